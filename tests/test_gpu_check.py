"""scripts/gpu_check.sh on a machine without CUDA: it says so, installs a wheel folder into a
throwaway target, simulates its scenario, and writes the report — the script proven before the
first GPU sees it. Each step has its own limit and the whole stops itself by its deadline."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, records, write_scenario

pytestmark = pytest.mark.slow  # the script starts the CLI as a user would, several times


def _wheels(tmp_path: Path) -> Path:
    """A real wheel of a one-module project, built offline by setuptools."""
    project = tmp_path / "probe_project"
    (project / "gpu_check_probe").mkdir(parents=True)
    (project / "gpu_check_probe" / "__init__.py").write_text("VALUE = 1\n")
    (project / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "gpu-check-probe"\nversion = "1.0"\n')
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--quiet", "-w", str(wheels), str(project)], check=True, timeout=120)
    return wheels


def _check(tmp_path: Path, out: Path, **env: str) -> subprocess.CompletedProcess:
    scenario = write_scenario(tmp_path, "check", [
        {"name": "bf16", "techniques": ["bf16"]},
        {"name": "lora", "techniques": ["bf16", {"lora": {"r": 8}}]}])
    return subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), str(out)], cwd=REPO, text=True,
        capture_output=True, timeout=600,
        env={**os.environ, "GPU_CHECK_SCENARIO": str(scenario), "GPU_CHECK_MISTRAL": "",
             "GPU_CHECK_WHEELS": str(_wheels(tmp_path)), "GPU_CHECK_PYTHON": sys.executable,
             **env})


def _steps(out: Path) -> dict[str, list[str]]:
    return {row.split("\t")[0]: row.split("\t")[1:] for row in
            (out / "steps.tsv").read_text().splitlines()}


def test_without_cuda_the_check_installs_simulates_and_reports(tmp_path):
    out = tmp_path / "out"
    proc = _check(tmp_path, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no CUDA device here" in proc.stderr
    steps = _steps(out)
    assert steps["pytest-gpu"][:1] == ["skipped"] and "no CUDA" in steps["pytest-gpu"][2]
    for name in ("install", "machine", "scenario", "compare-methods", "snapshot"):
        assert steps[name][0] == "ok", (name, (out / "logs" / f"{name}.log").read_text()[-2000:])
    assert (out / "throwaway" / "gpu_check_probe-1.0.dist-info").is_dir()
    simulated = records(next((out / "runs" / "check").iterdir()))
    assert {r["method"] for r in simulated.values()} == {"simulated"}
    report = (out / "report.md").read_text()
    assert "No measurement" in report and '"cuda_available": false' in report
    for name, record in simulated.items():  # each variant's simulated peak, as recorded
        row = next(line for line in report.splitlines() if line.startswith(f"| {name} |"))
        assert f"{record['memory']['peak_allocated_bytes'] / 2**30:.3f}" in row
    assert list((out / "snapshot").rglob("bf16.snapshot.pickle"))


def test_the_check_stops_itself_by_its_deadline_and_still_reports(tmp_path):
    out = tmp_path / "out"
    started = time.monotonic()
    proc = _check(tmp_path, out, GPU_CHECK_DEADLINE="12")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.monotonic() - started < 40  # wheel build and report included
    steps = _steps(out)
    skipped = [name for name, (status, *_) in steps.items() if status == "skipped"]
    assert "snapshot" in skipped and "scenario" in skipped
    assert all("deadline" in steps[name][2] for name in skipped if name != "pytest-gpu")
    assert (out / "report.md").is_file()
