"""harness history: the records of every run of a scenario over time, series by series, with
what changed in where they ran beside how the figure moved — a release traced to its effect."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import REPO, harness, last_json, write_scenario

COMMITTED = REPO / "results" / "smoke_tiny" / "20261122T034105071Z-4ae8585"


@pytest.fixture(params=["committed", pytest.param("simulated", marks=pytest.mark.slow)])
def first(request, tmp_path) -> Path:
    """A scenario's first run under tmp_path/results: the committed smoke_tiny one, or (slow) a
    scenario simulated now, as records this code writes today."""
    results = tmp_path / "results"
    if request.param == "committed":
        run = results / "smoke_tiny" / COMMITTED.name
        shutil.copytree(COMMITTED, run)
        return run
    path = write_scenario(tmp_path, "hist", [{"name": "bf16", "techniques": ["bf16"]},
                                             {"name": "lora", "techniques": ["bf16",
                                                                             {"lora": {"r": 8}}]}])
    proc = harness("run", str(path), "--device", "simulate", "--out", str(results))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return Path(last_json(proc.stdout)["run_dir"])


def test_history_lines_runs_up_and_names_what_changed(first, tmp_path, cli):
    scenario, variants = first.parent.name, sorted(p.stem for p in first.glob("*.json"))
    method = json.loads((first / "lora.json").read_text())["method"]
    # A later run of the same scenario, after a transformers release that grew LoRA's peak.
    later_id = "29991231T000000000Z-abcdef0"
    later = first.parent / later_id
    shutil.copytree(first, later)
    for file in later.glob("*.json"):
        record = json.loads(file.read_text())
        record["run_id"] = later_id
        record["env"]["transformers"] = "9.9.9"
        if record["variant"]["name"] == "lora":
            record["memory"]["peak_allocated_bytes"] = int(
                record["memory"]["peak_allocated_bytes"] * 1.1)
        file.write_text(json.dumps(record))
    proc = cli("history", scenario, "--results", str(first.parent.parent),
               "--out", str(tmp_path / "h"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = Path(last_json(proc.stdout)["out"])
    table = pd.read_csv(out / "history.csv")
    assert len(table) == 2 * len(variants) and last_json(proc.stdout)["series"] == len(variants)
    newest = table[table["run_id"] == later_id].set_index("variant")
    assert newest.loc["lora", "change_pct"] == pytest.approx(10.0, abs=0.01)
    for variant in set(variants) - {"lora"}:
        assert newest.loc[variant, "change_pct"] == 0, variant
    assert "transformers" in newest.loc["lora", "changed"] and "→ 9.9.9" in newest.loc["lora", "changed"]
    assert (out / "history.png").read_bytes().startswith(b"\x89PNG")
    assert f"| {scenario} | lora | {method} | 29991231T000000000Z-abcdef0 | ok |" in proc.stdout


def test_history_of_nothing_is_bad_input(tmp_path, cli):
    proc = cli("history", "nope", "--results", str(tmp_path))
    assert proc.returncode == 2 and "no results for scenario 'nope'" in proc.stderr
    proc = cli("history", "--results", str(tmp_path / "missing"))
    assert proc.returncode == 2 and "no such folder" in proc.stderr
