"""Name the tensors behind allocations: what was a parameter, a grad, optimizer state, saved for
backward — and enforce a memory budget as a real out-of-memory would.

The tracker only *names*; byte counts at the peak come from the allocator trace (see
timeline.py). It sees every tensor that an op returns (a TorchDispatchMode), every tensor autograd
packs for backward (saved-tensor hooks), and what the loop hands it (parameters, grads, state).
"""

from __future__ import annotations

import time
import weakref

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from harness.probes.timeline import Kind, round_block

_NOBODY = object()  # a tensor no layer or parameter made (see Tracker._inherit)
NOT_ANSWERED = object()  # see Tracker.values


_COMPRESSED = (torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc)


def _storage_holders(leaves):
    """The tensors whose storages hold memory: a wrapper subclass's inner tensors in its place
    (a DTensor's rank's shard; a collective's AsyncCollectiveTensor, whose own storage is not
    valid), a sparse tensor's indices and values (SHiRA's and FRoD's sparse adapters), the rest
    as they are."""
    for t in leaves:
        if isinstance(t, torch.Tensor) and is_traceable_wrapper_subclass(t):
            names, _ = t.__tensor_flatten__()
            yield from _storage_holders(getattr(t, name) for name in names)
        elif isinstance(t, torch.Tensor) and t.layout == torch.sparse_coo:
            yield from (t._indices(), t._values())
        elif isinstance(t, torch.Tensor) and t.layout in _COMPRESSED:
            rows = t.layout in (torch.sparse_csr, torch.sparse_bsr)
            yield from ((t.crow_indices(), t.col_indices()) if rows else
                        (t.ccol_indices(), t.row_indices()))
            yield t.values()
        else:
            yield t


class BudgetExceeded(torch.OutOfMemoryError):
    """Raised where a real allocation would fail: the variant ends as an OOM does."""


