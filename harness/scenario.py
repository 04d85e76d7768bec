"""Load and validate a scenario YAML file into frozen dataclasses.

Everything a run needs is checked here, before anything heavy starts: unknown keys at any level,
unknown techniques (with "did you mean"), types and ranges, duplicate variants, a baseline that
names no variant, techniques that conflict or lack what they require. Each problem is a
`ScenarioError` whose text is one line naming the file, the variant and the key.

A top-level `parallel: {strategy: fsdp2, world_size: 8, …}` trains every variant in that many
processes (parallel.py); a variant's own `parallel:` replaces it, `parallel: null` is one process.

A top-level `sweep: {seq_len: [512, 1024], batch_size: [1, 2]}` crosses every variant with
every point of the grid (the cartesian product, in the order written): each (variant, point) is
a `Variant` of its own, named `lora@seq_len=512,batch_size=1`, whose train settings are the
variant's with the point on top — a run measures and records each one.

The rest of a job after the training steps: `eval: {batch_size, seq_len, batches,
every_steps, keep_logits}`, `generate: {batch_size, prompt_len, max_new_tokens}` and `save:
[adapters | merged | full, …]` (EvalSpec, GenerateSpec, SaveSpec). A variant's own `eval:` or
`generate:` keys go on top of the scenario's, its `save:` list replaces the scenario's; null:
that variant has none.

`objective: dpo` (or `{dpo: {TRL's DPOConfig fields}}`; orpo, kto, reward, grpo) at the top or
in a variant replaces the step's loss with TRL's trainer's (objectives.py); a variant's own
replaces the scenario's, `sft` is the model's own loss.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import itertools
import math
import re
import typing
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.objectives import ObjectiveError, ObjectiveSpec
from harness.objectives import check as check_objective
from harness.objectives import parse as parse_objective
from harness.optimizers import OPTIMIZERS
from harness.techniques import REGISTRY, TechniqueArgError, TechniqueUse, check_stack, said

SCENARIO_DIR = Path(__file__).resolve().parent.parent / "scenarios"
MODEL_DIR = SCENARIO_DIR / "models"

WEIGHTS = ("random", "pretrained")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
# transformers' implementations of a mixture of experts' layers that run on any device
# (`experts_implementation`); how a simulation routes tokens where that decides memory (eager)
EXPERTS = ("grouped_mm", "batched_mm", "eager")
ROUTINGS = ("balanced", "worst")
# Scenario and variant names name folders and files (with suffixes such as a sweep point and
# `.rank3.snapshot.pickle`): one safe path component, never `.` or `..`, well under 255 bytes.
MAX_NAME = 100
_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._+-]{{0,{MAX_NAME - 1}}}")


class ScenarioError(ValueError):
    """Bad input: one line naming the file, the variant (if any) and the key."""

    def __init__(self, path: Path | str, message: str, key: str | None = None,
                 variant: str | None = None):
        message = " ".join(str(message).splitlines())  # one line, whatever a library said
        self.path, self.key, self.variant, self.message = str(path), key, variant, message
        where = [self.path]
        if variant is not None:
            where.append(f"variant {variant!r}")
        if key is not None:
            where.append(f"key {key!r}")
        super().__init__(": ".join(where) + ": " + message)


def setting(default: Any = dataclasses.MISSING, **rules: Any) -> Any:
    """A scenario key: a dataclass field whose type is its annotation and whose `rules` say
    what a value must be — `minimum` (≥), `maximum` (≤), `above` (>), `below` (<), `choices`
    (names, or a function giving them), `strategy` (a parallel option of that strategy only).
    `_parse_fields` checks a mapping against them: a new key is one field."""
    return field(default=default, metadata=rules)


@dataclass(frozen=True)
class ModelSpec:
    config: str = setting()  # as written in the scenario: a committed name, a path, a hub id
    weights: str = setting("random", choices=WEIGHTS)
    attn_implementation: str = setting("sdpa", choices=ATTN_IMPLEMENTATIONS)
    trust_remote_code: bool = setting(False)
    # A mixture of experts (models.experts_of): transformers' experts implementation (null:
    # its own default, grouped_mm where the kernel exists) and, for eager experts in a
    # simulation, how the router spreads tokens (balanced: each expert tokens × top_k /
    # experts; worst: every token to the same top_k experts).
    experts: str | None = setting(None, choices=EXPERTS)
    routing: str = setting("balanced", choices=ROUTINGS)
    # A vision-language model's image encoder trains too (full fine-tune: its weights; PEFT:
    # adapters in it as well); false, as most recipes: frozen, and no adapter in it.
    train_vision: bool = setting(False)


@dataclass(frozen=True)
class TrainSpec:
    batch_size: int = setting(1, minimum=1)  # per micro-batch
    # Micro-batches of batch_size per optimizer step, their gradients summed (Trainer's key).
    gradient_accumulation_steps: int = setting(1, minimum=1)
    seq_len: int = setting(512, minimum=2)  # one token has no next-token target
    optimizer: str = setting("adamw", choices=lambda: list(OPTIMIZERS))
    lr: float = setting(1.0e-4, above=0)
    weight_decay: float = setting(0.0, minimum=0)
    max_grad_norm: float | None = setting(1.0, above=0)  # None: no clipping
    steps: int = setting(3, minimum=1)  # measured steps
    warmup_steps: int = setting(1, minimum=0)  # run first; excluded from step time, in peaks
    seed: int = setting(0, minimum=0, below=2 ** 64)

    @property
    def effective_batch_size(self) -> int:
        """Sequences per optimizer step: the micro-batch times the accumulation."""
        return self.batch_size * self.gradient_accumulation_steps


@dataclass(frozen=True)
class EvalSpec:
    """`eval:` after the training steps, as `Trainer.evaluate` runs: the model in eval mode, no
    grad, each batch's forward with its loss (prediction loss only); `keep_logits` keeps each
    batch's logits and labels on the device, concatenated as Trainer's evaluation loop does for
    `compute_metrics`. The optimizer state stays live; the grads are gone (Trainer zeroes them
    after each optimizer step)."""

    batch_size: int | None = setting(None, minimum=1)  # None: the training micro-batch
    seq_len: int | None = setting(None, minimum=2)  # None: the training seq_len
    batches: int = setting(2, minimum=1)  # eval batches per evaluation
    every_steps: int | None = setting(None, minimum=1)  # None: once, after the last step
    keep_logits: bool = setting(False)

    def resolved(self, train: TrainSpec) -> dict[str, Any]:
        """The settings with the training shape filled in: what a record says."""
        return {**dataclasses.asdict(self), "batch_size": self.batch_size or train.batch_size,
                "seq_len": self.seq_len or train.seq_len}


@dataclass(frozen=True)
class GenerateSpec:
    """`generate:` after the training steps (and any evaluation): `model.generate` of
    `max_new_tokens` greedy tokens after a prompt of `prompt_len`, with the KV cache the model
    uses by default."""

    prompt_len: int = setting(minimum=1)
    max_new_tokens: int = setting(minimum=1)
    batch_size: int | None = setting(None, minimum=1)  # None: the training micro-batch

    def resolved(self, train: TrainSpec) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "batch_size": self.batch_size or train.batch_size}


SAVE_KINDS = ("adapters", "merged", "full")


@dataclass(frozen=True)
class SaveSpec:
    """One entry of `save:` (a list, saved in order, last in the job), into a temporary folder
    that is removed: `adapters` — the PEFT model's `save_pretrained`; `merged` —
    `merge_and_unload()` then `save_pretrained` of the merged model (`device: cpu`: moved to
    the CPU first, where its weights then are merged and saved); `full` — the whole model's
    state dict, as full fine-tuning saves it (under FSDP2 gathered in full on rank 0, each
    tensor moved to the CPU as it is gathered where `cpu_offload`, as accelerate gathers)."""

    kind: str = setting(choices=SAVE_KINDS)
    device: str | None = setting(None, kind="merged", choices=("cpu",))
    cpu_offload: bool = setting(True, kind="full")

    def as_dict(self) -> dict[str, Any]:
        """The kind and its own options: what a record says was asked."""
        return {"kind": self.kind, **{f.name: getattr(self, f.name)
                                      for f in dataclasses.fields(self)
                                      if f.metadata.get("kind") == self.kind}}


@dataclass(frozen=True)
class DataSpec:
    """`data:` — the training batches' real lengths instead of a fixed `seq_len` (then the
    truncation limit): one source (`lengths`, `lengths_file`, `dataset` with `tokenizer`, or
    `synthetic: {median, p99}`), padding to each micro-batch's longest or to `seq_len`, and
    Trainer's length-grouped sampler (harness/data.py). Paths are absolute once parsed."""

    lengths: tuple[int, ...] | None = None
    lengths_file: str | None = setting(None)
    dataset: str | None = setting(None)
    tokenizer: str | None = setting(None)
    text_field: str = setting("text")
    synthetic: Mapping[str, int] | None = None  # {median, p99}
    padding: str = setting("longest", choices=("longest", "max_length"))
    group_by_length: bool = setting(False)
    # TRL's packing: sequences packed into rows of seq_len (best-fit decreasing), a micro-batch
    # of rows collated padding-free into one row with per-sequence position ids.
    packing: bool = setting(False)


