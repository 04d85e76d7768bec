"""`harness plot RUN_DIR` (and the end of every `run`): PNGs of a run, beside its records.

* `breakdown.png` — one stacked bar per variant (and sweep point): what was live at the peak
  (params, grads, optimizer state, activations, other, unattributed), a tick for the reserved
  peak where it is known, and a line for each common card size the bars reach.
* `sweep.png` — for a sweep: the peak against the first swept key, one line per variant (and
  value of any other swept key); dashed, the reserved peak.

`summary.md` links them. Drawn from the records alone, like every table; the functions return
what they drew, so the pictures can be checked against the records.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from harness.gpus import PRESETS
from harness.report import BREAKDOWN, _unit, load_results_in

COLOURS = {"params": "#4c72b0", "grads": "#dd8452", "optimizer": "#55a868",
           "activations": "#c44e52", "vision_activations": "#ccb974",
           "kv_cache": "#da8bc3", "other": "#8172b3",
           "unattributed": "#937860"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def breakdown_png(frame: pd.DataFrame, path: Path) -> dict[str, dict[str, float]]:
    """The stacked bars; returns {row label: {category: bytes drawn}} (ok rows only)."""
    plt = _pyplot()
    ok = frame[frame["status"] == "ok"]
    unit, scale = _unit(frame)
    labels = list(ok["job"])
    # Records from before the KV cache was a category have none (not 0): not drawn.
    categories = [k for k in BREAKDOWN if ok[f"{k}_bytes"].notna().any()]
    drawn = {label: {k: float(r[f"{k}_bytes"] or 0) for k in categories}
             for label, (_, r) in zip(labels, ok.iterrows(), strict=True)}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(labels) + 2), 5))
    bottom = [0.0] * len(labels)
    for k in categories:
        heights = [drawn[label][k] / scale for label in labels]
        ax.bar(labels, heights, bottom=bottom, color=COLOURS[k], label=k)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    reserved = [(i, r["peak_reserved_bytes"] / scale) for i, (_, r) in enumerate(ok.iterrows())
                if not pd.isna(r["peak_reserved_bytes"])]
    if reserved:
        ax.scatter([i for i, _ in reserved], [v for _, v in reserved], marker="_", s=600,
                   color="black", zorder=3, label="reserved")
    top = max(bottom + [v for _, v in reserved], default=0)
    if unit == "GiB":
        for name, card in _cards():  # the cards the bars reach, and the next one up
            ax.axhline(card, color="grey", linestyle=":", linewidth=1)
            ax.text(len(labels) - 0.5, card, f"{name} (usable)", va="bottom", ha="right",
                    fontsize=8, color="grey")
            if card >= top:
                break
    first = frame.iloc[0]
    ax.set_title(f"{first['scenario']}: memory at the peak ({first['method']})")
    ax.set_ylabel(unit)
    ax.tick_params(axis="x", labelrotation=30)
    for tick in ax.get_xticklabels():
        tick.set_horizontalalignment("right")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside, not over, bars
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


PLOT_CARDS = ("rtx4090", "l40s", "a100-80", "h200")  # the lines drawn across the bars


def _cards() -> list[tuple[str, float]]:
    """(preset, usable GiB) of the cards drawn, smallest first."""
    return sorted(((n, PRESETS[n].usable_bytes() / 2**30) for n in PLOT_CARDS),
                  key=lambda c: c[1])


def sweep_png(frame: pd.DataFrame, path: Path) -> dict[str, list[tuple[float, float]]]:
    """Peak against the first swept key; returns {line label: [(x, peak bytes), ...]}."""
    plt = _pyplot()
    ok = frame[(frame["status"] == "ok") & frame["sweep_point"].notna()].copy()
    points = list(ok["sweep_values"])
    key = next(iter(points[0]))
    values = [p[key] for p in points]
    # Sizes (batch, sequence) read on a log axis; anything else (null, names) as categories
    # in the order the sweep lists them.
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                  for v in values)
    order = list(dict.fromkeys(values))
    ok["x"] = [float(v) for v in values] if numeric else [float(order.index(v)) for v in values]
    ok["others"] = [",".join(f"{k}={v}" for k, v in p.items() if k != key) for p in points]
    unit, scale = _unit(frame)
    fig, ax = plt.subplots(figsize=(9, 5))
    lines: dict[str, list[tuple[float, float]]] = {}
    for (variant, others), rows in ok.groupby(["variant", "others"], sort=False):
        rows = rows.sort_values("x")
        label = variant + (f" ({others})" if others else "")
        lines[label] = list(zip(rows["x"], rows["peak_allocated_bytes"].astype(float),
                                strict=True))
        (line,) = ax.plot(rows["x"], rows["peak_allocated_bytes"] / scale, marker="o",
                          label=label)
        if rows["peak_reserved_bytes"].notna().all():
            ax.plot(rows["x"], rows["peak_reserved_bytes"] / scale, linestyle="--",
                    color=line.get_color(), linewidth=1)
    if unit == "GiB":
        top = ok["peak_allocated_bytes"].max() / scale
        for _, card in _cards():
            ax.axhline(card, color="grey", linestyle=":", linewidth=1)
            if card >= top:
                break
    xs = sorted(set(ok["x"]))
    if numeric:
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{v:g}" for v in xs])
    else:
        ax.set_xticks(xs, ["null" if v is None else str(v) for v in order])
    ax.minorticks_off()
    ax.set_xlabel(key)
    ax.set_ylabel(f"peak {unit} (dashed: reserved)")
    ax.set_title(f"{frame.iloc[0]['scenario']}: peak against {key}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return lines


def plot_run(run_dir: str | Path) -> list[Path]:
    """Every PNG a run folder's records make; returns their paths."""
    run_dir = Path(run_dir)
    frame = load_results_in(run_dir)
    written = []
    if frame.empty or not (frame["status"] == "ok").any():
        return written
    breakdown_png(frame, run_dir / "breakdown.png")
    written.append(run_dir / "breakdown.png")
    if "sweep_point" in frame and frame["sweep_point"].notna().any():
        sweep_png(frame, run_dir / "sweep.png")
        written.append(run_dir / "sweep.png")
    return written
