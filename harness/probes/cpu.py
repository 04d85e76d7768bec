"""CPU probe: every byte PyTorch's CPU allocator hands out, from the profiler's memory events.

There is no `max_memory_allocated` on CPU, and a dispatch-mode tracker misses allocations made
inside kernels and compiled graphs. The profiler with `profile_memory=True` records each CPU
allocator event (address, size, time), including those inside `torch.compile`d code. We replay
them with CUDA's 512-byte rounding, so a CPU run and a CUDA run of the same step are comparable.
Reserved memory has no CPU meaning: `peak_reserved_bytes` is null.
"""

from __future__ import annotations

import bisect
from typing import Any

from torch.profiler import ProfilerActivity, profile

from harness.probes import Probe


class CpuProbe(Probe):
    method = "measured-cpu"

    def _start_device(self) -> None:
        self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True,
                                 record_shapes=False, with_stack=False)
        self._profiler.__enter__()

    def _memory(self) -> dict[str, Any]:
        self._profiler.__exit__(None, None, None)
        allocations = _with_lost_frees(list(_allocations(self._profiler)), self.tracker.deaths)
        del self._profiler  # the event tree is large; free it before the record is written
        if self.keep_snapshot:
            from harness.probes.snapshot import measured_cpu

            self.snapshot = measured_cpu(allocations)
        analysis = self._analysed(allocations)  # (with any seeded tensors)
        stats = [(phase, {"peak_allocated_bytes": peak, "peak_reserved_bytes": None})
                 for phase, peak in analysis.phase_peaks]
        return self._shape(stats, analysis)


def _allocations(prof):
    """(t_ns, ptr, ±bytes) for every CPU allocator event the profiler saw."""
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        fields = node.extra_fields
        if type(fields).__name__ == "_ExtraFields_Allocation" and fields.device.type == "cpu":
            yield node.start_time_ns, fields.ptr, fields.alloc_size
        stack.extend(node.children)


def _with_lost_frees(allocations: list, deaths: list) -> list:
    """The profiler records the allocator's events of the threads it profiles only: a tensor
    whose last reference another thread drops (a gloo worker, done with a collective's
    buffers) is freed unseen, and its block would stay live to the end. Where the tracker saw
    such a block's storage die, its free is added then (the first death at its address after
    it was allocated, before the address was handed out again)."""
    if not deaths:
        return allocations
    by_ptr: dict[int, list[int]] = {}
    for t, ptr in sorted(deaths):
        by_ptr.setdefault(ptr, []).append(t)
    open_at: dict[int, tuple[int, int]] = {}  # ptr → (t_alloc, bytes) of a block not freed
    added = []

    def close(ptr: int, before: int | None) -> None:
        t_alloc, size = open_at.pop(ptr)
        times = by_ptr.get(ptr, [])
        i = bisect.bisect_right(times, t_alloc)
        if i < len(times) and (before is None or times[i] < before):
            added.append((times[i], ptr, -size))

    for t, ptr, delta in sorted(allocations, key=lambda a: (a[0], a[2] < 0)):
        if delta > 0:
            if ptr in open_at:  # handed out again: the free was missed
                close(ptr, t)
            open_at[ptr] = (t, delta)
        elif delta < 0:
            open_at.pop(ptr, None)
    for ptr in list(open_at):
        close(ptr, None)
    return allocations + added
