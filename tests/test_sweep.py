"""A scenario's `sweep:` crosses every variant with every point of a grid of train settings:
one record per (variant, point), one table row each, comparable and selectable by point."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO, harness, last_json, records, write_scenario

COMMITTED = REPO / "results" / "sweep_mistral" / "20261203T131012443Z-7710944"

VARIANTS = [{"name": "bf16", "techniques": ["bf16"]},
            # Its own seq_len is overridden by the sweep's.
            {"name": "lora-gc", "techniques": ["bf16", {"lora": {"r": 8}}, "gradient_checkpointing"],
             "train": {"seq_len": 32, "lr": 2.0e-4}}]


def sweep_scenario(folder: Path, sweep, name: str = "grid") -> Path:
    path = write_scenario(folder, name, VARIANTS)
    path.write_text(path.read_text() + f"sweep: {sweep}\n")
    return path


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep")
    path = sweep_scenario(folder, "{seq_len: [64, 128], batch_size: [1, 2]}")
    proc = harness("run", str(path), "--device", "simulate", "--out", str(folder / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(last_json(proc.stdout)["run_dir"]), proc.stdout


@pytest.mark.slow
def test_each_variant_at_each_point_is_a_record_of_its_own(grid):
    run_dir, stdout = grid
    got = records(run_dir)
    points = [(s, b) for s in (64, 128) for b in (1, 2)]
    assert sorted(got) == sorted(f"{v['name']}@seq_len={s},batch_size={b}"
                                 for v in VARIANTS for s, b in points)
    for stem, record in got.items():
        assert record["status"] == "ok", (stem, record["error"])
        name, point = stem.split("@")
        assert record["variant"]["name"] == name
        seq, batch = (int(part.split("=")[1]) for part in point.split(","))
        assert record["sweep_point"] == {"seq_len": seq, "batch_size": batch}
        # The point wins over the scenario's train and the variant's own; the rest stays.
        assert (record["train"]["seq_len"], record["train"]["batch_size"]) == (seq, batch)
        assert record["train"]["lr"] == (2.0e-4 if name == "lora-gc" else 1.0e-4)
    # One table row per (variant, point); the script line names each.
    assert sum(line.startswith("| lora-gc ") for line in stdout.splitlines()) == 4
    assert set(last_json(stdout)["variants"]) == set(got)
    # "vs baseline" is against the baseline variant at the same point.
    import pandas as pd

    table = pd.read_csv(run_dir / "summary.csv")
    for _, row in table[table["variant"] == "lora-gc"].iterrows():
        base = got[f"bf16@{row['sweep_point']}"]["memory"]["peak_allocated_bytes"]
        assert row["vs_baseline_pct"] == pytest.approx(
            (row["peak_allocated_bytes"] / base - 1) * 100)


@pytest.mark.slow
def test_activations_scale_with_the_swept_batch(grid):
    """Kept activations are per sequence: twice the batch keeps twice the bytes (512-byte
    rounding aside), at each sequence length — measured, not assumed. (LoRA's forward peaks at
    its end, where they are all kept; full fine-tuning's, on this tiny model, as zero_grad
    drops the previous step's grads.)"""
    got = records(grid[0])
    for name in ("lora-gc",):
        for seq in (64, 128):
            one, two = (got[f"{name}@seq_len={seq},batch_size={b}"]["memory"]["phases"]["forward"]
                        ["breakdown_bytes"]["activations"] for b in (1, 2))
            assert two == pytest.approx(2 * one, rel=0.02), (name, seq)
            assert one > 0


def test_a_committed_sweeps_table_is_a_row_per_point_against_the_baseline_there(tmp_path):
    """The table of the committed sweep_mistral run (3 variants × 8 points), made again from its
    records: a row per (variant, point), "vs baseline" against qlora at the same point."""
    import pandas as pd

    from harness.report import write_summary

    run = tmp_path / COMMITTED.name
    shutil.copytree(COMMITTED, run, ignore=shutil.ignore_patterns("summary.*"))
    write_summary(run)
    got = records(run)
    table = pd.read_csv(run / "summary.csv")
    assert sorted(f"{row.variant}@{row.sweep_point}" for row in table.itertuples()) == sorted(got)
    assert len(got) == 3 * 8
    for row in table.itertuples():
        base = got[f"qlora@{row.sweep_point}"]["memory"]["peak_allocated_bytes"]
        assert row.vs_baseline_pct == pytest.approx((row.peak_allocated_bytes / base - 1) * 100)


@pytest.mark.slow
def test_a_sweep_point_or_a_declared_variant_is_selected_by_name(tmp_path):
    path = sweep_scenario(tmp_path, "{seq_len: [64, 128]}")
    proc = harness("run", str(path), "--device", "simulate", "--out", str(tmp_path / "out"),
                   "--variant", "lora-gc", "--variant", "bf16@seq_len=128")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(records(Path(last_json(proc.stdout)["run_dir"]))) == [
        "bf16@seq_len=128", "lora-gc@seq_len=128", "lora-gc@seq_len=64"]
    # And the gate matches them point by point.
    run = last_json(proc.stdout)["run_dir"]
    gate = harness("compare", run, run, "--fail-above", "0")
    assert gate.returncode == 0 and set(last_json(gate.stdout)["rows"]) == {
        "bf16@seq_len=128", "lora-gc@seq_len=128", "lora-gc@seq_len=64"}


@pytest.mark.parametrize("sweep, key, says", [
    ("{seq_lne: [64]}", "sweep.seq_lne", "did you mean 'seq_len'"),
    ("{seq_len: []}", "sweep.seq_len", "non-empty list"),
    ("{seq_len: 64}", "sweep.seq_len", "non-empty list"),
    ("{seq_len: [64, zero]}", "sweep.seq_len[1]", "must be int"),
    ("{batch_size: [0]}", "sweep.batch_size[0]", "must be ≥ 1"),
    ("{optimizer: [adamw, adamx]}", "sweep.optimizer[1]", "unknown optimizer"),
    ("{seq_len: [64, 64]}", "sweep.seq_len", "twice"),
    ("{}", "sweep", "at least one"),
])
def test_a_bad_sweep_is_one_line_naming_the_key(tmp_path, cli, sweep, key, says):
    path = sweep_scenario(tmp_path, sweep)
    proc = cli("validate", str(path))
    assert proc.returncode == 2, proc.stdout
    line = proc.stderr.strip()
    assert line.count("\n") == 0 and f"key {key!r}" in line and says in line, line
