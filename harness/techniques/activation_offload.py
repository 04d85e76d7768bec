"""activation_offload: gradient checkpointing whose saved layer inputs live in host RAM."""

from __future__ import annotations

from harness.techniques import BuildContext, Stage, base_model, technique


def _needs_a_gpu(device) -> str | None:
    if device.type != "cuda":
        return (f"offloading moves saved activations from GPU memory to host RAM; on a "
                f"{device.type} run host RAM is the measured memory, so the effect cannot show")
    return None


@technique("activation_offload", stage=Stage.MODEL,
           conflicts=("gradient_checkpointing",), supported=_needs_a_gpu,
           not_simulated="host-RAM offload needs a real device to offload from",
           not_estimated="offloaded activations are not modelled")
def activation_offload(ctx: BuildContext) -> None:
    """Checkpointing as gradient_checkpointing, and the one hidden state kept per layer is copied
    to (pinned) host memory in forward and back in backward: GPU activations fall to about one
    layer's worth, at the cost of host↔device copies.
    """
    from harness.techniques.gradient_checkpointing import enable

    enable(base_model(ctx.model), offload=True)  # non-reentrant, as gradient_checkpointing
