"""One variant, in its own fresh process: build, train a few steps under the probe, write a record.

The runner starts `python -m harness.worker ...` per variant (or forks `forked_main` from a
server that has the libraries imported; see runner.py) and only watches. Whatever happens
here — OOM, an unsupported technique, an exception — ends as a record with that status; only a
hard crash (segfault, kill) leaves none, and the runner writes that record instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

import psutil

from harness.record import collect_env, new_record, write_record
from harness.scenario import load_scenario


def method_for(device: str) -> str:
    if device == "simulate":
        return "simulated"
    return "measured-cuda" if device.startswith("cuda") else "measured-cpu"


def _cuda_missing_reason() -> str | None:
    import torch

    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    return None


def _too_big_for_ram(scenario, variant) -> str | None:
    """A real CPU run whose parameters alone take more than half the available RAM is not started."""
    from harness.models import parameter_bytes_on_meta, resolve_config
    from harness.techniques import BuildContext, Stage, apply_stage

    ctx = BuildContext(device=None)
    apply_stage(Stage.LOAD, ctx, variant.techniques)
    source = resolve_config(scenario.model, scenario.path)
    needed = parameter_bytes_on_meta(scenario.model, source, ctx.load)
    if variant.parallel is not None and variant.parallel.strategy == "ddp":
        needed *= variant.parallel.world_size  # every rank holds a replica (FSDP2: a shard)
    available = psutil.virtual_memory().available
    if needed > available / 2:
        dtype = str(ctx.load.dtype or "torch.float32").replace("torch.", "")
        before = " before quantization" if ctx.load.quantization is not None else ""
        return (f"parameters alone need {needed / 2**30:.1f} GiB in {dtype}{before}, more than "
                f"half of the {available / 2**30:.1f} GiB of RAM available; run it on a GPU")
    return None


def run_variant(scenario_path: str, variant_name: str, device: str, run_id: str,
                result_path: Path, steps: int | None, budget_bytes: int | None,
                full_depth: bool = False, target: str = "cuda",
                snapshot_path: Path | None = None) -> str:
    import torch

    from harness import parallel as parallel_training
    from harness.optimizers import OPTIMIZERS
    from harness.techniques import simulation_reason, unsupported_reason

    scenario = load_scenario(scenario_path, only=variant_name)
    variant = scenario.variant(variant_name)
    if steps is not None:
        variant = dataclasses.replace(variant, train=dataclasses.replace(variant.train, steps=steps))
    record = new_record(run_id=run_id, scenario=scenario, variant=variant, device=device,
                        method=method_for(device))
    record["variant"]["index"] = scenario.index(variant)
    started = time.perf_counter()

    reason = _cuda_missing_reason() if device.startswith("cuda") else None
    simulate = device == "simulate"
    parallel, rank = variant.parallel, None
    kind = "cuda" if device.startswith("cuda") else "cpu"  # a simulation's fake tensors: cpu
    reason = reason or (parallel_training.unsupported_reason(
        parallel, variant.techniques, torch.device(kind), simulate)
        if parallel is not None else None)
    if parallel is not None and not simulate and "RANK" in os.environ:
        # One of the ranks torchrun started (runner.py): join the others, unless this device
        # cannot run them (too few GPUs, say: then every rank says so); write our own record.
        rank, where = int(os.environ["RANK"]), None
        if reason is None:
            rank, where = parallel_training.init_rank(parallel, kind)
        result_path = rank_record_path(result_path, rank)
        if snapshot_path is not None:  # <variant>.rank<r>.snapshot.pickle
            snapshot_path = snapshot_path.with_name(
                snapshot_path.name.replace(".snapshot.", f".rank{rank}.snapshot.", 1))
        if where is not None:
            device = record["device"] = str(where)
    if device == "cuda" and reason is None:
        device = record["device"] = f"cuda:{torch.cuda.current_device()}"
    record["env"] = collect_env(device if device.startswith("cuda") and torch.cuda.is_available()
                                else "cpu")
    torch_device = torch.device("cpu" if simulate else device)  # simulation: fake CPU tensors
    if simulate:
        reason = reason or simulation_reason(variant.techniques,
                                             OPTIMIZERS[variant.train.optimizer])
    else:
        reason = reason or unsupported_reason(variant.techniques, torch_device)
    if reason is None and torch_device.type == "cpu" and not simulate:
        reason = _too_big_for_ram(scenario, variant)
    if reason is not None:
        record.update(status="unsupported", error=reason)
        write_record(result_path, record)
        return record["status"]
    if parallel is not None and simulate:
        return _simulate_ranks(scenario, variant, record, result_path, budget_bytes, full_depth,
                               target, snapshot_path, started)
    try:
        _run_measured(scenario, variant, record, torch_device, budget_bytes, full_depth, target,
                      snapshot_path, started)
    finally:
        parallel_training.leave()  # if this is a rank
    write_record(result_path, record)
    return record["status"]


def rank_record_path(result_path: Path, rank: int) -> Path:
    """Where rank `rank` of a parallel variant writes its record (the runner merges them)."""
    return result_path.with_name(f"{result_path.stem}.rank{rank}.json")


def _simulate_ranks(scenario, variant, record, result_path: Path, budget_bytes, full_depth,
                    target, snapshot_path, started) -> str:
    """Every rank of a parallel variant, simulated on the fake process group in this process:
    one of each kind of rank (ranks whose shards have the same shapes allocate the same),
    merged as the runner merges measured ranks' records."""
    import copy

    import torch

    from harness import parallel as parallel_training
    from harness.models import resolve_config
    from harness.train import build

    spec = variant.parallel
    model = build(scenario.model, resolve_config(scenario.model, scenario.path),
                  variant.techniques, torch.device("meta")).model  # its shapes, unsharded
    kinds = parallel_training.representative_ranks(model, spec.world_size)
    del model
    records = {}
    for rank, alike in kinds.items():
        ranked = copy.deepcopy(record)
        with parallel_training.fake_group(spec, rank):
            _run_measured(scenario, variant, ranked, torch.device("cpu"), budget_bytes,
                          full_depth, target, snapshot_path if rank == 0 else None, started)
        for other in alike:
            records[other] = ranked
    if len(kinds) < spec.world_size:
        note = (f"simulated {len(kinds)} of the {spec.world_size} ranks: the others hold shards "
                "of the same shapes as one of those")
        records[0]["notes"].insert(0, note)
    merged = parallel_training.merge(records, spec.world_size)
    merged["timing"]["wall_s"] = round(time.perf_counter() - started, 3)
    write_record(result_path, merged)
    return merged["status"]


