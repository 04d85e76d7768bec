"""harness fit: the largest batch size that fits, by bisection, is the boundary a brute-force
scan finds — on a tiny model, for real on CPU under a memory budget."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import harness, last_json, records, write_scenario

LORA = [{"name": "lora", "techniques": ["bf16", {"lora": {"r": 8}}]}]
BATCHES = [1, 2, 3, 4, 5, 6]


def scenario(folder: Path, name: str, sweep: str | None = None) -> Path:
    path = write_scenario(folder, name, LORA, train={"seq_len": 32, "batch_size": 2})
    if sweep:
        path.write_text(path.read_text() + f"sweep: {sweep}\n")
    return path


def run(*args: str) -> dict:
    proc = harness(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return last_json(proc.stdout)


@pytest.mark.slow
def test_fit_finds_the_boundary_a_brute_force_scan_finds(tmp_path):
    # A budget between batch 4's and batch 5's peaks (simulated like with like against CPU).
    scan = scenario(tmp_path, "scan", f"{{batch_size: {BATCHES}}}")
    sim = records(Path(run("run", str(scan), "--device", "simulate", "--target", "cpu",
                           "--out", str(tmp_path / "sim"))["run_dir"]))
    peaks = [sim[f"lora@batch_size={b}"]["memory"]["peak_allocated_bytes"] for b in BATCHES]
    assert peaks == sorted(peaks) and peaks[3] < peaks[4]
    budget = (peaks[3] + peaks[4]) // 2
    # Brute force, for real: every batch size under that budget.
    real = records(Path(run("run", str(scan), "--device", "cpu", "--memory-budget", str(budget),
                            "--out", str(tmp_path / "scan"))["run_dir"]))
    statuses = [real[f"lora@batch_size={b}"]["status"] for b in BATCHES]
    assert statuses == ["ok"] * 4 + ["oom"] * 2
    # Bisection from the scenario's batch size 2: the same boundary, in fewer runs.
    got = run("fit", str(scenario(tmp_path, "one")), "--gpu-memory", str(budget), "--vary",
              "batch_size", "--device", "cpu", "--out", str(tmp_path / "fit"))
    lora = got["variants"]["lora"]
    assert (lora["largest"], lora["first_failing"]) == (4, 5)
    assert lora["first_failing_status"] == "oom" and lora["largest_need_bytes"] <= budget
    assert len(lora["probes"]) < len(BATCHES) and lora["probes"][0] == 2
    # Each probe is a record of its own, in the fit's run folder, with its table.
    fit_dir = Path(got["run_dir"])
    assert {f"lora@batch_size={b}" for b in lora["probes"]} == set(records(fit_dir))
    assert (fit_dir / "fit.md").is_file() and (fit_dir / "fit.csv").is_file()
    assert (fit_dir / "summary.md").is_file()


@pytest.mark.slow
def test_simulated_fit_judges_the_reserved_peak(tmp_path):
    """Without a GPU the probes are simulated and a value fits when what the card must hold —
    reserved, predicted — is within the memory; the answer's is, the next one's is not."""
    path = scenario(tmp_path, "sim")
    got = run("fit", str(path), "--gpu-memory", "120MiB", "--vary", "seq_len", "--device",
              "simulate", "--multiple-of", "32", "--out", str(tmp_path / "fit"))
    lora = got["variants"]["lora"]
    assert lora["largest"] % 32 == 0 and lora["first_failing"] == lora["largest"] + 32
    probes = records(Path(got["run_dir"]))
    at, beyond = (probes[f"lora@seq_len={v}"]["memory"] for v in (lora["largest"],
                                                                 lora["first_failing"]))
    assert at["peak_reserved_bytes"] <= 120 * 2**20 < beyond["peak_reserved_bytes"]
    assert lora["largest_need_bytes"] == at["peak_reserved_bytes"]


@pytest.mark.slow
def test_a_gpu_preset_is_its_usable_memory_and_a_thin_margin_says_tight(tmp_path):
    """`--gpu a10g`: the budget is the preset's usable memory (driver's share and CUDA context
    taken off), and the table says how much the largest value leaves — tight under 1 GiB."""
    from harness.gpus import PRESETS

    path = scenario(tmp_path, "preset")
    got = run("fit", str(path), "--gpu", "a10g", "--vary", "batch_size", "--device", "simulate",
              "--max", "4", "--out", str(tmp_path / "fit"))
    usable = PRESETS["a10g"].usable_bytes("cuda")
    assert got["gpu_memory_bytes"] == usable < PRESETS["a10g"].total_bytes
    lora = got["variants"]["lora"]
    assert lora["largest"] == 4 and lora["largest_left_bytes"] == usable - lora["largest_need_bytes"]
    table = (Path(got["run_dir"]) / "fit.md").read_text()
    assert "| left |" in table and "tight" not in table.split("\n", 3)[-1]  # GiB to spare
    tight = run("fit", str(path), "--gpu-memory", "120MiB", "--vary", "batch_size", "--device",
                "simulate", "--max", "4", "--out", str(tmp_path / "fit"))
    assert tight["variants"]["lora"]["largest_left_bytes"] < 2**30
    assert " tight |" in (Path(tight["run_dir"]) / "fit.md").read_text()


@pytest.mark.parametrize("args, says", [
    (["--gpu", "a10", "--vary", "batch_size"], "did you mean 'a10g'"),
    (["--gpu-memory", "lots", "--vary", "batch_size"], "--gpu-memory"),
    (["--gpu-memory", "1GiB", "--vary", "batch_size", "--multiple-of", "0"], "--multiple-of"),
    (["--gpu-memory", "1GiB", "--vary", "batch_size", "--variant", "lroa"], "did you mean 'lora'"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, cli, args, says):
    proc = cli("fit", str(scenario(tmp_path, "bad")), *args, "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and says in proc.stderr, \
        proc.stderr
    assert not (tmp_path / "o").exists()


def test_a_key_the_sweep_sets_cannot_be_fitted(tmp_path, cli):
    path = scenario(tmp_path, "swept", "{batch_size: [1, 2]}")
    proc = cli("fit", str(path), "--gpu-memory", "1GiB", "--vary", "batch_size")
    assert proc.returncode == 2 and "sweep sets it already" in proc.stderr
