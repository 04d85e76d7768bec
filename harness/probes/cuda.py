"""CUDA probe: the caching allocator's own figures are the truth.

Per phase: peak stats are reset on entry and read on exit (`max_memory_allocated`,
`max_memory_reserved`, active-bytes peak, alloc retries). The allocator's trace
(`_record_memory_history`) gives addresses and times, which the shared timeline turns into the
breakdown at the peak. No `empty_cache()` anywhere: it would change what "reserved" means.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

from harness.probes import Probe
from harness.probes.timeline import Phase

_TRACE_ENTRIES = 2_000_000  # ring buffer; a longer run loses the breakdown, never the peaks
BUSY_BYTES = 512 * 2**20  # other processes using more than this at start: warn and record


class CudaProbe(Probe):
    method = "measured-cuda"
    # A real allocator limit: the budget OOMs exactly where cudaMalloc would.
    enforces_budget_in_tracker = False

    def _start_device(self) -> None:
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", index)
        torch.cuda.set_device(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        others = _nvml_other_processes_bytes(index)
        self.extra.update({
            "device_total_bytes": total,
            "device_used_at_start_bytes": total - free,  # includes this process's CUDA context
            "other_processes_bytes_at_start": others,
            "pytorch_cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        })
        if others is not None and others > BUSY_BYTES:
            warnings.warn(f"GPU {index} is busy: other processes hold {others / 2**30:.2f} GiB; "
                          "peaks are this process's, but an OOM may come early", stacklevel=1)
        if self.budget_bytes is not None:
            torch.cuda.set_per_process_memory_fraction(min(1.0, self.budget_bytes / total),
                                                       self.device)
        self._retries_at_start = torch.cuda.memory_stats(self.device).get("num_alloc_retries", 0)
        self._stats: list[tuple[Phase, dict[str, int | None]]] = []
        # context=None: no stack traces, only (action, addr, size, time_us) — cheap enough to
        # leave on for every step. time_us is unix time, the clock the tracker's sightings use.
        torch.cuda.memory._record_memory_history(enabled="all", context=None, stacks="python",
                                                 max_entries=_TRACE_ENTRIES)

    def _enter_phase(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def _exit_phase(self) -> None:
        torch.cuda.synchronize(self.device)

    def _phase_closed(self, phase: Phase) -> None:
        stats = torch.cuda.memory_stats(self.device)
        self._stats.append((phase, {
            "peak_allocated_bytes": stats.get("allocated_bytes.all.peak", 0),
            "peak_reserved_bytes": stats.get("reserved_bytes.all.peak", 0),
            "peak_active_bytes": stats.get("active_bytes.all.peak", 0),
            "nvml_process_bytes": _nvml_process_bytes(self.device.index),
        }))

    def _memory(self) -> dict[str, Any]:
        snapshot = torch.cuda.memory._snapshot(self.device)
        torch.cuda.memory._record_memory_history(enabled=None)
        if self.keep_snapshot:
            self.snapshot = snapshot  # the allocator's own, as _dump_snapshot would write it
        stats = torch.cuda.memory_stats(self.device)
        self.extra["alloc_retries"] = stats.get("num_alloc_retries", 0) - self._retries_at_start
        trace = snapshot["device_traces"][self.device.index]
        analysis, note = None, None
        if len(trace) >= _TRACE_ENTRIES:
            note = "allocator trace overflowed its ring buffer: breakdown unavailable"
        elif trace and "time_us" not in trace[0]:
            note = "this PyTorch's allocator trace has no timestamps: breakdown unavailable"
        else:
            allocations = [(e["time_us"] * 1000, e["addr"],
                            e["size"] if e["action"] == "alloc" else -e["size"])
                           for e in trace if e["action"] in ("alloc", "free_completed")]
            analysis = self._analysed(allocations)
        return self._shape(self._stats, analysis, note)


def _nvml_handle(index: int):
    try:
        import pynvml
    except ImportError:
        return None, None
    try:
        pynvml.nvmlInit()
        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:  # noqa: BLE001 - NVML missing or not permitted: the figure is null
        return None, None


def _nvml_process_bytes(index: int | None) -> int | None:
    nvml, handle = _nvml_handle(index or 0)
    if handle is None:
        return None
    for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
        if proc.pid == os.getpid():
            return proc.usedGpuMemory
    return None


def _nvml_other_processes_bytes(index: int) -> int | None:
    nvml, handle = _nvml_handle(index)
    if handle is None:
        return None
    return sum(p.usedGpuMemory or 0 for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle)
               if p.pid != os.getpid())
