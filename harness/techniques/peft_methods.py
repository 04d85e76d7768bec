"""peft: any PEFT method by its PEFT name, its arguments as that method's config class spells
them — `{peft: {method: ia3, target_modules: [k_proj, v_proj, down_proj]}}`."""

from __future__ import annotations

import dataclasses
import difflib

from harness.techniques import (
    BuildContext,
    Stage,
    TechniqueArgError,
    Unsupported,
    adapted_targets,
    dataclass_args,
    lora_label,
    peft_args,
    said,
    technique,
)
from harness.techniques.lora import (
    _RESERVED,
    RANGES,
    _check_targets,
    _peft,
    _unmatched,
    add_lora,
    estimate_lora,
    init_not_simulated,
)

# What a method's config is asked to show in the record (those of its fields it has): what
# tells two runs of one method apart.
_SHOWN = ("r", "target_modules", "num_virtual_tokens")
# Config fields PEFT fills from the model when it builds the method (the prompt-learning
# methods' sizes; every method's default target modules for known architectures).
_FILLED_BY_PEFT = frozenset({"token_dim", "encoder_hidden_size", "target_modules"})
# Methods PEFT has whose training this harness's step cannot drive, and why. Everything else in
# PEFT's registry runs, or ends as PEFT (or a missing package) says.
NOT_BUILT = {
    "xlora": "X-LoRA mixes LoRA adapters trained before (its `adapters`: folders on disk) "
             "through a learned gate; the harness trains one method from scratch",
    "poly": "Poly routes each sample by its task id (`task_ids` in every batch), which the "
            "harness's single-task batches do not have",
    "multitask_prompt_tuning": "multi-task prompt tuning picks a prompt by each sample's task "
                               "id (`task_ids` in every batch), which the harness's "
                               "single-task batches do not have",
}


def needed_args(cls) -> list[str]:
    """A config class's fields typed as required but None by default, that PEFT does not fill
    from the model: prompt tuning's num_virtual_tokens, adaption prompt's adapter_len and
    adapter_layers."""
    return [f.name for f in dataclasses.fields(cls) if f.init and f.default is None
            and f.name not in _FILLED_BY_PEFT
            and not any(mark in str(f.type) for mark in ("None", "Optional", "Any"))]


def methods() -> dict[str, type]:
    """PEFT's own registry of methods: name (its PeftType's value, lower case) → config class."""
    return {t.value.lower(): cls for t, cls in _peft().PEFT_TYPE_TO_CONFIG_MAPPING.items()}


def _resolve(args: dict) -> dict:
    method = args.get("method")
    if not isinstance(method, str) or not method:
        raise TechniqueArgError("needs method: a PEFT method's name (harness ls lists them)",
                                key="method")
    known = methods()
    name = method.lower()
    if name not in known:
        hint = difflib.get_close_matches(name, known, n=1)
        raise TechniqueArgError(
            f"PEFT {_peft().__version__} has no method {method!r}" +
            (f" (did you mean {hint[0]!r}?)" if hint else " (harness ls lists them)"),
            key="method")
    rest = {k: v for k, v in args.items() if k != "method"}
    if name == "trainable_tokens":
        from harness.techniques.trainable_tokens import _resolve as tokens

        return {"method": name, **tokens(rest)}
    cls = known[name]
    if name in NOT_BUILT:  # the run says why (unsupported)
        return {"method": name, **rest}
    needed = [f for f in needed_args(cls) if f not in rest]
    if needed:
        raise TechniqueArgError(f"{cls.__name__} needs {', '.join(needed)} (no default)",
                                key=needed[0])
    # Built as a causal LM's config (CPT takes no other task), which the harness sets for all;
    # a package the method needs (AdaMSS: scikit-learn) leaves it to the run (unsupported).
    shown = tuple(f.name for f in dataclasses.fields(cls) if f.name in _SHOWN)
    resolve = dataclass_args(lambda: cls, reserved=_RESERVED, defaults={"task_type": "CAUSAL_LM"},
                             shown=shown,
                             ranges=RANGES if name == "lora" else ())
    resolved = resolve(rest)
    del resolved["task_type"]
    return {"method": name, **resolved}


def _check(model, args: dict) -> str | None:
    """LoRA as the lora technique checks it; any other method: the modules it names exist
    (what else its arguments mean, PEFT checks when the validation builds it on meta)."""
    method, rest = args["method"], {k: v for k, v in args.items() if k != "method"}
    if method == "lora":
        return _check_targets(model, rest)
    targets = rest.get("target_modules")
    if isinstance(targets, (list, tuple)):
        missing = _unmatched([n for n, _ in model.named_modules()], [str(t) for t in targets])
        if missing:
            return f"target_modules {missing} match no module of this model"
    return None


def _estimate(stack: dict, args: dict) -> None:
    from harness.estimate import NotModelled

    if args["method"] != "lora":
        raise NotModelled(f"PEFT's {args['method']} has no closed form in the estimate "
                          "(simulate it: it runs on fake tensors)")
    estimate_lora(stack, {k: v for k, v in args.items() if k != "method"})


def _label(args: dict) -> str:
    """`ia3(k/v/down)`, `prompt_tuning(200 tokens)`, `lora(r=32, q/v)`: the method's name and
    what tells its runs apart."""
    rest = {k: v for k, v in args.items() if k != "method"}
    label = lora_label(args["method"], rest)
    tokens = rest.get("num_virtual_tokens")
    if tokens:
        label = (label[:-1] + f", {tokens} tokens)") if label.endswith(")") else \
            f"{label}({tokens} tokens)"
    return label


