"""The JSON record: one per variant, versioned, written once and atomically.

Three parts, as PEFT's method comparison keeps them: what was run (scenario, variant, model,
train), what was measured (status, memory, timing), where it ran (device, method, env).
Bytes are whole integers; anything the tool cannot know is null, never a guess.

The schema is the dataclasses below: their fields are the keys, their annotations the types,
their comments what each means. The harness builds a `Record` (`new_record`), fills its parts
as attributes, and writes it (`write_record`, which turns it into the JSON on disk); readers of
results get that JSON back as plain dicts (`read_record`). `check_record` holds every record
to the schema before it is written and after it is read, so a key that is missing, misspelt or
of the wrong type fails where it is made. A change to a field bumps SCHEMA_VERSION with an
entry in _UPGRADES, so old records still load.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
import os
import platform
import subprocess
import tempfile
import types
import typing
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 6
STATUSES = ("ok", "oom", "error", "unsupported")
METHODS = ("measured-cpu", "measured-cuda", "simulated", "estimated")
REPO_ROOT = Path(__file__).resolve().parent.parent
_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "trl", "accelerate", "liger-kernel")


class RecordError(ValueError):
    pass


@dataclass
class ScenarioPart:
    name: str
    path: str | None  # as given; None for code profiled without a scenario (profiling.py)
    sha256: str | None  # of the scenario file's bytes
    baseline: str | None  # the variant others are compared with


@dataclass
class VariantPart:
    name: str  # as declared, without a sweep point
    description: str
    techniques: list  # [{name, args}] in the order applied, args resolved (defaults filled in)
    train_overrides: dict  # the variant's own train keys
    index: int | None = None  # position in the scenario, sweep points expanded


@dataclass
class ModelPart:
    config: str  # as the scenario names it (a committed config, a path, a hub id)
    weights: str | None  # "random" | "pretrained"; None when profiled
    attn_implementation: str
    params_total: int | None = None
    params_trainable: int | None = None
    quantized_params: int | None = None  # parameters stored quantized (bitsandbytes)
    virtual_tokens: dict | None = None  # a PEFT method's own tokens: {count, where}; where
    #   "sequence" (prompt tuning, P-tuning, CPT: prepended, every layer runs seq_len + count),
    #   "attention" (prefix tuning: keys and values each layer attends to beside the
    #   sequence, as cartridges; adaption prompt: its own attention over them, in `layers`
    #   layers); null: none
    experts: dict | None = None  # a mixture of experts (models.experts_of): {count, top_k,
    #   implementation (transformers': grouped_mm, batched_mm, eager), routing (what the
    #   figures assume of it: "any" where no buffer depends on it; eager: balanced | worst in
    #   a simulation, "as routed" where it ran)}; null: a dense model
    vision: dict | None = None  # a vision-language model's image encoder (images.py):
    #   {module (its path), params, trained (model.train_vision)}; null: a text-only model


@dataclass
class Timing:
    step_time_s_median: float | None  # measured steps only; null when simulated or estimated
    tokens_per_s: float | None
    warmup_s: float | None  # the warm-up steps together, compilation included
    wall_s: float | None  # the whole variant, build included


@dataclass
class Memory:
    """Every figure is the whole process's (parallel: rank `rank`'s, the one with the highest
    peak). Device extras beside these are allowed (a probe's own figures)."""

    peak_allocated_bytes: int | None
    peak_reserved_bytes: int | None  # null on CPU; predicted when simulated
    phases: dict  # {load|forward|backward|optimizer|eval: {peak_allocated_bytes,
    #   peak_reserved_bytes, breakdown_bytes (at that phase's own peak), step, ...}}
    per_step_peak_allocated_bytes: list  # warm-up steps first
    breakdown_bytes: dict | None  # {params, grads, optimizer, activations, other,
    #   unattributed} at the overall peak
    peak_phase: str | None = None
    peak_step: int | None = None
    per_step_peak_reserved_bytes: list | None = None  # each step's reserved peak, warm-up
    #   first: how it grows as shapes vary (`data:`); null where reserved is unknown
    peak_micro_batch: int | None = None  # with gradient accumulation: the micro-batch (from
    #   0) whose forward or backward set the peak; null without accumulation or elsewhere
    breakdown_note: str | None = None
    end_of_step_bytes: dict | None = None  # the same categories after the last optimizer
    #   step: what persists between steps
    paged_optimizer_bytes: int | None = None  # bitsandbytes paged state in CUDA unified
    #   memory, which no allocator figure includes; 0 when none
    quantized_weight_bytes: int | None = None
    kv_cache_bytes: int | None = None  # generate: the KV cache's tensors at their largest
    #   (after the last token's forward); null where nothing generated
    tracked_tensor_peak_bytes: int | None = None
    budget_bytes: int | None = None  # --memory-budget / fit's budget
    rank: int | None = None  # parallel: whose figures these are
    ranks: list | None = None  # parallel: per rank {rank, status, error, peak_allocated_bytes,
    #   peak_reserved_bytes, peak_phase, breakdown_bytes, end_of_step_bytes}; its params/
    #   grads/optimizer that rank's shards, the collectives' buffers under other
    imbalance: float | None = None  # parallel: the highest rank peak over the mean, minus 1
    snapshot_file: str | None = None  # with --snapshot: the memory_viz snapshot beside it
    target: str | None = None  # simulated/estimated: "cuda" or "cpu" (CUDA kernels' scratch
    #   buffers modelled or not)
    reserved_model: str | None = None  # simulated: what predicted peak_reserved_bytes (a
    #   replay of CUDA's caching allocator, default or expandable_segments), or null
    terms_bytes: dict | None = None  # estimated: each named term of the closed form
    alloc_retries: int | None = None  # measured on CUDA: allocator retries (cudaMalloc
    #   failed, caches flushed) during the run
    device_total_bytes: int | None = None  # measured on CUDA
    device_used_at_start_bytes: int | None = None  # includes this process's CUDA context
    other_processes_bytes_at_start: int | None = None
    pytorch_cuda_alloc_conf: str | None = None
    extras: dict = field(default_factory=dict, metadata={"inline": True})  # a probe's own
    #   figures: on disk beside the fields above, not under a key of their own

    @classmethod
    def of(cls, memory: dict[str, Any]) -> Memory:
        """From a probe's (or a record's) `memory` object: the fields by name, the rest extras."""
        names = _fields(cls)[0].keys()
        try:
            return cls(**{k: v for k, v in memory.items() if k in names},
                       extras={k: v for k, v in memory.items() if k not in names})
        except TypeError as e:  # a required figure missing
            raise RecordError(f"memory: {e}") from None


@dataclass
class Record:
    schema_version: int  # SCHEMA_VERSION when written (older ones are upgraded on read)
    run_id: str  # "<UTC timestamp>-<git sha7>[-dirty]": sorts by time
    scenario: ScenarioPart
    sweep_point: dict | None  # {train key: value} of the scenario's sweep this record is at
    #   (its file is "<variant>@<key>=<value>,….json")
    variant: VariantPart
    model: ModelPart
    train: dict  # the effective train settings (scenario's, variant overrides, --steps)
    parallel: dict | None  # null: one process; else {strategy: "ddp" | "fsdp2", world_size,
    #   and the strategy's options (scenario.ParallelSpec.as_dict)}
    device: str  # "cpu" | "cuda:0" | "simulate" | "estimate"
    method: str  # one of METHODS: measured on this device, simulated (fake tensors) or
    #   estimated (closed form, estimate.py: no tensor created)
    status: str  # one of STATUSES
    error: str | None  # null, or why (OOM message, stderr tail, the missing capability)
    memory: Memory
    timing: Timing
    env: dict | None  # where it ran (collect_env): package versions, GPU, git, the
    #   environment variables figures depend on
    notes: list = field(default_factory=list)  # what the libraries warned about, and how a
    #   figure was obtained (extrapolated, simulated steps)
    # The job beyond its training steps, as run (scenario.EvalSpec / GenerateSpec with the
    # training shape filled in); null: none. Their phases are memory.phases.eval / .generate.
    eval: dict | None = None
    generate: dict | None = None
    # `save:` in order, each {kind, device, cpu_offload} as asked and, once it ran, its
    # peak_allocated_bytes (memory.phases.save: the largest), the files written
    # (written_bytes: their sizes; simulated: as large as their tensors, sparse), this
    # process's resident host memory meanwhile (host_rss_peak_bytes, host_rss_growth_bytes:
    # null when simulated) and seconds; `skipped`: why it did not run. null: nothing saved.
    save: list | None = None
    # `data:` (harness/data.py): the source as given and what it held (samples, length
    # p50/p99/max, truncated_samples), each step's micro-batch shapes and tokens, the per-step
    # peaks' p50/p99/max with the step and shapes of the maximum (the peaks themselves, and
    # reserved step by step, are memory's per_step_* lists). null: fixed-shape batches.
    data: dict | None = None
    # `objective:` (harness/objectives.py): {name, args (TRL's config fields as given),
    # reference (adapter_disabled | ref_adapter | copy | precomputed | none), prompt_len}
    # and, once built, trainer (the TRL class whose compute_loss ran), trl_version, head
    # (causal_lm | sequence_classification: a reward model), reference_params (copy: the
    # second model's; else null), sequences_per_step (2 × batch × accumulation for pairs;
    # GRPO: prompts_per_step × num_generations), completion_tokens_per_step (tokens with a
    # label: what the fused LM head scores on CUDA; null for a reward model, which scores
    # sequences), forwards_per_micro_batch ({with_grad, without_grad} in the loss); KTO:
    # kl_sequences_per_step, desirable_per_step; GRPO: num_generations, prompts_per_step,
    # max_completion_length, generation_batch_size (completions generated at once),
    # forwards_per_generation ({generate: one a token, reference: scoring passes}).
    # null: sft, the model's own loss.
    objective: dict | None = None
    # `images:` (harness/images.py): {count, height, width, min_pixels, max_pixels} per
    # sample as asked (null: the processor's own bounds) and, once
    # made, processor (the image processor's class), tokens_per_image (placeholders each
    # image takes in the text), tokens_per_sample (with each image's start and end tokens:
    # of seq_len, the rest is text), pixel_values_shape (a micro-batch's). null: text only.
    images: dict | None = None


    def as_dict(self) -> dict[str, Any]:
        """The JSON object on disk (a probe's extras inline in `memory`)."""
        out = dataclasses.asdict(self)
        out["memory"].update(out["memory"].pop("extras"))
        return out

    @classmethod
    def of(cls, record: dict[str, Any]) -> Record:
        """A record read back (read_record: upgraded and checked) as the dataclasses again."""
        check_record(record)
        return _construct(cls, record)


def _construct(part: type, value: dict[str, Any]):
    if part is Memory:
        return Memory.of(value)
    kinds = _fields(part)[0]
    built = {}
    for key, item in value.items():
        inner = _dataclass_of(kinds[key])
        built[key] = _construct(inner, item) if inner is not None and item is not None else item
    return part(**built)


def _arms(kind: Any) -> tuple:
    """The types a field's annotation allows: each arm of a union, or the one type."""
    return typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) \
        else (kind,)


