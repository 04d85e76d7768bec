"""qlora: bitsandbytes 4-bit base weights + LoRA adapters, PEFT's k-bit training preparation."""

from __future__ import annotations

from harness.techniques import (
    BuildContext,
    Stage,
    TechniqueArgError,
    Unsupported,
    dataclass_args,
    lora_label,
    technique,
)
from harness.techniques.lora import (
    _RESERVED,
    RANGES,
    _check_targets,
    _peft,
    add_lora,
    estimate_lora,
    init_not_simulated,
)

# BitsAndBytesConfig's 4-bit arguments, spelled as it spells them, with QLoRA's usual values.
BNB_4BIT = {"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": None}
_LORA = dataclass_args(lambda: _peft().LoraConfig, reserved=_RESERVED,
                       shown=("r", "lora_alpha", "lora_dropout", "target_modules"), ranges=RANGES)


def bnb_supported(device) -> str | None:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # noqa: BLE001 - a missing native library, an unsupported CPU
        return f"bitsandbytes cannot be imported: {e}"
    return None


def bnb_config(**kwargs):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(**kwargs)


def _resolve(args: dict) -> dict:
    bnb = {k: v for k, v in args.items() if k in BNB_4BIT}
    prepare = args.get("prepare_model_for_kbit_training", True)
    if not isinstance(prepare, bool):
        raise TechniqueArgError(f"must be true or false, got {prepare!r}",
                                key="prepare_model_for_kbit_training")
    lora = {k: v for k, v in args.items()
            if k not in BNB_4BIT and k != "prepare_model_for_kbit_training"}
    return {**resolve_4bit(bnb), "prepare_model_for_kbit_training": prepare, **_LORA(lora)}


def resolve_4bit(bnb: dict) -> dict:
    """BitsAndBytesConfig's 4-bit settings (keys of BNB_4BIT), QLoRA's values where not given,
    checked by BitsAndBytesConfig itself (qlora and int4)."""
    if bnb.get("bnb_4bit_quant_type", "nf4") not in ("nf4", "fp4"):
        raise TechniqueArgError(f"must be nf4 or fp4, got {bnb['bnb_4bit_quant_type']!r}",
                                key="bnb_4bit_quant_type")
    merged = {**BNB_4BIT, **bnb}
    try:
        bnb_config(load_in_4bit=True, **merged)
    except Exception as e:  # noqa: BLE001 - BitsAndBytesConfig's own checks
        raise TechniqueArgError(" ".join(str(e).split())) from None
    return merged


def quantize_at_load(ctx: BuildContext, **args) -> None:
    import torch

    bnb = {k: args[k] for k in BNB_4BIT}
    ctx.load.quantization = bnb_config(load_in_4bit=True, **bnb)
    # Non-quantized weights (embeddings, norms, LM head) are created in the compute dtype.
    ctx.load.dtype = ctx.load.dtype or getattr(torch, args["bnb_4bit_compute_dtype"])


def _estimate(stack: dict, args: dict) -> None:
    from harness.estimate import BYTES, NotModelled

    estimate_lora(stack, args, neutral=frozenset({*BNB_4BIT, "prepare_model_for_kbit_training"}))
    if args["bnb_4bit_quant_storage"] != "uint8" or args.get("llm_int8_skip_modules"):
        raise NotModelled("4-bit storage other than uint8, or skipped modules, is not modelled")
    compute = BYTES.get(args["bnb_4bit_compute_dtype"])
    if compute is None:
        raise NotModelled(f"bnb_4bit_compute_dtype {args['bnb_4bit_compute_dtype']}")
    # PEFT's k-bit preparation up-casts the non-quantized weights to fp32.
    stack.update(weight_bytes=4 if args["prepare_model_for_kbit_training"] else compute,
                 quantized=True, double_quant=args["bnb_4bit_use_double_quant"])


def _check_compute(stack: dict[str, dict]) -> str | None:
    """bf16 loads the weights QLoRA leaves unquantized (embeddings, norms, LM head) in
    bfloat16: a float16 or float32 compute dtype then mixes two dtypes in every layer."""
    compute = stack["qlora"]["bnb_4bit_compute_dtype"]  # resolved: the default filled in
    if "bf16" in stack and compute != "bfloat16":
        return (f"bnb_4bit_compute_dtype {compute} with bf16 (weights in bfloat16) mixes dtypes: "
                "use bnb_4bit_compute_dtype: bfloat16, or drop bf16")
    return None


def _not_simulated(args: dict, device) -> str | None:
    """QDoRA: DoRA's weight norm dequantizes each 4-bit weight through a deep copy of
    bitsandbytes' Params4bit, which cannot be copied on the meta device a simulation builds on
    (RuntimeError from `set_data`); a real run, CPU or CUDA, trains it."""
    if args.get("use_dora"):
        return ("DoRA on 4-bit weights (QDoRA) deep-copies bitsandbytes' Params4bit for the "
                "weight norm, which bitsandbytes cannot do on the meta device; measure it "
                "(--device cpu or cuda)")
    return init_not_simulated(args)


@technique("qlora", stage=Stage.MODEL, adapters=True, conflicts=("lora", "int8", "fp16"),
           check_stack=_check_compute, not_simulated=_not_simulated,
           estimate=_estimate, label=lambda args: lora_label("qlora", args),
           parallel_unsupported={"fsdp2": (
               "QLoRA under FSDP2 (bitsandbytes 4-bit weights sharded as uint8 DTensors, "
               "quant_storage matched to the compute dtype) is not built into the harness yet")},
           args=_resolve, load=quantize_at_load, supported=bnb_supported,
           check_model=_check_targets)
def qlora(ctx: BuildContext, prepare_model_for_kbit_training: bool, **args) -> None:
    """Base linear weights in 4-bit NF4 (≈ 0.5 byte per weight plus block constants, about a
    quarter to a third of bf16's bytes); LoRA adapters train in fp32 on top. PEFT's
    prepare_model_for_kbit_training (default on) up-casts every non-quantized weight —
    embeddings, norms, LM head — to fp32: that costs memory, so it is an explicit argument.
    The linear layers dequantize their weight for each matmul, in forward and in backward.
    """
    if not getattr(ctx.model, "is_quantized", False):
        raise Unsupported("the model did not load quantized")
    lora_args = {k: v for k, v in args.items() if k not in BNB_4BIT}
    add_lora(ctx, lora_args, prepare_model_for_kbit_training, name="qlora")
