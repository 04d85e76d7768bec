"""Faults lose nothing: OOM, a killed or hung worker, Ctrl-C, what the device cannot run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO, harness, last_json, records, write_scenario

pytestmark = pytest.mark.slow  # each test runs `harness run` and its workers


def test_oom_under_a_budget_is_recorded_and_the_next_variant_still_runs(tmp_path):
    path = write_scenario(tmp_path, "budget", [
        {"name": "full-fp32", "techniques": []},
        {"name": "lora-gc", "techniques": ["bf16", {"lora": {"r": 8}}, "gradient_checkpointing"]},
    ])
    budget = 48 * 2**20  # between the two peaks (~95 MiB and ~25 MiB at this shape)
    proc = harness("run", str(path), "--device", "cpu", "--out", str(tmp_path / "out"),
                   "--memory-budget", "48MiB")
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = records(Path(last_json(proc.stdout)["run_dir"]))
    oom, ok = got["full-fp32"], got["lora-gc"]
    assert oom["status"] == "oom" and "budget" in oom["error"]
    assert oom["memory"]["budget_bytes"] == budget
    # The peak reached is recorded: at least the budget's worth of tensors was live.
    assert oom["memory"]["peak_allocated_bytes"] > budget
    assert oom["memory"]["tracked_tensor_peak_bytes"] > budget
    assert ok["status"] == "ok" and ok["memory"]["peak_allocated_bytes"] < budget


def _worker_of(parent: subprocess.Popen, timeout: float = 60,
               started_after: float = 0.0) -> psutil.Process:
    """The variant's worker: the one descendant that leads its own process group (forked from
    the fork server or started fresh, it calls setsid; the fork server does not), started after
    `started_after` (a unix time: not the previous variant's, still exiting)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(parent.pid).children(recursive=True):
            try:
                if os.getpgid(child.pid) == child.pid and child.create_time() > started_after:
                    return child
            except (ProcessLookupError, psutil.NoSuchProcess):
                pass
        time.sleep(0.1)
    raise AssertionError("no worker started")


def _start(path: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "harness", "run", str(path), "--device", "cpu",
                             "--out", str(out), *extra], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_a_killed_worker_is_recorded_and_the_next_variant_still_runs(tmp_path):
    path = write_scenario(tmp_path, "kill", [{"name": "a", "techniques": ["bf16"]},
                                             {"name": "b", "techniques": ["bf16"]}])
    parent = _start(path, tmp_path / "out")
    _worker_of(parent).kill()
    stdout, stderr = parent.communicate(timeout=300)
    assert parent.returncode == 0, stderr[-2000:]
    got = records(Path(last_json(stdout)["run_dir"]))
    assert got["a"]["status"] == "error" and "killed by SIGKILL" in got["a"]["error"]
    assert got["b"]["status"] == "ok"


def test_a_worker_past_its_timeout_is_killed_and_recorded(tmp_path):
    path = write_scenario(tmp_path, "slow", [{"name": "a", "techniques": []}])
    proc = harness("run", str(path), "--device", "cpu", "--out", str(tmp_path / "out"),
                   "--timeout", "5", "--steps", "100000")  # hours of steps: only a kill ends it
    assert proc.returncode == 0
    got = records(Path(last_json(proc.stdout)["run_dir"]))
    assert got["a"]["status"] == "error" and "timed out after 5 s" in got["a"]["error"]


def test_workers_die_with_a_cli_killed_outright(tmp_path):
    """SIGKILL gives the CLI no chance to stop its workers' session: a worker forked from the
    fork server must still go (it once trained on at 100 % CPU for minutes)."""
    path = write_scenario(tmp_path, "orphan", [{"name": "a", "techniques": []}])
    parent = _start(path, tmp_path / "out", "--steps", "100000")  # hours, if left alone
    worker = _worker_of(parent)
    parent.kill()
    parent.communicate(timeout=60)
    try:
        worker.wait(timeout=30)
    except psutil.TimeoutExpired:
        worker.kill()
        raise AssertionError("the worker outlived its CLI by 30 s") from None


def test_ctrl_c_keeps_every_finished_record_and_exits_130(tmp_path):
    path = write_scenario(tmp_path, "interrupt", [
        {"name": "a", "techniques": ["bf16"]},
        {"name": "b", "techniques": ["bf16"], "train": {"steps": 500}},  # still running at ^C
    ])
    parent = _start(path, tmp_path / "out")
    out = tmp_path / "out" / "interrupt"
    deadline = time.monotonic() + 120
    while not list(out.glob("*/a.json")) and time.monotonic() < deadline:
        time.sleep(0.2)
    worker = _worker_of(parent, started_after=next(out.glob("*/a.json")).stat().st_mtime - 1)
    parent.send_signal(signal.SIGINT)
    stdout, stderr = parent.communicate(timeout=120)
    assert parent.returncode == 130, stderr[-2000:]
    assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE
    summary = last_json(stdout)
    assert summary["interrupted"] is True and summary["counts"] == {"ok": 1}
    run_dir = Path(summary["run_dir"])
    assert sorted(p.name for p in run_dir.glob("*.json")) == ["a.json"]
    assert (run_dir / "summary.md").is_file()
    assert not list(run_dir.rglob("*.tmp")) and not list(run_dir.rglob("*.pending.json"))


def test_what_this_machine_cannot_run_is_an_unsupported_result(tmp_path):
    import torch

    # Mistral-7B's layout at 2.2 trillion parameters: 8.8 TB in fp32, more than any machine
    # that runs this has (the RAM arithmetic itself: tests/test_job.py).
    config = json.loads((REPO / "scenarios" / "models" / "mistral-7b-v0.1.json").read_text())
    config.update(hidden_size=65536, intermediate_size=262144, num_attention_heads=512)
    (tmp_path / "huge.json").write_text(json.dumps(config))
    big = write_scenario(tmp_path, "big", [
        {"name": "full", "techniques": []},
        {"name": "liger", "techniques": ["bf16", "liger"]},
        {"name": "offload", "techniques": ["bf16", "activation_offload"]},
    ], model={"config": "./huge.json"})
    proc = harness("run", str(big), "--device", "cpu", "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = records(Path(last_json(proc.stdout)["run_dir"]))
    record = got["full"]
    assert record["status"] == "unsupported" and "half of the" in record["error"]
    assert got["liger"]["status"] == "unsupported"
    assert got["liger"]["error"].startswith("liger: ") and "GPU" in got["liger"]["error"]
    assert got["offload"]["status"] == "unsupported" and "host RAM" in got["offload"]["error"]
    if not torch.cuda.is_available():
        proc = harness("run", str(big), "--device", "cuda", "--variant", "full",
                       "--out", str(tmp_path / "out"))
        assert proc.returncode == 0
        record = records(Path(last_json(proc.stdout)["run_dir"]))["full"]
        assert record["status"] == "unsupported" and record["method"] == "measured-cuda"
        assert "CUDA" in record["error"]


def test_a_forked_worker_takes_the_environment_the_cli_has_now(tmp_path, monkeypatch):
    """Workers fork from a fork server started once (and, here, reused across runs): each must
    see the CLI's environment of its own run, not the server's — CUBLAS_WORKSPACE_CONFIG sizes
    the simulated cuBLAS workspaces, two handles of them."""
    from harness.estimate import HOPPER_CUBLAS_WORKSPACE

    path = write_scenario(tmp_path, "env", [{"name": "bf16", "techniques": ["bf16"]}])
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    got = {}
    for config in (None, ":4096:2:16:8"):
        if config:
            monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", config)
        proc = harness("run", str(path), "--device", "simulate", "--out", str(tmp_path / "out"))
        assert proc.returncode == 0, proc.stderr[-2000:]
        got[config] = records(Path(last_json(proc.stdout)["run_dir"]))["bf16"]
        assert got[config]["env"]["cublas_workspace_config"] == config
    before_sm90 = 4096 * 1024 * 2 + 16 * 1024 * 8
    assert (got[None]["memory"]["peak_allocated_bytes"] -
            got[":4096:2:16:8"]["memory"]["peak_allocated_bytes"]) == \
        2 * (HOPPER_CUBLAS_WORKSPACE - before_sm90)
