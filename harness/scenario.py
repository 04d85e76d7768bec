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
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import itertools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.optimizers import OPTIMIZERS
from harness.techniques import REGISTRY, TechniqueArgError, TechniqueUse, check_stack

SCENARIO_DIR = Path(__file__).resolve().parent.parent / "scenarios"
MODEL_DIR = SCENARIO_DIR / "models"

WEIGHTS = ("random", "pretrained")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
_VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


class ScenarioError(ValueError):
    """Bad input: one line naming the file, the variant (if any) and the key."""

    def __init__(self, path: Path | str, message: str, key: str | None = None,
                 variant: str | None = None):
        self.path, self.key, self.variant, self.message = str(path), key, variant, message
        where = [self.path]
        if variant is not None:
            where.append(f"variant {variant!r}")
        if key is not None:
            where.append(f"key {key!r}")
        super().__init__(": ".join(where) + ": " + message)


@dataclass(frozen=True)
class ModelSpec:
    config: str  # as written in the scenario
    weights: str = "random"
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False


@dataclass(frozen=True)
class TrainSpec:
    batch_size: int = 1
    seq_len: int = 512
    optimizer: str = "adamw"
    lr: float = 1.0e-4
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0  # None: no clipping
    steps: int = 3  # measured steps
    warmup_steps: int = 1  # run first; excluded from step time, included in peaks
    seed: int = 0


STRATEGIES = ("ddp", "fsdp2")
REDUCE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ParallelSpec:
    """How many processes train the variant, and how they split the model (parallel.py)."""

    strategy: str  # ddp | fsdp2
    world_size: int
    # fsdp2: free each unit's gathered parameters after its forward (all-gather again in
    # backward); put the sharded parameters, grads and the optimizer step on the CPU; the
    # dtype parameters are gathered in / gradients reduced in (None: the parameters' own).
    reshard_after_forward: bool = True
    cpu_offload: bool = False
    param_dtype: str | None = None
    reduce_dtype: str | None = None
    # ddp: gradient bucket size, and whether grads are views into the buckets.
    bucket_cap_mb: float = 25.0
    gradient_as_bucket_view: bool = False

    def as_dict(self) -> dict[str, Any]:
        """The options that apply to the strategy, for records and tables."""
        keys = _PARALLEL_KEYS[self.strategy]
        return {k: getattr(self, k) for k in ("strategy", "world_size", *keys)}

    def label(self) -> str:
        return f"{self.strategy}×{self.world_size}"


_PARALLEL_KEYS = {"fsdp2": ("reshard_after_forward", "cpu_offload", "param_dtype",
                            "reduce_dtype"),
                  "ddp": ("bucket_cap_mb", "gradient_as_bucket_view")}


@dataclass(frozen=True)
class Variant:
    name: str  # unique in the scenario; with a sweep point: "<declared name>@<point>"
    techniques: tuple[TechniqueUse, ...]
    train: TrainSpec  # scenario train with this variant's overrides (and sweep point) applied
    train_overrides: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    sweep_point: tuple[tuple[str, Any], ...] = ()  # (train key, value) pairs, in sweep order
    parallel: ParallelSpec | None = None  # None: one process

    @property
    def declared(self) -> str:
        """The name as the scenario declares it, without the sweep point."""
        return self.name.split("@", 1)[0]


def point_label(point) -> str:
    """`seq_len=512,batch_size=2`: how a sweep point reads in names and tables."""
    return ",".join(f"{k}={v}" for k, v in dict(point).items())


def parse_point(label: str) -> dict[str, Any]:
    """`seq_len=512,batch_size=2` → {"seq_len": 512, "batch_size": 2}, typed as train is."""
    point = {}
    for part in label.split(","):
        key, _, text = part.partition("=")
        if key not in _TRAIN_TYPES:
            raise KeyError(key)
        kind = _TRAIN_TYPES[key][0]
        point[key] = None if text == "None" else int(text) if kind == "int" else \
            float(text) if kind == "float" else text
    return point


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

    def variant(self, name: str) -> Variant:
        """By name; `<declared>@<key>=<value>,…` is that variant at that point of the train
        settings even where no sweep of the scenario has it (what `harness fit` probes)."""
        for v in self.variants:
            if v.name == name:
                return v
        if "@" in name:
            declared, label = name.split("@", 1)
            return self.at_point(declared, parse_point(label))
        raise KeyError(name)

    def at_point(self, declared: str, point: Mapping[str, Any]) -> Variant:
        """A declared variant with `point`'s train values on top (of its sweep point's, if any)."""
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
    seen = set()
    for key_node, _ in node.value:
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


