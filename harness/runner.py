"""One process per variant; collect every record; never lose one.

The parent only launches, watches and collects. Each variant's worker writes its record to a
temporary path; the parent moves it into the run folder. A worker that crashes, is killed or
times out gets an `error` record with its log tail. Ctrl-C stops the current worker, keeps
every finished record, regenerates the summary and returns 130.

Where a worker starts: importing torch, transformers and PEFT takes 6–8 s, longer than a tiny
variant runs. For devices that never touch CUDA, workers are forked from a fork server that
imported them once (a fresh process per variant all the same: nothing it does reaches the next).
The CLI starts the fork server first thing, so its imports overlap the parent's own scenario
validation (4 s of a tiny run's 16). CUDA workers start as fresh interpreters: a driver
initialised before a fork is not safe to use after it, and a GPU variant's run dwarfs the import.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.job import Job, RunOptions
from harness.record import Record, RecordError, collect_env, new_record, read_record, write_record
from harness.scenario import Scenario, Variant

LOG_DIR = "logs"  # per-variant worker output, inside the run folder
STDERR_TAIL_LINES = 30


@dataclass
class RunOutcome:
    run_dir: Path
    statuses: dict[str, str]
    interrupted: bool = False


def run_scenario(scenario: Scenario, variants: Sequence[Variant], options: RunOptions, *,
                 run_dir: Path, run_id: str,
                 progress: Callable[[str], None] = lambda line: None) -> RunOutcome:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOG_DIR).mkdir(exist_ok=True)
    outcome = RunOutcome(run_dir, {})
    for i, variant in enumerate(variants, 1):
        progress(f"[{i}/{len(variants)}] {variant.name} ...")
        started = time.monotonic()
        job = Job.make(scenario, variant, options, run_id=run_id,
                       result=run_dir / LOG_DIR / f"{variant.name}.pending.json",
                       snapshot=run_dir / f"{variant.name}.snapshot.pickle")
        try:
            record = _run_one(job, run_dir, options.timeout_s)
        except KeyboardInterrupt:
            outcome.interrupted = True
            progress(f"[{i}/{len(variants)}] {variant.name} interrupted: no record written")
            break
        outcome.statuses[variant.name] = record.status
        peak = record.memory.peak_allocated_bytes
        shown = f"{peak / 2**30:.3f} GiB peak" if peak is not None else "no peak"
        note = f" ({record.error.splitlines()[0][:120]})" if record.error else ""
        progress(f"[{i}/{len(variants)}] {variant.name}: {record.status}, {shown}, "
                 f"{time.monotonic() - started:.1f} s{note}")
    return outcome


def _run_one(job: Job, run_dir: Path, timeout_s: float | None) -> Record:
    """Start the job's worker (or its ranks), wait, and move its record into `run_dir` — or
    write the error record that says why there is none."""
    name = job.variant.name
    final, pending = run_dir / f"{name}.json", job.result
    log, job_file = run_dir / LOG_DIR / f"{name}.log", run_dir / LOG_DIR / f"{name}.job.json"
    pending.unlink(missing_ok=True)
    for stale in pending.parent.glob(f"{name}.pending.rank*.json"):
        stale.unlink()
    job.write(job_file)
    ranks = job.variant.parallel.world_size \
        if job.variant.parallel and job.device != "simulate" else None
    worker = _start_ranks([str(job_file)], log, ranks) if ranks else \
        _start_worker([str(job_file)], log, fork=not job.device.startswith("cuda"))
    why = None
    try:
        code = worker.wait(timeout_s)
        if code is None:
            worker.kill_group()
            code, why = worker.wait(None), f"worker timed out after {timeout_s:g} s and was killed"
    except BaseException:
        worker.kill_group()
        pending.unlink(missing_ok=True)
        raise
    if ranks:
        return _collect_ranks(job, final, log, ranks, code, why)
    # A record the worker finished is the measurement, even if the process died at exit after.
    if why is None and pending.is_file():
        try:
            record = Record.of(read_record(pending))
            write_record(final, record)
            pending.unlink(missing_ok=True)
            return record
        except (RecordError, ValueError, KeyError) as e:
            why = f"worker wrote an unreadable record: {e}"
    if why is None:
        why = f"worker exited with {_exit(code)}"
    pending.unlink(missing_ok=True)
    return _error_record(job, final, why + "\n" + _tail(log))


def _error_record(job: Job, final: Path, error: str) -> Record:
    record = new_record(run_id=job.run_id, scenario=job.scenario, variant=job.variant,
                        device=job.device, method=job.method, index=job.index,
                        # never touch CUDA here: a context would skew the workers
                        env=collect_env("cpu"))
    record.error = error
    write_record(final, record)
    return record


def _collect_ranks(job: Job, final: Path, log: Path, ranks: int, code: int,
                   why: str | None) -> Record:
    """The variant's record from its ranks' (parallel.merge). Any rank without a record — it
    died, or torchrun stopped it when another died — makes the variant an error that says
    which, with the others' figures kept in `memory.ranks`."""
    from harness.parallel import merge
    from harness.worker import rank_record_path

    records, unreadable = {}, []
    for rank in range(ranks):
        path = rank_record_path(job.result, rank)
        if path.is_file():
            try:
                records[rank] = Record.of(read_record(path))
            except (RecordError, ValueError, KeyError):
                unreadable.append(rank)
            path.unlink(missing_ok=True)
    missing = [r for r in range(ranks) if r not in records]
    if not missing and why is None:
        record = merge(records, ranks)
        write_record(final, record)
        return record
    if why is None:
        why = (f"rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} of "
               f"{ranks} wrote no record" + (" (unreadable)" if unreadable else "") +
               f"; torchrun exited with {_exit(code)}")
    error = why + "\n" + _tail(log)
    if not records:
        return _error_record(job, final, error)
    record = merge(records, ranks)
    record.status, record.error = "error", error
    write_record(final, record)
    return record


