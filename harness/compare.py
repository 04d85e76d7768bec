"""`harness compare BASE NEW`: two runs of one scenario, variant by variant — the gate a nightly
job fails on when memory regresses.

Each row is marked as asv marks benchmarks: `+` worse beyond the threshold, `-` better beyond
it, `~` within it (or nothing to compare: failing before and now), `!` newly failing (ok in
BASE, oom / error / unsupported in NEW), `x` incomparable (measured by another method or
device, another GPU, another model, a changed variant, a simulation of another target, or a
variant only one side has). The exit code is the verdict: 1 on any `+` or `!`, else 0; bad
input is 2.

The one thing to know: comparability is decided per variant, from what the records say was run
(techniques with their resolved arguments, train shape, model, device, method) — not from the
scenario file's hash, so adding a variant to a scenario leaves the others comparable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.record import RecordError, read_record
from harness.scenario import point_label
from harness.units import parse_size, unit_for

MARKS = ("+", "-", "~", "!", "x")
HIGHER_IS_BETTER = {"tokens_per_s"}  # every other metric (bytes, seconds): lower is better


class CompareError(ValueError):
    """Bad input: the message is the one line the CLI prints."""


@dataclass(frozen=True)
class Threshold:
    """How much a metric may move before a row is `+` or `-`: a fraction of BASE's value
    (`2%`), or an absolute amount in the metric's unit (`256MiB` for bytes)."""

    relative: float | None = None
    absolute: int | None = None

    @classmethod
    def parse(cls, text: str) -> Threshold:
        text = text.strip()
        if text.endswith("%"):
            try:
                value = float(text[:-1])
            except ValueError:
                value = -1.0
            if not value >= 0:
                raise CompareError(f"--fail-above {text!r}: a percentage must be a number ≥ 0")
            return cls(relative=value / 100)
        if text == "0":
            return cls(absolute=0)
        try:
            return cls(absolute=parse_size(text))
        except ValueError as e:
            raise CompareError(f"--fail-above {text!r}: {e}, or a percentage such as 2%") from None

    def allows(self, base: float, delta: float) -> bool:
        if self.relative is not None:
            return abs(delta) <= self.relative * abs(base)
        return abs(delta) <= self.absolute

    def __str__(self) -> str:
        if self.relative is not None:
            return f"{self.relative * 100:g}%"
        return f"{self.absolute} bytes"


@dataclass
class Row:
    key: str  # variant, or variant@point for a sweep
    mark: str
    base: float | None
    new: float | None
    note: str

    @property
    def delta(self) -> float | None:
        return None if self.base is None or self.new is None else self.new - self.base


def record_key(record: dict) -> str:
    """A record's variant name, with its sweep point (as its file is named): what a row of
    this comparison, and of the tidy table (report.py), stands for. Here, so that comparing
    two runs never imports pandas."""
    point = record.get("sweep_point")
    name = record["variant"]["name"]
    return f"{name}@{point_label(point)}" if point else name


def load_run(path: str | Path) -> tuple[Path, dict[str, dict]]:
    """A run folder's records by key; a folder of run folders (results/<scenario>/) means its
    newest run (run ids sort by time)."""
    folder = Path(path)
    if not folder.is_dir():
        raise CompareError(f"{folder}: no such folder")
    if not any(folder.glob("*.json")):
        runs = sorted(p for p in folder.iterdir() if p.is_dir() and any(p.glob("*.json")))
        if not runs:
            raise CompareError(f"{folder}: not a run folder (no records), nor a folder of runs")
        folder = runs[-1]
    records = []
    for file in sorted(folder.glob("*.json")):
        try:
            records.append(read_record(file))
        except (RecordError, json.JSONDecodeError, KeyError) as e:
            raise CompareError(f"{file}: not a record ({e})") from None
    records.sort(key=lambda r: (r["variant"].get("index", 0), record_key(r)))  # scenario order
    return folder, {record_key(r): r for r in records}


