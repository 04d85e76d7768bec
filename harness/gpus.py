"""Cards as named presets, and the one rule that says whether a run fits one.

A card's `total_bytes` is what its driver reports (`nvidia-smi`'s total, MiB × 2^20; ROCm's for
the MI300X), each with where the figure was seen. What a training process can use is less:

* the driver keeps part of it from every process — CUDA's own total (`cudaMemGetInfo`, what
  PyTorch's OOM message calls "total capacity") sits below nvidia-smi's: 0.35 GiB on an
  RTX 4090, 0.50 GiB on an A100-40GB (sources below); `DRIVER_RESERVE_BYTES` is the larger;
* the process's CUDA context (driver state and the kernels it loads): 287 MB to 426 MiB for a
  bare context with lazy module loading, PyTorch's default since 1.13 (pytorch/pytorch#86509,
  unsloth-zoo#1053), more once cuBLAS, cuDNN and NCCL kernels load; `CONTEXT_BYTES` is 512 MiB
  until a CUDA record of the harness on that card is under results/ (`measured_presets`).

The rule (`verdict`), used wherever the harness says "fits": what the card must hold is the
reserved peak where it is known (measured on CUDA, or simulated), else the allocated peak plus
`FRAGMENTATION` for a CUDA target (the caching allocator keeps more than is live: +0.7 % to
+32 % over the committed simulated records, 90 % of them within 19 %). Against the usable memory it `fits`
when at least the headroom (default 1 GiB) is left, is `tight` when less is, and does not fit
(`no`) beyond the usable memory. A verdict for a CPU target has no CUDA context or driver share
to subtract: the card is then a plain memory budget.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass, replace
from pathlib import Path

from harness.units import GIB, parse_size

MIB = 2**20
CONTEXT_BYTES = 512 * MIB
DRIVER_RESERVE_BYTES = GIB // 2
FRAGMENTATION = 0.20
HEADROOM_BYTES = GIB
VERDICTS = ("fits", "tight", "no")


@dataclass(frozen=True)
class Gpu:
    name: str  # the preset's key, as `--gpu` takes it
    label: str  # as the driver names the card
    total_bytes: int  # what the driver reports
    source: str  # where that figure was seen
    # CUDA's total where a process's view of this card was seen ("total capacity" in PyTorch's
    # OOM message); None: total_bytes − DRIVER_RESERVE_BYTES
    cuda_total_bytes: int | None = None
    cuda_source: str | None = None
    context_bytes: int = CONTEXT_BYTES  # the CUDA context: measured once a GPU run has
    context_source: str = "default"  #   been made on this card (measured_presets)
    # What a simulation on the fake CUDA device tells the libraries (NVIDIA's specifications);
    # None where it is not a CUDA card (ROCm) or not a preset: SIMULATED's are used.
    capability: tuple[int, int] | None = None
    multiprocessors: int | None = None

    @property
    def driver_reserve_bytes(self) -> int:
        if self.cuda_total_bytes is not None:
            return self.total_bytes - self.cuda_total_bytes
        return DRIVER_RESERVE_BYTES

    def usable_bytes(self, target: str = "cuda") -> int:
        """What a training process may allocate: total, less the driver's share and the CUDA
        context (a CPU target: the total, a plain budget)."""
        if target != "cuda":
            return self.total_bytes
        return self.total_bytes - self.driver_reserve_bytes - self.context_bytes


def _mib(n: int) -> int:
    return n * MIB


# Totals as nvidia-smi prints them (MiB). Sources: issue threads and posts quoting the tool.
PRESETS: dict[str, Gpu] = {g.name: g for g in (
    Gpu("rtx3090", "NVIDIA GeForce RTX 3090", _mib(24576),
        "nvidia-smi 24576MiB (noonghunna/club-3090#1128)",
        capability=(8, 6), multiprocessors=82),
    Gpu("rtx4090", "NVIDIA GeForce RTX 4090", _mib(24564),
        "nvidia-smi 24564MiB (RLinf/RLinf#255)",
        int(23.64 * GIB), "PyTorch: 'a total capacity of 23.64 GiB' (ali-vilab/VGen#104)",
        capability=(8, 9), multiprocessors=128),
    Gpu("rtx5090", "NVIDIA GeForce RTX 5090", _mib(32607),
        "nvidia-smi 32607MiB (noonghunna/club-3090#1261)",
        capability=(12, 0), multiprocessors=170),
    Gpu("a10g", "NVIDIA A10G", _mib(23028), "nvidia-smi 23028MiB (NVIDIA/DCGM#232)",
        capability=(8, 6), multiprocessors=80),
    Gpu("l4", "NVIDIA L4", _mib(23034), "nvidia-smi 23034MiB (modal-labs/modal-client#2797)",
        capability=(8, 9), multiprocessors=58),
    Gpu("l40s", "NVIDIA L40S", _mib(46068), "nvidia-smi 46068MiB (modal-labs/modal-client#2797)",
        capability=(8, 9), multiprocessors=142),
    Gpu("a100-40", "NVIDIA A100-SXM4-40GB", _mib(40960),
        "nvidia-smi 40960MiB (modal-labs/modal-client#2797)",
        int(39.50 * GIB), "PyTorch: 'a total capacity of 39.50 GiB' (TianheWu/CoSeR#10)",
        capability=(8, 0), multiprocessors=108),
    Gpu("a100-80", "NVIDIA A100-SXM4-80GB", _mib(81920),
        "nvidia-smi 81920MiB (modal-labs/modal-client#2797, NVIDIA/mig-parted#31)",
        capability=(8, 0), multiprocessors=108),
    Gpu("h100-80", "NVIDIA H100 80GB HBM3", _mib(81559),
        "nvidia-smi 81559MiB (modal-labs/modal-client#2797)",
        capability=(9, 0), multiprocessors=132),
    Gpu("h200", "NVIDIA H200", _mib(143771),
        "nvidia-smi 143771MiB (thundergolfer.com/blog/nvidia-gpu-memory-capacity)",
        capability=(9, 0), multiprocessors=132),
    Gpu("b200", "NVIDIA B200", _mib(183359), "nvidia-smi 183359MiB (NVIDIA/TensorRT-LLM#10278)",
        capability=(10, 0), multiprocessors=148),
    Gpu("mi300x", "AMD Instinct MI300X", 8 * 25767706624,
        "8 × 25767706624 B, one CPX partition's VRAM in ROCm's topology "
        "(ROCm/legacy-rocm-build#4750)"),
)}


SIMULATED = "h200"  # the card a simulation's libraries are told of, unless one is named


def simulated_card(gpu: Gpu | None = None):
    """What the fake CUDA device says it is (fake_cuda.Card): `gpu`'s name, compute capability
    and multiprocessors, SIMULATED's for what `gpu` does not say (a size, a ROCm card)."""
    from harness.fake_cuda import Card

    default = PRESETS[SIMULATED]
    gpu = gpu or default
    known = gpu.capability is not None and gpu.multiprocessors is not None
    source = gpu if known else default
    return Card(gpu.label if known else default.label, source.capability,
                source.multiprocessors, gpu.total_bytes)


