"""Training in several processes: PyTorch's DDP and FSDP2, as users run them.

A variant with `parallel: {strategy, world_size, …}` runs as `world_size` ranks that torchrun
(`python -m torch.distributed.run`) starts, each a worker measuring its own process with the
device's probe: gloo between CPU ranks, NCCL between GPUs (one per rank). The runner merges
their records (`merge`): `memory` is the rank with the highest peak, `memory.ranks` every
rank's figures, `memory.imbalance` how far the highest peak is above the ranks' mean.

Simulated, the ranks are predicted one after another in one process, on PyTorch's fake process
group (collectives that move no data) with fake tensors: rank r is the same build with the fake
group saying "rank r of N". Ranks whose shards have the same shapes allocate the same, so one of
each kind is simulated (`representative_ranks`).

FSDP2 (`fully_shard`) shards each decoder layer and then the root (the embedding, final norm
and LM head), as TorchTitan and the FSDP2 tutorial do; with random weights the model is built
on the meta device, sharded, then given storage rank by rank, so no rank ever holds the whole
model. DDP wraps the built model; its gradient buckets live in its C++ reducer.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import os
from collections.abc import Callable
from typing import Any

import torch

from harness.probes.timeline import Kind
from harness.record import Record
from harness.scenario import ParallelSpec
from harness.techniques import Unsupported

BACKENDS = {"cpu": "gloo", "cuda": "nccl"}
# How long a rank waits in a collective for the others: a dead rank then ends the live ones
# with an error rather than a hang (torchrun also stops them once it sees one exit).
COLLECTIVE_TIMEOUT_S = float(os.environ.get("HARNESS_COLLECTIVE_TIMEOUT_S", "300"))


def dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else getattr(torch, name)


def unsupported_reason(spec: ParallelSpec, uses, device: torch.device,
                       simulate: bool) -> str | None:
    """Why this device or this build cannot run the variant's parallel training, or None.
    `uses`: the variant's techniques, each saying which strategies it cannot run under."""
    from harness.techniques import ordered

    for tech, _ in ordered(tuple(uses)):
        why = tech.parallel_unsupported.get(spec.strategy)
        if why:
            return why
    if spec.cpu_offload:
        if simulate:
            return ("FSDP2 CPU offload is not simulated: the fake tensors of a simulation all "
                    "live on one device, so what stays on the host cannot be told apart")
        if device.type == "cpu":
            return "FSDP2 CPU offload needs a CUDA device: on CPU there is nothing to offload"
    if simulate and spec.strategy == "ddp":
        return ("DDP is not simulated: its reducer (C++) reads every parameter's storage when "
                "it wraps the model, which fake tensors do not have; simulate FSDP2, or measure")
    if device.type == "cuda" and not simulate:
        visible = torch.cuda.device_count()
        if visible < spec.world_size:
            return (f"{spec.label()} needs {spec.world_size} CUDA devices, "
                    f"{visible} visible")
    return None


# ---------------------------------------------------------------------------------------------
# Process groups


def init_rank(spec: ParallelSpec, device_type: str) -> tuple[int, torch.device | None]:
    """In a worker torchrun started: join the group; (rank, this rank's CUDA device or None)."""
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    where = None
    if device_type == "cuda":
        where = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(where)
    dist.init_process_group(BACKENDS[device_type], timeout=dt.timedelta(
        seconds=COLLECTIVE_TIMEOUT_S), device_id=where)
    return rank, where


def simulate_ranks(job, record: Record, run: Callable[[Any, Record], None]) -> Record:
    """Every rank of a parallel job (job.py), simulated on the fake process group in this
    process: one of each kind of rank (ranks whose shards have the same shapes allocate the
    same), each filled in by `run(job, rank's record)`, merged as the runner merges measured
    ranks' records. The snapshot, if asked for, is rank 0's."""
    import dataclasses

    from harness.models import resolve_config
    from harness.train import build

    scenario, spec = job.scenario, job.variant.parallel
    model = build(scenario.model, resolve_config(scenario.model, scenario.path),
                  job.variant.techniques, torch.device("meta")).model  # its shapes, unsharded
    kinds = representative_ranks(model, spec.world_size)
    del model
    if any(s.kind == "full" and s.cpu_offload for s in job.variant.save or ()):
        kinds = _alone(kinds, 0)  # only rank 0 gathers the offloaded state dict
    records = {}
    for rank, alike in kinds.items():
        ranked = copy.deepcopy(record)
        with fake_group(spec, rank):
            run(job if rank == 0 else dataclasses.replace(job, snapshot=None), ranked)
        for other in alike:
            records[other] = ranked
    if len(kinds) < spec.world_size:
        note = (f"simulated {len(kinds)} of the {spec.world_size} ranks: the others hold shards "
                "of the same shapes as one of those")
        records[0].notes.insert(0, note)
    return merge(records, spec.world_size)