def metric_value(record: dict, metric: str) -> float | None:
    """`metric` as a dotted path into the record, or a key of its memory or timing section."""
    for root in (record, record.get("memory") or {}, record.get("timing") or {}):
        value: Any = root
        for part in metric.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
    return None


def _what_ran(record: dict) -> dict[str, Any]:
    """What decides a record's figures, apart from the code measured: a change here makes two
    records incomparable. (The measured step count does not: peaks include the warm-up.)"""
    env = record.get("env") or {}
    memory = record.get("memory") or {}
    return {
        "method": record["method"],
        "device": record["device"].split(":")[0],
        "GPU": env.get("gpu_name"),
        "model": {k: v for k, v in record["model"].items() if k != "params_trainable"},
        "techniques": record["variant"]["techniques"],
        "train": {k: v for k, v in record["train"].items() if k != "steps"},
        "parallel": record.get("parallel"),  # strategy, world size and options
        "target": memory.get("target"),
        # The environment variables figures depend on: the caching allocator's settings, and
        # cuBLAS's workspaces (a simulated or estimated CUDA target sizes them from it too).
        "PYTORCH_CUDA_ALLOC_CONF": env.get("pytorch_cuda_alloc_conf"),
        "CUBLAS_WORKSPACE_CONFIG": env.get("cublas_workspace_config"),
    }


def _incomparable(base: dict, new: dict) -> str | None:
    a, b = _what_ran(base), _what_ran(new)
    if a["model"].get("params_total") is None or b["model"].get("params_total") is None:
        a["model"].pop("params_total", None)  # a failed run never counted them
        b["model"].pop("params_total", None)
    for key in a:
        if a[key] != b[key]:
            if key in ("method", "device", "GPU", "target", "PYTORCH_CUDA_ALLOC_CONF",
                       "CUBLAS_WORKSPACE_CONFIG"):
                return f"{key} {a[key]} vs {b[key]}"
            return f"{key} changed"
    return None


def compare_records(base: dict[str, dict], new: dict[str, dict], metric: str,
                    threshold: Threshold) -> list[Row]:
    better_up = metric.rsplit(".", 1)[-1] in HIGHER_IS_BETTER
    rows = []
    for key in list(base) + [k for k in new if k not in base]:
        a, b = base.get(key), new.get(key)
        if a is None or b is None:
            rows.append(Row(key, "x", None, None, "only in BASE" if b is None else "only in NEW"))
            continue
        va, vb = metric_value(a, metric), metric_value(b, metric)
        why = _incomparable(a, b)
        if why:
            rows.append(Row(key, "x", va, vb, why))
        elif a["status"] == "ok" and b["status"] != "ok":
            rows.append(Row(key, "!", va, None, f"newly {b['status']}: {_line(b['error'])}"))
        elif a["status"] != "ok" and b["status"] == "ok":
            rows.append(Row(key, "-", None, vb, f"now ok (was {a['status']})"))
        elif a["status"] != "ok":
            rows.append(Row(key, "~", None, None, f"still {b['status']}"))
        elif va is None or vb is None:
            rows.append(Row(key, "x", va, vb, f"no {metric} in {'BASE' if va is None else 'NEW'}"))
        else:
            delta = vb - va
            if threshold.allows(va, delta):
                mark = "~"
            else:
                mark = "+" if (delta > 0) != better_up else "-"
            rows.append(Row(key, mark, va, vb, ""))
            if mark != "+":  # a parallel record's figure is its busiest rank's: ask each rank
                worse = _worse_rank(a, b, metric, threshold, better_up)
                if worse:
                    rows[-1] = Row(key, "+", va, vb, worse)
    return rows