def load_scenario(arg: str | Path, only: str | None = None) -> Scenario:
    """Load and validate a scenario. `only`: resolve the technique arguments of that variant
    alone (a worker re-checking the one variant it runs; the file was validated whole before)."""
    path = resolve_scenario_path(arg)
    raw_bytes = path.read_bytes()
    try:
        raw = yaml.load(raw_bytes.decode("utf-8"), Loader=_StrictLoader)  # noqa: S506 - safe subclass
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ScenarioError(path, "not valid YAML: " + " ".join(str(e).split())) from None
    except RecursionError:
        raise ScenarioError(path, "not valid YAML: nested too deeply") from None
    return _parse(path, raw, hashlib.sha256(raw_bytes).hexdigest(), only)


# ---------------------------------------------------------------------------------------------
# Parsing: every check names the file, variant and key.


def _unknown_keys(path, given: Mapping, allowed, where: str, variant: str | None = None):
    for key in given:
        if key not in allowed:
            hint = difflib.get_close_matches(str(key), list(allowed), n=1)
            msg = f"unknown key {key!r} in {where}" + (f" (did you mean {hint[0]!r}?)" if hint
                                                      else f"; allowed: {', '.join(allowed)}")
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


def _parse_model(path, raw, deep: bool = True) -> ModelSpec:
    """deep: also read the config file (transformers, seconds); a worker skips it."""
    model = _require_mapping(path, raw, "model")
    _unknown_keys(path, model, [f.name for f in dataclasses.fields(ModelSpec)], "model")
    if "config" not in model:
        raise ScenarioError(path, "missing (a name under scenarios/models, a config path or a hub id)",
                            key="model.config")
    _check_type(path, "model.config", model["config"], "str")
    weights = model.get("weights", "random")
    if weights not in WEIGHTS:
        raise ScenarioError(path, f"must be one of {', '.join(WEIGHTS)}, got {weights!r}",
                            key="model.weights")
    attn = model.get("attn_implementation", "sdpa")
    if attn not in ATTN_IMPLEMENTATIONS:
        raise ScenarioError(path, f"must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, got {attn!r}",
                            key="model.attn_implementation")
    trust = model.get("trust_remote_code", False)
    _check_type(path, "model.trust_remote_code", trust, "bool")
    spec = ModelSpec(config=model["config"], weights=weights, attn_implementation=attn,
                     trust_remote_code=trust)
    # Imported here: models.py pulls in transformers, which validation of the rest does not need.
    from harness.models import ModelConfigError, load_config, resolve_config

    try:
        source = resolve_config(spec, path)
    except ModelConfigError as e:
        raise ScenarioError(path, str(e), key="model.config") from None
    if source.kind == "file" and deep:
        try:
            load_config(source, spec.trust_remote_code)
        except Exception as e:  # noqa: BLE001 - transformers' own complaint, on one line
            raise ScenarioError(path, f"cannot read model config {source.location}: "
                                + " ".join(str(e).split())[:300], key="model.config") from None
    return spec


_TRAIN_TYPES = {
    "batch_size": ("int", 1),
    "seq_len": ("int", 2),  # one token has no next-token target
    "optimizer": ("str", None),
    "lr": ("float", None),
    "weight_decay": ("float", 0),
    "max_grad_norm": ("float", None),
    "steps": ("int", 1),
    "warmup_steps": ("int", 0),
    "seed": ("int", 0),
}


def _parse_train(path, raw, base: TrainSpec, where: str, variant=None) -> tuple[TrainSpec, dict]:
    train = _require_mapping(path, raw, where, variant)
    _unknown_keys(path, train, list(_TRAIN_TYPES), where, variant)
    for key, value in train.items():
        kind, minimum = _TRAIN_TYPES[key]
        full = f"{where}.{key}"
        if key == "max_grad_norm" and value is None:
            continue
        _check_type(path, full, value, kind, variant)
        if minimum is not None and value < minimum:
            raise ScenarioError(path, f"must be ≥ {minimum}, got {value!r}", key=full, variant=variant)
        if kind == "float" and not math.isfinite(value):
            raise ScenarioError(path, f"must be a finite number, got {value!r}", key=full,
                                variant=variant)
        if key == "seed" and value >= 2 ** 64:
            raise ScenarioError(path, f"must be < 2**64, got {value!r}", key=full, variant=variant)
        if key in ("lr", "max_grad_norm") and value <= 0:
            raise ScenarioError(path, f"must be > 0, got {value!r}", key=full, variant=variant)
        if key == "optimizer" and value not in OPTIMIZERS:
            hint = difflib.get_close_matches(value, list(OPTIMIZERS), n=1)
            raise ScenarioError(path, f"unknown optimizer {value!r}" +
                                (f" (did you mean {hint[0]!r}?)" if hint else
                                 f"; known: {', '.join(OPTIMIZERS)}"), key=full, variant=variant)
    values = {k: (float(v) if _TRAIN_TYPES[k][0] == "float" and v is not None else v)
              for k, v in train.items()}
    return dataclasses.replace(base, **values), dict(train)


