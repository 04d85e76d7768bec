"""Shared fixtures: scenarios written in tmp folders, the CLI run as a user runs it (`harness`:
its workers are processes, forked from one fork server per test process; slow) or in this
process (`cli`: fast, for verbs that start no worker).

Two tiers: a test that starts the CLI or a worker process, or trains beyond a tiny model, is
marked `slow`; `make test-fast` runs the rest (`-m "not slow and not gpu"`), `make test` all."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

from harness import fake_cuda

# Before anything imports torch: simulations run in this process see the fake CUDA device.
fake_cuda.build()
fake_cuda.preload()

import pytest  # noqa: E402
import yaml  # noqa: E402
from hypothesis import settings  # noqa: E402

# CI must not turn red on a random draw: there the property tests replay a fixed sequence.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

REPO = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def shipped_scenarios() -> list:
    """Every shipped scenario as a test parameter: validating one of many models (a model
    built on meta for each variant: models_24gb's 33 take 17 s) is the slow tier's."""
    from harness.scenario import list_scenarios, outline

    def models(path) -> int:
        return len({v.get("model", {}).get("config") for v in
                    yaml.safe_load(path.read_text())["variants"] if isinstance(v, dict)})

    return [pytest.param(p, id=p.stem, marks=pytest.mark.slow) if models(p) > 3 or
            outline(p)[2] > 40 else pytest.param(p, id=p.stem) for p in list_scenarios()]


@functools.cache
def shipped(path: Path):
    """A shipped scenario, loaded (validated against its model: meta builds, TRL's trainers)
    once per test process: several tests read each one."""
    from harness.scenario import load_scenario

    return load_scenario(path)


def write_scenario(folder: Path, name: str, variants: list[dict], *, train: dict | None = None,
                   model: dict | None = None, baseline: str | None = None,
                   **top) -> Path:
    """A scenario file; `top`: further top-level keys (eval, generate, sweep, …)."""
    body = {
        "name": name,
        "description": "test scenario",
        "model": model or {"config": "tiny-llama", "weights": "random"},
        "train": {"batch_size": 2, "seq_len": 128, "steps": 1, "warmup_steps": 1, "seed": 0,
                  **(train or {})},
        "variants": variants,
    }
    if baseline:
        body["baseline"] = baseline
    body.update(top)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def measured_variants(folder: Path, name: str, variants: list[dict], *,
                      modes=lambda variant: (False, True), **scenario) -> tuple:
    """A scenario of `variants` (write_scenario's keywords in `scenario`), each variant run in
    this process — measured on CPU, simulated (CPU target), or both, as `modes(variant name)`
    says (False: measured, True: simulated) — and every run asserted ok: (the loaded scenario,
    {(variant name, simulated): train.Measured})."""
    import torch

    from harness.models import resolve_config
    from harness.scenario import load_scenario
    from harness.train import measure

    loaded = load_scenario(write_scenario(folder, name, variants, **scenario))
    source = resolve_config(loaded.model, loaded.path)
    out = {}
    for variant in loaded.variants:
        for simulate in modes(variant.name):
            got = measure(loaded, source, variant, variant.train, torch.device("cpu"), None,
                          simulate, "cpu")
            assert got.outcome["status"] == "ok", (variant.name, simulate, got.outcome)
            out[variant.name, simulate] = got
    return loaded, out


def harness(*args: str, process: bool = False, timeout: float = 600,
            **kwargs) -> subprocess.CompletedProcess:
    """`harness <args>` as a user runs it, answered as a finished process is (exit code, stdout,
    stderr). By default the CLI's `main` runs in this process: its workers fork, as they do
    for a user, from one fork server that later calls reuse (they take this process's
    environment and folder, as a fresh worker would), so a call costs what it runs rather
    than two imports of torch, transformers and PEFT. `process=True` (or any subprocess
    option) starts `python -m harness` instead: for what only a process shows — its exit
    status, what reaches its real stderr, imports, signals."""
    if process or kwargs:
        return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True,
                              text=True, timeout=timeout, cwd=REPO,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"}, **kwargs)
    return _in_process(list(args))


def _in_process(args: list[str]) -> subprocess.CompletedProcess:
    import contextlib
    import io
    import signal
    import traceback

    from harness import cli as entry

    out, err = io.StringIO(), io.StringIO()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    cwd = os.getcwd()
    try:
        os.chdir(REPO)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = entry.main(args)
            except SystemExit as e:  # argparse's own refusals
                code = e.code
            except Exception:  # what a process would print before exiting with 1
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(cwd)
        for s, handler in handlers.items():  # main() installs its own for a run's clean stop
            signal.signal(s, handler)
    return subprocess.CompletedProcess(["harness", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture
def cli(capsys, monkeypatch):
    """`cli("compare", a, b)`: the CLI's `main` in this process, answered like `harness(...)`
    (exit code, stdout, stderr). For the verbs that start no worker (validate, estimate,
    compare, report, plot, history) and for the bad input `run` and `fit` refuse before any
    variant runs: no fork server is started, and a variant it did run would be a process."""
    import signal

    from harness import cli as entry

    # main() installs SIGINT/SIGTERM handlers for a run's clean stop: pytest's must stay.
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    monkeypatch.setattr(entry, "_forks", lambda device: False)

    def run(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        try:
            code = entry.main(list(args))
        except SystemExit as e:  # argparse's own refusals (unknown flag, bad --timeout)
            code = e.code
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["harness", *args], code, out, err)

    return run


def run_cpu(folder: Path, name: str, variants: list[dict], **scenario) -> dict[str, dict]:
    """Write a scenario, run every variant on CPU as a user would, insist each ended `ok`."""
    path = write_scenario(folder, name, variants, **scenario)
    proc = harness("run", str(path), "--device", "cpu", "--out", str(folder / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = records(Path(last_json(proc.stdout)["run_dir"]))
    for variant, record in got.items():
        assert record["status"] == "ok", (variant, record["error"])
    return got


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def records(run_dir: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(Path(run_dir).glob("*.json"))}


@pytest.fixture
def scenario_dir(tmp_path: Path) -> Path:
    return tmp_path
