"""How memory is read. One interface, one implementation per device:

    probe = make_probe(device, budget_bytes)
    probe.start()
    with probe.phase("load"): ...
    with probe.phase("forward", step): ...
    memory = probe.stop()        # the record's `memory` section

cuda.py reads the caching allocator's own statistics (the truth on a GPU); cpu.py replays every
event of PyTorch's CPU allocator from the profiler; simulate.py runs the step on fake tensors
and takes each storage's birth and death as the allocation trace. All three name tensors with
the same `Tracker` and attribute the peak with the same `timeline.analyse`, so a CPU run tests
the CUDA path's logic everywhere but in the few lines that read the device.
"""

from __future__ import annotations

import contextlib
import time
from abc import ABC, abstractmethod
from typing import Any

import torch

from harness.probes.host import HostMemory
from harness.probes.timeline import (
    CATEGORIES,
    Analysis,
    Kind,
    Phase,
    analyse,
    attach_sightings,
    build_blocks,
)
from harness.probes.tracker import BudgetExceeded, Tracker

PHASES = ("load", "reference", "forward", "backward", "optimizer", "eval", "generate",
          "save")
STEP_PHASES = ("forward", "backward", "optimizer")  # a training step's: per-step peaks

__all__ = ["PHASES", "BudgetExceeded", "Kind", "Probe", "make_probe"]


