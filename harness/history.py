"""`harness history [SCENARIO]`: every record under results/ as one table over time — each
variant's peak per run, by date, commit, GPU and library versions — and a plot of it, so a
change can be traced to the commit or release that brought it.

Runs of different methods or devices are never lined up with each other (a simulated and a
measured peak are different questions): each (variant, method, device) is a series of its own.
Between two consecutive runs of a series, `changed` names what differs in where they ran
(commit, torch, transformers, PEFT, bitsandbytes, GPU) next to how the figure moved.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from harness.report import load_results
from harness.units import unit_for

WHERE = ("git_sha", "torch", "transformers", "peft", "bitsandbytes", "gpu_name")


def history(results: Path, scenario: str | None, metric: str = "peak_allocated_bytes"
            ) -> pd.DataFrame:
    """One row per (scenario, variant, method, device, run), in time order, with the figure's
    change since the series' previous run and what changed in where it ran."""
    # results/<scenario>/<run>/: each scenario's folder of runs (not _scratch, not benchmarks).
    folders = [results / scenario] if scenario else sorted(
        d for d in results.iterdir() if d.is_dir() and not d.name.startswith(("_", ".")))
    frames = [load_results(f) for f in folders if f.is_dir()]
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame()
    frame = pd.concat(frames, ignore_index=True)
    frame = frame.assign(date=pd.to_datetime(frame["run_id"].str[:15], format="%Y%m%dT%H%M%S",
                                             utc=True))
    frame = frame.sort_values(["scenario", "job", "method", "device", "run_id"])
    rows = []
    for _, series in frame.groupby(["scenario", "job", "method", "device"], sort=False):
        previous = None
        for _, r in series.iterrows():
            value = r.get(metric)
            row = {"scenario": r["scenario"], "variant": r["job"], "method": r["method"],
                   "device": r["device"], "run_id": r["run_id"], "date": r["date"],
                   "status": r["status"], metric: None if pd.isna(value) else int(value),
                   **{k: r[k] for k in WHERE}, "change_pct": None, "changed": ""}
            if previous is not None:
                before = previous[metric]
                if before and row[metric] is not None:
                    row["change_pct"] = (row[metric] / before - 1) * 100
                row["changed"] = ", ".join(
                    f"{k} {previous[k]} → {row[k]}" for k in WHERE
                    if previous[k] != row[k] and not (pd.isna(previous[k]) and pd.isna(row[k])))
            rows.append(row)
            previous = row
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame, metric: str) -> str:
    unit, scale = unit_for(table[metric].dropna().max())
    lines = [f"{metric} ({unit}) per run, oldest first; `changed`: what differs from the "
             "series' previous run", "",
             "| scenario | variant | method | run | status | value | change | changed |",
             "|:--|:--|:--|:--|:--|--:|--:|:--|"]
    for _, r in table.iterrows():
        value = "—" if r[metric] is None or pd.isna(r[metric]) else f"{r[metric] / scale:.3f}"
        change = "—" if r["change_pct"] is None or pd.isna(r["change_pct"]) else \
            f"{r['change_pct']:+.2f}%"
        lines.append(f"| {r['scenario']} | {r['variant']} | {r['method']} | {r['run_id']} | "
                     f"{r['status']} | {value} | {change} | {r['changed']} |")
    return "\n".join(lines) + "\n"


def plot(table: pd.DataFrame, metric: str, path: Path) -> dict[str, list]:
    """Each series' figure over time; returns {series label: [(run_id, value), ...]}."""
    from harness.plot import _pyplot

    plt = _pyplot()
    unit, scale = unit_for(table[metric].dropna().max())
    series = [(key, rows[rows[metric].notna()]) for key, rows in table.groupby(
        ["scenario", "variant", "method", "device"], sort=False)]
    series = [(key, rows) for key, rows in series if not rows.empty]
    if any(len(rows) > 1 for _, rows in series):  # a history is two runs or more
        series = [(key, rows) for key, rows in series if len(rows) > 1]
    fig, ax = plt.subplots(figsize=(10, max(5.0, 0.2 * len(series))))
    drawn = {}
    for (scenario, variant, method, device), rows in series:
        label = f"{scenario}/{variant} ({method}, {device})"
        drawn[label] = list(zip(rows["run_id"], rows[metric], strict=True))
        ax.plot(rows["date"], rows[metric].astype(float) / scale, marker="o",
                linestyle="-" if method.startswith("measured") else "--", label=label)
    ax.set_ylabel(f"{metric} ({unit})")
    ax.set_title("history: solid measured, dashed simulated or estimated")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.autofmt_xdate()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return drawn
