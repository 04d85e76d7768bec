"""harness compare: the regression gate. A real run's records, copied and changed the way a
regression, a fix, a failure or another set-up changes them, each marked and judged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import harness, last_json, write_scenario

VARIANTS = [{"name": "bf16", "techniques": ["bf16"]},
            {"name": "lora", "techniques": ["bf16", {"lora": {"r": 8}}]},
            {"name": "lora-gc", "techniques": ["bf16", {"lora": {"r": 8}},
                                               "gradient_checkpointing"]}]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("compare")
    path = write_scenario(folder, "gate", VARIANTS)
    proc = harness("run", str(path), "--device", "simulate", "--out", str(folder / "runs"))
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


def gate(base: Path, new: Path, *args: str):
    proc = harness("compare", str(base), str(new), *args)
    return proc, (last_json(proc.stdout) if proc.returncode != 2 else None)


def grow(fraction: float):
    def edit(record):
        record["memory"]["peak_allocated_bytes"] = int(
            record["memory"]["peak_allocated_bytes"] * (1 + fraction))
    return edit


def test_the_same_run_passes_with_every_row_unchanged(base):
    proc, summary = gate(base, base, "--fail-above", "0")
    assert proc.returncode == 0, proc.stdout
    assert summary["marks"]["~"] == len(VARIANTS) and summary["exit"] == 0
    # The table is what a CI job summary shows: one row per variant, in the scenario's order.
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ~ |")]
    assert [r.split("|")[2].strip() for r in rows] == [v["name"] for v in VARIANTS]


def test_a_regression_beyond_the_threshold_fails_and_one_within_passes(base, tmp_path):
    new = changed(base, tmp_path, lora=grow(0.05), lora_gc=grow(0.005))
    proc, summary = gate(base, new, "--fail-above", "2%")
    assert proc.returncode == 1, proc.stdout
    assert summary["rows"]["lora"]["mark"] == "+"
    assert summary["rows"]["lora-gc"]["mark"] == "~"  # +0.5 %: within 2 %
    assert summary["rows"]["bf16"]["mark"] == "~"
    # An absolute threshold: +5 % of lora's peak is under 256 MiB on this tiny model.
    assert gate(base, new, "--fail-above", "256MiB")[0].returncode == 0
    # An improvement beyond the threshold is marked, and passes.
    better = changed(base, tmp_path / "b", lora=grow(-0.10))
    proc, summary = gate(base, better, "--fail-above", "2%")
    assert proc.returncode == 0 and summary["rows"]["lora"]["mark"] == "-"


def test_a_newly_failing_variant_fails_the_gate(base, tmp_path):
    def crash(record):
        record.update(status="error", error="Traceback ...\nRuntimeError: boom")

    new = changed(base, tmp_path, lora=crash)
    proc, summary = gate(base, new)
    assert proc.returncode == 1
    assert summary["rows"]["lora"]["mark"] == "!" and "newly error" in summary["rows"]["lora"]["note"]
    # The other way round it is a fix, not a failure.
    proc, summary = gate(new, base)
    assert proc.returncode == 0 and summary["rows"]["lora"]["mark"] == "-"


def test_records_of_another_method_device_or_set_up_are_incomparable_not_judged(base, tmp_path):
    def measured(record):
        record["method"], record["device"] = "measured-cuda", "cuda:0"
        record["memory"]["peak_allocated_bytes"] *= 3

    def other_shape(record):
        record["train"]["seq_len"] *= 2
        record["memory"]["peak_allocated_bytes"] *= 2

    def more_steps(record):
        record["train"]["steps"] += 5  # peaks include the warm-up: still comparable

    new = changed(base, tmp_path, bf16=measured, lora=other_shape, lora_gc=more_steps)
    proc, summary = gate(base, new, "--fail-above", "0")
    assert proc.returncode == 0, proc.stdout
    rows = summary["rows"]
    assert rows["bf16"]["mark"] == "x" and "method simulated vs measured-cuda" in rows["bf16"]["note"]
    assert rows["lora"]["mark"] == "x" and "train" in rows["lora"]["note"]
    assert rows["lora-gc"]["mark"] == "~"
    # A variant only one side has is incomparable too.
    (new / "lora.json").unlink()
    assert gate(base, new)[1]["rows"]["lora"] == {"mark": "x", "base": None, "new": None,
                                                  "note": "only in BASE"}


def test_other_metrics_and_a_folder_of_runs(base, tmp_path):
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
def test_bad_input_is_one_line_and_exit_2(base, args, says):
    proc, _ = gate(base, base, *args)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and says in proc.stderr, \
        proc.stderr
    assert "Traceback" not in proc.stderr


def test_runs_of_different_scenarios_or_no_run_are_bad_input(base, tmp_path):
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
