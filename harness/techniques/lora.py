"""lora: PEFT LoRA adapters on a frozen base model."""

from __future__ import annotations

import math

from harness.techniques import (
    BuildContext,
    Stage,
    Unsupported,
    adapted_targets,
    dataclass_args,
    lora_label,
    peft_args,
    said,
    technique,
)


def _peft():
    import peft  # imported on use: it costs seconds, and pulls in bitsandbytes

    return peft


_RESERVED = ("task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
             "revision", "inference_mode")


def _init_of(args: dict) -> str | None:
    init = args.get("init_lora_weights")
    return init.lower() if isinstance(init, str) else None


# Data-driven initialisations: each runs the model on data before (CorDA, LoRA-GA) or after
# (EVA) PEFT builds the adapters, here on the step's own micro-batches, inside the load phase.
DATA_DRIVEN = ("corda", "lora_ga", "eva")


def init_not_simulated(args: dict, device=None) -> str | None:
    """Initialisations that read values a simulation does not have: PiSSA, OLoRA and MiCA
    decompose each adapted weight (an SVD, a QR) as the adapters are built; EVA, CorDA and
    LoRA-GA decompose what the model computes on data."""
    init = _init_of(args)
    if init and (init.startswith("pissa") or init in ("olora", "mica")):
        return (f"init_lora_weights {init!r} decomposes each adapted weight as it is built, "
                "whose values a simulation's meta build does not have; measure it "
                "(--device cpu or cuda)")
    if init in DATA_DRIVEN:
        return (f"init_lora_weights {init!r} decomposes what the model computes on data, "
                "values a simulation does not have; measure it (--device cpu or cuda)")
    return None


def _check_targets(model, args: dict) -> str | None:
    """Names in target_modules and modules_to_save must match some module, and the rank must
    fit in the layers it adapts: PEFT takes an `r` above a layer's smaller side, which only
    adds parameters that cannot raise the rank."""
    modules = [n for n, _ in model.named_modules()]
    saved = args.get("modules_to_save")
    if isinstance(saved, (list, tuple)) and _unmatched(modules, saved):
        return f"modules_to_save {_unmatched(modules, saved)} match no module of this model"
    parameters = args.get("target_parameters")
    if isinstance(parameters, (list, tuple)):
        missing = _unmatched([n for n, _ in model.named_parameters()], parameters)
        if missing:
            return f"target_parameters {missing} match no parameter of this model; " + \
                _loose_parameters(model)
    targets = args.get("target_modules")
    if targets is None and not parameters and _no_default_targets(model):
        return (f"PEFT has no default target_modules for model_type "
                f"{model.config.model_type!r}: name them (or all-linear); its linear layers: "
                f"{', '.join(_linear_names(model))}")
    if not isinstance(targets, (list, tuple)):
        return None  # None: PEFT's per-architecture default; a str is a regex PEFT checks itself
    if not all(isinstance(t, str) and t for t in targets):
        return f"target_modules must be module names, got {targets!r}"
    missing = _unmatched(modules, targets)
    if missing:
        return (f"target_modules {missing} match no module of this model; "
                f"its linear layers: {', '.join(_linear_names(model))}")
    sides = [min(m.in_features, m.out_features) for n, m in model.named_modules()
             if hasattr(m, "in_features") and any(_names(n, t) for t in targets)]
    r = args.get("r")
    if sides and isinstance(r, int) and r > min(sides):
        return (f"r {r} is above the smallest adapted layer's smaller side ({min(sides)}): "
                "such a rank adds parameters, not rank")
    return None


def _names(module_name: str, given: str) -> bool:
    """Whether a name in a LoRA config stands for this module: PEFT matches the whole name or
    its last parts (`q_proj`, `self_attn.q_proj`)."""
    return module_name == given or module_name.endswith("." + given)


def _linear_names(model) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if type(m).__name__ == "Linear"})