class UnknownGpu(ValueError):
    pass


RESULTS = Path(__file__).resolve().parent.parent / "results"


@functools.cache
def measured_presets(results: Path = RESULTS) -> dict[str, Gpu]:
    """The presets, with what CUDA runs under `results` measured on each card replacing the
    defaults: CUDA's own total (`memory.device_total_bytes`) and the context, what the device
    held at the probe's start less other processes (`device_used_at_start_bytes` −
    `other_processes_bytes_at_start`; the largest seen). A context measured before the first
    kernel ran is the bare one: cuBLAS's and NCCL's kernels load later."""
    import json

    seen: dict[str, list[tuple[int, int, str]]] = {}
    for path in sorted(Path(results).glob("*/*/*.json")):
        try:
            record = json.loads(path.read_text())
            memory, env = record["memory"], record.get("env") or {}
            if record.get("method") != "measured-cuda" or not env.get("gpu_name"):
                continue
            used, total = memory["device_used_at_start_bytes"], memory["device_total_bytes"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(used, int) and isinstance(total, int):
            others = memory.get("other_processes_bytes_at_start") or 0
            seen.setdefault(env["gpu_name"], []).append((used - others, total, str(path)))
    out = {}
    for name, gpu in PRESETS.items():
        runs = seen.get(gpu.label)
        if runs:
            context, _, where = max(runs)
            total = min(t for _, t, _ in runs)
            gpu = replace(gpu, cuda_total_bytes=total, context_bytes=context,
                          cuda_source=f"measured ({where})", context_source=f"measured ({where})")
        out[name] = gpu
    return out


def card(text: str) -> Gpu:
    """A preset by name (case and `-`/`_` ignored), or a size (`24GiB`: a card of that total)."""
    presets = measured_presets()
    key = text.lower().replace("_", "-")
    if key in presets:
        return presets[key]
    squeezed = {k.replace("-", ""): g for k, g in presets.items()}
    if key.replace("-", "") in squeezed:
        return squeezed[key.replace("-", "")]
    try:
        total = parse_size(text)
    except ValueError:
        hint = difflib.get_close_matches(key, list(PRESETS), n=1)
        raise UnknownGpu(f"no GPU preset {text!r}" + (f" (did you mean {hint[0]!r}?)" if hint
                         else f"; presets: {', '.join(PRESETS)} (harness ls gpus), or a size "
                         "such as 24GiB")) from None
    return Gpu(text, f"a {text} card", total, "given")


def need_bytes(peak_allocated: int | None, peak_reserved: int | None,
               target: str = "cuda") -> int | None:
    """What a card must hold: the reserved peak where known, else allocated + FRAGMENTATION
    for a CUDA target (its caching allocator holds more than is live; a CPU one does not)."""
    if peak_reserved is not None:
        return peak_reserved
    if peak_allocated is None:
        return None
    return int(peak_allocated * (1 + FRAGMENTATION)) if target == "cuda" else peak_allocated


@dataclass(frozen=True)
class Verdict:
    verdict: str  # one of VERDICTS
    need_bytes: int
    usable_bytes: int
    left_bytes: int  # usable − need; negative: short by that much
    headroom_bytes: int

    @property
    def ok(self) -> bool:
        """Fits, or fits tightly: within the usable memory."""
        return self.verdict != "no"

    def text(self) -> str:
        if self.verdict == "fits":
            return f"fits, {size(self.left_bytes)} left"
        if self.verdict == "tight":
            return (f"tight: fits with {size(self.left_bytes)} left, under the "
                    f"{size(self.headroom_bytes)} headroom")
        return f"does not fit: {size(-self.left_bytes)} short"


def size(n_bytes: int) -> str:
    """`12.34 GiB`, or `40.0 MiB` under a GiB (tiny models, small budgets)."""
    return f"{n_bytes / GIB:.2f} GiB" if abs(n_bytes) >= GIB else f"{n_bytes / MIB:.1f} MiB"


def word(left_bytes: int, headroom: int = HEADROOM_BYTES) -> str:
    """The rule's word for what a card has left: `no` below 0, `tight` under the headroom."""
    return "no" if left_bytes < 0 else "tight" if left_bytes < headroom else "fits"


def verdict(need: int, gpu: Gpu, target: str = "cuda",
            headroom: int = HEADROOM_BYTES) -> Verdict:
    usable = gpu.usable_bytes(target)
    return Verdict(word(usable - need, headroom), need, usable, usable - need, headroom)


def record_need(record: dict) -> int | None:
    """What a card must hold for a record's run (need_bytes, for the record's target)."""
    memory = record.get("memory") or {}
    return need_bytes(memory.get("peak_allocated_bytes"), memory.get("peak_reserved_bytes"),
                      target_of(record))


def record_verdict(record: dict, gpu: Gpu, headroom: int = HEADROOM_BYTES) -> Verdict | None:
    """The rule applied to a record (None unless it ended ok with a peak)."""
    need = record_need(record)
    if record.get("status") != "ok" or need is None:
        return None
    return verdict(need, gpu, target_of(record), headroom)


def target_of(record: dict) -> str:
    """Whether a record's figures are for a CUDA device (measured there, or simulated or
    estimated for it) or a CPU one."""
    if record.get("method") == "measured-cuda":
        return "cuda"
    if record.get("method") == "measured-cpu":
        return "cpu"
    return (record.get("memory") or {}).get("target") or "cuda"


def smallest_fitting(need: int, target: str = "cuda",
                     headroom: int = HEADROOM_BYTES) -> tuple[Gpu, Verdict] | None:
    """The preset with the least usable memory that the rule says fits (not tight)."""
    for gpu in sorted(measured_presets().values(), key=lambda g: g.usable_bytes(target)):
        v = verdict(need, gpu, target, headroom)
        if v.verdict == "fits":
            return gpu, v
    return None