@contextlib.contextmanager
def fake_group(spec: ParallelSpec, rank: int):
    """PyTorch's fake process group as rank `rank` of `spec.world_size`: every collective
    returns at once, moving nothing (torch.testing._internal.distributed.fake_pg)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=spec.world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def representative_ranks(model: torch.nn.Module, world_size: int) -> dict[int, list[int]]:
    """Ranks that hold shards of different shapes → the ranks like each one. FSDP2 cuts each
    parameter along dim 0 as torch.chunk does: ceil(d / N) rows per rank, the last ranks fewer
    (or none); every rank allocates the padded size for its shards, but AdamW's state and
    what reads the unpadded shard follow the real rows."""
    groups: dict[tuple, list[int]] = {}
    shapes = [p.shape[0] if p.dim() else 1 for p in model.parameters()]
    for rank in range(world_size):
        rows = []
        for d in shapes:
            chunk = -(-d // world_size)
            rows.append(max(0, min(chunk, d - rank * chunk)))
        groups.setdefault(tuple(rows), []).append(rank)
    return {ranks[0]: ranks for ranks in groups.values()}


def _alone(kinds: dict[int, list[int]], rank: int) -> dict[int, list[int]]:
    """`kinds` (representative_ranks) with `rank` a kind of its own."""
    out: dict[int, list[int]] = {}
    for alike in kinds.values():
        others = [r for r in alike if r != rank]
        if others:
            out[others[0]] = others
    return dict(sorted({**out, rank: [rank]}.items()))


# ---------------------------------------------------------------------------------------------
# Wrapping the model


def build_on_meta(spec: ParallelSpec | None, weights: str, quantized: bool) -> bool:
    """Whether a real run builds on meta and shards before any storage exists (FSDP2 with
    random weights): no rank ever holds the unsharded model."""
    return spec is not None and spec.strategy == "fsdp2" and weights == "random" and not quantized


def wrap(ctx, spec: ParallelSpec, device: torch.device) -> None:
    """Shard (FSDP2, in place: ctx.model becomes the root FSDP module) or replicate (DDP:
    ctx.forward_module is the wrapper the loop calls) the built model."""
    if ctx.loss_fn is not None:  # chunked_nll's: the decoder and the head called one by one
        around = ("gathers the root's parameters" if spec.strategy == "fsdp2" else
                  "arms the gradient reduction")
        raise Unsupported("the variant's loss is computed from the decoder and the head "
                          f"separately, not through the {spec.strategy.upper()}-wrapped model, "
                          f"whose own forward {around}")
    if spec.strategy == "fsdp2":
        _fully_shard(ctx.model, spec, device)
    else:
        from torch.nn.parallel import DistributedDataParallel

        ctx.forward_module = DistributedDataParallel(
            ctx.model, device_ids=[device] if device.type == "cuda" else None,
            bucket_cap_mb=spec.bucket_cap_mb,
            gradient_as_bucket_view=spec.gradient_as_bucket_view)


def _fully_shard(model: torch.nn.Module, spec: ParallelSpec, device: torch.device) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
    )

    from harness.probes.layers import decoder_layers

    # The mesh's device type is where the shards live: a simulation's fake tensors are CPU's.
    mesh_device = "cpu" if device.type == "meta" else device.type
    options: dict[str, Any] = dict(
        mesh=init_device_mesh(mesh_device, (spec.world_size,)),
        reshard_after_forward=spec.reshard_after_forward,
        mp_policy=MixedPrecisionPolicy(param_dtype=dtype(spec.param_dtype),
                                       reduce_dtype=dtype(spec.reduce_dtype)),
        offload_policy=CPUOffloadPolicy() if spec.cpu_offload else OffloadPolicy())
    layers = decoder_layers(model)
    if layers is None:
        raise Unsupported("FSDP2: no list of identical decoder layers found to shard one by one")
    for layer in layers:
        fully_shard(layer, **options)
    fully_shard(model, **options)


def materialize(model: torch.nn.Module, device: torch.device) -> None:
    """Storage for a model sharded on meta: each rank's own shards, parameters drawn from
    normal(0, 0.02) and buffers zeroed (rotary frequencies included). Values do not change
    memory, but uninitialised storage could hold NaNs and denormals that slow CPU kernels."""
    model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            local = getattr(p, "_local_tensor", p)
            if local.is_floating_point():
                local.normal_(0.0, 0.02)
        for b in model.buffers():
            if b.is_floating_point():
                b.zero_()


@contextlib.contextmanager
def gradient_sync(forward: torch.nn.Module, model: torch.nn.Module, enabled: bool):
    """A micro-batch's backward with (the last of a step's) or without the gradient reduction,
    as accelerate's `no_sync` runs accumulation: DDP keeps the local grads unreduced; FSDP2
    keeps each unsharded gradient, reduce-scattered only at the last micro-batch. Nothing for
    a model in one process."""
    if enabled:
        yield
    elif _is_ddp(forward):
        with forward.no_sync():
            yield
    elif is_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


@contextlib.contextmanager
def named_buffers(model: torch.nn.Module, tracker):
    """While `model` trains, name what its collectives use, `other` in the breakdown.

    FSDP2: each parameter it gathers (the all-gather outputs and the unsharded parameter
    viewing them), also where autograd saves it for backward; and, in a simulation, the
    gathers' storage frees and re-allocations, which FSDP2 makes by resizing storage in place
    (`free_storage`, `alloc_storage`) rather than by any op, enter the trace (patches.py).
    DDP: its gradient buckets (which it re-allocates once, in the second step's forward, in
    the order gradients arrived), through a communication hook that names each bucket and
    all-reduces it as DDP's own does (`allreduce_hook`).
    Nothing for a model in one process."""
    if _is_ddp(model):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def named_allreduce(state, bucket):
            tracker.sight(Kind.COMM, bucket.buffer())
            return allreduce_hook(state, bucket)

        model.register_comm_hook(None, named_allreduce)
    if not is_sharded(model):
        yield
        return
    from harness.patches import fsdp2_storage_traced

    with fsdp2_storage_traced(tracker):
        yield


def save_refused(model: torch.nn.Module, kind: str) -> str | None:
    """Why a parallel job's `kind` save is not built yet, or None."""
    if is_sharded(model) and kind != "full":
        return f"{kind} under FSDP2 (a PEFT state dict of sharded adapters) is not built yet"
    return None