@dataclass(frozen=True)
class ImagesSpec:
    """`images:` — each training sample of a vision-language model holds `count` images of
    height × width pixels before its text (images.py): the image processor's pixel values,
    and in the sequence of seq_len tokens each image's placeholder tokens."""

    height: int = setting(minimum=1, maximum=16384)
    width: int = setting(minimum=1, maximum=16384)
    count: int = setting(1, minimum=1)
    # Qwen-VL's processor settings, as recipes set them to bound an image's tokens (pixels
    # after resizing; null: the checkpoint's preprocessor config's).
    min_pixels: int | None = setting(None, minimum=1)
    max_pixels: int | None = setting(None, minimum=1)


# The parts of a job beyond its training steps: top-level keys a variant may override.
JOB_PARTS = {"eval": EvalSpec, "generate": GenerateSpec, "save": SaveSpec, "data": DataSpec,
             "images": ImagesSpec}


STRATEGIES = ("ddp", "fsdp2")
REDUCE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ParallelSpec:
    """How many processes train the variant, and how they split the model (parallel.py)."""

    strategy: str = setting(choices=STRATEGIES)
    # Beyond a thousand ranks full sharding is not how models train (hybrid sharding is), and
    # simulating each kind of rank stops being a matter of seconds.
    world_size: int = setting(minimum=1, maximum=1024)
    # fsdp2: free each unit's gathered parameters after its forward (all-gather again in
    # backward); put the sharded parameters, grads and the optimizer step on the CPU; the
    # dtype parameters are gathered in / gradients reduced in (None: the parameters' own).
    reshard_after_forward: bool = setting(True, strategy="fsdp2")
    cpu_offload: bool = setting(False, strategy="fsdp2")
    param_dtype: str | None = setting(None, strategy="fsdp2", choices=REDUCE_DTYPES)
    reduce_dtype: str | None = setting(None, strategy="fsdp2", choices=REDUCE_DTYPES)
    # ddp: gradient bucket size, and whether grads are views into the buckets.
    bucket_cap_mb: float = setting(25.0, strategy="ddp", above=0)
    gradient_as_bucket_view: bool = setting(False, strategy="ddp")

    def as_dict(self) -> dict[str, Any]:
        """The options that apply to the strategy, for records and tables."""
        return {k: getattr(self, k) for k in ("strategy", "world_size",
                                                *_options(self.strategy))}

    def label(self) -> str:
        return f"{self.strategy}×{self.world_size}"


def _options(strategy: str) -> tuple[str, ...]:
    """ParallelSpec's options of `strategy`, in field order."""
    return tuple(f.name for f in dataclasses.fields(ParallelSpec)
                 if f.metadata.get("strategy") == strategy)


@dataclass(frozen=True)
class Variant:
    name: str  # unique in the scenario; with a sweep point: "<declared name>@<point>"
    techniques: tuple[TechniqueUse, ...]
    train: TrainSpec  # scenario train with this variant's overrides (and sweep point) applied
    train_overrides: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    sweep_point: tuple[tuple[str, Any], ...] = ()  # (train key, value) pairs, in sweep order
    parallel: ParallelSpec | None = None  # None: one process
    declared: str = ""  # the name as the scenario declares it, without the sweep point
    eval: EvalSpec | None = None  # None: no evaluation
    generate: GenerateSpec | None = None  # None: no generation
    save: tuple[SaveSpec, ...] | None = None  # None: nothing saved
    data: DataSpec | None = None  # None: fixed-shape batches of train.seq_len
    images: ImagesSpec | None = None  # None: text only
    objective: ObjectiveSpec | None = None  # None: sft, the model's own loss (objectives.py)
    # The variant's own model (its `model:` keys on top of the scenario's); None: the scenario's.
    model: ModelSpec | None = None

    def __post_init__(self):
        if not self.declared:
            object.__setattr__(self, "declared", self.name)


