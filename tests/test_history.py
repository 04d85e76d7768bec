"""harness history: the records of every run of a scenario over time, series by series, with
what changed in where they ran beside how the figure moved — a release traced to its effect."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import harness, last_json, write_scenario


def test_history_lines_runs_up_and_names_what_changed(tmp_path):
    path = write_scenario(tmp_path, "hist", [{"name": "bf16", "techniques": ["bf16"]},
                                             {"name": "lora", "techniques": ["bf16",
                                                                             {"lora": {"r": 8}}]}])
    results = tmp_path / "results"
    proc = harness("run", str(path), "--device", "simulate", "--out", str(results))
    assert proc.returncode == 0, proc.stderr[-2000:]
    first = Path(last_json(proc.stdout)["run_dir"])
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
    proc = harness("history", "hist", "--results", str(results), "--out", str(tmp_path / "h"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = Path(last_json(proc.stdout)["out"])
    table = pd.read_csv(out / "history.csv")
    assert len(table) == 4 and last_json(proc.stdout)["series"] == 2
    newest = table[table["run_id"] == later_id].set_index("variant")
    assert newest.loc["lora", "change_pct"] == pytest.approx(10.0, abs=0.01)
    assert newest.loc["bf16", "change_pct"] == 0
    assert "transformers" in newest.loc["lora", "changed"] and "→ 9.9.9" in newest.loc["lora", "changed"]
    assert (out / "history.png").read_bytes().startswith(b"\x89PNG")
    assert "| hist | lora | simulated | 29991231T000000000Z-abcdef0 | ok |" in proc.stdout


def test_history_of_nothing_is_bad_input(tmp_path):
    proc = harness("history", "nope", "--results", str(tmp_path))
    assert proc.returncode == 2 and "no results for scenario 'nope'" in proc.stderr
    proc = harness("history", "--results", str(tmp_path / "missing"))
    assert proc.returncode == 2 and "no such folder" in proc.stderr
