"""compile: torch.compile of the model, or of each decoder layer."""

from __future__ import annotations

import difflib
import shutil

from harness.techniques import (
    BuildContext,
    Stage,
    TechniqueArgError,
    Unsupported,
    base_model,
    technique,
)

SCOPES = ("model", "layers")
_DEFAULTS = {"backend": "inductor", "mode": "default", "scope": "model", "fullgraph": False,
             "dynamic": False}


def _resolve(args: dict) -> dict:
    import torch._dynamo
    from torch._inductor import list_mode_options

    for key in args:
        if key not in _DEFAULTS:
            raise TechniqueArgError(f"unknown argument {key!r}; compile takes "
                                    f"{', '.join(_DEFAULTS)}", key=str(key))
    merged = {**_DEFAULTS, **args}
    backends = torch._dynamo.list_backends(exclude_tags=())
    if merged["backend"] not in backends:
        hint = difflib.get_close_matches(str(merged["backend"]), backends, n=1)
        raise TechniqueArgError(f"unknown torch.compile backend {merged['backend']!r}" +
                                (f" (did you mean {hint[0]!r}?)" if hint else
                                 f"; this torch has {', '.join(sorted(backends))}"), key="backend")
    modes = list(list_mode_options())
    if merged["mode"] not in modes:
        raise TechniqueArgError(f"must be one of {', '.join(modes)}, got {merged['mode']!r}",
                                key="mode")
    if merged["mode"] != "default" and merged["backend"] != "inductor":
        raise TechniqueArgError(f"mode {merged['mode']!r} is an inductor mode; backend is "
                                f"{merged['backend']!r}", key="mode")
    if merged["scope"] not in SCOPES:
        raise TechniqueArgError(f"must be one of {', '.join(SCOPES)}, got {merged['scope']!r}",
                                key="scope")
    for key in ("fullgraph", "dynamic"):
        if not isinstance(merged[key], bool):
            raise TechniqueArgError(f"must be true or false, got {merged[key]!r}", key=key)
    return merged


def _check_stack(stack: dict[str, dict]) -> str | None:
    loss = stack.get("chunked_nll")
    if stack["compile"]["scope"] == "model" and loss and loss["impl"] == "harness":
        return ("scope: model compiles model(...), which chunked_nll's loss never calls (it runs "
                "the decoder and the LM head itself); use scope: layers")
    return None


def _inductor_missing(device) -> str | None:
    if device.type == "cpu":
        from torch._inductor import config

        compiler = config.cpp.cxx[1] if isinstance(config.cpp.cxx, tuple) else None
        if not any(shutil.which(c) for c in (compiler, "g++", "c++", "clang++") if c):
            return "inductor compiles C++ on CPU and no C++ compiler (g++, c++, clang++) is on PATH"
        return None
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "inductor generates Triton kernels on CUDA and Triton is not installed"
    return None


def _not_simulated(args: dict, device) -> str | None:
    """Inductor's own code generation runs on fake tensors (patches.compiled_code_traced):
    C++ for the CPU target, Triton for the fake CUDA device; the kernels are never built nor
    run, and the buffers the generated wrapper allocates and frees are in the trace. On a tiny
    Llama (bf16, 2 × 256) the CPU target equals a real compiled CPU run at the peak."""
    if device is None and args["backend"] == "inductor":
        return ("Inductor generates Triton code for CUDA, which needs the fake CUDA device, and "
                "this simulation is on fake CPU tensors (see the record's notes)")
    if args["mode"] in ("reduce-overhead", "max-autotune"):
        return (f"mode {args['mode']!r} replays CUDA graphs from their own memory pool, which "
                "the simulation does not model; measure it")
    return None


def _simulated_notes(args: dict, device) -> list[str]:
    """What a simulated compile figure assumes, for the record's notes."""
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    breaks = sum(counters["graph_break"].values())
    notes = [f"compiled by {args['backend']} on fake tensors: the generated wrapper's buffers "
             f"are traced, its kernels never run; Dynamo made {graphs} graph(s) with {breaks} "
             "graph break(s); warmup_s is the warm-up step's wall time here, Inductor's compile "
             "of the layers simulated included"]
    if graphs == 0:
        notes.append("Dynamo compiled nothing (every frame fell back to eager at a graph break, "
                     "e.g. a torch.compiler.disable'd library call inside a checkpointed layer): "
                     "the figure is the eager step's, as a GPU run of this stack would be")
    if device.type == "cuda" and args["backend"] == "inductor":
        notes.append("Inductor on the fake CUDA device: Triton kernels generated for the "
                     "simulated GPU, autotuning off (one config per kernel, no benchmark "
                     "clones), joint-graph constant folding off")
    return notes


@technique("compile", stage=Stage.MODEL, args=_resolve, check_stack=_check_stack,
           needs_warmup=True, not_simulated=_not_simulated, simulated_notes=_simulated_notes,
           not_estimated="what compiled kernels allocate is known only by running them")
def compile(ctx: BuildContext, backend: str, mode: str, scope: str, fullgraph: bool,
            dynamic: bool) -> None:
    """torch.compile (in place, `nn.Module.compile`): inductor fuses elementwise chains into one
    kernel, so their intermediates are never materialised, and AOTAutograd's partitioner picks
    what forward saves for backward — cheap ops are recomputed rather than saved. The effect is
    largest where eager keeps many same-sized temporaries (the fp32 up-cast of the logits and the
    cross-entropy around it); compilation itself runs in the warm-up step.

    scope: model — the model the loop calls, as `Trainer(torch_compile=True)` does;
    scope: layers — each decoder layer on its own, as torchtune does (works with chunked_nll,
    whose loss calls the decoder and the LM head directly).
    """
    if backend == "inductor":
        reason = _inductor_missing(ctx.device)
        if reason:
            raise Unsupported(reason)
    options = {"backend": backend, "fullgraph": fullgraph, "dynamic": dynamic}
    if backend == "inductor":
        options["mode"] = mode
    if scope == "model":
        ctx.model.compile(**options)
        return
    layers = getattr(base_model(ctx.model).get_decoder(), "layers", None)
    if layers is None:
        raise Unsupported(f"scope: layers needs a decoder with .layers; "
                          f"{type(base_model(ctx.model)).__name__} has none")
    for layer in layers:
        layer.compile(**options)
