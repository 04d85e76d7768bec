"""harness compare: the regression gate. A run's records — the committed results/smoke_tiny run
(measured on CPU) or, slow, that scenario simulated now — copied and changed the way a regression,
a fix, a failure or another set-up changes them, each marked and judged: by the CLI in this
process, and once as the process CI starts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from harness.scenario import load_scenario
from tests.conftest import REPO, harness, last_json

COMMITTED = REPO / "results" / "smoke_tiny" / "20261122T034105071Z-4ae8585"
VARIANTS = [v.name for v in load_scenario("smoke_tiny").variants]  # the table's row order


@pytest.fixture(scope="module", params=["committed", pytest.param("simulated",
                                                                   marks=pytest.mark.slow)])
def base(request, tmp_path_factory) -> Path:
    """A run alone in its scenario's folder (a test adds runs beside it): the committed one, or
    (slow) the same scenario simulated now, as records this code writes today."""
    folder = tmp_path_factory.mktemp("compare")
    if request.param == "committed":
        run = folder / "smoke_tiny" / COMMITTED.name
        shutil.copytree(COMMITTED, run)
        return run
    proc = harness("run", "smoke_tiny", "--device", "simulate", "--out", str(folder))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(last_json(proc.stdout)["run_dir"])


def changed(base: Path, folder: Path, **edits) -> Path:
    """A copy of the run whose records `edits` change: variant → function(record)."""
    new = folder / "new"
    shutil.copytree(base, new)
    for variant, edit in edits.items():
        file = new / f"{variant.replace('_', '-')}.json"
        record = json.loads(file.read_text())
        edit(record)
        file.write_text(json.dumps(record))
    return new


@pytest.fixture
def gate(cli):
    def run(base: Path, new: Path, *args: str):
        proc = cli("compare", str(base), str(new), *args)
        return proc, (last_json(proc.stdout) if proc.returncode != 2 else None)
    return run


def grow(fraction: float):
    def edit(record):
        record["memory"]["peak_allocated_bytes"] = int(
            record["memory"]["peak_allocated_bytes"] * (1 + fraction))
    return edit


def test_the_same_run_passes_with_every_row_unchanged(base, gate):
    proc, summary = gate(base, base, "--fail-above", "0")
    assert proc.returncode == 0, proc.stdout
    assert summary["marks"]["~"] == len(VARIANTS) and summary["exit"] == 0
    # The table is what a CI job summary shows: one row per variant, in the scenario's order.
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ~ |")]
    assert [r.split("|")[2].strip() for r in rows] == VARIANTS


def test_a_regression_beyond_the_threshold_fails_and_one_within_passes(base, gate, tmp_path):
    new = changed(base, tmp_path, lora=grow(0.05), lora_gc=grow(0.005))
    proc, summary = gate(base, new, "--fail-above", "2%")
    assert proc.returncode == 1, proc.stdout
    assert summary["rows"]["lora"]["mark"] == "+"
    assert summary["rows"]["lora-gc"]["mark"] == "~"  # +0.5 %: within 2 %
    assert summary["rows"]["full-bf16"]["mark"] == "~"
    # An absolute threshold: +5 % of lora's peak is under 256 MiB on this tiny model.
    assert gate(base, new, "--fail-above", "256MiB")[0].returncode == 0
    # An improvement beyond the threshold is marked, and passes.
    better = changed(base, tmp_path / "b", lora=grow(-0.10))
    proc, summary = gate(base, better, "--fail-above", "2%")
    assert proc.returncode == 0 and summary["rows"]["lora"]["mark"] == "-"


def test_a_newly_failing_variant_fails_the_gate(base, gate, tmp_path):
    def crash(record):
        record.update(status="error", error="Traceback ...\nRuntimeError: boom")

    new = changed(base, tmp_path, lora=crash)
    proc, summary = gate(base, new)
    assert proc.returncode == 1
    assert summary["rows"]["lora"]["mark"] == "!" and "newly error" in summary["rows"]["lora"]["note"]
    # The other way round it is a fix, not a failure.
    proc, summary = gate(new, base)
    assert proc.returncode == 0 and summary["rows"]["lora"]["mark"] == "-"


def test_records_of_another_method_device_or_set_up_are_incomparable_not_judged(base, gate,
                                                                               tmp_path):
    def measured(record):
        record["method"], record["device"] = "measured-cuda", "cuda:0"
        record["memory"]["peak_allocated_bytes"] *= 3

    def other_shape(record):
        record["train"]["seq_len"] *= 2
        record["memory"]["peak_allocated_bytes"] *= 2

    def more_steps(record):
        record["train"]["steps"] += 5  # peaks include the warm-up: still comparable

    method = json.loads((base / "full-bf16.json").read_text())["method"]
    new = changed(base, tmp_path, full_bf16=measured, lora=other_shape, lora_gc=more_steps)
    proc, summary = gate(base, new, "--fail-above", "0")
    assert proc.returncode == 0, proc.stdout
    rows = summary["rows"]
    assert rows["full-bf16"]["mark"] == "x"
    assert f"method {method} vs measured-cuda" in rows["full-bf16"]["note"]
    assert rows["lora"]["mark"] == "x" and "train" in rows["lora"]["note"]
    assert rows["lora-gc"]["mark"] == "~"
    # A variant only one side has is incomparable too.
    (new / "lora.json").unlink()
    assert gate(base, new)[1]["rows"]["lora"] == {"mark": "x", "base": None, "new": None,
                                                  "note": "only in BASE"}


def test_other_metrics_and_a_folder_of_runs(base, gate, tmp_path):
    def slower(record):
        record["memory"]["phases"]["backward"]["peak_allocated_bytes"] += 10 * 2**20

    new = changed(base, tmp_path, lora=slower)
    proc, summary = gate(base, new, "--metric", "phases.backward.peak_allocated_bytes",
                         "--fail-above", "1MiB")
    assert proc.returncode == 1 and summary["rows"]["lora"]["mark"] == "+"
    # BASE as the scenario's results folder: its newest run is taken.
    proc, summary = gate(base.parent, base)
    assert proc.returncode == 0 and summary["base"] == str(base)


@pytest.mark.parametrize("args, says", [
    (["--fail-above", "lots"], "--fail-above 'lots'"),
    (["--fail-above=-2%"], "a percentage must be a number"),
    (["--metric", "step_time_s_median", "--fail-above", "1MiB"], "not a byte count"),
    (["--metric", "no_such_figure"], "no record of either run has it"),
])
def test_bad_input_is_one_line_and_exit_2(base, gate, args, says):
    proc, _ = gate(base, base, *args)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and says in proc.stderr, \
        proc.stderr
    assert "Traceback" not in proc.stderr


def test_runs_of_different_scenarios_or_no_run_are_bad_input(base, gate, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(base, other)
    for file in other.glob("*.json"):
        record = json.loads(file.read_text())
        record["scenario"]["name"] = "other"
        file.write_text(json.dumps(record))
    proc, _ = gate(base, other)
    assert proc.returncode == 2 and "different scenarios" in proc.stderr
    proc, _ = gate(base, tmp_path / "nowhere")
    assert proc.returncode == 2 and "no such folder" in proc.stderr


@pytest.mark.slow
def test_the_command_ci_runs_exits_1_on_a_regression(tmp_path):
    """CI reads the process's exit code: 1 for a regression, with the JSON summary last."""
    new = changed(COMMITTED, tmp_path, lora=grow(0.05))
    proc = harness("compare", str(COMMITTED), str(new), "--fail-above", "2%")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert last_json(proc.stdout)["rows"]["lora"]["mark"] == "+"