def _run_measured(scenario, variant, record, torch_device, budget_bytes, full_depth, target,
                  snapshot_path, started) -> None:
    """Build and train the variant under this device's probe; fill `record`'s results."""
    from harness.models import resolve_config
    from harness.train import timing

    simulate = record["device"] == "simulate"

    source = resolve_config(scenario.model, scenario.path)
    train, sim_note = variant.train, None
    if simulate and train.warmup_steps + train.steps > 2:
        # The first step creates the optimizer state, the second runs with it; on fake tensors
        # every later step repeats the second byte for byte.
        warmup = min(train.warmup_steps, 1)
        train = dataclasses.replace(train, warmup_steps=warmup, steps=2 - warmup)
        sim_note = (f"simulated {train.warmup_steps + train.steps} of "
                    f"{variant.train.warmup_steps + variant.train.steps} steps: on fake tensors "
                    "every step after the second repeats it exactly")
    # FSDP2 gathers a layer's parameters from the previous layer's hooks (and prefetches in
    # backward): not the one-layer-at-a-time pattern assembly repeats, so every layer runs.
    layers = _layers_to_extrapolate(scenario, source) if simulate and not full_depth \
        and budget_bytes is None and variant.parallel is None else None
    measured = _extrapolated(scenario, source, variant, train, torch_device, layers, target,
                             snapshot_path) if layers is not None else None
    if measured is not None:
        outcome, memory, result, notes = measured
        sim_note = "; ".join(n for n in (sim_note, notes.pop(0)) if n)
    else:  # every layer (or the extrapolation failed: whatever went wrong, say it of all)
        from harness.probes import make_probe

        probe = make_probe(torch_device, budget_bytes, simulate=simulate, target=target)
        probe.keep_snapshot = snapshot_path is not None
        outcome, memory, result, notes = _measure(scenario, source, variant, train, torch_device,
                                                  budget_bytes, simulate, target, probe)
        if probe.snapshot is not None:
            _write_snapshot(snapshot_path, probe.snapshot)
    memory["snapshot_file"] = snapshot_path.name if snapshot_path and snapshot_path.is_file() \
        else None
    record.update(outcome)
    record["notes"] = ([sim_note] if sim_note else []) + notes
    record["memory"] = {**memory, "rank": None, "ranks": None, "imbalance": None}  # one process
    record["model"]["quantized_params"] = result.quantized_params
    record["model"].update(params_total=result.params_total or None,
                           params_trainable=result.params_trainable if result.params_total else None)
    for use in record["variant"]["techniques"]:
        use["args"].update(result.resolved.get(use["name"], {}))
    # Fake ops take no device time: a simulated step time would be the simulator's own.
    record["timing"] = {**(timing(result, train) if not simulate else
                           {"step_time_s_median": None, "tokens_per_s": None, "warmup_s": None}),
                        "wall_s": round(time.perf_counter() - started, 3)}


