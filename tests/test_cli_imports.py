"""The verbs that read records or list things (compare, report, history, ls) never import torch,
transformers or PEFT, and print what they always printed.

Each verb runs in a fresh interpreter (this one has torch loaded already), on the committed
reference runs under results/; the last line that interpreter prints is the heavy libraries it
ended up with."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from tests.conftest import REPO

HEAVY = ("torch", "transformers", "peft", "bitsandbytes")
RESULTS = REPO / "results"


def _verb(*argv: str) -> tuple[int, list[str]]:
    """(exit code, stdout lines) of `harness.cli.main(argv)` in a fresh interpreter; fails the
    test if the verb imported any of HEAVY."""
    code = ("import json, sys\n"
            "from harness.cli import main\n"
            f"code = main({list(argv)!r})\n"
            f"print(json.dumps([code, [m for m in {HEAVY!r} if m in sys.modules]]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    *lines, last = proc.stdout.splitlines()
    exit_code, heavy = json.loads(last)
    assert heavy == [], f"harness {' '.join(argv)} imported {heavy}"
    return exit_code, lines


def test_compare_reads_records_without_torch():
    base = RESULTS / "guide_mistral_fp16" / "20261201T082327960Z-4bbe3b0"
    new = RESULTS / "guide_mistral_fp16" / "20261201T082338145Z-4bbe3b0"
    code, lines = _verb("compare", str(base), str(new))
    assert code == 0
    summary = json.loads(lines[-1])
    # An estimate against a simulation: every variant incomparable, each value as recorded.
    assert summary["marks"] == {"+": 0, "-": 0, "~": 0, "!": 0, "x": 5}
    assert {k: (r["mark"], r["base"], r["new"]) for k, r in summary["rows"].items()} == {
        "guide": ("x", 86976292864, 86968044032),
        "trainer-fp16": ("x", 144901911040, None),
        "pure-fp16": ("x", 72484588544, 72484728832),
        "pure-fp16-fused": ("x", 58009513472, 58001264640),
        "guide-gc": ("x", 86976292864, 86968044032),
    }
    assert "| x | trainer-fp16 | 134.950 | — | — | — | method simulated vs estimated |" in lines


def test_report_builds_the_table_without_torch(tmp_path):
    run = tmp_path / "20261122T034105071Z-4ae8585"  # report rewrites the folder's summaries
    shutil.copytree(RESULTS / "smoke_tiny" / run.name, run)
    code, lines = _verb("report", str(run), "--wide")  # the techniques column is wide's
    assert code == 0
    rows = {cells[0]: cells[1:4] for line in lines if line.startswith("| ")
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}
    # The techniques column comes from each technique's own label, the registry read torch-free.
    assert {k: v for k, v in rows.items() if k != "variant"} == {
        "full-fp32": ["(none) · adamw", "ok", "119.9"],
        "amp-bf16": ["amp_bf16 · adamw", "ok", "114.7"],
        "full-bf16": ["bf16 · adamw", "ok", "74.2"],
        "lora": ["bf16 + lora(r=16, q/v) · adamw", "ok", "52.8"],
        "lora-gc": ["bf16 + lora(r=16, q/v) + gradient_checkpointing · adamw", "ok", "35.5"],
    }
    assert (run / "summary.md").read_text().strip() == "\n".join(lines).strip()


def test_history_tracks_runs_without_torch(tmp_path):
    code, lines = _verb("history", "smoke_tiny", "--results", str(RESULTS), "--out",
                        str(tmp_path))
    assert code == 0
    first = "20261122T034105071Z-4ae8585"  # the oldest run: no change to show yet
    for variant, mib in (("full-fp32", "119.881"), ("amp-bf16", "114.663"),
                         ("full-bf16", "74.243"), ("lora", "52.834"), ("lora-gc", "35.467")):
        assert f"| smoke_tiny | {variant} | measured-cpu | {first} | ok | {mib} | — |  |" in lines
    assert (tmp_path / "smoke_tiny" / "history.png").stat().st_size > 0


def test_ls_lists_without_torch():
    code, lines = _verb("ls")
    assert code == 0
    models = next(i for i, line in enumerate(lines) if line.startswith("models (scenarios/models"))
    assert lines.index("scenarios:") < lines.index("techniques:") < models
    shown = "\n".join(lines)
    assert "\n  qlora_mistral          mistral-7b-v0.1     8 variants  Mistral-7B fine-tuning, " \
        "one technique stacked per row" in shown
    # Its variants crossed with a 4 × 2 sweep (seq_len × batch_size).
    assert "\n  sweep_mistral          mistral-7b-v0.1    24 variants  Mistral-7B QLoRA" in shown
    assert "\n  qlora                    model  Base linear weights in 4-bit NF4 (≈ 0.5 byte " \
        "per weight plus block constants" in shown
    assert "tiny-llama" in lines[models + 1].split()  # the names; `ls models` the details
