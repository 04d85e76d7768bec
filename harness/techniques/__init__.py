"""The technique registry: each technique is one small function in its own module.

A technique only changes the `BuildContext` (load options, the model, autocast, ...). It never
runs training and never reads the scenario file. Each declares the `Stage` where it applies, and
`APPLY_ORDER` below is the one place that says what applies before what, so the order in the
YAML does not matter: LOAD techniques before the model is built, MODEL techniques to the built
model, STEP techniques to how the step runs.

What a technique can do is declared on it, never kept in a list of names elsewhere: whether the
device can run it (`supported`), why it cannot be simulated (`not_simulated`), its closed-form
estimate (`estimate`, or `not_estimated` with the reason: the estimate then says "not
modelled", never ok), the parallel strategies it cannot run under (`parallel_unsupported`) and
its table label (`label`: the arguments that tell two rows apart). Optimizers
(harness/optimizers.py) declare the same capabilities.

Adding one: a new module here with

    @technique("name", stage=Stage.MODEL, conflicts=("other",), args=resolver)
    def name(ctx: BuildContext, **args) -> None:
        \"\"\"Expected memory effect, and why.\"\"\"

its name in `APPLY_ORDER`, and an import line at the bottom of this file.
"""

from __future__ import annotations

import difflib
import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class Stage(enum.IntEnum):
    LOAD = 0  # how weights are created (dtype, quantization): a load option, as from_pretrained
    MODEL = 1  # transforms of the built model (adapters, checkpointing)
    STEP = 2  # how each step runs (autocast)


class TechniqueArgError(ValueError):
    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.message, self.key = message, key


class Unsupported(RuntimeError):
    """This device or the installed libraries cannot run the technique: a result, not bad input."""


@dataclass(frozen=True)
class TechniqueUse:
    """One entry of a variant's technique list, arguments resolved (defaults filled in)."""

    name: str
    args: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class LoadOptions:
    dtype: torch.dtype | None = None  # None: float32
    quantization: Any = None  # a transformers BitsAndBytesConfig: weights quantized at load
    # transformers' auto class (models.HEADS): an objective's (a reward model is a sequence
    # classifier, one score a sequence)
    head: str = "causal_lm"

    @property
    def task_type(self) -> str:
        """PEFT's task type for this head (a classifier's score head then trains too)."""
        return "SEQ_CLS" if self.head == "sequence_classification" else "CAUSAL_LM"


@dataclass
class BuildContext:
    device: torch.device
    load: LoadOptions = field(default_factory=LoadOptions)
    model: Any = None  # set between the LOAD and MODEL stages
    # What the loop calls for the loss, when not the model itself (DDP's wrapper; parallel.py).
    forward_module: Any = None
    autocast_dtype: torch.dtype | None = None
    grad_scaler: bool = False  # fp16 autocast: scale the loss, unscale grads before clipping
    # (model, batch) → loss; None: the model's own loss, `model(**batch).loss`.
    loss_fn: Callable[[Any, dict], Any] | None = None
    # Called with the finished model (on its device, under the probe, in the load phase): a
    # check only a built model can answer (whether a method computes on 4-bit weights),
    # raising Unsupported.
    after_build: list[Callable[[Any], None]] = field(default_factory=list)
    # Called with the step's index after each optimizer step, its grads still there: what a
    # method's training loop must run then (AdaLoRA's rank allocation).
    after_optimizer_step: list[Callable[[int], None]] = field(default_factory=list)
    # Arguments a technique could only resolve once applied (e.g. LoRA's default target modules).
    resolved: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The step's micro-batches (synthetic tokens of the training shape), for what needs data
    # to build (EVA's, CorDA's and LoRA-GA's initialisations); None where no step runs.
    batches: Callable[[], list[dict]] | None = None
    # An objective's separate reference model (objectives.py, reference: copy): frozen, built
    # as the policy's base is; None: none.
    reference: Any = None
    # An objective's TRL trainer and what it says of itself (objectives.Preference); None: sft.
    objective: Any = None
    # Modules that do not train (a frozen image encoder: model.train_vision false), as PEFT's
    # `exclude_modules` regex: no adapter goes in them (peft_args); None: every module may.
    frozen: str | None = None


def adapted_targets(model, config) -> list[str]:
    """A PEFT config's target modules that hold an adapter: all of them, unless
    `exclude_modules` kept some out (PEFT resolves "all-linear" before excluding)."""
    targets = sorted(config.target_modules)
    if not getattr(config, "exclude_modules", None):
        return targets
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapted = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    return [t for t in targets if any(a == t or a.endswith("." + t) for a in adapted)]