def _measure(scenario, source, variant, train, torch_device, budget_bytes: int | None,
             simulate: bool, target: str = "cuda", probe=None):
    """Build and train under a fresh probe (or `probe`, made for this run):
    ({status, error}, memory, TrainResult, notes)."""
    import torch

    from harness.probes import make_probe
    from harness.techniques import Unsupported
    from harness.train import TrainResult, run_steps

    probe = probe or make_probe(torch_device, budget_bytes, simulate=simulate, target=target)
    result = TrainResult()
    outcome = {"status": "ok", "error": None}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        probe.start()
        try:
            run_steps(probe, scenario.model, source, variant.techniques, train, torch_device,
                      result, variant.parallel)
        except torch.OutOfMemoryError as e:
            outcome = {"status": "oom", "error": _first_line(e)}
        except Unsupported as e:
            outcome = {"status": "unsupported", "error": str(e)}
        except Exception as e:  # noqa: BLE001 - any failure of the variant is its result
            outcome = ({"status": "oom", "error": _first_line(e)} if _is_oom(e) else
                       {"status": "error", "error": _tail(traceback.format_exc())})
        finally:
            memory = probe.stop()
    memory["paged_optimizer_bytes"] = result.paged_optimizer_bytes
    memory["quantized_weight_bytes"] = result.quantized_weight_bytes
    return outcome, memory, result, _notes(seen)


def _write_snapshot(path: Path, snapshot: dict) -> None:
    from harness.probes.snapshot import write

    write(path, snapshot)


def _extrapolated(scenario, source, variant, train, torch_device, layers: int,
                  target: str = "cuda", snapshot_path: Path | None = None):
    """A deep model from shallow simulations: at EXTRAPOLATE_FROM[1] layers with each event
    labelled by layer, assembled into the `layers`-deep step (layers.py: the trace, its peaks,
    breakdown and reserved memory); at EXTRAPOLATE_FROM[0] too, to check that assembly against
    what one layer adds, and to carry every allocated byte count to `layers` where it cannot
    be assembled. What `_measure` returns, the first note saying which; None if either run did
    not end ok."""
    import dataclasses

    from harness.probes import make_probe
    from harness.probes.simulate import EXTRAPOLATE_FROM, extrapolate, repeak

    probes = {depth: make_probe(torch_device, None, simulate=True, target=target)
              for depth in EXTRAPOLATE_FROM}
    deep = probes[EXTRAPOLATE_FROM[1]]
    deep.label_layers, deep.assemble_to = True, layers
    (low_outcome, shallow, low, _), (outcome, deeper, result, notes) = (
        _measure(scenario, dataclasses.replace(source, layers=depth), variant, train,
                 torch_device, None, True, target, probes[depth]) for depth in EXTRAPOLATE_FROM)
    if low_outcome["status"] != "ok" or outcome["status"] != "ok":
        return None
    memory = extrapolate(shallow, deeper, layers)
    shallow_depth, deep_depth = EXTRAPOLATE_FROM
    why = deep.assembled if isinstance(deep.assembled, str) else _disagreement(
        deep.assembled, memory, [len(p.tracker.allocations) for p in probes.values()], layers)
    if why is None:
        memory = {**deep.assembled[0], **{key: memory[key] for key in (
            "paged_optimizer_bytes", "quantized_weight_bytes")}}  # not in the trace: affine
        if snapshot_path is not None:
            from harness.probes.simulate import snapshot_of

            snapshot = snapshot_of(deep.assembled[1])
            if snapshot is not None:
                _write_snapshot(snapshot_path, snapshot)
        note = (f"simulated with {deep_depth} of the {layers} identical decoder layers, the "
                f"{layers}-layer step assembled from them layer by layer (allocation trace, "
                f"peaks, breakdown, reserved memory) and checked against {shallow_depth} layers")
    else:
        for phase in memory["phases"].values():  # reserved is not affine in depth
            if phase:
                phase["peak_reserved_bytes"] = None
        memory = repeak({**memory, "reserved_model": None})
        note = (f"simulated with {shallow_depth} and {deep_depth} of the {layers} identical "
                "decoder layers, every allocated byte count extrapolated one layer at a time; "
                f"reserved memory needs --full-depth, which simulates every layer (not "
                f"assembled: {why})")
    for key in ("params_total", "params_trainable", "quantized_params", "quantized_weight_bytes"):
        setattr(result, key, extrapolate(getattr(low, key), getattr(result, key), layers))
    return outcome, memory, result, [note, *notes]