def _not_simulated(args: dict, device=None) -> str | None:
    return init_not_simulated(args) if args["method"] == "lora" else None


@technique("peft", stage=Stage.MODEL, adapters=True,
           conflicts=("lora", "qlora", "trainable_tokens"), not_simulated=_not_simulated,
           args=_resolve, check_model=_check, estimate=_estimate, label=_label)
def peft_method(ctx: BuildContext, method: str, **args) -> None:
    """Any PEFT method, through PEFT's own registry and `get_peft_model`: what trains, and what
    it adds to every step, is the method's — IA³ and LN tuning train a few thousand values yet
    keep the base's activations, prompt tuning lengthens every sequence by its virtual tokens,
    OFT/BOFT multiply weights by trained rotations, VeRA shares frozen random matrices.
    """
    if method in NOT_BUILT:
        raise Unsupported(f"peft {method}: {NOT_BUILT[method]}")
    if method == "lora":  # the lora technique's own path: the same model, spelled long
        add_lora(ctx, args, prepare_kbit=True, name="peft")
        return
    peft = _peft()
    quantized = getattr(ctx.model, "is_quantized", False)
    if quantized:  # int4 / int8: as QLoRA prepares its base
        ctx.model = peft.prepare_model_for_kbit_training(ctx.model,
                                                         use_gradient_checkpointing=False)
    try:
        config = methods()[method](task_type=ctx.load.task_type,
                                   **peft_args(ctx, methods()[method], args))
        ctx.model = peft.get_peft_model(ctx.model, config)
    except ImportError as e:  # a package the method needs (AdaMSS: scikit-learn)
        raise Unsupported(f"peft {method}: {said(e)}") from None
    except (ValueError, TypeError, RuntimeError) as e:  # NotImplementedError among them
        if quantized:
            # The arguments built a config (checked first): what fails now is the method on
            # bitsandbytes' layers, in PEFT's words ("GLoRA does not support this layer type").
            raise Unsupported(f"peft {method} on quantized weights: PEFT says {said(e, 200)}") \
                from None
        if isinstance(e, (NotImplementedError, RuntimeError)) and "meta" in str(e) and \
                _on_meta(ctx.model):
            # The build a simulation (and validation) makes holds no values to decompose.
            raise Unsupported(
                f"peft {method}: its initialisation reads the base weights' values "
                f"({said(e, 200)}), which a model built on the meta device, as a simulation builds "
                "it, does not have; measure it (--device cpu or cuda)") from None
        raise
    if quantized:
        ctx.after_build.append(lambda model: _computes_on_quantized(model, method))
    if method == "adalora":  # its loop's part, as PEFT documents it: after each step
        ctx.after_optimizer_step.append(ctx.model.base_model.update_and_allocate)
    built = ctx.model.peft_config["default"]
    targets = getattr(built, "target_modules", None)
    if isinstance(targets, (set, frozenset, list, tuple)):
        ctx.resolved["peft"] = {"target_modules": adapted_targets(ctx.model, built)}


def _on_meta(model) -> bool:
    return any(p.is_meta for p in model.parameters())


def virtual_tokens(model) -> dict | None:
    """The tokens a PEFT method adds to every sequence (record.ModelPart.virtual_tokens), from
    the built model's own config; None for a method that adds none, or no PEFT model."""
    config = getattr(model, "active_peft_config", None)
    if config is None:
        return None
    if getattr(config, "is_adaption_prompt", False):
        return {"count": config.adapter_len, "where": "attention", "layers": config.adapter_layers}
    if not config.is_prompt_learning:
        return None
    # As PeftModelForCausalLM.forward: these two pass their tokens as past keys and values,
    # every other prompt-learning method prepends them to the input embeddings.
    kinds = _peft().PeftType
    prefix = config.peft_type in (kinds.PREFIX_TUNING, getattr(kinds, "CARTRIDGE", None))
    return {"count": config.num_virtual_tokens, "where": "attention" if prefix else "sequence"}


def _computes_on_quantized(model, method: str) -> None:
    """Whether the method's layers compute with bitsandbytes' weights. PEFT wraps any linear
    layer with any method, but only some methods' layers read a quantized base through
    bitsandbytes (PEFT's `bnb` layers, or a layer that only calls its base); others take the
    packed uint8 weight for the matrix (HRA, LoHa, LoKr, …). One token's forward without grad
    tells, in the load phase: unsupported, in PEFT's and torch's words, where it cannot."""
    import torch

    wrapped = [m for m in model.modules() if hasattr(m, "get_base_layer") and m is not model
               and type(m.get_base_layer()).__module__.startswith("bitsandbytes")]
    if not wrapped or all(type(m).__module__.endswith(".bnb") for m in wrapped):
        return
    from torch._subclasses.fake_tensor import (
        DataDependentOutputException,
        DynamicOutputShapeException,
    )

    device = next(p.device for p in model.parameters())
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device))
    except (DataDependentOutputException, DynamicOutputShapeException):
        raise  # a value the simulation does not have: it says so (train.measure)
    except (RuntimeError, TypeError, ValueError) as e:
        raise Unsupported(f"peft {method} on quantized weights: its layers do not compute "
                          f"with bitsandbytes' packed weights ({said(e, 200)})") from None