def point_label(point) -> str:
    """`seq_len=512,batch_size=2`: how a sweep point reads in names and tables."""
    return ",".join(f"{k}={v}" for k, v in dict(point).items())


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    path: Path
    sha256: str
    model: ModelSpec
    train: TrainSpec
    baseline: str
    variants: tuple[Variant, ...]  # with a sweep: one per (declared variant, point)
    sweep: tuple[tuple[str, tuple], ...] = ()  # (train key, values), as written

    def model_of(self, variant: Variant) -> ModelSpec:
        """The model a variant trains: its own, else the scenario's."""
        return variant.model or self.model

    def variant(self, name: str) -> Variant:
        """By name: a declared variant's, or one sweep point's (`<declared>@<key>=<value>,…`)."""
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(name)

    def at_point(self, declared: str, point: Mapping[str, Any]) -> Variant:
        """A declared variant with `point`'s train values on top (of its sweep point's, if any),
        even where no sweep of the scenario has that point (what `harness fit` probes)."""
        base = next((v for v in self.variants if v.declared == declared), None)
        if base is None:
            raise KeyError(declared)
        return _at_point(self.path, base, tuple({**dict(base.sweep_point), **point}.items()))

    def index(self, variant: Variant) -> int:
        """Where a variant (or a point of it) stands in the scenario's order."""
        names = [v.name for v in self.variants]
        return names.index(variant.name) if variant.name in names else \
            [v.declared for v in self.variants].index(variant.declared)


# ---------------------------------------------------------------------------------------------
# YAML: safe loading (no tags, no code) and duplicate keys are errors, not silent overwrites.


class _StrictLoader(yaml.SafeLoader):
    pass


def _mapping_no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False):
    """A mapping whose own keys are unique. Merge keys (`<<: *base`) are standard YAML: the
    merged keys come first and the mapping's own override them, as YAML specifies."""
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, (str, int, float, bool, type(None))):
            raise yaml.constructor.ConstructorError(
                None, None, f"a key must be a plain value, got {type(key).__name__}",
                key_node.start_mark)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    loader.flatten_mapping(node)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_no_duplicates)


def _int_no_octal(loader: _StrictLoader, node: yaml.ScalarNode):
    """YAML 1.1 reads `010` as 8; refuse a leading zero rather than guess."""
    text = loader.construct_scalar(node)
    sign, digits = text[:1].strip("0123456789_"), text.lstrip("+-0_")
    if re.fullmatch(r"[-+]?0[0-9_]+", text):
        raise yaml.constructor.ConstructorError(
            None, None, f"{text!r} has a leading zero (octal in YAML 1.1): write {sign}"
            f"{digits or '0'} or {sign}0o{digits}", node.start_mark)
    return yaml.constructor.SafeConstructor.construct_yaml_int(loader, node)


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _int_no_octal)


def resolve_scenario_path(arg: str | Path) -> Path:
    """A path to a file, or the name of a scenario under `scenarios/`."""
    path = Path(arg)
    if path.is_file():
        return path.resolve()
    candidate = SCENARIO_DIR / f"{arg}.yaml"
    if candidate.is_file():
        return candidate
    known = sorted(p.stem for p in SCENARIO_DIR.glob("*.yaml"))
    hint = difflib.get_close_matches(str(arg), known, n=1)
    raise ScenarioError(arg, "no such scenario file or name" +
                        (f" (did you mean {hint[0]!r}?)" if hint else f"; known: {', '.join(known)}"))


def list_scenarios() -> list[Path]:
    return sorted(SCENARIO_DIR.glob("*.yaml"))


def load_scenario(arg: str | Path) -> Scenario:
    """Load and validate a scenario."""
    path = resolve_scenario_path(arg)
    raw, raw_bytes = _read(path)
    return _parse(path, raw, hashlib.sha256(raw_bytes).hexdigest())


def outline(arg: str | Path) -> tuple[str, str, int, str]:
    """(name, model config, how many variants with the sweep crossed in, description) as the
    file spells them, read without validating it — which builds the model and resolves
    technique arguments with the libraries, seconds that `harness ls` need not spend. Raises
    ScenarioError where the file does not even read as a scenario."""
    path = resolve_scenario_path(arg)
    raw, _ = _read(path)
    try:
        config, variants = raw["model"]["config"], raw["variants"]
        sweep, description = raw.get("sweep") or {}, raw.get("description", "")
        if raw["name"] == path.stem and isinstance(config, str) and isinstance(variants, list) \
                and variants and isinstance(description, str) \
                and all(isinstance(v, list) and v for v in sweep.values()):
            return raw["name"], config, len(variants) * math.prod(map(len, sweep.values())), \
                description
    except (TypeError, KeyError, AttributeError):
        pass
    raise ScenarioError(path, "does not read as a scenario (harness validate says why)")


def _read(path: Path) -> tuple[Any, bytes]:
    """The file's YAML (strictly: see _StrictLoader) and its bytes."""
    raw_bytes = path.read_bytes()
    try:
        raw = yaml.load(raw_bytes.decode("utf-8"), Loader=_StrictLoader)  # noqa: S506 - safe subclass
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ScenarioError(path, "not valid YAML: " + " ".join(str(e).split())) from None
    except RecursionError:
        raise ScenarioError(path, "not valid YAML: nested too deeply") from None
    if _expanded_size(raw, MAX_VALUES) > MAX_VALUES:  # aliases of aliases: a few bytes, GBs
        raise ScenarioError(path, f"expands to more than {MAX_VALUES:,} values (YAML aliases "
                                  "nested in aliases?); a scenario is far smaller")
    return raw, raw_bytes


MAX_VALUES = 100_000  # values in a scenario with every alias written out


def _expanded_size(value, limit: int) -> int:
    """How many values `value` holds with every alias expanded; stops counting past `limit`."""
    count, stack = 0, [value]
    while stack and count <= limit:
        item = stack.pop()
        count += 1
        if isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count


# ---------------------------------------------------------------------------------------------
# Parsing: every check names the file, variant and key.


def _unknown_keys(path, given: Mapping, allowed, where: str, variant: str | None = None):
    for key in given:
        if key not in allowed:
            hint = _did_you_mean(key, list(allowed))
            msg = f"unknown key {key!r} in {where}" + (hint or f"; allowed: {', '.join(allowed)}")
            raise ScenarioError(path, msg, key=f"{where}.{key}" if where != "scenario" else str(key),
                                variant=variant)


def _require_mapping(path, value, key, variant=None) -> Mapping:
    if not isinstance(value, Mapping):
        raise ScenarioError(path, f"must be a mapping, got {_type_name(value)}", key=key,
                            variant=variant)
    return value


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def _check_type(path, key, value, kind, variant=None):
    ok = {
        "str": isinstance(value, str) and value.strip() != "",
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
    }[kind]
    if not ok and kind == "float" and isinstance(value, str):
        try:
            float(value)
        except ValueError:
            pass
        else:
            raise ScenarioError(path, f"must be float, got the string {value!r} (YAML 1.1 reads "
                                      f"a float only with a dot: write e.g. 1.0e-4)", key=key,
                                variant=variant)
    if not ok:
        raise ScenarioError(path, f"must be {'a non-empty string' if kind == 'str' else kind}, "
                                  f"got {value!r}", key=key, variant=variant)


