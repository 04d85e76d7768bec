"""The values a simulation can know: those of the harness's own inputs, carried through every
op that computes from them alone.

Fake tensors have shapes and no values, so a library's read of a value (`.item()`,
`.tolist()`, `nonzero()`, `x[mask]`) cannot be answered by the fake kernels. Most such reads
in training are about values the harness itself made: a vision-language batch's token ids say
where its images are, its patch grids how many patches each has, and the model computes
positions, windows and sequence boundaries from them before any weight is touched. A
`KnownValues` keeps, beside each fake tensor computed only from known values, its real value
(a host tensor): a real tensor entering the simulation (the batch, made on the host and moved
to the device) is known; an op whose every tensor input is known (or that has none, as
`arange`) runs for real too, on the host, and its fake output gets the real result as its
value; reads of a known value are answered with it, and an op whose output's shape hangs on
known values (`repeat_interleave` of a known count, `x[known_mask]`) gets that shape. A write
of unknown values into a known tensor forgets it, and every view sharing its storage.

Only small tensors are carried (at most `LIMIT` bytes of storage: a mask expanded over the hidden
size is a view of a small one): token ids, masks, positions, grids — never activations, which
are never known anyway (they come from weights). Nothing here
allocates device memory: the real values live on the host, beside the simulation; the fake
outputs are what the tracker counts, as for any op.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    is_fake,
    unset_fake_temporarily,
)
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.weak import WeakIdKeyDictionary

from harness.probes.tracker import NOT_ANSWERED

LIMIT = 1 << 25  # bytes of storage: a batch's ids, masks and positions, under any activation

# Factory ops whose output holds no value until written: nothing to know.
_UNDEFINED = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default,
              torch.ops.aten.empty_like.default, torch.ops.aten.new_empty.default,
              torch.ops.aten.new_empty_strided.default}
_MASKED = (torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default,
           torch.ops.aten.index_put.default)


class KnownValues:
    def __init__(self):
        self._values = WeakIdKeyDictionary()  # fake tensor → its real value (host)
        self._forgotten = WeakIdKeyDictionary()  # fake storages written with unknown values

    def value(self, t: torch.Tensor) -> torch.Tensor | None:
        """The real value of `t`, or None: a real tensor is its own value."""
        if not is_fake(t):  # a host tensor (not a meta one, which has no values either)
            return t if t.device.type != "meta" and _small(t) else None
        value = self._values.get(t)
        if value is None or (self._forgotten and t.untyped_storage() in self._forgotten):
            return None
        return value

    def dispatch(self, func, args, kwargs):
        """The op's output where known values decide it (the module docstring), else
        NOT_ANSWERED: the op runs on fake tensors as ever."""
        if not isinstance(func, torch._ops.OpOverload) or func in _UNDEFINED:
            return NOT_ANSWERED  # a higher-order operator's ops come through one by one
        first = args[0] if args else None
        if isinstance(first, torch.Tensor) and func not in _MASKED and is_fake(first) and \
                first not in self._values:
            return NOT_ANSWERED  # most ops: on activations or weights, never known
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if not tensors and (not _small_factory(func, args, kwargs) or
                            torch.device(kwargs.get("device") or "cpu").type == "meta"):
            return NOT_ANSWERED
        values = [self.value(t) for t in tensors]
        if any(v is None for v in values):
            return self._partly_known(func, args, kwargs, values)
        known = dict(zip(map(id, tensors), values, strict=True))
        real_args, real_kwargs = tree_map(
            lambda x: known[id(x)] if isinstance(x, torch.Tensor) else
            torch.device("cpu") if isinstance(x, torch.device) else x, (args, kwargs))
        with unset_fake_temporarily():
            try:
                real = func(*real_args, **real_kwargs)
            except Exception:  # noqa: BLE001 - the host cannot run it: the fake path decides
                return NOT_ANSWERED
        if not any(isinstance(r, torch.Tensor) for r in tree_leaves(real)):
            return real  # a value read: `.item()`, `equal`
        try:
            out = func(*args, **kwargs)
        except (DataDependentOutputException, DynamicOutputShapeException):
            device = next((t.device for t in tensors if is_fake(t)), None) or \
                kwargs.get("device") or torch.device("cpu")
            out = tree_map(lambda r: torch.empty_strided(r.shape, r.stride(), dtype=r.dtype,
                                                         device=device)
                           if isinstance(r, torch.Tensor) else r, real)
        for fake, value in zip(tree_leaves(out), tree_leaves(real), strict=False):
            if isinstance(fake, torch.Tensor) and is_fake(fake) and \
                    isinstance(value, torch.Tensor) and \
                    _small(value):
                self._values[fake] = value
                if self._forgotten:
                    self._forgotten.pop(fake.untyped_storage(), None)
        return out

    @contextlib.contextmanager
    def tensors_from_lists(self):
        """`torch.tensor([t, …])` of 0-dim tensors reads their values in C++, past the
        dispatcher (Qwen3-VL gathers its position offsets so): known ones are handed over as
        their values; an unknown one fails as before."""
        original = torch.tensor

        def plain(data):
            if isinstance(data, (list, tuple)):
                return type(data)(plain(d) for d in data)
            if isinstance(data, torch.Tensor) and is_fake(data):
                value = self.value(data)
                if value is not None:
                    return value.tolist()
            return data

        def tensor(data, *args, **kwargs):
            return original(plain(data), *args, **kwargs)

        torch.tensor = tensor
        try:
            yield
        finally:
            torch.tensor = original

    def _partly_known(self, func, args, kwargs, values):
        """Some inputs unknown: a boolean mask that is known still fixes what `x[mask]` selects
        and `x[mask] = v` writes (as the positions it holds); a write into a known tensor
        forgets it."""
        if func in _MASKED and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                   for i in args[1] if i is not None):
            indices = []
            for index in args[1]:
                if isinstance(index, torch.Tensor) and index.dtype == torch.bool:
                    known = self.value(index)
                    if known is None:
                        return NOT_ANSWERED
                    with unset_fake_temporarily():  # on the host: the mask's true positions
                        positions = known.nonzero(as_tuple=True)
                    # on the mask's device, as the kernel uses them: a fake tensor there (a
                    # real one moved would run a real copy to the device)
                    indices += [index.fake_mode.from_tensor(p).to(index.device)
                                for p in positions]
                else:
                    indices.append(index)
            out = func(args[0], indices, *args[2:], **kwargs)
            self._forget_written(func, args)
            return out
        self._forget_written(func, args)
        return NOT_ANSWERED

    def _forget_written(self, func, args) -> None:
        for at in _written(func):
            if at < len(args) and isinstance(args[at], torch.Tensor) and is_fake(args[at]):
                self._forgotten[args[at].untyped_storage()] = True


@functools.cache
def _written(func) -> tuple[int, ...]:
    """The positions of the arguments an op writes into (in-place and out= ops)."""
    return tuple(i for i, a in enumerate(func._schema.arguments)
                 if a.alias_info is not None and a.alias_info.is_write)


def _small(t: torch.Tensor) -> bool:
    return t.untyped_storage().nbytes() <= LIMIT


def _small_factory(func, args, kwargs) -> bool:
    """An op that makes a tensor of at most LIMIT bytes from Python values alone (arange,
    full, ones, zeros, scalar_tensor)."""
    packet = func.overloadpacket
    if packet in (torch.ops.aten.full, torch.ops.aten.ones, torch.ops.aten.zeros):
        size = args[0] if args else kwargs.get("size", ())
        return math.prod(int(n) for n in size) * 8 <= LIMIT
    if packet is torch.ops.aten.arange:  # (end), (start, end) or (start, end, step)
        numbers = [float(a) for a in args if isinstance(a, (int, float))]
        if not numbers:
            return False
        start, end, step = ([0.0] * (len(numbers) == 1) + numbers + [1.0])[:3]
        return abs((end - start) / step) * 8 <= LIMIT
    return packet is torch.ops.aten.scalar_tensor
