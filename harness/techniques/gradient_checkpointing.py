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
    base = base_model(ctx.model)
    # use_reentrant=False: the reentrant form needs inputs that require grad and silently drops
    # grads of frozen-base (LoRA) models. (transformers 5 renamed gradient_checkpointing_enable.)
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