def _dataclass_of(kind: Any) -> type | None:
    return next((a for a in _arms(kind) if dataclasses.is_dataclass(a)), None)


_OPEN = (Memory,)  # parts that may carry keys beyond their fields


def _upgrade_1(record: dict) -> dict:
    """Schema 2 records the environment variables that change figures (a schema-1 record did
    not say: null) and holds every record to the schema's keys: records written before
    parallel runs and sweeps existed lack those keys (one process; no sweep point)."""
    if isinstance(record.get("env"), dict):
        record["env"].setdefault("cublas_workspace_config", None)
    for key, default in (("parallel", None), ("sweep_point", None), ("notes", [])):
        record.setdefault(key, default)
    if isinstance(record.get("timing"), dict):
        record["timing"].setdefault("warmup_s", None)
    if isinstance(record.get("model"), dict):  # a record that never built its model
        record["model"].setdefault("quantized_params", None)
    return {**record, "schema_version": 2}


def _upgrade_2(record: dict) -> dict:
    """Schema 3 says what ran after the training steps (`eval`, `generate`: nothing did
    before) and names the KV cache (the optional `memory.kv_cache_bytes`, the breakdowns'
    `kv_cache`, which older breakdowns lack: none was made)."""
    for key in ("eval", "generate"):
        record.setdefault(key, None)
    return {**record, "schema_version": 3}


