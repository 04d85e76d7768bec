"""int8: LLM.int8 base weights (bitsandbytes 8-bit), for training adapters on top."""

from __future__ import annotations

from harness.techniques import BuildContext, Stage, technique
from harness.techniques.qlora import bnb_config, bnb_supported


@technique("int8", stage=Stage.LOAD, conflicts=("qlora", "fp16"), requires=("lora", "peft"),
           supported=bnb_supported,
           not_simulated="LLM.int8 keeps outlier columns (|x| > llm_int8_threshold) in 16 bit, "
                         "and how many there are depends on activation values, which fake "
                         "tensors do not have",
           not_estimated="LLM.int8 layers are not modelled")
def int8(ctx: BuildContext) -> None:
    """Base linear weights as int8 with per-row scales: about half of bf16's bytes. The frozen
    base trains adapters only (so it needs lora or a peft method, which then runs PEFT's k-bit
    preparation).
    """
    import torch

    ctx.load.quantization = bnb_config(load_in_8bit=True)
    ctx.load.dtype = ctx.load.dtype or torch.bfloat16  # the non-quantized weights
