"""gradient_checkpointing: recompute each decoder layer in backward (non-reentrant)."""

from __future__ import annotations

from harness.techniques import BuildContext, Stage, base_model, technique


@technique("gradient_checkpointing", stage=Stage.MODEL,
           estimate=lambda stack, args: stack.update(checkpointing=True))
def gradient_checkpointing(ctx: BuildContext) -> None:
    """Activations drop from every layer's saved tensors to one hidden state per layer (plus one
    layer's worth, live while that layer is recomputed in backward); costs about one extra
    forward of compute.
    """
    enable(base_model(ctx.model))


def enable(base, offload: bool = False) -> None:
    """Non-reentrant checkpointing of every decoder layer: the reentrant form needs inputs that
    require grad and silently drops grads of frozen-base (LoRA) models. transformers 5.2x calls
    it `activation_checkpointing_enable` (the old name a deprecated alias); 5.17 and earlier
    have only `gradient_checkpointing_enable`, with the same arguments under the old names."""
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs,
                                             offload=offload)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs, offload=offload)
