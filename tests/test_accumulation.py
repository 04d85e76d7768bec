"""Gradient accumulation: a step of several micro-batches holds every grad from the first
micro-batch's backward to the optimizer step, so the next micro-batch's activations meet them.
Measured on CPU (tiny Llama, in this process), simulated, estimated, and as a user reads it."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tests.conftest import harness as run_cli
from tests.conftest import last_json, measured_variants, records, write_scenario

LORA = {"lora": {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"]}}
VARIANTS = [
    {"name": "full-b1", "techniques": []},
    {"name": "full-b1x2", "techniques": [], "train": {"gradient_accumulation_steps": 2}},
    {"name": "full-b2", "techniques": [], "train": {"batch_size": 2}},
    {"name": "lora-b1x2", "techniques": [LORA], "train": {"gradient_accumulation_steps": 2}},
]
SIMULATED = ("full-b1x2", "lora-b1x2")


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    """Each variant measured on CPU; the accumulating ones also simulated (CPU target)."""
    return measured_variants(tmp_path_factory.mktemp("accumulation"), "acc", VARIANTS,
                             train={"batch_size": 1, "seq_len": 256},
                             modes=lambda name: (False, True) if name in SIMULATED else (False,)
                             )[1]


def _peak(steps, name, simulate=False) -> int:
    return steps[name, simulate].memory["peak_allocated_bytes"]


def test_accumulation_peaks_between_the_micro_batch_and_the_effective_batch(steps):
    """Full fine-tuning: the second micro-batch runs with every grad held, so the step is
    above one micro-batch without accumulation — by at most the grads — and below the whole
    effective batch at once, whose extra activations outweigh them."""
    grads = steps["full-b1x2", False].result.params_trainable * 4  # fp32: one per parameter
    one, two, both = (_peak(steps, n) for n in ("full-b1", "full-b1x2", "full-b2"))
    assert one < two < both
    assert two - one <= grads
    memory = steps["full-b1x2", False].memory
    assert memory["peak_phase"] == "backward" and memory["peak_micro_batch"] == 1
    assert memory["breakdown_bytes"]["grads"] == pytest.approx(grads, rel=0.01)
    assert steps["full-b1", False].memory["peak_micro_batch"] is None


def test_lora_accumulation_holds_only_the_adapters_grads(steps):
    adapters = steps["lora-b1x2", False].result.params_trainable * 4
    memory = steps["lora-b1x2", False].memory
    assert memory["breakdown_bytes"]["grads"] == pytest.approx(adapters, rel=0.05)
    assert memory["breakdown_bytes"]["grads"] < 0.02 * _peak(steps, "lora-b1x2")


@pytest.mark.parametrize("name", SIMULATED)
def test_accumulation_simulated_agrees_with_the_cpu_run_within_one_percent(steps, name):
    measured, simulated = steps[name, False].memory, steps[name, True].memory
    for phase in ("forward", "backward", "optimizer"):
        assert simulated["phases"][phase]["peak_allocated_bytes"] == pytest.approx(
            measured["phases"][phase]["peak_allocated_bytes"], rel=0.01), phase
    assert simulated["peak_micro_batch"] == measured["peak_micro_batch"]


def test_the_estimate_holds_the_grads_through_the_later_micro_batches(steps, tmp_path, cli):
    """The closed form's accumulating rows within 1 % of the CPU measurement (CPU target)."""
    path = write_scenario(tmp_path, "acc", [v for v in VARIANTS if v["name"] in SIMULATED],
                          train={"batch_size": 1, "seq_len": 256})
    proc = cli("estimate", str(path), "--target", "cpu", "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    got = records(Path(last_json(proc.stdout)["run_dir"]))
    for name in SIMULATED:
        assert got[name]["memory"]["peak_allocated_bytes"] == pytest.approx(
            _peak(steps, name), rel=0.01), name


@pytest.mark.parametrize("value", [0, -1, 1.5, "two"])
def test_a_bad_accumulation_is_refused_naming_the_key(tmp_path, cli, value):
    path = write_scenario(tmp_path, "bad", [{"name": "v", "techniques": [],
                                             "train": {"gradient_accumulation_steps": value}}])
    proc = cli("validate", str(path))
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert "variant 'v'" in line and "gradient_accumulation_steps" in line


@pytest.mark.slow  # a run and a fit, each variant a worker process
def test_records_tables_and_fit_say_micro_batch_accumulation_and_effective_batch(tmp_path):
    path = write_scenario(tmp_path, "acc", VARIANTS[:2], train={"batch_size": 1, "seq_len": 256},
                          baseline="full-b1")
    proc = run_cli("run", str(path), "--device", "simulate", "--target", "cpu",
                   "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = Path(last_json(proc.stdout)["run_dir"])
    train = records(run_dir)["full-b1x2"]["train"]
    assert (train["batch_size"], train["gradient_accumulation_steps"],
            train["effective_batch_size"]) == (1, 2, 2)
    rows = {r["variant"]: r for r in csv.DictReader(open(run_dir / "summary.csv"))}
    assert rows["full-b1x2"]["effective_batch_size"] == "2"
    assert "| full-b1x2 | 1 × 2 |" in proc.stdout.replace("  ", " ")
    assert "| 1 × 2 " in (run_dir / "summary.md").read_text()

    scaled = write_scenario(tmp_path, "fit", [VARIANTS[1]], train={"batch_size": 1,
                                                                   "seq_len": 256})
    proc = run_cli("fit", str(scaled), "--vary", "batch_size", "--gpu-memory", "300MiB", "--max", "4",
                   "--device", "simulate", "--target", "cpu", "--out", str(tmp_path / "fit"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = last_json(proc.stdout)["variants"]["full-b1x2"]
    assert found["gradient_accumulation_steps"] == 2
    assert found["largest_effective_batch_size"] == 2 * found["largest"]
    assert f"{found['largest']} × 2 (effective {2 * found['largest']})" in proc.stdout
    probes = records(Path(last_json(proc.stdout)["run_dir"]))
    assert {r["train"]["gradient_accumulation_steps"] for r in probes.values()} == {2}
