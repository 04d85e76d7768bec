"""amp_fp16: fp32 master weights, matmuls in fp16 under torch.autocast, with a GradScaler."""

from __future__ import annotations

from harness.techniques import BuildContext, Stage, technique
from harness.techniques.bf16 import others


@technique("amp_fp16", stage=Stage.STEP, conflicts=others("amp_fp16"),
           not_estimated="autocast (its weight-cast cache and per-op dtypes) is not modelled")
def amp_fp16(ctx: BuildContext) -> None:
    """Mixed precision as amp_bf16 (fp32 weights, grads and state; fp16 activations and an fp16
    weight-cast cache), plus the GradScaler fp16 needs: the loss is scaled before backward and
    grads are unscaled before clipping; its own state is a few scalars.
    """
    import torch  # imported on use: the registry (tables, `ls`) is read without torch

    ctx.autocast_dtype = torch.float16
    ctx.grad_scaler = True
