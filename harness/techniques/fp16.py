"""fp16: weights created directly in float16 (pure half precision, no loss scaling)."""

from __future__ import annotations

from harness.techniques import BuildContext, Stage, technique
from harness.techniques.bf16 import others


@technique("fp16", stage=Stage.LOAD, conflicts=others("fp16"),
           estimate=lambda stack, args: stack.update(weight_bytes=2))
def fp16(ctx: BuildContext) -> None:
    """Parameters, grads and AdamW state in fp16: half the bytes of fp32, as bf16.

    Same memory as bf16; pure fp16 training without a loss scaler is numerically fragile, which
    is why amp_fp16 exists. Kept for GPUs without bf16 (V100, T4).
    """
    import torch  # imported on use: the registry (tables, `ls`) is read without torch

    ctx.load.dtype = torch.float16
