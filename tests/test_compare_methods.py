"""`harness compare-methods`: estimated, simulated and measured peaks of the same variants side by
side, each with its error against the best reference there is."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import harness, last_json, write_scenario

pytestmark = pytest.mark.slow  # runs `harness run` and `harness compare-methods --cpu`

VARIANTS = [
    {"name": "bf16", "techniques": ["bf16"]},
    {"name": "lora-gc", "techniques": ["bf16", {"lora": {"r": 8}}, "gradient_checkpointing"]},
    {"name": "compiled", "techniques": ["bf16", "compile"]},
]


def test_three_methods_side_by_side_with_errors_against_the_measurement(tmp_path):
    # A measurement made earlier, of a scenario whose content has changed since: incomparable.
    path = write_scenario(tmp_path, "methods", VARIANTS[:1])
    proc = harness("run", str(path), "--device", "cpu", "--out", str(tmp_path / "old"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    old = last_json(proc.stdout)["run_dir"]
    path = write_scenario(tmp_path, "methods", VARIANTS, train={"seed": 1})

    proc = harness("compare-methods", str(path), "--cpu", "--target", "cpu", "--measured", old,
                   "--variant", "bf16", "--variant", "lora-gc", "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    top = Path(last_json(proc.stdout)["run_dir"])
    table = pd.read_csv(top / "methods.csv").set_index("variant")
    assert (top / "methods.md").read_text() in proc.stdout
    for name in ("bf16", "lora-gc"):
        row = table.loc[name]
        assert row["reference"] == "measured-cpu"  # this run's own measurement, not the old one
        assert abs(row["estimated_error_pct"]) < 10
        assert abs(row["simulated_error_pct"]) < 1
        # What people reach for instead, beside them: accelerate's estimate-memory (blind to
        # adapters and checkpointing: the same figure for both rows) and the guides' rule, each
        # with its error; accelerate's device map for the card.
        assert row["accelerate_peak_bytes"] == table.loc["bf16", "accelerate_peak_bytes"]
        assert row["guide_error_pct"] < 0 and not pd.isna(row["accelerate_error_pct"])
        assert row["device_map"] == "h200: all on the GPU"
        # The old measurement of bf16 is left out (and said so), not taken as the reference.
        assert ("other scenario content" in str(row["notes"])) == (name == "bf16")
        # Each method's records are a run folder of their own, as `harness run` writes them.
        for label in ("estimated", "simulated", "measured-cpu"):
            assert (top / label / f"{name}.json").is_file()
            assert (top / label / "summary.md").is_file()

    # A run folder of another scenario is bad input: one line, exit 2, nothing run.
    other = write_scenario(tmp_path, "other", VARIANTS[:1])
    proc = harness("compare-methods", str(other), "--measured", old, "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "not of 'other'" in proc.stderr and not (tmp_path / "x").exists()
