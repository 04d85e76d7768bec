"""int4: bitsandbytes 4-bit (NF4) base weights, for a PEFT method's adapters on top — QLoRA's
quantization with any method (`qlora` is this with LoRA)."""

from __future__ import annotations

from harness.techniques import BuildContext, Stage, TechniqueArgError, technique
from harness.techniques.qlora import BNB_4BIT, bnb_supported, quantize_at_load, resolve_4bit


def _resolve(args: dict) -> dict:
    unknown = [k for k in args if k not in BNB_4BIT]
    if unknown:
        import difflib

        hint = difflib.get_close_matches(str(unknown[0]), BNB_4BIT, n=1)
        raise TechniqueArgError(f"unknown argument {unknown[0]!r} for BitsAndBytesConfig's "
                                "4-bit settings" + (f" (did you mean {hint[0]!r}?)" if hint
                                                     else ""), key=str(unknown[0]))
    return resolve_4bit(args)


@technique("int4", stage=Stage.LOAD, conflicts=("qlora", "int8", "fp16"),
           requires=("peft", "lora"), supported=bnb_supported, args=_resolve,
           not_estimated="4-bit weights under a PEFT method other than LoRA (qlora) are not "
                         "modelled",
           label=lambda args: f"int4({args['bnb_4bit_quant_type']})")
def int4(ctx: BuildContext, **args) -> None:
    """Base linear weights in 4-bit (NF4 by default, double-quantized, bf16 compute), as
    QLoRA loads them, under any PEFT method that has 4-bit layers: about a quarter of bf16's
    weight bytes. The method's adapters then train on top after PEFT's k-bit preparation,
    which up-casts the weights left unquantized (embeddings, norms, LM head) to fp32.
    """
    quantize_at_load(ctx, **args)