def _upgrade_3(record: dict) -> dict:
    """Schema 4 says what was saved (`save`; nothing was before) and the batches' real lengths
    (`data`; fixed-shape batches before)."""
    record.setdefault("save", None)
    record.setdefault("data", None)
    return {**record, "schema_version": 4}


def _upgrade_4(record: dict) -> dict:
    """Schema 5 names the objective (`objective`; every step before was sft: null)."""
    record.setdefault("objective", None)
    return {**record, "schema_version": 5}


def _upgrade_5(record: dict) -> dict:
    """Schema 6 says what images each sample held (`images`; none before: null) and names a
    model's image encoder (`model.vision`; null before). Breakdowns gain
    `vision_activations`, which older ones lack: they counted the encoder's activations in
    `activations`."""
    record.setdefault("images", None)
    if isinstance(record.get("model"), dict):
        record["model"].setdefault("vision", None)
    return {**record, "schema_version": 6}


# version → function upgrading a record of that version to the next
_UPGRADES: dict[int, Any] = {1: _upgrade_1, 2: _upgrade_2, 3: _upgrade_3, 4: _upgrade_4,
                             5: _upgrade_5}


def new_record(*, run_id: str, scenario, variant, device: str, method: str,
               index: int | None = None, env: dict[str, Any] | None = None) -> Record:
    """A record with every key present, status `error` and measured fields null until filled."""
    from harness.techniques import ordered

    return Record(
        schema_version=SCHEMA_VERSION, run_id=run_id,
        scenario=ScenarioPart(scenario.name, str(scenario.path), scenario.sha256,
                              scenario.baseline),
        # A sweep point's record: the declared variant's name, and the point beside it.
        sweep_point=dict(variant.sweep_point) or None,
        variant=VariantPart(
            name=variant.declared, description=variant.description,
            # In the order they are applied (stage by stage), whatever the YAML's order.
            techniques=[{"name": u.name, "args": dict(u.args)}
                        for _, u in ordered(variant.techniques)],
            train_overrides=dict(variant.train_overrides), index=index),
        model=ModelPart(scenario.model_of(variant).config, scenario.model_of(variant).weights,
                        scenario.model_of(variant).attn_implementation),
        train={**{k: getattr(variant.train, k) for k in variant.train.__dataclass_fields__},
               "effective_batch_size": variant.train.effective_batch_size},
        parallel=variant.parallel.as_dict() if variant.parallel else None,
        device=device, method=method, status="error", error=None,
        memory=Memory(None, None, {}, [], None),
        timing=Timing(None, None, None, None), env=env,
        eval=_resolved(variant, "eval"), generate=_resolved(variant, "generate"),
        save=[s.as_dict() for s in variant.save] if getattr(variant, "save", None) else None,
        data={"spec": _data_spec(variant.data)} if getattr(variant, "data", None) else None,
        objective=_objective(variant),
        images=dataclasses.asdict(variant.images) if getattr(variant, "images", None) else None)