@functools.cache
def _kinds(spec: type) -> dict[str, tuple[str, bool]]:
    """Each field of a spec dataclass: (its type's name, whether null is allowed)."""
    hints = typing.get_type_hints(spec)
    kinds = {}
    for f in dataclasses.fields(spec):
        arms = typing.get_args(hints[f.name]) or (hints[f.name],)
        kind = next(a for a in arms if a is not type(None))
        kinds[f.name] = (kind.__name__, type(None) in arms)
    return kinds


def _parse_fields(path, spec: type, given: Mapping, where: str, variant=None,
                  keys=None) -> dict[str, Any]:
    """`given` checked against `spec`'s fields (or only `keys` of them): no unknown key, each
    value of its field's type and within its rules; floats as floats."""
    _unknown_keys(path, given, list(keys or _kinds(spec)), where, variant)
    return {key: _checked(path, spec, key, value, f"{where}.{key}", variant)
            for key, value in given.items()}


def _checked(path, spec: type, key: str, value, full: str, variant=None):
    kind, nullable = _kinds(spec)[key]
    rules = spec.__dataclass_fields__[key].metadata
    if value is None and nullable:
        return None
    if "choices" in rules:
        names = list(rules["choices"]() if callable(rules["choices"]) else rules["choices"])
        if value not in names:
            raise ScenarioError(path, f"unknown {key} {value!r}{_did_you_mean(value, names)}; "
                                      f"must be one of {', '.join(names)}"
                                      + (" or null" if nullable else ""), key=full, variant=variant)
        return value
    _check_type(path, full, value, kind, variant)
    if kind == "float" and not math.isfinite(value):
        raise ScenarioError(path, f"must be a finite number, got {value!r}", key=full,
                            variant=variant)
    for rule, holds, says in (("minimum", lambda v, m: v >= m, "≥"),
                              ("maximum", lambda v, m: v <= m, "≤"),
                              ("above", lambda v, m: v > m, ">"),
                              ("below", lambda v, m: v < m, "<")):
        bound = rules.get(rule)
        if bound is not None and not holds(value, bound):
            shown = f"2**{bound.bit_length() - 1}" if bound >= 2 ** 32 and \
                bound & (bound - 1) == 0 else bound
            raise ScenarioError(path, f"must be {says} {shown}, got {value!r}", key=full,
                                variant=variant)
    return float(value) if kind == "float" else value


def _did_you_mean(value, names) -> str:
    """` (did you mean 'bf16'?)` for `BF16` or `bf61`; empty when nothing is close."""
    text = str(value)
    same = [n for n in names if n.lower() == text.lower()]
    hint = same or difflib.get_close_matches(text.lower(), [n.lower() for n in names], n=1)
    if not hint:
        return ""
    return f" (did you mean {next(n for n in names if n.lower() == hint[0].lower())!r}?)"


def _parse_model(path, raw, variant: str | None = None) -> ModelSpec:
    """`model:` — the scenario's, or a variant's own keys on top of it (`variant`: its name,
    which its errors carry)."""
    values = _parse_fields(path, ModelSpec, _require_mapping(path, raw, "model", variant),
                           "model", variant)
    if "config" not in values:
        raise ScenarioError(path, "missing (a name under scenarios/models, a config path or a hub id)",
                            key="model.config", variant=variant)
    spec = ModelSpec(**values)
    # Imported here: models.py pulls in transformers, which validation of the rest does not need.
    from harness.models import (
        ModelConfigError,
        custom_code_reason,
        expert_count,
        load_config,
        resolve_config,
    )

    try:
        source = resolve_config(spec, path)
    except ModelConfigError as e:
        raise ScenarioError(path, str(e), key="model.config", variant=variant) from None
    if source.kind == "file":
        try:
            config = load_config(source, spec.trust_remote_code)
        except Exception as e:  # noqa: BLE001 - transformers' own complaint, on one line
            raise ScenarioError(path, custom_code_reason(source, spec.trust_remote_code) or
                                f"cannot read model config {source.location}: " +
                                " ".join(str(e).split())[:300], key="model.config",
                                variant=variant) from None
        for size in _MODEL_SIZES:  # what transformers builds without complaint, and trains wrong
            value = getattr(config, size, None)
            if isinstance(value, int) and not isinstance(value, bool) and value < 1:
                raise ScenarioError(path, f"{source.location}: {size} must be ≥ 1, got {value}",
                                    key="model.config", variant=variant)
        if expert_count(config) is None and spec.experts is not None:
            raise ScenarioError(path, f"{spec.config} has no mixture of experts: experts "
                                "applies to none of its layers", key="model.experts",
                                variant=variant)
    if spec.train_vision and source.kind == "file" and \
            getattr(load_config(source, spec.trust_remote_code), "vision_config", None) is None:
        raise ScenarioError(path, f"{spec.config} has no image encoder to train",
                            key="model.train_vision", variant=variant)
    if "routing" in values and spec.experts != "eager":
        raise ScenarioError(path, f"routing decides what eager experts hold; with "
                            f"{spec.experts or 'grouped_mm (the default)'} every expert buffer "
                            "holds tokens × top_k rows however tokens are routed",
                            key="model.routing", variant=variant)
    return spec


_MODEL_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
                "num_attention_heads", "num_key_value_heads", "head_dim")


def _parse_train(path, raw, base: TrainSpec, where: str, variant=None) -> tuple[TrainSpec, dict]:
    train = _require_mapping(path, raw, where, variant)
    return dataclasses.replace(base, **_parse_fields(path, TrainSpec, train, where, variant)), \
        dict(train)


def _parse_job_part(path, key: str, raw, base, variant=None):
    """`eval:` or `generate:` — a mapping of that part's keys, on top of the scenario's own
    (`base`) for a variant; `save:` — a list, which replaces the scenario's; null: the variant
    has none."""
    spec = JOB_PARTS[key]
    if raw is None:
        return None
    if key == "save":
        return _parse_save(path, raw, variant)
    if key == "data":
        return _parse_data(path, raw, base, variant)
    given = _require_mapping(path, raw, key, variant)
    values = _parse_fields(path, spec, given, key, variant)
    if base is not None:
        values = {**dataclasses.asdict(base), **values}
    missing = [f.name for f in dataclasses.fields(spec)
               if f.default is dataclasses.MISSING and f.name not in values]
    if missing:
        raise ScenarioError(path, "missing", key=f"{key}.{missing[0]}", variant=variant)
    return spec(**values)


