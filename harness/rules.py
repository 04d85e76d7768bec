"""What people reach for instead of measuring, answered for a variant: accelerate's
`estimate-memory`, accelerate's `infer_auto_device_map` for a card, and the fine-tuning guides'
rule of thumb (docs/guide_worked_example.md). `compare-methods` puts each beside the simulated
or measured peak, with its error.

- accelerate: what `accelerate estimate-memory` prints as "Training using Adam" for the dtype
  the variant computes in (its mixed-precision dtype under autocast) — its own
  `calculate_maximum_sizes` of the model (built on meta, in fp32 as it builds it) and
  `estimate_training_usage`, the largest of its terms. No batch, no
  sequence length, no adapters; for int8 and int4 it has no training figure.
- device map: accelerate's `infer_auto_device_map` of the model's weights in their dtype
  against the card's usable memory — whether the weights alone load on the GPU, the question
  it answers; it says nothing of training.
- guide: the guides' arithmetic, weights (parameters × bytes of their dtype, half a byte for
  4-bit) plus AdamW's two fp32 moments per trainable parameter; the gradients, the
  activations (the worked example's 10–20 GB are for its own model only) and everything
  else left out, as the guides leave them.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

_ACCELERATE_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16",
                      torch.float16: "float16"}


def dtypes(uses) -> tuple[torch.dtype, torch.dtype, bool]:
    """(the dtype the weights are stored in, the one they are computed in, whether they are
    quantized): the stack's load options and its autocast dtype (mixed precision keeps fp32
    weights and computes in bf16 or fp16)."""
    from harness.techniques import BuildContext, Stage, apply_stage

    ctx = BuildContext(device=torch.device("meta"))
    apply_stage(Stage.LOAD, ctx, uses)
    apply_stage(Stage.STEP, ctx, uses)
    stored = ctx.load.dtype or torch.float32
    return stored, ctx.autocast_dtype or stored, ctx.load.quantization is not None


def answers(scenario, variant, reference: dict | None, gpu) -> dict[str, dict[str, Any]]:
    """{accelerate, guide: {status, peak_allocated_bytes, error}, device_map: {text}} for the
    variant; `reference`: its simulated or measured record's row (parameter counts), `gpu`:
    the card the device map is made for (gpus.Gpu)."""
    from harness.models import meta_model, resolve_config

    stored, computed, quantized = dtypes(variant.techniques)
    spec = scenario.model_of(variant)
    source = resolve_config(spec, scenario.path)
    out: dict[str, dict[str, Any]] = {}
    try:
        model = meta_model(spec, source)
    except Exception as e:  # noqa: BLE001 - no model, no answer from either tool
        reason = f"the model does not build on meta: {type(e).__name__}: {e}"
        none = {"status": "unsupported", "peak_allocated_bytes": None, "error": reason}
        return {"accelerate": none, "guide": dict(none), "device_map": {"text": None}}
    out["accelerate"] = _accelerate(model, computed, quantized)  # its "mixed precision"
    out["device_map"] = {"text": _device_map(model, stored, quantized, gpu)}
    out["guide"] = _guide(reference, stored, quantized)
    return out


def _accelerate(model, dtype: torch.dtype, quantized: bool) -> dict[str, Any]:
    from accelerate.commands.estimate import estimate_training_usage
    from accelerate.utils import calculate_maximum_sizes

    name = "int4" if quantized else _ACCELERATE_DTYPES.get(dtype)
    total, _ = calculate_maximum_sizes(model)
    usage = estimate_training_usage(total, name) if name else {}
    peak = max(usage.values(), default=-1)
    if peak < 0:
        return {"status": "unsupported", "peak_allocated_bytes": None,
                "error": f"accelerate estimate-memory has no training figure for {name or dtype}"}
    return {"status": "ok", "peak_allocated_bytes": int(peak), "error": None}


def _device_map(model, dtype: torch.dtype, quantized: bool, gpu) -> str:
    from accelerate import infer_auto_device_map
    from accelerate.utils import CustomDtype

    logging.getLogger("accelerate.utils.modeling").setLevel(logging.ERROR)  # "no device 0"
    placed = infer_auto_device_map(
        model, max_memory={0: gpu.usable_bytes(), "cpu": 2 ** 50},
        no_split_module_classes=model._no_split_modules,
        dtype=CustomDtype.INT4 if quantized else dtype)
    off = [name for name, where in placed.items() if where != 0]
    return f"{gpu.name}: all on the GPU" if not off else \
        f"{gpu.name}: {len(off)} of {len(placed)} modules on the CPU"


def _guide(reference: dict | None, dtype: torch.dtype, quantized: bool) -> dict[str, Any]:
    if reference is None or reference.get("params_total") is None:
        return {"status": "unsupported", "peak_allocated_bytes": None,
                "error": "no parameter counts: the reference did not build the model"}
    total, trainable = int(reference["params_total"]), int(reference["params_trainable"])
    quantized_params = int(reference.get("quantized_params") or 0) if quantized else 0
    size = torch.empty((), dtype=dtype).element_size()
    weights = (total - quantized_params) * size + quantized_params // 2
    return {"status": "ok", "peak_allocated_bytes": weights + 8 * trainable, "error": None}