def peft_args(ctx: BuildContext, config_class, args: dict) -> dict:
    """A PEFT config's arguments with what does not train kept out (`ctx.frozen`, as the
    config's `exclude_modules`), unless the variant says its own or the method has none."""
    fields = getattr(config_class, "__dataclass_fields__", {})
    if ctx.frozen is None or "exclude_modules" in args or "exclude_modules" not in fields:
        return args
    return {**args, "exclude_modules": ctx.frozen}


# What applies before what: every registered technique once, stages in order (LOAD, MODEL,
# STEP). Within MODEL: Liger patches the model's classes and chunked NLL replaces the loss
# before PEFT wraps the model (both reach the base through the wrapper), adapters before
# checkpointing or offload (PEFT re-wraps the layers), compile last (it traces the finished
# model).
APPLY_ORDER = ("bf16", "fp16", "int8", "int4",  # LOAD
               "liger", "chunked_nll", "lora", "qlora", "peft", "trainable_tokens",  # MODEL
               "activation_offload", "gradient_checkpointing", "compile",
               "amp_bf16", "amp_fp16")  # STEP


def said(error: BaseException, limit: int = 300) -> str:
    """What a library raised, on one line: `ValueError: its message`."""
    return f"{type(error).__name__}: {' '.join(str(error).split())[:limit]}"


def _no_args(args: dict) -> dict:
    if args:
        raise TechniqueArgError(f"takes no arguments, got {', '.join(map(str, args))}",
                                key=str(next(iter(args))))
    return {}


@dataclass(frozen=True)
class Technique:
    name: str
    stage: Stage
    apply: Callable[..., None]
    conflicts: frozenset[str] = frozenset()
    resolve_args: Callable[[dict], dict] = _no_args
    supported: Callable[[torch.device], str | None] = lambda device: None  # reason, or None
    # Validation-time check against the model built on meta: a problem, or None.
    check_model: Callable[[Any, dict], str | None] | None = None
    # Runs at the LOAD stage for a technique whose main stage is later (QLoRA: quantize at
    # load, add adapters to the built model). Same arguments as `apply`.
    load: Callable[..., None] | None = None
    requires: tuple[str, ...] = ()  # at least one of these must be in the same stack
    # A check of the whole stack, {name: resolved args} (e.g. two techniques that both replace
    # the loss): a problem, or None.
    check_stack: Callable[[dict[str, dict]], str | None] | None = None
    needs_warmup: bool = False  # its first step is not representative (compilation)
    # Why it cannot run on fake tensors (simulation), or None where it can; a function of the
    # resolved arguments and the simulated device (cuda: the fake CUDA device, fake_cuda.py;
    # cpu: fake CPU tensors for a CPU target; None: fake CPU tensors standing in for a CUDA
    # target, no fake device) where only some can (QLoRA with DoRA; Liger only on CUDA).
    not_simulated: str | Callable[[dict, torch.device], str | None] | None = None
    # (resolved args, simulated device) → what a simulated figure of it rests on, for the
    # record's notes, read after the run (compile: Dynamo's graphs and breaks).
    simulated_notes: Callable[[dict, torch.device], list[str]] | None = None
    # Its part of the closed-form estimate (harness/estimate.py): (stack fields, resolved args)
    # → updates the stack fields in place, or raises estimate.NotModelled for arguments the
    # arithmetic does not cover. None: not modelled, for the reason in `not_estimated`.
    estimate: Callable[[dict, dict], None] | None = None
    not_estimated: str | None = None
    # Parallel strategies it cannot run under, each with the reason (parallel.py).
    parallel_unsupported: Mapping[str, str] = field(default_factory=dict)
    # It makes the model a PEFT model: what trains are adapters, saved alone or merged (save:).
    adapters: bool = False
    # Resolved args → its cell in tables: the name, and the arguments that tell rows apart.
    label: Callable[[dict], str] = lambda args: ""  # registration defaults it to the name

    @property
    def doc(self) -> str:
        """The docstring's first paragraph, on one line."""
        return " ".join((self.apply.__doc__ or "").strip().split("\n\n")[0].split())


REGISTRY: dict[str, Technique] = {}