def save_pretrained(model: torch.nn.Module, folder: str, cpu_offload: bool = True) -> None:
    """`model.save_pretrained(folder)` as a parallel job saves: rank 0 writes. Under FSDP2
    the full state dict is gathered first (`get_model_state_dict`, full_state_dict): with
    `cpu_offload` each tensor moves to rank 0's CPU as it is gathered and the other ranks get
    none; without, every rank holds the whole model on its device at once."""
    import torch.distributed as dist

    main = not dist.is_initialized() or dist.get_rank() == 0
    state = None
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(
            full_state_dict=True, cpu_offload=cpu_offload))
    if main:
        model.save_pretrained(folder, state_dict=state)
    del state


def _is_ddp(model: torch.nn.Module) -> bool:
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(model, DistributedDataParallel)


def is_sharded(model: torch.nn.Module) -> bool:
    import sys

    if "torch.distributed.fsdp" not in sys.modules:
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


# ---------------------------------------------------------------------------------------------
# Records


def rank_entry(rank: int, record: Record) -> dict[str, Any]:
    memory = record.memory
    return {"rank": rank, "status": record.status,
            "error": record.error.splitlines()[0][:300] if record.error else None,
            **{key: getattr(memory, key) for key in (
                "peak_allocated_bytes", "peak_reserved_bytes", "peak_phase", "breakdown_bytes",
                "end_of_step_bytes")},
            # Each phase's peak on this rank (a save gathers on some ranks only).
            "phase_peaks_bytes": {name: (phase or {}).get("peak_allocated_bytes")
                                  for name, phase in (memory.phases or {}).items()}}


def imbalance(ranks: list[dict[str, Any]]) -> float | None:
    """How far the highest per-rank peak is above the ranks' mean: max / mean − 1 (0 when
    balanced); None unless every rank has a peak."""
    peaks = [r["peak_allocated_bytes"] for r in ranks]
    if not peaks or None in peaks or not sum(peaks):
        return None
    return round(max(peaks) / (sum(peaks) / len(peaks)) - 1, 6)


_WORST = ("error", "oom", "unsupported", "ok")


def merge(records: dict[int, Record], world_size: int) -> Record:
    """One record from every rank's: the rank with the highest peak (its `memory`, timing and
    model figures), `memory.ranks` for all, `memory.rank`, `memory.imbalance`; the worst status
    (a rank's error or OOM is the variant's), with that rank's error."""
    ranks = [rank_entry(rank, records[rank]) for rank in sorted(records)]
    worst_rank = min(sorted(records), key=lambda r: _WORST.index(records[r].status))
    worst = records[worst_rank]
    peaked = [r for r in records if records[r].memory.peak_allocated_bytes is not None]
    top = max(peaked, key=lambda r: records[r].memory.peak_allocated_bytes) if peaked \
        else min(records)
    merged = copy.deepcopy(records[top])
    merged.memory.rank, merged.memory.ranks = top, ranks
    merged.memory.imbalance = imbalance(ranks)
    if worst.status != "ok":
        merged.status, merged.error = worst.status, f"rank {worst_rank}: {worst.error}"
    if merged.save and 0 in records and records[0].save:  # rank 0 writes: its files
        for entry, written in zip(merged.save, records[0].save, strict=True):
            entry.update({k: written[k] for k in ("files", "written_bytes") if k in written})
    merged.notes = list(dict.fromkeys(n for rank in sorted(records) for n in records[rank].notes))
    missing = world_size - len(records)
    if missing:
        merged.notes.append(f"{missing} of {world_size} ranks wrote no record")
    return merged