def _disagreement(assembled: tuple, affine: dict, events: list[int], layers: int) -> str | None:
    """Why an assembled `layers`-deep step cannot be right, or None: it must hold what persists
    (parameters, grads, state) as one layer at a time adds it, and have as many allocation
    events as one layer at a time adds."""
    from harness.probes.simulate import EXTRAPOLATE_FROM

    memory, trace = assembled
    low, high = EXTRAPOLATE_FROM
    expected = events[1] + (layers - high) * (events[1] - events[0]) // (high - low)
    if len(trace) != expected:
        return f"{len(trace)} allocation events, not {expected}"
    if memory["end_of_step_bytes"] != affine["end_of_step_bytes"]:
        return "what persists between steps is not what each layer adds"
    return None


def _layers_to_extrapolate(scenario, source) -> int | None:
    """A deep model whose decoder layers are all alike is simulated at a few layers and
    extrapolated: the depth to extrapolate to, or None to simulate every layer."""
    from harness.models import identical_layers
    from harness.probes.simulate import EXTRAPOLATE_FROM

    layers = identical_layers(source, scenario.model.trust_remote_code)
    return layers if layers is not None and layers > EXTRAPOLATE_FROM[1] + 1 else None


def _notes(caught: list[warnings.WarningMessage], limit: int = 20) -> list[str]:
    """What the libraries warned about while the variant ran (e.g. bitsandbytes falling back to
    non-paged state on CPU): it can change what the numbers mean, so it goes in the record."""
    notes: list[str] = []
    for w in caught:
        line = f"{w.category.__name__}: {str(w.message).strip().splitlines()[0][:300]}"
        if line not in notes:
            notes.append(line)
    return notes[:limit]


def _is_oom(e: BaseException) -> bool:
    # OOMs raised inside autograd's engine can come back re-wrapped as a plain RuntimeError.
    text = str(e)
    return "out of memory" in text.lower() or "memory budget exceeded" in text


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.worker")
    parser.add_argument("--scenario", required=True)
    parser.add_argument("--variant", required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--result", required=True, type=Path)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--memory-budget", type=int)
    parser.add_argument("--full-depth", action="store_true")
    parser.add_argument("--target", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--snapshot", type=Path, help="write the memory snapshot here")
    args = parser.parse_args(argv)
    status = run_variant(args.scenario, args.variant, args.device, args.run_id, args.result,
                         args.steps, args.memory_budget, args.full_depth, args.target,
                         args.snapshot)
    print(status)
    return 0


def forked_main(argv: list[str], log_path: str) -> None:
    """Entry of a worker forked from the runner's fork server: what a fresh
    `python -m harness.worker` gets from its command line — its own session, output to its log."""
    import faulthandler
    import os

    os.setsid()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    faulthandler.enable()  # a segfault's stack goes to the log, as in a fresh interpreter
    sys.exit(main(argv))


if __name__ == "__main__":
    sys.exit(main())
