"""From an allocation trace and tensor sightings to phase peaks and a breakdown at the peak.

Both probes produce the same two streams on one clock (`time.time_ns()`, which the profiler
and the CUDA allocator trace also use):

* allocations: every block the allocator handed out or took back — (t_ns, ptr, ±bytes);
* sightings: a tensor whose storage starts at `ptr` was alive at `t_ns` and was a parameter,
  a grad, optimizer state, saved for backward, ... (see `Kind`).

A sighting belongs to the block at its address that was live at its time (we held the tensor,
so that block cannot have been freed). Each block takes the highest-priority kind it was seen
as; blocks no tensor was ever seen in are `unattributed` (kernel workspaces, compiled code).
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from harness.units import CATEGORIES


def round_block(n_bytes: int) -> int:
    """CUDA's caching allocator rounds every request up to a multiple of 512 bytes (min 512)."""
    return max(512, -(-n_bytes // 512) * 512) if n_bytes > 0 else 0


class Kind(enum.IntEnum):
    """What a sighting says a storage is; a higher value wins when a block is seen as several."""

    TENSOR = 0  # any op output (other, unless the forward-to-backward rule makes it an activation)
    INPUT = 1  # the batch
    BUFFER = 2  # module buffers (rotary tables, ...)
    OUTPUT = 3  # model outputs: the loss, logits
    SAVED = 4  # packed by autograd for backward
    KV_CACHE = 5  # generation's key/value cache, each layer's keys and values
    # What a collective reads or writes (parallel training): FSDP2's gathered parameters — also
    # when autograd saves them — and reduce-scatter buffers, DDP's buckets.
    COMM = 6
    OPTIMIZER = 7
    GRAD = 8
    PARAM = 9


_CATEGORY = {Kind.TENSOR: "other", Kind.INPUT: "other", Kind.BUFFER: "other", Kind.OUTPUT: "other",
             Kind.SAVED: "activations", Kind.KV_CACHE: "kv_cache", Kind.COMM: "other",
             Kind.OPTIMIZER: "optimizer", Kind.GRAD: "grads", Kind.PARAM: "params"}


@dataclass(frozen=True)
class Phase:
    name: str  # load | forward | backward | optimizer | eval | generate
    step: int | None  # None for load
    start_ns: int
    end_ns: int
    micro: int | None = None  # forward/backward: the micro-batch within the step (accumulation)


@dataclass
class Block:
    ptr: int
    size: int  # rounded
    t_alloc: int
    t_free: int | None = None
    kind: Kind | None = None  # None: never seen as a tensor

    def live_at(self, t: int) -> bool:
        return self.t_alloc <= t and (self.t_free is None or self.t_free > t)


@dataclass
class Analysis:
    phase_peaks: list[tuple[Phase, int]]  # (phase, peak bytes) in order
    peak_bytes: int
    peak_ns: int | None
    peak_phase: Phase | None
    breakdown: dict[str, int] = field(default_factory=dict)
    # What stays between steps: live bytes at the end of the last optimizer phase (grads too,
    # as zero_grad(set_to_none) frees them only at the next step's start).
    end_of_step: dict[str, int] = field(default_factory=dict)
    # Per phase name (load, forward, ...): the breakdown at that phase's highest peak over steps.
    phase_breakdowns: dict[str, dict[str, int]] = field(default_factory=dict)


def build_blocks(allocations: Iterable[tuple[int, int, int]]) -> list[Block]:
    """Pair allocations with their frees. Frees of blocks allocated before recording are ignored."""
    open_blocks: dict[int, Block] = {}
    blocks: list[Block] = []
    for t, ptr, delta in sorted(allocations, key=lambda a: (a[0], a[2] < 0)):
        if delta > 0:
            block = Block(ptr=ptr, size=round_block(delta), t_alloc=t)
            open_blocks[ptr] = block
            blocks.append(block)
        elif delta < 0 and ptr in open_blocks:
            open_blocks.pop(ptr).t_free = t
    return blocks


def attach_sightings(blocks: Sequence[Block], sightings: Iterable[tuple[int, int, Kind]]) -> None:
    by_ptr: dict[int, list[Block]] = {}
    for b in blocks:  # blocks are in allocation order
        by_ptr.setdefault(b.ptr, []).append(b)
    starts = {ptr: [b.t_alloc for b in bs] for ptr, bs in by_ptr.items()}
    for t, ptr, kind in sightings:
        if ptr not in by_ptr:
            continue  # allocated before recording began (or not by this allocator)
        i = bisect.bisect_right(starts[ptr], t) - 1
        if i < 0:
            continue
        block = by_ptr[ptr][i]
        if block.kind is None or kind > block.kind:
            block.kind = kind


def analyse(blocks: Sequence[Block], phases: Sequence[Phase],
            windows: Sequence[Phase] = ()) -> Analysis:
    """Peaks per phase and the breakdown at the overall peak. `windows`: when the image
    encoder's forwards ran (Probe.windows), whose activations are its own category."""
    events = sorted([(b.t_alloc, b.size) for b in blocks] +
                    [(b.t_free, -b.size) for b in blocks if b.t_free is not None],
                    key=lambda e: (e[0], e[1] < 0))
    times = [t for t, _ in events]
    levels, level = [], 0
    for _, delta in events:
        level += delta
        levels.append(level)

    phase_peaks: list[tuple[Phase, int]] = []
    best = (-1, None, None)  # (bytes, t, phase)
    best_by_name: dict[str, tuple[int, int]] = {}  # name → (bytes, t)
    for phase in phases:
        peak, peak_t = peak_within(times, levels, phase)
        phase_peaks.append((phase, peak))
        if peak > best[0]:
            best = (peak, peak_t, phase)
        if peak > best_by_name.get(phase.name, (-1, 0))[0]:
            best_by_name[phase.name] = (peak, peak_t)
    peak_bytes, peak_ns, peak_phase = best
    analysis = Analysis(phase_peaks, max(peak_bytes, 0), peak_ns, peak_phase)
    if peak_ns is not None:
        analysis.breakdown = breakdown_at(blocks, phases, peak_ns, windows)
    analysis.phase_breakdowns = {name: breakdown_at(blocks, phases, t, windows)
                                 for name, (_, t) in best_by_name.items()}
    ends = [p.end_ns for p in phases if p.name == "optimizer"]
    if ends:
        analysis.end_of_step = breakdown_at(blocks, phases, ends[-1], windows)
    return analysis


def peak_within(times: Sequence[int], levels: Sequence[int], phase: Phase) -> tuple[int, int]:
    """The highest level during `phase` (the level it started at included), and when."""
    lo = bisect.bisect_left(times, phase.start_ns)
    hi = bisect.bisect_right(times, phase.end_ns)
    peak, peak_t = (levels[lo - 1] if lo > 0 else 0), phase.start_ns
    for i in range(lo, hi):
        if levels[i] > peak:
            peak, peak_t = levels[i], times[i]
    return peak, peak_t


def breakdown_at(blocks: Sequence[Block], phases: Sequence[Phase], t: int,
                 vision: Sequence[Phase] = ()) -> dict[str, int]:
    """Bytes live at `t` by category, plus `unattributed` (blocks no tensor was seen in).

    A tensor created during a step's forward that is still alive when its backward starts is
    held for backward (saved by autograd, or a checkpointed layer's input): an activation —
    the image encoder's (`vision_activations`) when made while it ran forward (`vision`).
    """
    fwd_bwd = {}
    for p in phases:
        if p.name in ("forward", "backward"):
            fwd_bwd.setdefault((p.step, p.micro), {})[p.name] = p
    windows = [(d["forward"].start_ns, d["forward"].end_ns, d["backward"].start_ns)
               for d in fwd_bwd.values() if "forward" in d and "backward" in d]
    out = dict.fromkeys((*CATEGORIES, "unattributed"), 0)
    for b in blocks:
        if not b.live_at(t):
            continue
        if b.kind is None:
            out["unattributed"] += b.size
            continue
        category = _CATEGORY[b.kind]
        if b.kind == Kind.TENSOR and any(
                f0 <= b.t_alloc <= f1 and (b.t_free is None or b.t_free > b0)
                for f0, f1, b0 in windows):
            category = "activations"
        if category == "activations" and any(w.start_ns <= b.t_alloc <= w.end_ns
                                             for w in vision):
            category = "vision_activations"
        out[category] += b.size
    return out
