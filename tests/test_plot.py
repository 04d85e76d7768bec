"""harness plot: valid PNGs drawn from the records — the bars are the records' breakdowns at the
peak, the sweep's lines their peaks — linked from summary.md; `run` makes them too."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from harness.scenario import point_label
from tests.conftest import REPO, harness, last_json, records, write_scenario

PNG = b"\x89PNG\r\n\x1a\n"
COMMITTED = REPO / "results" / "sweep_mistral" / "20261203T131012443Z-7710944"


@pytest.fixture(scope="module", params=["committed", pytest.param("simulated",
                                                                   marks=pytest.mark.slow)])
def swept(request, tmp_path_factory) -> Path:
    """A sweep's run folder and its pictures: the committed sweep_mistral run, its PNGs drawn
    again as `harness plot` draws them, or (slow) a tiny sweep that `harness run` drew."""
    from harness.plot import plot_run
    from harness.report import write_summary

    folder = tmp_path_factory.mktemp("plot")
    if request.param == "committed":
        run = folder / COMMITTED.name
        shutil.copytree(COMMITTED, run, ignore=shutil.ignore_patterns("*.png"))
        assert sorted(p.name for p in plot_run(run)) == ["breakdown.png", "sweep.png"]
        write_summary(run)  # links the pictures
        return run
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


def test_the_pictures_are_the_records(swept, tmp_path):
    from harness.plot import breakdown_png, sweep_png
    from harness.report import load_results_in

    frame = load_results_in(swept)
    got = records(swept)
    bars = breakdown_png(frame, tmp_path / "check.png")
    assert set(bars) == {name for name, r in got.items() if r["status"] == "ok"}
    for name, drawn in bars.items():
        # A bar is the peak's breakdown, category by category, unattributed included.
        assert drawn == {k: float(v) for k, v in got[name]["memory"]["breakdown_bytes"].items()}
    # A line per variant (and value of the other swept keys): the peaks against the first key.
    expected: dict[str, list[tuple[float, float]]] = {}
    for record in got.values():
        point = record["sweep_point"]
        first, *others = point
        label = record["variant"]["name"] + (
            f" ({','.join(f'{k}={point[k]}' for k in others)})" if others else "")
        expected.setdefault(label, []).append(
            (float(point[first]), float(record["memory"]["peak_allocated_bytes"])))
    lines = sweep_png(frame, tmp_path / "check.png")
    assert lines == {label: sorted(points) for label, points in expected.items()}
    assert all(len(points) >= 3 for points in lines.values())


def test_plot_of_a_folder_without_records_is_bad_input(tmp_path, cli):
    proc = cli("plot", str(tmp_path))
    assert proc.returncode == 2 and "not a run folder" in proc.stderr


def test_a_sweep_over_values_that_are_not_sizes_plots_them_as_categories(tmp_path):
    """`max_grad_norm: [null, …]` once failed the plot (float(None)): values that are not all
    positive numbers go on the axis in the sweep's order."""
    from harness.plot import sweep_png
    from harness.report import load_results_in

    frame = load_results_in(next((REPO / "results" / "sweep_mistral").iterdir()))
    as_norm = {512: None, 1024: 0.5, 2048: 1.0, 4096: 2.0}

    def as_norm_point(point):
        return None if point is None else {
            "max_grad_norm": as_norm[point["seq_len"]],
            **{k: v for k, v in point.items() if k != "seq_len"}}

    frame["sweep_values"] = [as_norm_point(p) for p in frame["sweep_values"]]
    frame["sweep_point"] = [None if p is None else point_label(p) for p in frame["sweep_values"]]
    lines = sweep_png(frame, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 0
    peaks = frame[frame["status"] == "ok"].set_index("sweep_point")
    for label, points in lines.items():
        assert [x for x, _ in points] == [0.0, 1.0, 2.0, 3.0], label  # null, 0.5, 1.0, 2.0
        variant, others = label.split(" (")
        expected = [peaks[(peaks["variant"] == variant)].loc[f"max_grad_norm={new},{others[:-1]}",
                                                              "peak_allocated_bytes"]
                    for new in as_norm.values()]
        assert [peak for _, peak in points] == [float(p) for p in expected]
