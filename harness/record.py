"""The JSON record: one per variant, versioned, written once and atomically.

Three parts, as PEFT's method comparison keeps them: what was run (scenario, variant, model,
train), what was measured (status, memory, timing), where it ran (device, method, env).
Bytes are whole integers; anything the tool cannot know is null, never a guess.

    schema_version   int; bump with an entry in _UPGRADES
    run_id           "<UTC timestamp>-<git sha7>[-dirty]": sorts by time
    scenario         {name, path, sha256, baseline}: sha256 of the file's bytes
    sweep_point      null, or {train key: value} of the scenario's sweep this record is at
                     (its file is "<variant>@<key>=<value>,….json")
    variant          {name (as declared), index (position in the scenario, sweep points
                      expanded), description, techniques: [{name, args}] (args resolved),
                      train_overrides}
    model            {config, source, weights, attn_implementation, params_total, params_trainable}
    train            the effective train settings (scenario's, variant overrides, --steps)
    parallel         null (one process), or {strategy: "ddp" | "fsdp2", world_size, and the
                     strategy's options: reshard_after_forward, cpu_offload, param_dtype,
                     reduce_dtype (fsdp2); bucket_cap_mb, gradient_as_bucket_view (ddp)}
    device           "cpu" | "cuda:0" | "simulate" | "estimate"
    method           "measured-cpu" | "measured-cuda" | "simulated" (fake tensors) | "estimated"
                     (closed form, harness/estimate.py: no tensor created)
    status           "ok" | "oom" | "error" | "unsupported"
    error            null, or why (oom message, stderr tail, the missing capability)
    memory           {peak_allocated_bytes, peak_reserved_bytes (null on CPU; predicted when simulated), peak_phase,
                      peak_step, phases: {load|forward|backward|optimizer: {peak_allocated_bytes,
                      peak_reserved_bytes, breakdown_bytes (at that phase's own peak), ...}},
                      per_step_peak_allocated_bytes (warm-up steps
                      first), breakdown_bytes: {params, grads, optimizer, activations, other,
                      unattributed} at the overall peak, breakdown_note, end_of_step_bytes
                      (the same categories live after the last optimizer step: what persists
                      between steps), paged_optimizer_bytes (bitsandbytes paged state in CUDA
                      unified memory, which no allocator figure includes; 0 when none),
                      tracked_tensor_peak_bytes, budget_bytes, rank / ranks / imbalance
                      (parallel: every other figure of `memory` is rank `rank`'s, the one with
                      the highest peak; `ranks` one entry per rank — rank, status, error,
                      peak_allocated_bytes, peak_reserved_bytes, peak_phase, breakdown_bytes,
                      end_of_step_bytes —, its params/grads/optimizer that rank's shards and
                      the collectives' buffers under other; `imbalance` the highest rank peak
                      over the ranks' mean, minus 1; all three null for one process),
                      snapshot_file (with --snapshot:
                      the memory_viz snapshot beside the record, or null), device extras (simulated:
                      target, "cuda" or "cpu": whether CUDA kernels' scratch buffers are
                      modelled; reserved_model, what predicted peak_reserved_bytes — a replay of CUDA's
                      caching allocator, default or expandable_segments — or null where
                      PYTORCH_CUDA_ALLOC_CONF asks for what
                      it does not model); estimated: target, and terms_bytes, each named
                      term of the closed form}
    timing           {step_time_s_median, tokens_per_s}: measured steps only; warmup_s: the
                     warm-up steps together (compilation included); wall_s: the whole variant
    notes            [str]: warnings the libraries raised while the variant ran
    env              {python, torch, transformers, peft, bitsandbytes, trl, accelerate, ...,
                      gpu_name, driver, cuda, git_sha, git_dirty, pytorch_cuda_alloc_conf, host}
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from harness.techniques import ordered

SCHEMA_VERSION = 1
STATUSES = ("ok", "oom", "error", "unsupported")
METHODS = ("measured-cpu", "measured-cuda", "simulated", "estimated")
REPO_ROOT = Path(__file__).resolve().parent.parent
_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "trl", "accelerate", "liger-kernel")

# version → function upgrading a record of that version to the next
_UPGRADES: dict[int, Any] = {}


class RecordError(ValueError):
    pass


def new_record(*, run_id: str, scenario, variant, device: str, method: str) -> dict[str, Any]:
    """A record with every key present; measured fields null until filled."""
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "scenario": {"name": scenario.name, "path": str(scenario.path), "sha256": scenario.sha256,
                     "baseline": scenario.baseline},
        # A sweep point's record: the declared variant's name, and the point beside it.
        "sweep_point": dict(variant.sweep_point) or None,
        "variant": {
            "name": variant.declared,
            "description": variant.description,
            # In the order they are applied (stage by stage), whatever the YAML's order.
            "techniques": [{"name": u.name, "args": dict(u.args)}
                           for _, u in ordered(variant.techniques)],
            "train_overrides": dict(variant.train_overrides),
        },
        "model": {
            "config": scenario.model.config,
            "weights": scenario.model.weights,
            "attn_implementation": scenario.model.attn_implementation,
            "params_total": None,
            "params_trainable": None,
        },
        "train": {k: getattr(variant.train, k) for k in variant.train.__dataclass_fields__},
        "parallel": variant.parallel.as_dict() if variant.parallel else None,
        "device": device,
        "method": method,
        "status": "error",
        "error": None,
        "memory": {"peak_allocated_bytes": None, "peak_reserved_bytes": None,
                   "phases": {}, "per_step_peak_allocated_bytes": [], "breakdown_bytes": None},
        "timing": {"step_time_s_median": None, "tokens_per_s": None, "warmup_s": None,
                   "wall_s": None},
        "notes": [],
        "env": None,
    }


def write_record(path: Path, record: dict[str, Any]) -> None:
    """Temp file in the same folder, fsync, rename: a reader never sees a partial record."""
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
    version = record.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise RecordError(f"{path}: unknown schema_version {version!r}")
    while record["schema_version"] < SCHEMA_VERSION:
        record = _UPGRADES[record["schema_version"]](record)
    check_record(record)
    return record


def check_record(record: dict[str, Any]) -> None:
    """The contract scripts rely on: keys present, types right."""
    for key in ("schema_version", "run_id", "scenario", "variant", "model", "train", "device",
                "method", "status", "error", "memory", "timing", "env"):
        if key not in record:
            raise RecordError(f"record lacks {key!r}")
    if record["status"] not in STATUSES:
        raise RecordError(f"bad status {record['status']!r}")
    if record["method"] not in METHODS:
        raise RecordError(f"bad method {record['method']!r}")
    memory = record["memory"]
    for key in ("peak_allocated_bytes", "peak_reserved_bytes"):
        value = memory.get(key)
        if value is not None and (not isinstance(value, int) or value < 0):
            raise RecordError(f"memory.{key} must be whole bytes, got {value!r}")
    if record["status"] == "ok" and memory.get("peak_allocated_bytes") is None:
        raise RecordError("an ok record needs memory.peak_allocated_bytes")


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
    env["pytorch_cuda_alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    return env


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        return out.strip().splitlines()[0] if out.strip() else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None