class _Worker:
    """A started worker, in a session (process group) of its own: a terminal's Ctrl-C reaches
    the parent only, which then stops the worker's whole group (and whatever it started)."""

    def __init__(self, proc: subprocess.Popen | multiprocessing.process.BaseProcess):
        self.proc = proc

    def wait(self, timeout: float | None) -> int | None:
        """The exit code (negative: killed by that signal); None if still running at timeout."""
        if isinstance(self.proc, subprocess.Popen):
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return None
        self.proc.join(timeout)
        return self.proc.exitcode

    def kill_group(self) -> None:
        pid = self.proc.pid
        try:
            os.killpg(pid, signal.SIGKILL)  # the worker leads its own group (setsid)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.kill()  # in case it was not yet its own group's leader
        self.wait(None)


_PRELOAD = ["harness.worker", "harness.train", "harness.probes.cpu", "harness.techniques.lora",
            "peft", "transformers.models.llama.modeling_llama",
            "transformers.models.mistral.modeling_mistral"]


def start_fork_server() -> None:
    """Start the fork server (its imports) now, in its own process, so that they overlap what
    the parent does before the first variant — loading and validating the scenario imports the
    same libraries. Called by the CLI for devices whose workers fork; harmless if none does."""
    from multiprocessing import forkserver

    from harness import fake_cuda

    fake_cuda.build()  # cached; the server loads it before torch (worker.py), or says why not
    multiprocessing.get_context("forkserver").set_forkserver_preload(_PRELOAD)
    forkserver.ensure_running()


def _start_worker(argv: list[str], log: Path, *, fork: bool) -> _Worker:
    if fork:
        from harness import fake_cuda

        fake_cuda.build()
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(_PRELOAD)
        from harness.worker import forked_main

        # The fork server's environment and folder are those it started with: the worker
        # takes the CLI's own, as a fresh process would.
        proc = context.Process(target=forked_main, daemon=False,
                               args=(argv, str(log), os.getpid(), dict(os.environ), os.getcwd()))
        proc.start()
        return _Worker(proc)
    with open(log, "w") as log_file:
        return _Worker(subprocess.Popen(
            [sys.executable, "-m", "harness.worker", *argv], stdout=log_file,
            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent,
            env={**os.environ, "PYTHONUNBUFFERED": "1"}))


def _start_ranks(argv: list[str], log: Path, ranks: int) -> _Worker:
    """`ranks` workers under torchrun (standalone: its own rendezvous on a free local port),
    in a session of their own. torchrun stops every rank once one fails, so a dead rank ends
    the variant instead of leaving the others waiting in a collective."""
    with open(log, "w") as log_file:
        return _Worker(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone",
             f"--nproc-per-node={ranks}", "--max-restarts=0", "--monitor-interval=0.5",
             "-m", "harness.worker", *argv],
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=die_with_parent,
            env={**os.environ, "PYTHONUNBUFFERED": "1",
                 "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(
                     1, (os.cpu_count() or 1) // ranks)))}))


def die_with_parent() -> None:
    """Linux: have the kernel kill this process when its parent dies (PR_SET_PDEATHSIG), so a
    CLI killed with SIGKILL — which cannot stop its workers' sessions — leaves no CUDA worker
    or torchrun behind, and torchrun's ranks go with it. Elsewhere: nothing."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before we asked
        os._exit(1)


def exit_with(pid: int) -> None:
    """A thread that ends this process when process `pid` (the CLI) is gone. A forked worker's
    parent is the fork server, which outlives the CLI while any worker it forked runs, so
    PR_SET_PDEATHSIG cannot tell it; the CLI's own pid can (a pidfd on Linux: no polling)."""
    import select
    import threading

    def watch() -> None:
        try:
            select.select([os.pidfd_open(pid)], [], [])  # readable once the process has ended
        except (AttributeError, OSError):  # not Linux ≥ 5.3, or already gone
            while _alive(pid):
                time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-cli", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _exit(code: int) -> str:
    """`code 1`, or `code -9 (killed by SIGKILL)`."""
    return f"code {code}" + (f" (killed by {signal.Signals(-code).name})" if code < 0 else "")


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-STDERR_TAIL_LINES:])