def _parse_parallel(path, raw, where: str, variant=None) -> ParallelSpec | None:
    """`parallel: {strategy, world_size, …}`; null: one process."""
    if raw is None:
        return None
    given = _require_mapping(path, raw, where, variant)
    strategy = given.get("strategy")
    if strategy not in STRATEGIES:
        raise ScenarioError(path, f"must be one of {', '.join(STRATEGIES)}, got {strategy!r}",
                            key=f"{where}.strategy", variant=variant)
    options = _PARALLEL_KEYS[strategy]
    for key in given:
        if key not in ("strategy", "world_size", *options):
            other = next((s for s, keys in _PARALLEL_KEYS.items() if key in keys), None)
            if other is not None:  # an option of the other strategy contradicts this one
                raise ScenarioError(path, f"is an option of {other}, not of {strategy}",
                                    key=f"{where}.{key}", variant=variant)
            _unknown_keys(path, {key: None}, ["strategy", "world_size", *options], where, variant)
    if "world_size" not in given:
        raise ScenarioError(path, "missing (how many processes: GPUs, or CPU ranks)",
                            key=f"{where}.world_size", variant=variant)
    values: dict[str, Any] = {}
    for key, value in given.items():
        full = f"{where}.{key}"
        if key == "world_size":
            _check_type(path, full, value, "int", variant)
            if value < 1:
                raise ScenarioError(path, f"must be ≥ 1, got {value!r}", key=full, variant=variant)
        elif key in ("reshard_after_forward", "cpu_offload", "gradient_as_bucket_view"):
            _check_type(path, full, value, "bool", variant)
        elif key in ("param_dtype", "reduce_dtype"):
            if value is not None and value not in REDUCE_DTYPES:
                raise ScenarioError(path, f"must be one of {', '.join(REDUCE_DTYPES)} or null, "
                                          f"got {value!r}", key=full, variant=variant)
        elif key == "bucket_cap_mb":
            _check_type(path, full, value, "float", variant)
            if value <= 0:
                raise ScenarioError(path, f"must be > 0, got {value!r}", key=full, variant=variant)
            value = float(value)
        values[key] = value
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
        hint = difflib.get_close_matches(str(name), list(REGISTRY), n=1)
        raise ScenarioError(path, f"unknown technique {name!r}" +
                            (f" (did you mean {hint[0]!r}?)" if hint else
                             f"; known: {', '.join(sorted(REGISTRY))}"), key=key, variant=variant)
    try:
        resolved = REGISTRY[name].resolve_args(dict(args))
    except TechniqueArgError as e:
        raise ScenarioError(path, e.message, key=f"{key}.{name}" + (f".{e.key}" if e.key else ""),
                            variant=variant) from None
    except Exception as e:  # noqa: BLE001 - whatever the library raised, it is bad input
        raise ScenarioError(path, f"invalid arguments: {type(e).__name__}: " +
                            " ".join(str(e).split())[:200], key=f"{key}.{name}",
                            variant=variant) from None
    return TechniqueUse(name=name, args=resolved)


