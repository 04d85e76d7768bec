"""One variant, in its own fresh process: build, train a few steps under the probe, write a record.

The runner writes the variant's job (job.py) and starts `python -m harness.worker JOB_FILE`
(or forks `forked_main` from a server that has the libraries imported; see runner.py) and only
watches. The worker reads the job, never the scenario's YAML: preflight (every check that
can refuse the job, each a reason) → the path (measured; simulated in one process, or as its
ranks) → the probe → the record. Whatever happens here — OOM, an unsupported technique, an
exception — ends as a record with that status; only a hard crash (segfault, kill) leaves none,
and the runner writes that record instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import psutil

from harness import fake_cuda

fake_cuda.preload()  # before torch is imported, or torch never sees the fake CUDA device

from harness.job import Job  # noqa: E402
from harness.record import Memory, Record, Timing, collect_env, new_record, write_record  # noqa: E402


def _cuda_missing_reason() -> str | None:
    import torch

    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    return None


def _too_big_for_ram(scenario, variant, available: int) -> str | None:
    """A real CPU run whose parameters alone take more than half the `available` bytes of RAM
    is not started."""
    from harness.models import parameter_bytes_on_meta, resolve_config
    from harness.techniques import BuildContext, Stage, apply_stage

    ctx = BuildContext(device=None)
    apply_stage(Stage.LOAD, ctx, variant.techniques)
    source = resolve_config(scenario.model, scenario.path)
    needed = parameter_bytes_on_meta(scenario.model, source, ctx.load)
    if variant.parallel is not None and variant.parallel.strategy == "ddp":
        needed *= variant.parallel.world_size  # every rank holds a replica (FSDP2: a shard)
    if needed > available / 2:
        dtype = str(ctx.load.dtype or "torch.float32").replace("torch.", "")
        before = " before quantization" if ctx.load.quantization is not None else ""
        return (f"parameters alone need {needed / 2**30:.1f} GiB in {dtype}{before}, more than "
                f"half of the {available / 2**30:.1f} GiB of RAM available; run it on a GPU")
    return None


def run_variant(job: Job) -> str:
    """Preflight, then the path (measured, or simulated: one process or its ranks), then the
    record, written to `job.result`: the status it ended with."""
    import torch

    from harness import parallel as parallel_training

    variant, started = job.variant, time.perf_counter()
    record = new_record(run_id=job.run_id, scenario=job.scenario, variant=variant,
                        device=job.device, method=job.method, index=job.index)
    reason = _preflight(job)
    simulate, parallel = job.device == "simulate", variant.parallel
    if parallel is not None and not simulate and "RANK" in os.environ:
        job = _as_rank(job, int(os.environ["RANK"]), join=reason is None)
        record.device = job.device
    if job.device == "cuda" and reason is None:
        job = dataclasses.replace(job, device=f"cuda:{torch.cuda.current_device()}")
        record.device = job.device
    record.env = collect_env(job.device if job.device.startswith("cuda") and
                                torch.cuda.is_available() else "cpu")
    if reason is not None:
        record.status, record.error = "unsupported", reason
        write_record(job.result, record)
        return record.status
    if parallel is not None and simulate:
        return _simulate_ranks(job, record, started)
    try:
        _run_measured(job, record, None if simulate else torch.device(job.device), started)
    finally:
        parallel_training.leave()  # if this is a rank
    write_record(job.result, record)
    return record.status


def simulated_device(job: Job):
    """(device, card, why not CUDA) of a simulation: the fake CUDA device as the job's card
    (fake_cuda.py) for a CUDA target where this process has it; fake CPU tensors for a CPU
    target, or — saying why — where it does not."""
    import torch

    from harness import gpus

    if job.target != "cuda":
        return torch.device("cpu"), None, None
    if job.variant.parallel is not None:
        # The ranks' fake process group (parallel.fake_group) holds CPU tensors, which FSDP2
        # and DDP would meet beside the model's fake CUDA ones.
        return torch.device("cpu"), None, ("the ranks of a parallel variant are simulated on "
                                           "fake CPU tensors, whose fake process group is CPU's")
    why = fake_cuda.unavailable()
    if why is not None:
        return torch.device("cpu"), None, why
    return torch.device("cuda", 0), gpus.simulated_card(gpus.card(job.gpu or gpus.SIMULATED)), None


def _preflight(job: Job) -> str | None:
    """Every check made before anything is built, in order: why this job cannot run here (its
    record then says `unsupported` with that reason), or None."""
    import torch

    from harness import parallel as parallel_training
    from harness.models import attention_reason
    from harness.optimizers import OPTIMIZERS
    from harness.techniques import simulation_reason, unsupported_reason

    variant, simulate = job.variant, job.device == "simulate"
    kind = torch.device("cuda" if job.device.startswith("cuda") else "cpu")
    # What a technique's simulation is asked about: the fake CUDA device, fake CPU tensors for
    # a CPU target, or None — fake CPU tensors standing in for a CUDA target (no fake device).
    simulated_on = None
    if simulate:
        where, _, why_not = simulated_device(job)
        simulated_on = None if why_not else where
    checks = (
        lambda: _cuda_missing_reason() if kind.type == "cuda" else None,
        lambda: attention_reason(job.scenario.model.attn_implementation, job.device),
        lambda: parallel_training.unsupported_reason(
            variant.parallel, variant.techniques, kind, simulate) if variant.parallel else None,
        lambda: simulation_reason(variant.techniques, OPTIMIZERS[variant.train.optimizer],
                                  simulated_on)
        if simulate else unsupported_reason(variant.techniques, kind),
        lambda: _too_big_for_ram(job.scenario, variant, psutil.virtual_memory().available)
        if kind.type == "cpu" and not simulate else None,
    )
    return next((reason for reason in (check() for check in checks) if reason), None)


def _as_rank(job: Job, rank: int, *, join: bool) -> Job:
    """One of the ranks torchrun started (runner.py): join the others (unless preflight found
    a reason, which every rank then records), with a record and snapshot of its own."""
    from harness import parallel as parallel_training

    device = job.device
    if join:
        rank, where = parallel_training.init_rank(job.variant.parallel,
                                                  "cuda" if device.startswith("cuda") else "cpu")
        device = str(where) if where is not None else device
    snapshot = job.snapshot and job.snapshot.with_name(  # <variant>.rank<r>.snapshot.pickle
        job.snapshot.name.replace(".snapshot.", f".rank{rank}.snapshot.", 1))
    return dataclasses.replace(job, device=device, snapshot=snapshot,
                               result=rank_record_path(job.result, rank))


def rank_record_path(result_path: Path, rank: int) -> Path:
    """Where rank `rank` of a parallel variant writes its record (the runner merges them)."""
    return result_path.with_name(f"{result_path.stem}.rank{rank}.json")


def _simulate_ranks(job: Job, record: Record, started: float) -> str:
    from harness.parallel import simulate_ranks

    merged = simulate_ranks(job, record, lambda rank_job, rank_record: _run_measured(
        rank_job, rank_record, None, started))
    merged.timing.wall_s = round(time.perf_counter() - started, 3)
    write_record(job.result, merged)
    return merged.status


def _run_measured(job: Job, record: Record, torch_device, started: float) -> None:
    """Build and train the variant under this device's probe (a simulation's: None, chosen
    here, simulated_device); fill `record`'s results."""
    from harness.depth import NotExtrapolated, layers_to_extrapolate, simulate_deep
    from harness.models import beyond_positions, resolve_config
    from harness.train import measure, timing

    scenario, variant, simulate = job.scenario, job.variant, job.device == "simulate"
    budget_bytes, target, snapshot_path = job.budget_bytes, job.target, job.snapshot

    source = resolve_config(scenario.model, scenario.path)
    train, sim_note = variant.train, None
    card = None
    if simulate:  # torch_device is None: the simulated device is decided here
        torch_device, card, why_not = simulated_device(job)
        if why_not:
            record.notes.append(f"simulated on fake CPU tensors, with CUDA kernels' scratch "
                                f"added by hand: no fake CUDA device ({why_not})")
    if simulate and train.warmup_steps + train.steps > 2 and variant.data is None:
        # The first step creates the optimizer state, the second runs with it; on fake tensors
        # every later step repeats the second byte for byte.
        warmup = min(train.warmup_steps, 1)
        train = dataclasses.replace(train, warmup_steps=warmup, steps=2 - warmup)
        sim_note = (f"simulated {train.warmup_steps + train.steps} of "
                    f"{variant.train.warmup_steps + variant.train.steps} steps: on fake tensors "
                    "every step after the second repeats it exactly")
        if variant.eval is not None and variant.eval.every_steps is not None:
            # Every evaluation from the second step on holds the same (the state is there).
            variant = dataclasses.replace(variant, eval=dataclasses.replace(
                variant.eval, every_steps=None))
            sim_note += (f"; evaluated once, after the last of them (every_steps "
                         f"{job.variant.eval.every_steps}: each evaluation after the first "
                         "step repeats it)")
    # FSDP2 gathers a layer's parameters from the previous layer's hooks (and prefetches in
    # backward): not the one-layer-at-a-time pattern assembly repeats, so every layer runs.
    layers = layers_to_extrapolate(scenario, source) if simulate and not job.full_depth \
        and budget_bytes is None and variant.parallel is None else None
    deep = None
    if layers is not None:
        try:
            deep = simulate_deep(scenario, source, variant, train, torch_device, layers, target,
                                 snapshot_path, card)
        except NotExtrapolated:  # a shallow run failed: every layer runs, and says it of all
            pass
    if deep is not None:
        outcome, memory, result, notes = deep
        sim_note = "; ".join(n for n in (sim_note, notes.pop(0)) if n)
    else:
        from harness.probes import make_probe
        from harness.probes.snapshot import write

        probe = make_probe(torch_device, budget_bytes, simulate=simulate, target=target,
                           card=card)
        probe.keep_snapshot = snapshot_path is not None
        outcome, memory, result, notes = measure(scenario, source, variant, train, torch_device,
                                                 budget_bytes, simulate, target, probe)
        if probe.snapshot is not None:
            write(snapshot_path, probe.snapshot)
    memory["snapshot_file"] = snapshot_path.name if snapshot_path and snapshot_path.is_file() \
        else None
    record.status, record.error = outcome["status"], outcome["error"]
    positions = beyond_positions(source, variant.train.seq_len, scenario.model.trust_remote_code)
    record.notes = [n for n in (*record.notes, positions, sim_note) if n] + notes
    record.memory = Memory.of(memory)  # one process: no rank, ranks or imbalance
    record.model.quantized_params = result.quantized_params
    record.model.virtual_tokens = result.virtual_tokens
    record.model.experts = result.experts
    record.model.vision = result.vision
    if record.images is not None and result.images is not None:
        record.images.update(result.images.record())
    record.model.params_total = result.params_total or None
    record.model.params_trainable = result.params_trainable if result.params_total else None
    for use in record.variant.techniques:
        use["args"].update(result.resolved.get(use["name"], {}))
    if record.save:
        # Each save that ran is one `save` phase, in order.
        peaks = iter((memory["phases"].get("save") or {}).get("per_save_peak_allocated_bytes", []))
        for entry, done in zip(record.save, result.saves, strict=False):
            entry.update(done, peak_allocated_bytes=None if "skipped" in done else
                         next(peaks, None))
    if record.objective is not None and result.objective is not None:
        record.objective.update(result.objective)
    if record.data is not None and result.drawn is not None:
        from harness.data import summary

        record.data.update(summary(variant.data, result.lengths, result.drawn,
                                   memory.get("per_step_peak_allocated_bytes") or [],
                                   train.seq_len))
    measured = timing(result, train)
    if simulate:
        from harness.techniques import REGISTRY

        applied = [(REGISTRY[u["name"]], u["args"]) for u in record.variant.techniques]
        # Fake ops take no device time: a simulated step time would be the simulator's own.
        # A warm-up that needs its own step (compilation) is real work here too.
        warm = any(tech.needs_warmup for tech, _ in applied)
        measured = {"step_time_s_median": None, "tokens_per_s": None,
                    "warmup_s": measured["warmup_s"] if warm else None}
        if record.status == "ok":
            record.notes += [note for tech, args in applied if tech.simulated_notes
                             for note in tech.simulated_notes(args, torch_device)]
    record.timing = Timing(**measured, wall_s=round(time.perf_counter() - started, 3))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.worker",
                                     description="Run one variant from its job file (job.py).")
    parser.add_argument("job", type=Path, help="the job file the runner wrote")
    print(run_variant(Job.read(parser.parse_args(argv).job)))
    return 0


def forked_main(argv: list[str], log_path: str, cli_pid: int, environ: dict[str, str],
                cwd: str) -> None:
    """Entry of a worker forked from the runner's fork server: what a fresh
    `python -m harness.worker` gets from its command line — the CLI's environment and folder,
    its own session, output to its log — and an end when the CLI that asked for it ends,
    however it ends."""
    import faulthandler

    from harness.runner import exit_with

    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    os.setsid()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    faulthandler.enable()  # a segfault's stack goes to the log, as in a fresh interpreter
    exit_with(cli_pid)
    sys.exit(main(argv))


if __name__ == "__main__":
    if "RANK" in os.environ:  # a rank torchrun started: it ends with torchrun
        from harness.runner import die_with_parent

        die_with_parent()
    sys.exit(main())