class Tracker(TorchDispatchMode):
    # Higher-order operators (compiled checkpointing's rng save/restore, ...) pass through
    # __torch_dispatch__ like any op: run them, name what they return.
    supports_higher_order_operators = True

    def __init__(self, budget_bytes: int | None = None, trace_allocations: bool = False):
        super().__init__()
        self.sightings: list[tuple[int, int, Kind]] = []
        self.budget_bytes = budget_bytes
        self.live_bytes = 0  # tensor storages alive now, 512-byte rounded (for the budget)
        self.peak_live_bytes = 0
        # With trace_allocations (fake tensors: no allocator to ask), each storage's first
        # sighting is its allocation and its death its free — (t_ns, id, ±bytes) — and storages
        # are keyed by a counter instead of an address.
        self.allocations: list[tuple[int, int, int]] | None = [] if trace_allocations else None
        self._seen = WeakIdKeyDictionary()
        self._live: dict[int, int] = {}  # traced: id → bytes of each storage alive now
        # Untraced (a real allocator's trace): when each seen storage died, at which address —
        # for frees the allocator trace misses (see CpuProbe).
        self.deaths: list[tuple[int, int]] = []
        self._where = WeakIdKeyDictionary()
        self._last_ns = 0
        # A labelled trace (simulation, to be assembled at another depth: layers.py) also says
        # which decoder layer each allocation event belongs to: `layer` is the one whose forward
        # or backward runs now (set by hooks); `labels` is parallel to `allocations`; `owners`
        # maps a trace id to the layer it belongs to (None: to no layer, as the embedding).
        # With `inherit` (the optimizer step, where no layer runs) an op's new outputs take
        # their inputs' layer, element by element for foreach ops: the step's temporaries for
        # layer i's parameters belong to layer i; so do those an op makes from no tensor of
        # anyone's (scalars) while a per-parameter loop is at one of layer i's (`_current`).
        # Counted only on this device type (a simulation on the fake CUDA device: a CPU tensor
        # there, such as a batch before its copy to the device, holds no device memory).
        self.device_type: str | None = None
        self.labels: list[int | None] | None = None
        self.owners: dict[int, int | None] = {}
        self.layer: int | None = None
        self.inherit = False
        self._current: int | None | object = _NOBODY

    # -- naming -------------------------------------------------------------------------------

    def _now(self) -> int:
        # Strictly increasing: a free and the next allocation never share a timestamp.
        self._last_ns = max(time.time_ns(), self._last_ns + 1)
        return self._last_ns

    def sight(self, kind: Kind, tensors) -> None:
        now = self._now()
        for t in _storage_holders(tree_leaves(tensors)):
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and (
                    self.allocations is None or is_fake(t)) and (  # simulated: only fake is
                    self.device_type is None or t.device.type == self.device_type):  # device
                storage = t.untyped_storage()
                key = self._count(storage, now)
                if self.allocations is None:
                    key = storage.data_ptr()  # the allocator's own key; resize_ can move it
                self.sightings.append((now, key, kind))
                self._check_budget()

    def _count(self, storage: torch.UntypedStorage, now: int) -> int:
        """Counts the storage's bytes the first time it is seen; its trace id (0 untraced)."""
        seen = self._seen.get(storage)
        if seen is not None:
            return seen
        if not storage.nbytes() and self.allocations is not None:
            return 0  # freed by a resize (see resized); counted when it has bytes again
        size = round_block(storage.nbytes())
        key = 0
        if self.allocations is not None:
            key = len(self.allocations) + 1
            self.allocations.append((now, key, size))
            self._live[key] = size
            if self.labels is not None:
                self.labels.append(self.layer)
                if self.layer is not None:
                    self.owners[key] = self.layer
        self._seen[storage] = key
        self.live_bytes += size
        where = None
        if self.allocations is None:  # where its memory is: kept current across resizes
            where = self._where[storage] = [storage.data_ptr()]
        weakref.finalize(storage, self._release, size, key, where)
        self.peak_live_bytes = max(self.peak_live_bytes, self.live_bytes)
        return key

    def _check_budget(self) -> None:
        if self.budget_bytes is not None and self.live_bytes > self.budget_bytes:
            raise BudgetExceeded(
                f"memory budget exceeded: {self.live_bytes} tracked bytes > budget "
                f"{self.budget_bytes} bytes")

    def resized(self, storage: torch.UntypedStorage) -> None:
        """A traced storage was resized in place (FSDP2 frees and re-allocates gathered
        parameters so): its old bytes are freed now, its new ones a new allocation."""
        if self.allocations is None:  # a real allocator's trace has the free and allocation
            if storage in self._where:
                self._where[storage][0] = storage.data_ptr()
            return
        key = self._seen.pop(storage, None)
        if key in self._live:
            self._release(self._live[key], key)
        self._count(storage, self._now())

    def _release(self, size: int, key: int, where: list[int] | None = None) -> None:
        if self.allocations is not None and self._live.pop(key, None) is None:
            return  # freed already, by a resize (the storage itself dies now)
        if where is not None:
            self.deaths.append((self._now(), where[0]))
        self.live_bytes -= size
        if self.allocations is not None:
            self.allocations.append((self._now(), key, -size))
            if self.labels is not None:
                self.labels.append(self.layer)

    def _key(self, t: torch.Tensor) -> int | None:
        """A (fake) tensor's storage's trace id, once the tracker has seen it."""
        return self._seen.get(t.untyped_storage()) if is_fake(t) else None

    def layer_of(self, t: torch.Tensor) -> int | None:
        """The layer a (fake) tensor's storage belongs to, in a labelled trace."""
        return self.owners.get(self._key(t))

    def own(self, t: torch.Tensor, layer: int | None) -> None:
        """Say that a tensor's storage belongs to `layer` (parameters, by their module)."""
        key = self._key(t)
        if key is not None:
            self.owners[key] = layer

    def start_inheriting(self) -> None:
        self._current = _NOBODY

    def _owner(self, t) -> int | None | object:
        return self.owners.get(self._key(t), _NOBODY)

    def _inherit(self, func, args, out, first_new: int) -> None:
        new = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)
               and (self._key(t) or 0) >= first_new]
        if func.__name__.startswith("_foreach_") and isinstance(out, (list, tuple)) and args \
                and isinstance(args[0], (list, tuple)) and len(args[0]) == len(out):
            fresh = {id(t) for t in new}
            for t, source in zip(out, args[0], strict=True):
                owner = self._owner(source)
                if id(t) in fresh and owner is not _NOBODY:
                    self.own(t, owner)
            self._current = _NOBODY  # every parameter at once: no one parameter's loop
            return
        if not any(isinstance(t, torch.Tensor) for t in tree_leaves(out)):
            return  # a question about tensors (their device, say), not work on one's
        owners = {self._owner(t) for t in tree_leaves(args) if isinstance(t, torch.Tensor)}
        owners.discard(_NOBODY)
        if len(owners) == 1:
            self._current = owners.pop()
        elif owners:
            self._current = _NOBODY  # several layers' tensors meet: the step's own
        if self._current is not _NOBODY:
            for t in new:
                self.own(t, self._current)

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        # Otherwise torch.compile falls back to eager under any active dispatch mode, and a
        # compiled variant would silently measure eager. With this, the mode is off while
        # compiling and on around the compiled graphs: it sees what they return and the extern
        # kernels they call; allocations inside fused kernels are seen by the allocator trace.
        return True

    # func, args → byte sizes of scratch buffers the op would allocate around its kernel on the
    # device being modelled (a simulation's CUDA target); held while the op runs.
    scratch = None
    # func, args → the value a read of a fake tensor's value (which it does not have) returns,
    # or NOT_ANSWERED to let the read fail as it would; None: none answered.
    values = None
    # func, args, kwargs → the output the device's kernel returns where the fake kernel refuses
    # inputs that kernel takes, or NOT_ANSWERED; None: none answered.
    kernels = None

    # probes/values.KnownValues: the real values of tensors computed from the harness's own
    # inputs, which answer ops whose outputs hang on them; None: none known.
    known_values = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.known_values is not None:
            out = self.known_values.dispatch(func, args, kwargs or {})
            if out is not NOT_ANSWERED:
                self.sight(Kind.TENSOR, out)
                return out
        if self.values is not None:
            value = self.values(func, args)
            if value is not NOT_ANSWERED:
                if isinstance(value, torch.Tensor):  # an answered selection (simulate._peft_masked)
                    self.sight(Kind.TENSOR, value)
                return value
        if self.kernels is not None:
            out = self.kernels(func, args, kwargs or {})
            if out is not NOT_ANSWERED:
                self.sight(Kind.TENSOR, out)
                return out
        sizes = self.scratch(func, args) if self.scratch is not None else ()
        # Inside this method the mode is off: these go to the fake mode below, as fake tensors.
        held = [torch.empty(n, dtype=torch.uint8, device=self.device_type or "cpu")
                for n in sizes]
        self.sight(Kind.TENSOR, held)
        first_new = len(self.allocations) + 1 if self.allocations is not None else 0
        out = func(*args, **(kwargs or {}))
        self.sight(Kind.TENSOR, out)
        if self.inherit and self.labels is not None and self.layer is None:
            self._inherit(func, args, out, first_new)
        del held
        return out

    # -- hooks the loop installs --------------------------------------------------------------

    def saved_tensors(self):
        """Context for forward: every tensor autograd saves for backward is seen as SAVED."""

        def pack(t: torch.Tensor):
            self.sight(Kind.SAVED, t)
            return t

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    def _grad_of(self, param: torch.Tensor) -> None:
        self.sight(Kind.GRAD, param.grad)
        if self.labels is not None:  # a grad belongs where its parameter does
            self.own(param.grad, self.layer_of(param))

    def watch_grads(self, model: torch.nn.Module) -> list:
        """Name each grad the moment autograd accumulates it."""
        handles = []
        for p in model.parameters():
            if p.requires_grad:
                handles.append(p.register_post_accumulate_grad_hook(self._grad_of))
        return handles