def _parse_variant(path, raw, index: int, base_train: TrainSpec, names: set,
                   only: str | None = None, parallel: ParallelSpec | None = None) -> Variant:
    key = f"variants[{index}]"
    variant = _require_mapping(path, raw, key)
    name = variant.get("name")
    if not isinstance(name, str) or not _VARIANT_NAME.match(name):
        raise ScenarioError(path, "needs a name of letters, digits and . _ + - (it names a file), "
                                  f"got {name!r}", key=f"{key}.name")
    if name in names:
        raise ScenarioError(path, "duplicate variant name", key=f"{key}.name", variant=name)
    _unknown_keys(path, variant, ["name", "description", "techniques", "train", "parallel"],
                  key, name)
    description = variant.get("description", "")
    if description:
        _check_type(path, f"{key}.description", description, "str", name)
    entries = variant.get("techniques", [])
    if entries is None:
        entries = []
    if not isinstance(entries, list):
        raise ScenarioError(path, f"must be a list, got {_type_name(entries)}", key="techniques",
                            variant=name)
    if only is not None and name != only.split("@", 1)[0]:
        entries = []  # another variant: the worker does not need its techniques
    uses = tuple(_parse_technique(path, entry, i, name) for i, entry in enumerate(entries))
    try:
        check_stack(uses)
    except TechniqueArgError as e:
        raise ScenarioError(path, e.message, key=e.key or "techniques", variant=name) from None
    train, overrides = (base_train, {})
    if "train" in variant:
        train, overrides = _parse_train(path, variant["train"], base_train, "train", name)
    _check_warmup(path, uses, train, "train.warmup_steps", name)
    if "parallel" in variant:  # the variant's own replaces the scenario's; null: one process
        parallel = _parse_parallel(path, variant["parallel"], "parallel", name)
    return Variant(name=name, techniques=uses, train=train, train_overrides=overrides,
                   description=description, parallel=parallel)


def _check_warmup(path, uses, train: TrainSpec, key: str, variant: str) -> None:
    warm = [u.name for u in uses if REGISTRY[u.name].needs_warmup]
    if warm and train.warmup_steps < 1:
        raise ScenarioError(path, f"{warm[0]} needs warmup_steps ≥ 1 (its first step compiles; "
                                  "step time would include it)", key=key, variant=variant)


def _check_against_model(path: Path, model: ModelSpec, variants: list[Variant]) -> None:
    """Techniques that need something of the model (LoRA's target modules) are checked against
    the model built on the meta device: nothing allocated, nothing downloaded."""
    checks = [(v, u) for v in variants for u in v.techniques if REGISTRY[u.name].check_model]
    if not checks:
        return
    from harness.models import resolve_config

    source = resolve_config(model, path)
    if source.kind != "file":
        return  # a hub config we may not fetch here; the run reports what is missing
    meta = _cached_meta_model(model, source)
    for variant, use in checks:
        try:
            problem = REGISTRY[use.name].check_model(meta, dict(use.args))
        except Exception as e:  # noqa: BLE001 - a value no check foresaw is still bad input
            problem = f"cannot check against the model: {type(e).__name__}: {e}"
        if problem:
            index = variant.techniques.index(use)
            raise ScenarioError(path, problem, key=f"techniques[{index}].{use.name}",
                                variant=variant.name)


@functools.lru_cache(maxsize=8)
def _cached_meta_model(model: ModelSpec, source):
    from harness.models import meta_model

    return meta_model(model, source)


def _parse(path: Path, raw: Any, sha256: str, only: str | None = None) -> Scenario:
    top = _require_mapping(path, raw, "scenario")
    _unknown_keys(path, top, ["name", "description", "model", "train", "parallel", "baseline",
                              "variants", "sweep"], "scenario")
    for key in ("name", "model", "variants"):
        if key not in top:
            raise ScenarioError(path, "missing", key=key)
    _check_type(path, "name", top["name"], "str")
    if top["name"] != path.stem:
        raise ScenarioError(path, f"must equal the file stem {path.stem!r}, got {top['name']!r}",
                            key="name")
    description = top.get("description", "")
    if description:
        _check_type(path, "description", description, "str")
    model = _parse_model(path, top["model"], deep=only is None)
    train, _ = _parse_train(path, top.get("train", {}) or {}, TrainSpec(), "train")
    parallel = _parse_parallel(path, top.get("parallel"), "parallel")
    raw_variants = top["variants"]
    if not isinstance(raw_variants, list) or not raw_variants:
        raise ScenarioError(path, "must be a non-empty list of variants", key="variants")
    variants: list[Variant] = []
    names: set[str] = set()
    for i, rv in enumerate(raw_variants):
        v = _parse_variant(path, rv, i, train, names, only, parallel)
        names.add(v.name)
        variants.append(v)
    if only is None:
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
    return Scenario(name=top["name"], description=description, path=path, sha256=sha256,
                    model=model, train=train, baseline=baseline, variants=tuple(variants),
                    sweep=sweep)


def _parse_sweep(path, raw, train: TrainSpec) -> tuple[tuple[str, tuple], ...]:
    sweep = _require_mapping(path, raw, "sweep")
    if not sweep:
        raise ScenarioError(path, "must name at least one train key to sweep", key="sweep")
    _unknown_keys(path, sweep, list(_TRAIN_TYPES), "sweep")
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
    return dataclasses.replace(variant, name=f"{variant.declared}@{point_label(point)}",
                               train=train, sweep_point=tuple(point))
