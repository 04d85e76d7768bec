"""amp_bf16: fp32 master weights, matmuls in bf16 under torch.autocast."""

from __future__ import annotations

from harness.techniques import BuildContext, Stage, technique
from harness.techniques.bf16 import bf16_supported, others


@technique("amp_bf16", stage=Stage.STEP, conflicts=others("amp_bf16"), supported=bf16_supported,
           not_estimated="autocast (its weight-cast cache and per-op dtypes) is not modelled")
def amp_bf16(ctx: BuildContext) -> None:
    """Mixed precision: weights, grads and optimizer state stay fp32 (no saving there);
    activations saved for backward are mostly bf16 (about half), but autocast caches a bf16
    copy of each weight for the duration of the forward, which adds up to half the fp32 weight
    bytes.
    """
    import torch  # imported on use: the registry (tables, `ls`) is read without torch

    ctx.autocast_dtype = torch.bfloat16