def _parse_save(path, raw, variant=None) -> tuple[SaveSpec, ...]:
    """`save: [adapters, {merged: {device: cpu}}]`; one name alone is a list of one."""
    entries = [raw] if isinstance(raw, str) else raw
    if not isinstance(entries, list) or not entries:
        raise ScenarioError(path, f"must be a list of {', '.join(SAVE_KINDS)} (or one of them), "
                                  f"got {_type_name(raw)}", key="save", variant=variant)
    specs = []
    for i, entry in enumerate(entries):
        where = f"save[{i}]"
        kind, options = (entry, {}) if isinstance(entry, str) else \
            next(iter(entry.items())) if isinstance(entry, Mapping) and len(entry) == 1 else \
            (None, None)
        if kind is None:
            raise ScenarioError(path, "must be a name or a one-key mapping {name: {options}}",
                                key=where, variant=variant)
        kind = _checked(path, SaveSpec, "kind", kind, where, variant)
        given = _require_mapping(path, {} if options is None else options, f"{where}.{kind}",
                                 variant)
        keys = [f.name for f in dataclasses.fields(SaveSpec) if f.metadata.get("kind") == kind]
        _unknown_keys(path, given, keys, f"{where}.{kind}", variant)
        specs.append(SaveSpec(kind=kind, **_parse_fields(path, SaveSpec, given,
                                                         f"{where}.{kind}", variant, keys)))
    kinds = [s.kind for s in specs]
    for i, spec in enumerate(specs):
        if spec.kind == "adapters" and "merged" in kinds[:i]:
            raise ScenarioError(path, "comes after merged: the adapters are merged into the "
                                      "model by then", key=f"save[{i}]", variant=variant)
        if spec.kind == "merged" and "merged" in kinds[:i]:
            raise ScenarioError(path, "merged twice", key=f"save[{i}]", variant=variant)
    return tuple(specs)


DATA_SOURCES = ("lengths", "lengths_file", "dataset", "synthetic")  # `data:`'s, one of them


def _parse_data(path, raw, base: DataSpec | None, variant=None) -> DataSpec:
    """`data:` on top of the scenario's (`base`); a source the variant names replaces the
    scenario's source."""
    given = dict(_require_mapping(path, raw, "data", variant))
    _unknown_keys(path, given, [f.name for f in dataclasses.fields(DataSpec)], "data", variant)
    values = {}
    if "lengths" in given:
        lengths = given.pop("lengths")
        if not isinstance(lengths, list) or not lengths or not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in lengths):
            raise ScenarioError(path, "must be a non-empty list of positive token counts",
                                key="data.lengths", variant=variant)
        values["lengths"] = tuple(lengths)
    if "synthetic" in given:
        synthetic = _require_mapping(path, given.pop("synthetic"), "data.synthetic", variant)
        _unknown_keys(path, synthetic, ["median", "p99"], "data.synthetic", variant)
        for key in ("median", "p99"):
            value = synthetic.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ScenarioError(path, f"must be a positive token count, got {value!r}",
                                    key=f"data.synthetic.{key}", variant=variant)
        if synthetic["p99"] <= synthetic["median"]:
            raise ScenarioError(path, f"must be above the median {synthetic['median']}, got "
                                      f"{synthetic['p99']}", key="data.synthetic.p99",
                                variant=variant)
        values["synthetic"] = {"median": synthetic["median"], "p99": synthetic["p99"]}
    values.update(_parse_fields(path, DataSpec, given, "data", variant))
    for key in ("lengths_file", "dataset", "tokenizer"):
        if values.get(key) is not None:
            where = Path(values[key]) if Path(values[key]).is_absolute() else \
                Path(path).parent / values[key]
            if not where.exists():
                raise ScenarioError(path, f"no such file or folder: {where}", key=f"data.{key}",
                                    variant=variant)
            values[key] = str(where.resolve())
    named = [k for k in DATA_SOURCES if values.get(k) is not None]
    if len(named) > 1:
        raise ScenarioError(path, f"gives {named[0]} and {named[1]}: one source of lengths",
                            key=f"data.{named[1]}", variant=variant)
    if base is not None:
        inherited = dataclasses.asdict(base)
        if named:  # the variant's source replaces the scenario's
            inherited.update({k: None for k in DATA_SOURCES})
        values = {**inherited, **values}
        named = named or [k for k in DATA_SOURCES if values.get(k) is not None]
    if not named:
        raise ScenarioError(path, f"needs one source of lengths: {', '.join(DATA_SOURCES)}",
                            key="data", variant=variant)
    if values.get("packing") and values.get("padding") == "max_length":
        raise ScenarioError(path, "packing pads nothing: it packs rows of seq_len",
                            key="data.padding", variant=variant)
    if values.get("tokenizer") is not None and values.get("dataset") is None:
        raise ScenarioError(path, "tokenizes a dataset: give data.dataset", key="data.tokenizer",
                            variant=variant)
    return DataSpec(**values)


def _check_save(path, save: tuple[SaveSpec, ...] | None, uses, variant: str) -> None:
    """What is saved against what trains: adapters and merging need a PEFT model, a full state
    dict is full fine-tuning's."""
    if not save:
        return
    adapters = next((u.name for u in uses if REGISTRY[u.name].adapters), None)
    for i, spec in enumerate(save):
        if spec.kind in ("adapters", "merged") and adapters is None:
            makers = ", ".join(name for name, t in REGISTRY.items() if t.adapters)
            raise ScenarioError(path, f"{spec.kind} needs adapters ({makers}): this variant "
                                      "trains the whole model; save full", key=f"save[{i}]",
                                variant=variant)
        if spec.kind == "full" and adapters is not None:
            raise ScenarioError(path, f"full is full fine-tuning's state dict; {adapters} trains "
                                      "adapters: save adapters or merged", key=f"save[{i}]",
                                variant=variant)


def _check_images(path, parts: Mapping, variant: str) -> None:
    """What images cannot be combined with yet: real lengths and generation are text only
    (an evaluation's batches hold the same images as the steps')."""
    if parts.get("images") is None:
        return
    for part, what in (("data", "real lengths (data:)"), ("generate", "generation (generate:)")):
        if parts.get(part) is not None:
            raise ScenarioError(path, f"images with {what} are not built yet: its batches "
                                "would be text only", key=part, variant=variant)


