"""liger: liger-kernel's Triton kernels patched into the model (RMSNorm, SwiGLU, RoPE, fused
linear cross-entropy), each switchable."""

from __future__ import annotations

from harness.techniques import BuildContext, Stage, TechniqueArgError, Unsupported, technique

_SWITCHES = {"rope": True, "rms_norm": True, "swiglu": True, "fused_linear_cross_entropy": True,
             "cross_entropy": False}  # liger-kernel's own defaults for Llama/Mistral/Qwen2


def _resolve(args: dict) -> dict:
    for key, value in args.items():
        if key not in _SWITCHES:
            raise TechniqueArgError(f"unknown switch {key!r}; liger has {', '.join(_SWITCHES)}",
                                    key=str(key))
        if not isinstance(value, bool):
            raise TechniqueArgError(f"must be true or false, got {value!r}", key=key)
    merged = {**_SWITCHES, **args}
    if merged["cross_entropy"] and merged["fused_linear_cross_entropy"]:
        raise TechniqueArgError("cross_entropy and fused_linear_cross_entropy exclude each other",
                                key="cross_entropy")
    return merged


def _check_stack(stack: dict[str, dict]) -> str | None:
    if stack["liger"]["fused_linear_cross_entropy"] and "chunked_nll" in stack:
        return ("fused_linear_cross_entropy and chunked_nll both replace the loss (chunked_nll's "
                "would run and Liger's never); set fused_linear_cross_entropy: false")
    return None


def _supported(device) -> str | None:
    if device.type != "cuda":
        return (f"liger-kernel's Triton kernels need a GPU; this run is on {device.type} "
                "(its patched forward fails without one)")
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"liger-kernel cannot be imported: {e}"
    return None


def _not_simulated(args: dict, device) -> str | None:
    """Simulated on the fake CUDA device only: Liger's kernels are Triton's, for CUDA."""
    if device is None or device.type != "cuda":
        return ("liger-kernel's Triton kernels run only on CUDA, and this simulation is on fake "
                "CPU tensors (--target cpu, or no fake CUDA device: see the record's notes)")
    return _supported(device)


def _label(args: dict) -> str:
    """`liger`, or with the switches that differ from Liger's defaults: `liger(-fused_linear_
    cross_entropy)`."""
    changed = [("+" if args[k] else "-") + k for k in _SWITCHES if k in args
               and args[k] != _SWITCHES[k]]
    return f"liger({', '.join(changed)})" if changed else "liger"


@technique("liger", stage=Stage.MODEL, args=_resolve, supported=_supported,
           check_stack=_check_stack, not_simulated=_not_simulated, label=_label,
           not_estimated="Liger's fused kernels are not modelled")
def liger(ctx: BuildContext, **switches) -> None:
    """Fused kernels: fused linear cross-entropy never materialises the [tokens, vocab] logits
    (the largest activation of a big-vocabulary model), RMSNorm/SwiGLU/RoPE kernels save fewer
    intermediates for backward. Applied to the base model before any adapter.
    """
    from liger_kernel.transformers import _apply_liger_kernel_to_instance
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    model_type = getattr(ctx.model.config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise Unsupported(f"liger-kernel has no kernels for model type {model_type!r}")
    _apply_liger_kernel_to_instance(model=ctx.model, **switches)