def _objective(variant) -> dict | None:
    """The objective as asked, its reference resolved for the variant's stack."""
    from harness.techniques import REGISTRY

    spec = getattr(variant, "objective", None)
    if spec is None:
        return None
    adapters = any(REGISTRY[u.name].adapters for u in variant.techniques)
    return {"name": spec.name, "args": dict(spec.args), "reference": spec.reference_of(adapters),
            "prompt_len": spec.prompt_tokens(variant.train.seq_len)}


def _data_spec(spec) -> dict:
    """The `data:` settings as given (the source's lengths list summarised, not repeated)."""
    out = {k: v for k, v in dataclasses.asdict(spec).items() if v is not None}
    if spec.dataset is None:
        out.pop("text_field")
    if "lengths" in out:
        out["lengths"] = f"{len(out['lengths'])} lengths"
    return out


def _resolved(variant, part: str) -> dict | None:
    """The variant's eval or generate settings as run; none for a profiled script's."""
    spec = getattr(variant, part, None)
    return spec.resolved(variant.train) if spec is not None else None


def write_record(path: Path, record: Record) -> None:
    """Temp file in the same folder, fsync, rename: a reader never sees a partial record."""
    record = record.as_dict()
    check_record(record)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; records are for every reader
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_record(path: Path) -> dict[str, Any]:
    record = json.loads(Path(path).read_text())
    version = record.get("schema_version") if isinstance(record, dict) else None
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise RecordError(f"{path}: unknown schema_version {version!r}")
    while record["schema_version"] < SCHEMA_VERSION:
        record = _UPGRADES[record["schema_version"]](record)
    check_record(record)
    return record