def _check_images_fit(path, model: ModelSpec, variants) -> None:
    """Each variant's images against its model (a committed or local config): the model has
    an image encoder of a family whose layout is known (images.py), and the images' tokens
    leave the text at least 2 of seq_len (one with a label)."""
    from harness.images import ImagesError, make_images
    from harness.models import load_config, resolve_config

    made: dict[tuple, Any] = {}
    for variant in variants:
        if variant.images is None:
            continue
        spec = variant.model or model
        source = resolve_config(spec, path)
        if source.kind != "file":
            continue  # a hub config we may not fetch here; the run reports what is missing
        key = (source.location, variant.images)
        if key not in made:
            try:
                made[key] = make_images(variant.images, 1, load_config(
                    source, spec.trust_remote_code), source.location, source.hub)
            except ImagesError as e:
                made[key] = e
        images = made[key]
        if isinstance(images, ImagesError):
            raise ScenarioError(path, str(images), key="images", variant=variant.name)
        need = images.tokens_per_sample() + 2
        evaluation = variant.eval.resolved(variant.train)["seq_len"] if variant.eval else None
        if evaluation is not None and evaluation < need:
            raise ScenarioError(
                path, f"the evaluation's seq_len {evaluation} leaves the text fewer than 2 "
                f"tokens beside the images' {images.tokens_per_sample()}: seq_len ≥ {need}",
                key="eval.seq_len", variant=variant.name)
        if variant.train.seq_len < need:
            raise ScenarioError(
                path, f"{variant.images.count} image(s) of {variant.images.height}×"
                f"{variant.images.width} take {images.tokens_per_sample()} tokens "
                f"({images.layout.tokens} each, {images.processor}); seq_len "
                f"{variant.train.seq_len} leaves the text fewer than 2: seq_len ≥ {need}",
                key="train.seq_len", variant=variant.name)


def _check_eval(path, evaluation: EvalSpec | None, train: TrainSpec, variant: str) -> None:
    """A variant's evaluation against its own steps (sweep point included)."""
    if evaluation is not None and evaluation.every_steps is not None and \
            evaluation.every_steps > train.warmup_steps + train.steps:
        raise ScenarioError(path, f"{evaluation.every_steps} is more than the "
                                  f"{train.warmup_steps + train.steps} steps run (warm-up "
                                  "included): no evaluation would run", key="eval.every_steps",
                            variant=variant)


def _parse_parallel(path, raw, where: str, variant=None) -> ParallelSpec | None:
    """`parallel: {strategy, world_size, …}`; null: one process."""
    if raw is None:
        return None
    given = _require_mapping(path, raw, where, variant)
    strategy = _checked(path, ParallelSpec, "strategy", given.get("strategy"),
                        f"{where}.strategy", variant)
    keys = ("strategy", "world_size", *_options(strategy))
    for key in given:
        other = next((s for s in STRATEGIES if s != strategy and key in _options(s)), None)
        if key not in keys and other is not None:  # the other strategy's option contradicts
            raise ScenarioError(path, f"is an option of {other}, not of {strategy}",
                                key=f"{where}.{key}", variant=variant)
    values = _parse_fields(path, ParallelSpec, given, where, variant, keys)
    if "world_size" not in given:
        raise ScenarioError(path, "missing (how many processes: GPUs, or CPU ranks)",
                            key=f"{where}.world_size", variant=variant)
    return ParallelSpec(**values)


def _parse_technique(path, entry, index: int, variant: str) -> TechniqueUse:
    key = f"techniques[{index}]"
    if isinstance(entry, str):
        name, args = entry, {}
    elif isinstance(entry, Mapping) and len(entry) == 1:
        name, args = next(iter(entry.items()))
        args = {} if args is None else args
        if not isinstance(args, Mapping):
            raise ScenarioError(path, f"arguments must be a mapping, got {_type_name(args)}",
                                key=f"{key}.{name}", variant=variant)
    else:
        raise ScenarioError(path, "must be a technique name or a one-key mapping "
                                  "{name: {arguments}}", key=key, variant=variant)
    if not isinstance(name, str) or name not in REGISTRY:
        hint = _did_you_mean(name, list(REGISTRY))
        raise ScenarioError(path, f"unknown technique {name!r}" +
                            (hint or f"; known: {', '.join(sorted(REGISTRY))}"), key=key,
                            variant=variant)
    try:
        resolved = REGISTRY[name].resolve_args(dict(args))
    except TechniqueArgError as e:
        raise ScenarioError(path, e.message, key=f"{key}.{name}" + (f".{e.key}" if e.key else ""),
                            variant=variant) from None
    except Exception as e:  # noqa: BLE001 - whatever the library raised, it is bad input
        raise ScenarioError(path, f"invalid arguments: {said(e, 200)}", key=f"{key}.{name}",
                            variant=variant) from None
    return TechniqueUse(name=name, args=resolved)


def _parse_variant(path, raw, index: int, base_train: TrainSpec, names: set,
                   parallel: ParallelSpec | None = None, job=None) -> Variant:
    try:
        return _parse_variant_keys(path, raw, index, base_train, names, parallel, job or {})
    except ScenarioError as e:  # a variant's own key reads from the top: variants[1].train.lr
        if e.variant is None or e.key is None or e.key.startswith("variants["):
            raise
        raise ScenarioError(path, e.message, key=f"variants[{index}].{e.key}",
                            variant=e.variant) from None


def _parse_variant_keys(path, raw, index: int, base_train: TrainSpec, names: set,
                        parallel: ParallelSpec | None, job: Mapping) -> Variant:
    key = f"variants[{index}]"
    variant = _require_mapping(path, raw, key)
    name = variant.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ScenarioError(path, f"needs a name of at most {MAX_NAME} letters, digits and "
                                  f". _ + - (it names a file), got {name!r}", key=f"{key}.name")
    if name in names:
        raise ScenarioError(path, "duplicate variant name", key=f"{key}.name", variant=name)
    _unknown_keys(path, variant, ["name", "description", "model", "techniques", "train",
                                  "parallel", "objective", *JOB_PARTS], key, name)
    model = None
    if "model" in variant:  # its keys on top of the scenario's
        model = _parse_model(path, {**job.get("model", {}), **_require_mapping(
            path, variant["model"], "model", name)}, name)
    description = variant.get("description", "")
    if description:
        _check_type(path, f"{key}.description", description, "str", name)
    entries = variant.get("techniques", [])
    if entries is None:
        entries = []
    if not isinstance(entries, list):
        raise ScenarioError(path, f"must be a list, got {_type_name(entries)}", key="techniques",
                            variant=name)
    uses = tuple(_parse_technique(path, entry, i, name) for i, entry in enumerate(entries))
    try:
        check_stack(uses)
    except TechniqueArgError as e:
        raise ScenarioError(path, e.message, key=e.key or "techniques", variant=name) from None
    train, overrides = (base_train, {})
    if "train" in variant:
        train, overrides = _parse_train(path, variant["train"], base_train, "train", name)
    _check_warmup(path, uses, train, "train.warmup_steps", name)
    _check_optimizer(path, uses, train, name)
    if "parallel" in variant:  # the variant's own replaces the scenario's; null: one process
        parallel = _parse_parallel(path, variant["parallel"], "parallel", name)
    # The variant's keys on top of the scenario's; null: none.
    parts = {part: _parse_job_part(path, part, variant[part], job.get(part), name)
             if part in variant else job.get(part) for part in JOB_PARTS}
    _check_eval(path, parts["eval"], train, name)
    _check_save(path, parts["save"], uses, name)
    _check_images(path, parts, name)
    # The variant's own replaces the scenario's; `sft`: the model's own loss.
    objective = _parse_objective(path, variant["objective"], "objective", name) \
        if "objective" in variant else job.get("objective")
    _check_objective(path, objective, uses, train, parallel, parts, name)
    return Variant(name=name, techniques=uses, train=train, train_overrides=overrides,
                   description=description, parallel=parallel, objective=objective,
                   model=model, **parts)


