"""Every replacement of a library's internals the harness makes, in one place, each with the
symbols it replaces and the library versions it was written against.

The one thing to know: these symbols are private and may move or change shape in any release.
`PATCHES` names each one ("module:qualname") with the parameters it had when the patch was
written; `check_targets` says which no longer match, and tests/test_patches.py fails on any,
naming the symbol and the versions — so an upgrade breaks a test, not a figure. The patches
look their targets up through the same table, so the table cannot drift from what they patch.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import inspect
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch._subclasses.fake_tensor import is_fake

from harness.probes.timeline import Kind


@dataclass(frozen=True)
class Patch:
    """One patch: what it replaces and the versions whose internals it was written against."""

    name: str  # the context manager or class below that applies it
    # "module:qualname" of each replaced symbol → its parameter names when the patch was
    # written ("*args", "**kwargs" for variadic ones)
    targets: Mapping[str, tuple[str, ...]]
    written_against: Mapping[str, str]  # distribution → version
    why: str


FIND_PACKED = "transformers.masking_utils:find_packed_sequence_indices"
MAYBE_OPT_STEP = "torch.amp.grad_scaler:GradScaler._maybe_opt_step"
_FSDP = "torch.distributed.fsdp._fully_shard."
ALLOC_STORAGE = _FSDP + "_fsdp_param:alloc_storage"
FREE_STORAGE = _FSDP + "_fsdp_param:free_storage"
GROUP_ALLOC_STORAGE = _FSDP + "_fsdp_param_group:alloc_storage"  # its own import of the above
INIT_UNSHARDED = _FSDP + "_fsdp_param:FSDPParam.init_unsharded_param"

PATCHES: tuple[Patch, ...] = (
    Patch("unpacked_batches", {FIND_PACKED: ("position_ids",)}, {"transformers": "5.24.0"},
          "fake position ids cannot say whether a row packs several sequences; unanswered, "
          "transformers builds a full [B, 1, S, S] mask a real run of these batches never has"),
    Patch("SteppingScaler",
          {MAYBE_OPT_STEP: ("self", "optimizer", "optimizer_state", "*args", "**kwargs")},
          {"torch": "2.13.0"},
          "GradScaler reads found_inf.item() to decide whether to step, a value fake tensors "
          "do not have"),
    Patch("fsdp2_storage_traced",
          {ALLOC_STORAGE: ("tensor",), FREE_STORAGE: ("tensor",),
           GROUP_ALLOC_STORAGE: ("tensor",), INIT_UNSHARDED: ("self",)},
          {"torch": "2.13.0"},
          "FSDP2 frees and re-allocates gathered parameters by resizing their storage in "
          "place, which no op shows the tracker; and it names each gather's buffers"),
)
_PATCH_OF = {target: patch for patch in PATCHES for target in patch.targets}


class MovedSymbol(LookupError):
    """A patched symbol is not where the patch was written to find it."""


def _installed(patch: Patch) -> str:
    found = []
    for dist in patch.written_against:
        try:
            found.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{dist} not installed")
    return ", ".join(found)


def _versions(patch: Patch) -> str:
    wrote = ", ".join(f"{d} {v}" for d, v in patch.written_against.items())
    return f"patch {patch.name!r} was written against {wrote}; installed: {_installed(patch)}"


def _lookup(target: str) -> tuple[Any, str, Any]:
    module_name, _, qualname = target.partition(":")
    *path, name = qualname.split(".")
    owner = importlib.import_module(module_name)
    for part in path:
        owner = getattr(owner, part)
    return owner, name, getattr(owner, name)


def resolve(target: str) -> tuple[Any, str, Any]:
    """(owner, attribute name, symbol) of a "module:qualname" target in PATCHES. Raises
    MovedSymbol, naming the versions the patch was written against."""
    try:
        return _lookup(target)
    except (ImportError, AttributeError) as e:
        raise MovedSymbol(f"{target} not found ({e}); {_versions(_PATCH_OF[target])}") from None


def parameters(fn: Any) -> tuple[str, ...]:
    """fn's parameter names as a Patch lists them ("*args", "**kwargs" for variadic ones)."""
    stars = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}
    return tuple(stars.get(p.kind, "") + p.name for p in inspect.signature(fn).parameters.values())


def check_targets(patches: Iterable[Patch] = PATCHES) -> list[str]:
    """One message per patched symbol that moved or whose parameters changed since the patch
    was written, naming the symbol and the versions; empty when all are as written against."""
    problems = []
    for patch in patches:
        for target, expected in patch.targets.items():
            try:
                _, _, symbol = _lookup(target)
            except (ImportError, AttributeError) as e:
                problems.append(f"{target} not found ({e}); {_versions(patch)}")
                continue
            found = parameters(symbol)
            if found != tuple(expected):
                problems.append(f"{target} takes ({', '.join(found)}), the patch was written for "
                                f"({', '.join(expected)}); {_versions(patch)}")
    return problems


@contextlib.contextmanager
def _replaced(replacements: dict[str, Any]) -> Iterator[None]:
    """Each target set to its replacement while the block runs; the originals back after."""
    originals = []
    try:
        for target, value in replacements.items():
            owner, name, original = resolve(target)
            # An inherited attribute is shadowed, then the shadow removed, not copied down.
            originals.append((owner, name, original, name in vars(owner)))
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, original, own in reversed(originals):
            if own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)


def unpacked_batches() -> contextlib.AbstractContextManager[None]:
    """transformers asks the position ids whether several sequences are packed into one row
    (`(mask[:, -1] == 0).all()`), a question about values that fake tensors cannot answer, so it
    assumes they may be and builds a full [B, 1, S, S] mask — which also turns SDPA's `is_causal`
    path off. The harness's batches are one sequence per row by construction, and a real run
    answers "not packed" and passes no mask: answer the same for fake position ids."""
    _, _, original = resolve(FIND_PACKED)

    def find_packed_sequence_indices(position_ids):
        return None if is_fake(position_ids) else original(position_ids)

    return _replaced({FIND_PACKED: find_packed_sequence_indices})


class SteppingScaler(torch.amp.GradScaler):
    """A GradScaler that steps without asking whether a gradient overflowed: that is a value
    (`found_inf.item()`), which fake tensors do not have. Scaling, unscaling (with its overflow
    check) and the scale's update run as ever."""

    def _maybe_opt_step(self, optimizer, optimizer_state, *args, **kwargs):
        return optimizer.step(*args, **kwargs)


@contextlib.contextmanager
def fsdp2_storage_traced(tracker) -> Iterator[None]:
    """While FSDP2 trains, tell `tracker` of each in-place storage resize it makes of gathered
    parameters (`free_storage`, `alloc_storage`: a free and a new allocation that no op shows),
    and name each all-gather's outputs and the unsharded parameter viewing them as COMM."""
    alloc, free, init_unsharded = (resolve(t)[2] for t in (ALLOC_STORAGE, FREE_STORAGE,
                                                           INIT_UNSHARDED))

    def alloc_storage(tensor):
        alloc(tensor)
        tracker.resized(tensor.untyped_storage())

    def free_storage(tensor):
        free(tensor)
        tracker.resized(tensor.untyped_storage())

    def init_unsharded_param(fsdp_param):  # after each all-gather's copy-out
        init_unsharded(fsdp_param)
        tracker.sight(Kind.COMM, [*fsdp_param.all_gather_outputs, fsdp_param._unsharded_param])

    with _replaced({ALLOC_STORAGE: alloc_storage, FREE_STORAGE: free_storage,
                    GROUP_ALLOC_STORAGE: alloc_storage, INIT_UNSHARDED: init_unsharded_param}):
        yield