def _no_default_targets(model) -> bool:
    """Whether PEFT lacks a default target_modules for this architecture (Phi-3's fused
    qkv_proj, Starcoder2): its own error would not say what to name instead."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    return getattr(getattr(model, "config", None), "model_type", None) not in DEFAULTS


def _loose_parameters(model) -> str:
    """What target_parameters can name: parameters held outside linear, embedding and norm
    layers (a mixture-of-experts' 3-D expert weights)."""
    loose = sorted({".".join(f"{module}.{param}".split(".")[-2:])
                    for module, m in model.named_modules()
                    for param, p in m.named_parameters(recurse=False)
                    if p.dim() >= 2 and type(m).__name__ not in ("Linear", "Embedding")})
    return (f"parameters it can name: {', '.join(loose)}" if loose else
            "it has none outside its linear and embedding layers (use target_modules)")


def _unmatched(names: list[str], given) -> list[str]:
    """What of `given` no module (or parameter) name in `names` stands for."""
    return [g for g in given if not any(_names(n, g) for n in names)]


# What LoraConfig takes unchecked: a negative dropout is no dropout, a negative alpha flips
# the adapters' sign.
RANGES = {"lora_dropout": (0, 1), "lora_alpha": (0, math.inf)}
# LoRA arguments the estimate's arithmetic does not depend on; any other one must keep its default.
_ESTIMATE_NEUTRAL = {"r", "lora_alpha", "lora_dropout", "target_modules"}


def estimate_lora(stack: dict, args: dict, neutral: frozenset[str] = frozenset()) -> None:
    """LoRA's part of the closed-form estimate: adapters on the named linears, the base frozen."""
    import dataclasses

    from harness.estimate import LINEARS, PEFT_DEFAULT_TARGETS, NotModelled

    defaults = {f.name: f.default for f in dataclasses.fields(_peft().LoraConfig)}
    for key, value in args.items():
        if key not in _ESTIMATE_NEUTRAL | neutral and key in defaults and value != defaults[key]:
            raise NotModelled(f"LoRA {key}={value!r} is not modelled (only its default)")
    targets = args.get("target_modules") or PEFT_DEFAULT_TARGETS
    if targets == "all-linear":
        targets = LINEARS
    if isinstance(targets, str) or not set(targets) <= set(LINEARS):
        raise NotModelled(f"target_modules {targets!r}: the estimate knows the decoder "
                          "layers' linears by name, or all-linear")
    stack.update(trainable_base=False, targets=tuple(t for t in LINEARS if t in targets),
                 rank=args["r"], dropout=bool(args.get("lora_dropout")))


@technique("lora", stage=Stage.MODEL, adapters=True, check_model=_check_targets,
           not_simulated=init_not_simulated, estimate=estimate_lora,
           label=lambda args: lora_label("lora", args),
           args=dataclass_args(lambda: _peft().LoraConfig, reserved=_RESERVED,
                               shown=("r", "lora_alpha", "lora_dropout", "target_modules"),
                               aliases={"rank": "r", "alpha": "lora_alpha",
                                        "dropout": "lora_dropout", "targets": "target_modules"},
                               ranges=RANGES))
def lora(ctx: BuildContext, **args) -> None:
    """Only the adapters train: grads and AdamW state shrink to the adapters' (well under 1 % of
    the base for r=16 on q/v), parameters barely change. Activations do not shrink: the frozen
    base still saves what backward needs to reach the adapters.
    """
    add_lora(ctx, args, prepare_kbit=True)


def add_lora(ctx: BuildContext, args: dict, prepare_kbit: bool, name: str = "lora") -> None:
    """LoRA on ctx.model; on a quantized base, PEFT's k-bit preparation first (if chosen), and
    its fp32 up-cast of the non-quantized weights with it. Gradient checkpointing stays its own
    technique: the preparation is asked not to turn it on. An initialisation from the weights
    (PiSSA, OLoRA, MiCA) runs as PEFT builds the adapters, inside the load phase."""
    peft = _peft()
    init = _init_of(args)
    quantized = getattr(ctx.model, "is_quantized", False)
    if quantized and prepare_kbit:
        ctx.model = peft.prepare_model_for_kbit_training(ctx.model,
                                                         use_gradient_checkpointing=False)
    try:
        config = peft.LoraConfig(task_type=ctx.load.task_type,
                                 **peft_args(ctx, peft.LoraConfig, args))
        if init in DATA_DRIVEN:
            ctx.model = _from_data(ctx, config, init)
        else:
            ctx.model = peft.get_peft_model(ctx.model, config)
    except ImportError as e:  # LoftQ: scipy; CorDA: attrs
        raise Unsupported(f"{name}: {said(e)}") from None
    config = ctx.model.peft_config["default"]
    ctx.resolved[name] = {"target_modules": adapted_targets(ctx.model, config)}


def _from_data(ctx: BuildContext, config, init: str):
    """The adapted model, its adapters initialised from the model's own computation on the
    step's micro-batches (PEFT's calls, as its docs give them): CorDA's covariance of each
    adapted layer's inputs, one sequence per forward, before the adapters are built; LoRA-GA's
    gradient of each adapted weight, before; EVA's incremental SVD of those inputs, cycling
    the batches until it converges, after (the adapters built empty). Train mode restored."""
    peft = _peft()
    if ctx.batches is None:
        raise Unsupported(f"init_lora_weights {init!r} needs data: it is built only for a step")
    model, batches = ctx.model, ctx.batches()
    if config.target_modules is None:  # what get_peft_model would fill; CorDA needs it before
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

        config.target_modules = set(DEFAULTS[model.config.model_type])
    training = model.training
    try:
        if init == "corda":
            from peft.tuners.lora.corda import preprocess_corda

            def run_model():
                for batch in batches:
                    for row in batch["input_ids"]:  # CorDA's hook takes one sequence
                        model(input_ids=row[None])

            preprocess_corda(model, config, run_model=run_model)
            return peft.get_peft_model(model, config)
        if init == "lora_ga":
            if config.lora_ga_config is None:  # its defaults, as PEFT gives EVA and CorDA theirs
                config.lora_ga_config = peft.LoraGAConfig()

            def train_step():
                for batch in batches:
                    model(**batch).loss.backward()

            peft.preprocess_loraga(model, config, train_step=train_step)
            return peft.get_peft_model(model, config)
        adapted = peft.get_peft_model(model, config, low_cpu_mem_usage=True)
        peft.initialize_lora_eva_weights(adapted, batches, show_progress_bar=False)
        return adapted
    except ValueError as e:  # what PEFT refuses here: LoRA-GA on a quantized base
        raise Unsupported(f"init_lora_weights {init!r}: {said(e)}") from None
    finally:
        model.train(training)