def check_record(record: dict[str, Any]) -> None:
    """The contract scripts rely on: the schema's keys present, no others, types right."""
    _check_part(Record, record, "")
    if record["status"] not in STATUSES:
        raise RecordError(f"bad status {record['status']!r}")
    if record["method"] not in METHODS:
        raise RecordError(f"bad method {record['method']!r}")
    memory = record["memory"]
    for key in ("peak_allocated_bytes", "peak_reserved_bytes"):
        value = memory.get(key)
        if value is not None and value < 0:
            raise RecordError(f"memory.{key} must be whole bytes, got {value!r}")
    if record["status"] == "ok" and memory.get("peak_allocated_bytes") is None:
        raise RecordError("an ok record needs memory.peak_allocated_bytes")


@functools.cache
def _fields(part: type) -> tuple[dict[str, Any], frozenset[str]]:
    """(every key's type, the keys a record must have): the fields, but for those written
    inline (a part's extras)."""
    hints = typing.get_type_hints(part)
    keys = [f for f in dataclasses.fields(part) if not f.metadata.get("inline")]
    required = frozenset(f.name for f in keys if f.default is dataclasses.MISSING and
                         f.default_factory is dataclasses.MISSING)
    return {f.name: hints[f.name] for f in keys}, required


def _check_part(part: type, value: Any, where: str) -> None:
    if not isinstance(value, dict):
        raise RecordError(f"record {where or 'itself'} must be an object, got {value!r:.80}")
    kinds, required = _fields(part)
    missing = sorted(required - value.keys())
    if missing:
        raise RecordError(f"record lacks {where + missing[0]!r}")
    unknown = sorted(value.keys() - kinds.keys())
    if unknown and part not in _OPEN:
        raise RecordError(f"record has an unknown key {where + unknown[0]!r}")
    for key, kind in kinds.items():
        if key in value:
            _check_value(kind, value[key], f"{where}{key}")


def _check_value(kind: Any, value: Any, where: str) -> None:
    if dataclasses.is_dataclass(kind):
        return _check_part(kind, value, where + ".")
    arms = _arms(kind)
    if value is None and type(None) in arms:
        return
    for arm in arms:
        if dataclasses.is_dataclass(arm):
            return _check_part(arm, value, where + ".")
        if arm is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return
        if arm is int and isinstance(value, int) and not isinstance(value, bool):
            return
        if arm in (str, bool, dict, list) and isinstance(value, arm):
            return
    names = " or ".join("null" if a is type(None) else getattr(a, "__name__", str(a))
                        for a in arms)
    raise RecordError(f"record {where} must be {names}, got {value!r:.80}")


# ---------------------------------------------------------------------------------------------
# Where it ran


def git_state(root: Path = REPO_ROOT) -> tuple[str | None, bool | None]:
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                 "--untracked-files=no"], capture_output=True, text=True,
                                timeout=10, check=True).stdout
        return sha, bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None


def new_run_id(now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now(dt.timezone.utc)
    sha, dirty = git_state()
    stamp = now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond // 1000:03d}Z"
    return stamp + (f"-{sha[:7]}" if sha else "-nogit") + ("-dirty" if dirty else "")


def collect_env(device: str) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {"python": platform.python_version(), "host": platform.node(),
                           "platform": platform.platform()}
    for name in _PACKAGES:
        try:
            env[name.replace("-", "_")] = metadata.version(name)
        except metadata.PackageNotFoundError:
            env[name.replace("-", "_")] = None
    env["cuda"] = torch.version.cuda
    env["gpu_name"] = env["driver"] = None
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        env["gpu_name"] = torch.cuda.get_device_name(index)
        env["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(index)))
        env["driver"] = _nvidia_driver()
    env["cpu_count"] = os.cpu_count()
    env["git_sha"], env["git_dirty"] = git_state()
    # What figures depend on beyond the code: the caching allocator's settings, and the
    # cuBLAS workspace size (estimate.cublas_workspace_bytes; simulated CUDA targets too).
    env["pytorch_cuda_alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    env["cublas_workspace_config"] = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    return env


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        return out.strip().splitlines()[0] if out.strip() else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None