def technique(name: str, *, stage: Stage, conflicts: tuple[str, ...] = (),
              args: Callable[[dict], dict] | None = None,
              supported: Callable[[Any], str | None] | None = None,
              check_model: Callable[[Any, dict], str | None] | None = None,
              load: Callable[..., None] | None = None, requires: tuple[str, ...] = (),
              check_stack: Callable[[dict[str, dict]], str | None] | None = None,
              needs_warmup: bool = False,
              not_simulated: str | Callable[[dict, torch.device], str | None] | None = None,
              simulated_notes: Callable[[dict, torch.device], list[str]] | None = None,
              estimate: Callable[[dict, dict], None] | None = None,
              not_estimated: str | None = None,
              parallel_unsupported: Mapping[str, str] | None = None,
              adapters: bool = False,
              label: Callable[[dict], str] | None = None):
    """Register a technique; a duplicate name, or one missing from APPLY_ORDER, is a
    programming error."""

    def register(fn: Callable[..., None]) -> Callable[..., None]:
        if name in REGISTRY:
            raise RuntimeError(f"technique {name!r} registered twice")
        if (estimate is None) == (not_estimated is None):
            raise RuntimeError(f"technique {name!r}: give its estimate or why it has none")
        if name not in APPLY_ORDER:
            raise RuntimeError(f"technique {name!r} has no place in APPLY_ORDER")
        REGISTRY[name] = Technique(
            name=name, stage=stage, apply=fn, conflicts=frozenset(conflicts),
            resolve_args=args or _no_args,
            supported=supported or (lambda device: None), check_model=check_model,
            load=load, requires=tuple(requires), check_stack=check_stack,
            needs_warmup=needs_warmup, not_simulated=not_simulated,
            simulated_notes=simulated_notes, estimate=estimate,
            not_estimated=not_estimated, parallel_unsupported=dict(parallel_unsupported or {}),
            adapters=adapters,
            label=label or (lambda args: name),
        )
        return fn

    return register


def check_stack(uses: tuple[TechniqueUse, ...]) -> None:
    """Reject a stack that contradicts itself: duplicates, missing requirements, declared
    conflicts (either side) and each technique's own check of the whole stack."""
    names = [u.name for u in uses]
    for i, name in enumerate(names):
        needs = REGISTRY[name].requires
        if needs and not any(n in names for n in needs):
            raise TechniqueArgError(f"{name!r} needs one of {', '.join(map(repr, needs))} in the "
                                    "same variant", key=f"techniques[{i}]")
        if name in names[:i]:
            raise TechniqueArgError(f"technique {name!r} listed twice", key=f"techniques[{i}]")
        for other in names[:i]:
            if other in REGISTRY[name].conflicts or name in REGISTRY[other].conflicts:
                raise TechniqueArgError(f"{name!r} conflicts with {other!r}",
                                        key=f"techniques[{i}]")
    stack = {u.name: dict(u.args) for u in uses}
    for i, name in enumerate(names):
        check = REGISTRY[name].check_stack
        problem = check(stack) if check else None
        if problem:
            raise TechniqueArgError(problem, key=f"techniques[{i}].{name}")


def ordered(uses: tuple[TechniqueUse, ...]) -> list[tuple[Technique, TechniqueUse]]:
    """The stack in the order it applies (APPLY_ORDER), whatever the YAML's order."""
    pairs = [(REGISTRY[u.name], u) for u in uses]
    return sorted(pairs, key=lambda p: APPLY_ORDER.index(p[0].name))


def apply_stage(stage: Stage, ctx: BuildContext, uses: tuple[TechniqueUse, ...]) -> None:
    for tech, use in ordered(uses):
        if stage == Stage.LOAD and tech.load is not None:
            tech.load(ctx, **use.args)
        if tech.stage == stage:
            tech.apply(ctx, **use.args)


def base_model(model):
    """The transformers model itself, under a PEFT wrapper if there is one."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def unsupported_reason(uses: tuple[TechniqueUse, ...], device) -> str | None:
    for tech, _ in ordered(uses):
        reason = tech.supported(device)
        if reason:
            return f"{tech.name}: {reason}"
    return None


def not_simulated(tech: Technique, use: TechniqueUse, device=None) -> str | None:
    """Why this use of the technique (its arguments) cannot run on fake tensors of `device`
    (None: fake CPU tensors standing in for a CUDA target; see Technique.not_simulated)."""
    why = tech.not_simulated
    return why(dict(use.args), device) if callable(why) else why


def simulation_reason(uses: tuple[TechniqueUse, ...], optimizer, device=None) -> str | None:
    """Why this stack and `optimizer` (an optimizers.OptimizerSpec) cannot be simulated on
    `device` (fake CPU tensors when None), or None."""
    for tech, use in ordered(uses):
        why = not_simulated(tech, use, device)
        if why:
            return f"{tech.name} cannot be simulated: {why}"
    why = optimizer.not_simulated
    return f"optimizer {optimizer.name} cannot be simulated: {why}" if why else None


def stack_label(uses, optimizer: str | None = None) -> str:
    """A variant's techniques as a table cell, in applied order, each with the arguments that
    tell it apart, then the optimizer: `qlora(r=16, all-linear) + gradient_checkpointing ·
    adamw_8bit`. `uses`: TechniqueUse or the record's {name, args} dicts."""
    uses = tuple(u if isinstance(u, TechniqueUse) else TechniqueUse(u["name"], u.get("args", {}))
                 for u in uses)
    known = tuple(u for u in uses if u.name in REGISTRY)  # an old record's retired name: as is
    cells = [tech.label(dict(use.args)) for tech, use in ordered(known)]
    cells += [u.name for u in uses if u.name not in REGISTRY]
    text = " + ".join(cells) or "(none)"
    return f"{text} · {optimizer}" if optimizer else text