def _parse_objective(path, raw, key: str, variant=None) -> ObjectiveSpec | None:
    try:
        return parse_objective(raw)
    except ObjectiveError as e:
        raise ScenarioError(path, e.message, key=f"{key}.{e.key}" if e.key else key,
                            variant=variant) from None


def _check_objective(path, objective: ObjectiveSpec | None, uses, train: TrainSpec,
                     parallel, parts: Mapping, variant: str) -> None:
    """What an objective cannot be combined with (yet), and what TRL refuses of its arguments
    with the step's batch and length (objectives.check)."""
    if objective is None:
        return
    key = f"objective.{objective.name}"
    adapters = any(REGISTRY[u.name].adapters for u in uses)
    if objective.reference in ("adapter_disabled", "ref_adapter") and not adapters:
        raise ScenarioError(path, f"reference: {objective.reference} needs a PEFT adapter in "
                            "techniques (lora, qlora, peft); a full fine-tune's reference is a "
                            "copy", key=f"{key}.reference", variant=variant)
    loss = [u.name for u in uses if u.name == "chunked_nll"]
    if loss:
        raise ScenarioError(path, f"{objective.name} computes its own loss (TRL's trainer's); "
                            f"{loss[0]} replaces the model's loss", key="objective",
                            variant=variant)
    for part, what in (("data", "real lengths (data:)"), ("eval", "an evaluation (eval:)"),
                       ("images", "images (images:)")):
        if parts.get(part) is not None:
            raise ScenarioError(path, f"{objective.name} with {what} is not built yet",
                                key=part, variant=variant)
    if parallel is not None:
        raise ScenarioError(path, f"{objective.name} across processes is not built yet",
                            key="parallel", variant=variant)
    try:
        check_objective(objective, train)
    except ObjectiveError as e:
        raise ScenarioError(path, e.message, key=f"objective.{e.key}", variant=variant) from None


def _check_optimizer(path, uses, train: TrainSpec, variant: str) -> None:
    """PEFT's LoRA optimizers (lorafa, loraplus) need LoRA adapters to shape."""
    if not OPTIMIZERS[train.optimizer].needs_lora:
        return
    lora = any(u.name in ("lora", "qlora") or
               (u.name == "peft" and u.args.get("method") == "lora") for u in uses)
    if not lora:
        raise ScenarioError(path, f"optimizer {train.optimizer} shapes LoRA adapters: add lora, "
                            "qlora or {peft: {method: lora}} to the variant",
                            key="train.optimizer", variant=variant)


def _check_warmup(path, uses, train: TrainSpec, key: str, variant: str) -> None:
    warm = [u.name for u in uses if REGISTRY[u.name].needs_warmup]
    if warm and train.warmup_steps < 1:
        raise ScenarioError(path, f"{warm[0]} needs warmup_steps ≥ 1 (its first step compiles; "
                                  "step time would include it)", key=key, variant=variant)


def _check_against_model(path: Path, model: ModelSpec, variants: list[Variant]) -> None:
    """Each variant's stack applied to the model on the meta device, as the worker applies it
    (nothing allocated, nothing downloaded): a technique's own check first (LoRA's targets, in
    its words), then whatever the libraries refuse while building — PEFT's config checks and
    adapter injection, transformers' config and model classes — as bad input naming the
    technique, in the library's words. What this machine lacks (a package, a GPU) is left to
    the run, where it is an `unsupported` result."""
    from harness.models import resolve_config

    scenario_model = model
    built: dict[tuple, Any] = {}
    for at, variant in enumerate(variants):
        model = variant.model or scenario_model
        source = resolve_config(model, path)
        if source.kind != "file":
            continue  # a hub config we may not fetch here; the run reports what is missing
        for index, use in enumerate(variant.techniques):
            if REGISTRY[use.name].check_model is None:
                continue
            meta = _meta_or_refuse(path, model, source)
            try:
                problem = REGISTRY[use.name].check_model(meta, dict(use.args))
            except Exception as e:  # noqa: BLE001 - a value no check foresaw is still bad input
                problem = f"cannot check against the model: {type(e).__name__}: {e}"
            if problem:
                raise ScenarioError(path, problem, key=f"variants[{at}].techniques[{index}]."
                                    f"{use.name}", variant=variant.name)
        stack = (model, repr(variant.techniques))
        if stack not in built:
            built[stack] = _meta_build_failure(model, source, variant.techniques)
        if built[stack] is not None:
            use, problem = built[stack]
            key = ((f"variants[{at}]." if variant.model else "") + "model.config") \
                if use is None else \
                f"variants[{at}].techniques[{variant.techniques.index(use)}].{use.name}"
            raise ScenarioError(path, problem, key=key, variant=variant.name)
        if variant.objective is not None:
            problem = _objective_failure(model, source, variant)
            if problem:
                raise ScenarioError(path, problem, variant=variant.name,
                                    key=f"variants[{at}].objective.{variant.objective.name}")


def _objective_failure(model: ModelSpec, source, variant: Variant) -> str | None:
    """What TRL's trainer refuses as it is built around the variant's model on meta (its
    checks of arguments together: a loss type that needs label smoothing, …); None when it
    builds or only a run can tell (a missing package)."""
    import torch

    from harness.techniques import Unsupported, not_simulated, ordered
    from harness.train import build

    if torch.cuda.is_available() and any(t.load is not None for t, _ in ordered(
            variant.techniques)):
        return None
    uses = tuple(u for t, u in ordered(variant.techniques) if not not_simulated(t, u))
    try:
        with warnings.catch_warnings():  # the run records what the libraries warn of
            warnings.simplefilter("ignore")
            build(model, dataclasses.replace(source, layers=2), uses, torch.device("meta"),
                  train=variant.train, objective=variant.objective)
    except (Unsupported, ImportError):
        return None
    except Exception as e:  # noqa: BLE001 - TRL's refusal, in its words
        return f"TRL's trainer refuses it: {said(e)}"
    return None


