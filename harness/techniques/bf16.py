"""bf16: weights created directly in bfloat16 (a load option, like `from_pretrained(dtype=...)`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from harness.techniques import BuildContext, Stage, technique

if TYPE_CHECKING:  # imported on use: the registry (tables, `ls`) is read without torch
    import torch

# One precision per variant: weight dtypes and autocast modes exclude each other.
PRECISIONS = ("bf16", "fp16", "amp_bf16", "amp_fp16")


def others(name: str) -> tuple[str, ...]:
    return tuple(p for p in PRECISIONS if p != name)


def bf16_supported(device: torch.device) -> str | None:
    import torch

    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return f"{torch.cuda.get_device_name(device)} has no bfloat16 support"
    return None


@technique("bf16", stage=Stage.LOAD, conflicts=others("bf16"), supported=bf16_supported,
           estimate=lambda stack, args: stack.update(weight_bytes=2))
def bf16(ctx: BuildContext) -> None:
    """Parameters, grads and AdamW state in bf16: each takes half the bytes of fp32.

    The model is built under bf16 as the default dtype, layer by layer, so the load phase never
    holds an fp32 copy. PEFT adapters added later stay fp32 (its autocast_adapter_dtype default).
    """
    import torch

    ctx.load.dtype = torch.bfloat16
