"""Memory snapshots in PyTorch's own format — what `torch.cuda.memory._snapshot()` returns and
pytorch.org/memory_viz draws (active memory over time, allocator state) — for every device.

On CUDA it is the allocator's own snapshot of the run. A simulation's comes from replaying its
allocation trace through the caching-allocator model (allocator.py): the same alloc, free and
segment events at the addresses the model hands out, and the segments it holds at the end.
A CPU run's has the CPU allocator's events at their real addresses and no segments (nothing is
cached on CPU). Written as `<variant>.snapshot.pickle` beside the record, as
`_dump_snapshot` writes it.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from pathlib import Path

from harness.probes.allocator import CachingAllocator


def simulated(allocations: Iterable[tuple[int, int, int]], expandable: bool = False) -> dict:
    """The snapshot a CUDA run of this trace would leave, by the caching-allocator model."""
    allocator = CachingAllocator(expandable)
    allocator.events = []
    live = {}
    for t, key, delta in sorted(allocations, key=lambda a: (a[0], a[2] < 0)):
        allocator.now_us = t // 1000
        if delta > 0:
            live[key] = allocator.malloc(delta)
        elif key in live:
            allocator.free(live.pop(key))
    blocks = [(b, "active_allocated") for b in live.values()] + \
        [(b, "inactive") for b in allocator._cached.values()]
    segments: dict[int, list] = {}
    for block, state in blocks:
        segments.setdefault(block.segment, []).append((block, state))
    return {"segments": [_segment(parts) for _, parts in sorted(segments.items())],
            "device_traces": [allocator.events]}


def _segment(parts: list) -> dict:
    parts.sort(key=lambda p: p[0].addr)
    blocks = [{"address": b.addr, "size": b.size, "requested_size": b.size, "state": state,
               "frames": []} for b, state in parts]
    active = sum(b["size"] for b in blocks if b["state"] == "active_allocated")
    return {"device": 0, "stream": 0, "address": blocks[0]["address"],
            "total_size": sum(b["size"] for b in blocks), "allocated_size": active,
            "active_size": active, "requested_size": active,
            "segment_type": "small" if parts[0][0].small else "large",
            "is_expandable": parts[0][0].segment < 0, "blocks": blocks}


def measured_cpu(allocations: Iterable[tuple[int, int, int]]) -> dict:
    """A CPU run's events at their real addresses (the CPU allocator caches no segments)."""
    events = []
    for t, ptr, delta in sorted(allocations, key=lambda a: (a[0], a[2] < 0)):
        actions = ("alloc",) if delta > 0 else ("free_requested", "free_completed")
        events += [{"action": a, "addr": ptr, "size": abs(delta), "stream": 0,
                    "time_us": t // 1000, "frames": []} for a in actions]
    return {"segments": [], "device_traces": [events]}


def write(path: Path, snapshot: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(snapshot, f)