def _meta_build_failure(model: ModelSpec, source, uses) -> tuple[TechniqueUse | None, str] | None:
    """What refuses to build on meta, and its message; None when it builds or when only a run
    can tell (a missing package or device: Unsupported, ImportError). A quantizing stack on a
    machine with CUDA is not built here: bitsandbytes would initialise CUDA in this process,
    whose workers then measure beside its context. Nothing built here outlives the check."""
    import torch

    from harness.techniques import Unsupported, not_simulated, ordered
    from harness.train import build_failure

    if torch.cuda.is_available() and any(t.load is not None for t, _ in ordered(uses)):
        return None
    # What cannot be simulated is not applied here either: only a device knows what it does,
    # and some of it acts process-wide (Liger patches the model classes themselves).
    uses = tuple(u for t, u in ordered(uses) if not not_simulated(t, u))
    # Two decoder layers build in a fraction of the time and refuse what the whole model would;
    # a refusal is confirmed at full depth (arguments such as layers_to_transform name layers).
    failed = build_failure(model, dataclasses.replace(source, layers=2), uses)
    if failed is not None:
        failed = build_failure(model, source, uses)
    if failed is None or isinstance(failed[1], (Unsupported, ImportError)):
        return None
    use, error = failed
    return use, f"{'the model' if use is None else use.name} cannot be built: {said(error)}"


def _meta_or_refuse(path, model: ModelSpec, source):
    try:
        return _cached_meta_model(model, source)
    except Exception as e:  # noqa: BLE001 - transformers' own complaint, on one line
        raise ScenarioError(path, f"the model cannot be built from its config: {said(e)}",
                            key="model.config") from None


@functools.lru_cache(maxsize=8)
def _cached_meta_model(model: ModelSpec, source):
    from harness.models import meta_model

    return meta_model(model, source)


def _parse(path: Path, raw: Any, sha256: str) -> Scenario:
    top = _require_mapping(path, raw, "scenario")
    _unknown_keys(path, top, ["name", "description", "model", "train", "parallel", "baseline",
                              "variants", "sweep", "objective", *JOB_PARTS], "scenario")
    for key in ("name", "model", "variants"):
        if key not in top:
            raise ScenarioError(path, "missing", key=key)
    _check_type(path, "name", top["name"], "str")
    if not _NAME.fullmatch(top["name"]):
        raise ScenarioError(path, f"needs a name of at most {MAX_NAME} letters, digits and "
                                  f". _ + - (it names a folder), got {top['name']!r}", key="name")
    if top["name"] != path.stem:
        raise ScenarioError(path, f"must equal the file stem {path.stem!r}, got {top['name']!r}",
                            key="name")
    description = top.get("description", "")
    if description:
        _check_type(path, "description", description, "str")
    model = _parse_model(path, top["model"])
    # `train:` with every key commented out is no train settings; `train: []` is a mistake.
    train, _ = _parse_train(path, {} if top.get("train") is None else top["train"], TrainSpec(),
                            "train")
    parallel = _parse_parallel(path, top.get("parallel"), "parallel")
    job = {part: _parse_job_part(path, part, top.get(part), None) for part in JOB_PARTS}
    job["objective"] = _parse_objective(path, top["objective"], "objective") \
        if "objective" in top else None
    job["model"] = top["model"]  # a variant's own model keys go on top of these
    raw_variants = top["variants"]
    if not isinstance(raw_variants, list) or not raw_variants:
        raise ScenarioError(path, "must be a non-empty list of variants", key="variants")
    variants: list[Variant] = []
    names: set[str] = set()
    for i, rv in enumerate(raw_variants):
        v = _parse_variant(path, rv, i, train, names, parallel, job)
        names.add(v.name)
        variants.append(v)
    _check_against_model(path, model, variants)
    baseline = top.get("baseline", variants[0].name)
    _check_type(path, "baseline", baseline, "str")
    if baseline not in names:
        hint = difflib.get_close_matches(str(baseline), sorted(names), n=1)
        raise ScenarioError(path, f"names no variant: {baseline!r}" +
                            (f" (did you mean {hint[0]!r}?)" if hint else ""), key="baseline")
    sweep = _parse_sweep(path, top["sweep"], train) if "sweep" in top else ()
    if sweep:
        variants = [_at_point(path, v, point) for v in variants for point in _points(sweep)]
    _check_images_fit(path, model, variants)
    return Scenario(name=top["name"], description=description, path=path, sha256=sha256,
                    model=model, train=train, baseline=baseline, variants=tuple(variants),
                    sweep=sweep)


def _parse_sweep(path, raw, train: TrainSpec) -> tuple[tuple[str, tuple], ...]:
    sweep = _require_mapping(path, raw, "sweep")
    if not sweep:
        raise ScenarioError(path, "must name at least one train key to sweep", key="sweep")
    _unknown_keys(path, sweep, list(_kinds(TrainSpec)), "sweep")
    axes = []
    for key, values in sweep.items():
        if not isinstance(values, list) or not values:
            raise ScenarioError(path, f"must be a non-empty list of values, got "
                                      f"{_type_name(values)}", key=f"sweep.{key}")
        checked = []
        for i, value in enumerate(values):
            try:  # checked, and typed, as a train value
                checked.append(getattr(_parse_train(path, {key: value}, train, "sweep")[0], key))
            except ScenarioError as e:
                raise ScenarioError(path, e.message, key=f"sweep.{key}[{i}]") from None
        if len(set(map(repr, checked))) != len(checked):
            raise ScenarioError(path, "lists a value twice", key=f"sweep.{key}")
        axes.append((key, tuple(checked)))
    return tuple(axes)


def _points(sweep) -> list[tuple[tuple[str, Any], ...]]:
    keys = [k for k, _ in sweep]
    return [tuple(zip(keys, values, strict=True))
            for values in itertools.product(*(v for _, v in sweep))]


def _at_point(path, variant: Variant, point) -> Variant:
    """The variant at one sweep point: the point's train values on top of the variant's."""
    train = dataclasses.replace(variant.train, **dict(point))
    _check_warmup(path, variant.techniques, train, "sweep.warmup_steps", variant.name)
    _check_eval(path, variant.eval, train, variant.name)
    _check_objective(path, variant.objective, variant.techniques, train, variant.parallel,
                     {"data": variant.data, "eval": variant.eval}, variant.name)
    return dataclasses.replace(variant, name=f"{variant.declared}@{point_label(point)}",
                               train=train, sweep_point=tuple(point))