def lora_label(name: str, args: Mapping[str, Any]) -> str:
    """`lora(r=16, all-linear)`: rank and target modules, the two arguments tables need."""
    targets = args.get("target_modules")
    if isinstance(targets, (list, tuple)):
        targets = "/".join(str(t).removesuffix("_proj") for t in targets)
    parts = [f"r={args['r']}"] if "r" in args else []
    if targets:
        parts.append(str(targets))
    if args.get("use_dora"):
        parts.append("dora")
    return f"{name}({', '.join(parts)})" if parts else name


def dataclass_args(config_cls: Callable[[], type], *, defaults: Mapping[str, Any] = (),
                   reserved: tuple[str, ...] = (), shown: tuple[str, ...] = (),
                   aliases: Mapping[str, str] = (),
                   ranges: Mapping[str, tuple[float, float]] = ()) -> Callable:
    """An argument resolver checked against a library's config dataclass (e.g. LoraConfig),
    given as a function returning the class, so the library is imported only when a scenario
    uses the technique.

    Keys must be the dataclass's own field names; values of simple-typed fields must match the
    type of the field's default; the config is then built once so the library's own checks run.
    The resolved arguments are `defaults`, then the user's, then the `shown` fields' values
    from the built config (so the record shows what actually ran). `aliases` maps names users
    commonly type (LoRA's "rank") to the library's, for the "did you mean" hint only.
    `ranges` bounds numbers the library takes unchecked: {key: (lowest, highest)}, inclusive.
    """
    import dataclasses

    def resolve(args: dict) -> dict:
        cls = config_cls()
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        allowed = [n for n in fields if n not in reserved]
        for key, value in args.items():
            if key in reserved and key in fields:
                raise TechniqueArgError(f"{key!r} is set by the harness for every run, not by "
                                        "a scenario", key=str(key))
            if key not in allowed:
                hint = [dict(aliases)[key]] if key in dict(aliases) else \
                    difflib.get_close_matches(str(key), allowed, n=1)
                raise TechniqueArgError(
                    f"unknown argument {key!r} for {cls.__name__}" +
                    (f" (did you mean {hint[0]!r}?)" if hint else ""), key=str(key))
            default = fields[key].default
            # Only plainly typed fields: `init_lora_weights: bool | str` takes either.
            plain = not any(mark in str(fields[key].type) for mark in ("|", "Union", "Literal"))
            if (plain and value is not None and type(default) in (int, float, bool, str)
                    and default is not None and not _same_kind(value, default)):
                raise TechniqueArgError(f"must be {type(default).__name__}, got {value!r}", key=key)
            low, high = dict(ranges).get(key, (None, None))
            if isinstance(value, (int, float)) and not isinstance(value, bool) and \
                    low is not None and not low <= value <= high:
                raise TechniqueArgError(f"must be within [{low:g}, {high:g}], got {value!r}",
                                        key=key)
        merged = {**dict(defaults), **args}
        try:
            built = cls(**merged)
        except ImportError:  # a package these arguments need (LoftQ: scipy): the run says so
            return merged
        except Exception as e:  # noqa: BLE001 - the library's own check, whatever it raises
            raise TechniqueArgError(" ".join(str(e).split()) or type(e).__name__) from None
        for key in shown:
            value = getattr(built, key)
            merged[key] = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return merged

    return resolve


def _same_kind(value: Any, default: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


# One import per technique module: importing registers it.
from harness.techniques import (  # noqa: E402,F401
    activation_offload,
    amp_bf16,
    amp_fp16,
    bf16,
    chunked_nll,
    compile,
    fp16,
    gradient_checkpointing,
    int4,
    int8,
    liger,
    lora,
    peft_methods,
    qlora,
    trainable_tokens,
)
