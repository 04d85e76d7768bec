"""The table a terminal shows: narrow (what decides the question), every column a flag away; a
row that did not end ok says why in the exception's words and shows no figures."""

from __future__ import annotations

import copy
import json
import shutil

from harness import report
from harness.report import narrow_markdown, reason_line, summary_table
from tests.conftest import REPO

QLORA_MISTRAL = next((REPO / "results" / "qlora_mistral").iterdir())


def test_the_narrow_table_of_qlora_mistral_fits_in_120_columns():
    table = summary_table(report.load_results_in(QLORA_MISTRAL))
    text = narrow_markdown(table)
    rows = [line for line in text.splitlines() if line.startswith("|")]
    assert len(rows) == 2 + len(table) and max(map(len, rows)) <= 120
    head = rows[0]
    for column in ("variant", "status", "peak", "reserved", "vs base", "phase", "largest",
                   "fits on"):
        assert f" {column} " in head, column
    full = next(r for r in rows if r.startswith("| full-bf16 "))
    assert "| optimizer |" in full and "| optim " in full and "67.51" in full


def test_every_column_stays_in_summary_md_and_with_wide(tmp_path, cli):
    run = tmp_path / QLORA_MISTRAL.name
    shutil.copytree(QLORA_MISTRAL, run)
    narrow, wide = cli("report", str(run)), cli("report", str(run), "--wide")
    assert narrow.returncode == wide.returncode == 0
    assert "| activations " in wide.stdout and "| activations " not in narrow.stdout
    assert (run / "summary.md").read_text() in wide.stdout


def test_an_error_row_shows_the_exception_and_no_figures(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(QLORA_MISTRAL, run)
    path = run / "qlora.json"
    record = json.loads(path.read_text())
    broken = copy.deepcopy(record)
    broken["status"] = "error"
    broken["error"] = ("worker exited with 1\n"
                       "Traceback (most recent call last):\n"
                       '  File "x.py", line 3, in f\n'
                       "    y = torch.mm(a, b)\n"
                       "        ^^^^^^^^^^^^^^\n"
                       "RuntimeError: mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)\n")
    path.write_text(json.dumps(broken))
    table = summary_table(report.load_results_in(run))
    for text in (narrow_markdown(table), report.markdown(table)):
        row = next(line for line in text.splitlines() if line.startswith("| qlora "))
        assert "0.000" not in row and "38.06" not in row and "| error " in row
        assert ("- `qlora` (error): RuntimeError: mat1 and mat2 shapes cannot be multiplied "
                "(2x3 and 4x5)") in text


def test_the_reason_line_is_the_exception_not_a_caret_or_frame_line():
    assert reason_line("  ^^^^\nValueError: bad r\n") == "ValueError: bad r"
    assert reason_line("worker timed out after 60 s and was killed\n...tail") == \
        "worker timed out after 60 s and was killed"
    assert reason_line("torch.OutOfMemoryError: CUDA out of memory. Tried").startswith(
        "torch.OutOfMemoryError")
    assert reason_line(None) == "no reason recorded"


def test_outputs_land_under_the_current_folder_and_the_last_line_says_where(tmp_path, cli,
                                                                             monkeypatch):
    monkeypatch.chdir(tmp_path)
    proc = cli("estimate", "smoke_tiny")
    assert proc.returncode == 0, proc.stderr
    run_dir = json.loads(proc.stdout.strip().splitlines()[-1])["run_dir"]
    assert run_dir.startswith(str(tmp_path / "results" / "_scratch" / "smoke_tiny"))
    assert (tmp_path / "results" / "_scratch" / "smoke_tiny").is_dir()