class Probe(ABC):
    method: str

    def __init__(self, device: torch.device, budget_bytes: int | None = None):
        self.device = device
        self.budget_bytes = budget_bytes
        self.tracker = Tracker(budget_bytes if self.enforces_budget_in_tracker else None,
                               trace_allocations=self.traces_allocations)
        self.phases: list[Phase] = []
        # When the image encoder ran forward (watch_vision): its activations' category.
        self.windows: list[Phase] = []
        self.current: Phase | None = None
        self.extra: dict[str, Any] = {}  # device-specific fields for the record
        self._tracking = False
        # With keep_snapshot, `snapshot` is then the run's memory snapshot in PyTorch's format
        # (torch.cuda.memory._snapshot; see snapshot.py), for memory_viz.
        self.keep_snapshot = False
        self.snapshot: dict | None = None
        self._seeded: list[tuple[int, int, int]] = []  # see seed()
        # What the harness knows of the values of its own inputs (an objective's token counts),
        # which a simulation answers the libraries' reads with (simulate.library_values).
        self.known: dict[str, Any] = {}

    enforces_budget_in_tracker = True
    traces_allocations = False  # True where no allocator exists to ask (simulation)

    # -- what the loop calls ------------------------------------------------------------------

    def start(self) -> None:
        self._start_device()
        self.tracker.__enter__()
        self._tracking = True

    def stop(self) -> dict[str, Any]:
        if self._tracking:
            self.tracker.__exit__(None, None, None)
            self._tracking = False
        return self._memory()

    @contextlib.contextmanager
    def phase(self, name: str, step: int | None = None, micro: int | None = None):
        """`micro`: the micro-batch of a step's forward or backward (gradient accumulation)."""
        assert name in PHASES, name
        self._enter_phase()
        start = time.time_ns()
        self.current = Phase(name, step, start, start, micro)
        try:
            yield
        finally:
            self._exit_phase()
            end = time.time_ns()
            self.phases.append(Phase(name, step, start, end, micro))
            self._phase_closed(self.phases[-1])
            self.current = None

    def sight(self, kind: Kind, tensors) -> None:
        self.tracker.sight(kind, tensors)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """The loss scaler fp16 mixed precision trains with (amp_fp16)."""
        return torch.amp.GradScaler(self.device.type)

    def seed(self, tensors) -> None:
        """Tensors that exist before the probe started (a profiled script's model): their
        storages enter the allocation trace as allocated now, so the peaks and the breakdown
        count them, as the device's own figures do."""
        now, seen = time.time_ns(), set()
        for t in tensors:
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen and storage.nbytes():
                seen.add(storage.data_ptr())
                self._seeded.append((now, storage.data_ptr(), storage.nbytes()))

    def watch_cache(self, model):
        """While `model.generate` runs: each forward's KV cache named (sight_cache), from the
        causal LM under PEFT's wrapper, whose output carries it (`cache` from transformers
        5.25, `past_key_values` before). Returns the hook's handle, to remove after."""
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        return inner.register_forward_hook(lambda module, args, out: self.sight_cache(
            next((out[k] for k in ("cache", "past_key_values") if out.get(k) is not None),
                 None)))

    def watch_vision(self, encoder) -> list:
        """Each forward of a vision-language model's image encoder as a window (`windows`,
        named "vision"): what it makes and keeps for backward is `vision_activations`.
        Returns the hooks' handles, to remove after."""
        started: list[int] = []

        def before(module, args):
            started.append(time.time_ns())

        def after(module, args, out):
            self.windows.append(Phase("vision", None, started.pop(), time.time_ns()))

        return [encoder.register_forward_pre_hook(before), encoder.register_forward_hook(after)]

    def sight_cache(self, cache) -> None:
        """Name a KV cache's tensors (transformers' Cache: each layer's keys and values)."""
        if cache is None:
            return
        tensors = [t for layer in getattr(cache, "layers", ())
                   for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                   if isinstance(t, torch.Tensor)]
        self.sight(Kind.KV_CACHE, tensors)
        held = sum(t.numel() * t.element_size() for t in tensors)
        self.extra["kv_cache_bytes"] = max(held, self.extra.get("kv_cache_bytes") or 0)

    def saving(self) -> contextlib.AbstractContextManager[HostMemory]:
        """Around one save: `with probe.saving() as host:` — this process's resident memory
        sampled while it runs (host.peak, host.growth)."""
        return HostMemory()

    def sight_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Name the optimizer's state (it exists once a step has run)."""
        from harness.optimizers import state_tensors

        self.sight(Kind.OPTIMIZER, state_tensors(optimizer))

    def on_host(self) -> contextlib.AbstractContextManager[None]:
        """Around what makes host tensors with values (a data collator's batch): real tensors
        everywhere, fake ones in a simulation made outside it (moved to the device after)."""
        return contextlib.nullcontext()

    def follow_values(self) -> None:  # noqa: B027 - optional hook
        """The batch's values decide shapes in the model (a vision-language batch's image
        tokens and patch grids): a probe without them (simulation) follows them."""

    def build(self, make, device: torch.device):
        """`make(device)` builds the model and applies the techniques; a probe may build
        elsewhere first (simulation builds on meta)."""
        return make(device)

    # -- what each device provides ------------------------------------------------------------

    def _start_device(self) -> None:  # noqa: B027 - optional hook
        pass

    def _enter_phase(self) -> None:  # noqa: B027
        pass

    def _exit_phase(self) -> None:  # noqa: B027
        pass

    def _phase_closed(self, phase: Phase) -> None:  # noqa: B027
        pass

    @abstractmethod
    def _memory(self) -> dict[str, Any]: ...

    # -- shared shaping of the record's memory section ----------------------------------------

    def _named_blocks(self, allocations) -> list:
        """An allocation trace (t_ns, key, ±bytes) as blocks, named by the tracker's sightings."""
        blocks = build_blocks([*self._seeded, *allocations])
        attach_sightings(blocks, self.tracker.sightings)
        return blocks

    def _analysed(self, allocations) -> Analysis:
        return analyse(self._named_blocks(allocations), self.phases, self.windows)

    def _shape(self, phase_stats: list[tuple[Phase, dict[str, int | None]]],
               analysis: Analysis | None, breakdown_note: str | None = None) -> dict[str, Any]:
        """phase_stats: per closed phase, its peak_allocated_bytes (and device extras)."""
        phases: dict[str, dict[str, Any]] = {}
        steps: dict[int, int] = {}
        reserved_steps: dict[int, int] = {}
        for phase, stats in phase_stats:
            slot = phases.setdefault(phase.name, {})
            for key, value in stats.items():
                if value is None:
                    slot.setdefault(key, None)
                else:
                    slot[key] = max(value, slot.get(key) or 0)
            if phase.name == "save":  # each entry of `save:` in order
                slot.setdefault("per_save_peak_allocated_bytes", []).append(
                    stats["peak_allocated_bytes"])
            if phase.step is not None and phase.name in STEP_PHASES:
                steps[phase.step] = max(steps.get(phase.step, 0), stats["peak_allocated_bytes"])
                reserved_steps[phase.step] = max(stats.get("peak_reserved_bytes") or 0,
                                                 reserved_steps.get(phase.step, 0))
        peak_phase, peak = None, -1
        for phase, stats in phase_stats:
            if stats["peak_allocated_bytes"] > peak:
                peak, peak_phase = stats["peak_allocated_bytes"], phase
        reserved = [s.get("peak_reserved_bytes") for _, s in phase_stats]
        reserved_known = reserved and None not in reserved
        breakdown = _explained(analysis.breakdown, peak) if analysis else None
        for name, slot in phases.items():
            slot["breakdown_bytes"] = _explained(
                analysis.phase_breakdowns.get(name) if analysis else None,
                slot["peak_allocated_bytes"])
        return {
            "peak_allocated_bytes": max(peak, 0),
            "peak_reserved_bytes": max(reserved) if reserved_known else None,
            "peak_phase": peak_phase.name if peak_phase else None,
            "peak_step": peak_phase.step if peak_phase else None,
            # With accumulation: the micro-batch whose forward or backward set the peak.
            "peak_micro_batch": peak_phase.micro if peak_phase and any(
                (p.micro or 0) > 0 for p, _ in phase_stats) else None,
            # The step's four always (null where one did not run); eval, generate where run.
            "phases": {name: phases.get(name) for name in PHASES
                       if name in phases or name in ("load", *STEP_PHASES)},
            "per_step_peak_allocated_bytes": [steps[s] for s in sorted(steps)],
            # Reserved memory step by step (grows as shapes vary); null where not known.
            "per_step_peak_reserved_bytes": [reserved_steps[s] for s in sorted(reserved_steps)]
            if reserved_known and reserved_steps else None,
            "breakdown_bytes": breakdown,
            "breakdown_note": breakdown_note,
            "end_of_step_bytes": (analysis.end_of_step or None) if analysis else None,
            "tracked_tensor_peak_bytes": self.tracker.peak_live_bytes,
            "budget_bytes": self.budget_bytes,
            **self.extra,
        }


def _explained(breakdown: dict[str, int] | None, peak: int) -> dict[str, int] | None:
    """The five named categories, and `unattributed` = the device's peak minus their sum."""
    if not breakdown:
        return None
    named = {k: breakdown[k] for k in CATEGORIES}
    return {**named, "unattributed": max(peak, 0) - sum(named.values())}


def make_probe(device: torch.device, budget_bytes: int | None = None, *,
               simulate: bool = False, target: str = "cuda", card=None) -> Probe:
    if simulate:  # on fake CPU tensors, or on the fake CUDA device as `card` (fake_cuda.py)
        from harness.probes.simulate import SimulateProbe

        return SimulateProbe(device, budget_bytes, target, card)
    if device.type == "cuda":
        from harness.probes.cuda import CudaProbe

        return CudaProbe(device, budget_bytes)
    if device.type == "cpu":
        from harness.probes.cpu import CpuProbe

        return CpuProbe(device, budget_bytes)
    raise ValueError(f"no probe for device {device}")