def _worse_rank(base: dict, new: dict, metric: str, threshold: Threshold,
                better_up: bool) -> str | None:
    """The first rank whose own `metric` (a key of memory.ranks' entries) got worse beyond the
    threshold while the busiest rank's did not, as 'rank r: A → B'; None."""
    ranks = [(r.get("memory") or {}).get("ranks") or [] for r in (base, new)]
    if not ranks[0] or len(ranks[0]) != len(ranks[1]):
        return None
    for old, now in zip(*ranks, strict=True):
        va, vb = old.get(metric), now.get(metric)
        if isinstance(va, int) and isinstance(vb, int) and not threshold.allows(va, vb - va) \
                and (vb > va) != better_up:
            return f"rank {old['rank']}: {va:,} → {vb:,}"
    return None


def _line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0][:120] if text and text.strip() else ""


def compare(base_path: str | Path, new_path: str | Path, metric: str = "peak_allocated_bytes",
            fail_above: str = "1%") -> tuple[int, str, dict[str, Any]]:
    """(exit code, markdown table, summary) for BASE vs NEW. Raises CompareError."""
    threshold = Threshold.parse(fail_above)
    base_dir, base = load_run(base_path)
    new_dir, new = load_run(new_path)
    names = {r["scenario"]["name"] for r in base.values()} | \
        {r["scenario"]["name"] for r in new.values()}
    if len(names) != 1:
        raise CompareError(f"BASE and NEW are runs of different scenarios: {sorted(names)}")
    bytes_metric = metric.endswith("_bytes")
    if threshold.absolute and not bytes_metric:
        raise CompareError(f"--fail-above {fail_above}: an absolute threshold is in bytes; "
                           f"{metric} is not a byte count (use a percentage)")
    if not any(metric_value(r, metric) is not None for r in [*base.values(), *new.values()]):
        raise CompareError(f"--metric {metric}: no record of either run has it (e.g. "
                           "peak_allocated_bytes, peak_reserved_bytes, "
                           "phases.backward.peak_allocated_bytes, step_time_s_median)")
    rows = compare_records(base, new, metric, threshold)
    counts = {m: sum(r.mark == m for r in rows) for m in MARKS}
    code = 1 if counts["+"] or counts["!"] else 0
    table = markdown(rows, counts, metric, threshold, base_dir, new_dir, bytes_metric)
    summary = {"base": str(base_dir), "new": str(new_dir), "scenario": names.pop(),
               "metric": metric, "fail_above": str(threshold), "marks": counts,
               "exit": code, "rows": {r.key: {"mark": r.mark, "base": r.base, "new": r.new,
                                              "note": r.note} for r in rows}}
    return code, table, summary


def markdown(rows: list[Row], counts: dict[str, int], metric: str, threshold: Threshold,
             base_dir: Path, new_dir: Path, bytes_metric: bool) -> str:
    values = [abs(v) for r in rows for v in (r.base, r.new) if v is not None]
    unit, scale = unit_for(max(values, default=None)) if bytes_metric else ("", 1)

    def show(value: float | None, signed: bool = False) -> str:
        if value is None:
            return "—"
        text = f"{value / scale:+.3f}" if signed else f"{value / scale:.3f}"
        return text if bytes_metric else (f"{value:+.4g}" if signed else f"{value:.4g}")

    lines = [f"{metric}{f' ({unit})' if unit else ''}: {base_dir.name} → {new_dir.name}; "
             f"± beyond {threshold} marks + worse, - better; ! newly failing, x incomparable",
             "",
             "| | variant | base | new | change | % | note |",
             "|:-:|:--|--:|--:|--:|--:|:--|"]
    for r in rows:
        pct = "—" if r.delta is None or not r.base else f"{r.delta / r.base * 100:+.2f}%"
        lines.append(f"| {r.mark} | {r.key} | {show(r.base)} | {show(r.new)} | "
                     f"{show(r.delta, True)} | {pct} | {r.note} |")
    verdict = "FAIL" if counts["+"] or counts["!"] else "ok"
    lines += ["", f"{verdict}: " + ", ".join(f"{n} {m}" for m, n in counts.items() if n)]
    return "\n".join(lines)
