"""harness plot: valid PNGs drawn from the records — the bars are the records' breakdowns at the
peak, the sweep's lines their peaks — linked from summary.md; `run` makes them too."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import harness, last_json, records, write_scenario

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("plot")
    path = write_scenario(folder, "pics", [{"name": "bf16", "techniques": ["bf16"]},
                                           {"name": "lora-gc", "techniques": [
                                               "bf16", {"lora": {"r": 8}},
                                               "gradient_checkpointing"]}])
    path.write_text(path.read_text() + "sweep: {seq_len: [64, 128, 256]}\n")
    proc = harness("run", str(path), "--device", "simulate", "--out", str(folder / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(last_json(proc.stdout)["run_dir"])


def test_run_writes_valid_pngs_and_links_them(swept):
    import matplotlib.image

    for name in ("breakdown.png", "sweep.png"):
        data = (swept / name).read_bytes()
        assert data.startswith(PNG), name
        height, width, _ = matplotlib.image.imread(swept / name).shape
        assert height > 200 and width > 200
        assert f"]({name})" in (swept / "summary.md").read_text()


def test_the_pictures_are_the_records(swept):
    from harness.plot import breakdown_png, sweep_png
    from harness.report import load_results_in

    frame = load_results_in(swept)
    got = records(swept)
    bars = breakdown_png(frame, swept / "check.png")
    assert set(bars) == set(got)
    for name, drawn in bars.items():
        memory = got[name]["memory"]
        # A bar is the peak's breakdown, unattributed included: its height is the peak.
        assert sum(drawn.values()) == memory["peak_allocated_bytes"]
    lines = sweep_png(frame, swept / "check.png")
    assert set(lines) == {"bf16", "lora-gc"}
    for variant, points in lines.items():
        assert [x for x, _ in points] == [64, 128, 256]
        assert [peak for _, peak in points] == [
            got[f"{variant}@seq_len={s}"]["memory"]["peak_allocated_bytes"] for s in (64, 128, 256)]


def test_plot_of_a_folder_without_records_is_bad_input(tmp_path):
    proc = harness("plot", str(tmp_path))
    assert proc.returncode == 2 and "not a run folder" in proc.stderr
