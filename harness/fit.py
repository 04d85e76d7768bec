"""`harness fit`: the largest batch size or sequence length that fits a GPU's memory, per variant,
found by bisection over runs — simulated without a GPU, real with the OOM caught on CUDA (and on
CPU under the tracked-bytes budget).

A value fits when its run ends `ok` and what a card must hold (gpus.py's rule: the reserved peak
where it is known, CUDA or simulation, else the allocated peak, plus the fragmentation margin
for a CUDA target) is within the usable memory: `--gpu NAME`'s (the preset's total less the
driver's share and the CUDA context) or `--gpu-memory SIZE` as given. A largest value that
leaves less than the headroom is marked tight. The search starts
at the scenario's value, doubles (or halves) until the answer is bracketed, then bisects; each
probe is a record of its own (`<variant>@batch_size=8.json`, a sweep point), so the bracket's
two ends can be read like any run. It assumes memory grows with the value, which it does for
batch size and sequence length. Varying the batch size keeps the scenario's gradient
accumulation: the answer is a micro-batch, and the table says the effective batch it makes.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import gpus
from harness.units import GIB, unit_for

VARIED = ("batch_size", "seq_len")


need_bytes = gpus.record_need  # what a card must hold for a probe's run


def fits(record: dict, budget: int) -> bool:
    need = need_bytes(record)
    return record["status"] == "ok" and need is not None and need <= budget


@dataclass
class Fit:
    variant: str
    largest: int | None = None  # the largest value that fits (None: not even the smallest)
    largest_record: dict | None = None
    first_failing: int | None = None  # the smallest tried value that does not (None: --max fits)
    failing_record: dict | None = None
    probes: list[int] = field(default_factory=list)  # values in the order tried


def search(probe: Callable[[int], dict], start: int, budget: int, multiple: int = 1,
           maximum: int = 2**16) -> Fit:
    """Bisection over multiples of `multiple` in [multiple, maximum]; `probe(value)` runs one."""
    tried: dict[int, dict] = {}
    fit = Fit(variant="")

    def ok(k: int) -> bool:
        if k not in tried:
            tried[k] = probe(k * multiple)
            fit.probes.append(k * multiple)
        return fits(tried[k], budget)

    top = max(1, maximum // multiple)
    k = min(top, max(1, round(start / multiple)))
    lo: int | None
    hi: int | None
    if ok(k):
        lo, hi = k, None
        while lo < top:
            step = min(top, lo * 2)
            if ok(step):
                lo = step
            else:
                hi = step
                break
    else:
        lo, hi = None, k
        while hi > 1:
            step = hi // 2
            if ok(step):
                lo = step
                break
            hi = step
    while lo is not None and hi is not None and hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    if lo is not None:
        fit.largest, fit.largest_record = lo * multiple, tried[lo]
    if hi is not None:
        fit.first_failing, fit.failing_record = hi * multiple, tried[hi]
    return fit


def table(fits_: list[Fit], key: str, budget: int,
          headroom: int = gpus.HEADROOM_BYTES) -> str:
    unit, scale = unit_for(budget)

    def peak(record: dict | None) -> str:
        if record is None:
            return "—"
        if record["status"] != "ok":
            return record["status"]
        memory = record["memory"]
        reserved = memory.get("peak_reserved_bytes")
        return f"{memory['peak_allocated_bytes'] / scale:.3f}" + (
            f" ({reserved / scale:.3f})" if reserved is not None else "")

    def left(record: dict | None) -> str:
        need = need_bytes(record) if record is not None else None
        if need is None:
            return "—"
        room = budget - need
        return f"{room / scale:.2f}" + (" tight" if gpus.word(room, headroom) == "tight" else "")

    lines = [f"largest {key} within {budget / scale:.2f} {unit} usable (what a card must hold: "
             f"reserved where known, else allocated, + {gpus.FRAGMENTATION:.0%} for CUDA); "
             f"peaks in {unit}, allocated (reserved); tight: less than "
             f"{headroom / GIB:g} GiB left", "",
             f"| variant | largest {key} | its peak | left | first that does not fit | "
             "its peak | probes |",
             "|:--|--:|--:|--:|--:|--:|:--|"]
    for f in fits_:
        lines.append(f"| {f.variant} | {_value(f, key)} | "
                     f"{peak(f.largest_record)} | {left(f.largest_record)} | "
                     f"{f.first_failing if f.first_failing is not None else '— (fits at --max)'} | "
                     f"{peak(f.failing_record)} | {' '.join(map(str, f.probes))} |")
    return "\n".join(lines) + "\n"


def _accumulation(f: Fit) -> int:
    record = f.largest_record or f.failing_record or {}
    return (record.get("train") or {}).get("gradient_accumulation_steps") or 1


def _effective(f: Fit, key: str) -> int | None:
    """The largest batch size's sequences per optimizer step (the accumulation is kept)."""
    return f.largest * _accumulation(f) if key == "batch_size" and f.largest else None


def _value(f: Fit, key: str) -> str:
    if f.largest is None:
        return "none"
    if _accumulation(f) > 1 and key == "batch_size":
        return f"{f.largest} × {_accumulation(f)} (effective {_effective(f, key)})"
    return str(f.largest)


def summary(fits_: list[Fit], key: str, budget: int, run_dir: Path) -> dict[str, Any]:
    def row(f: Fit) -> dict[str, Any]:
        need = need_bytes(f.largest_record) if f.largest_record else None
        return {"largest": f.largest, "largest_need_bytes": need,
                "gradient_accumulation_steps": _accumulation(f),
                "largest_effective_batch_size": _effective(f, key),
                "largest_left_bytes": budget - need if need is not None else None,
                "first_failing": f.first_failing,
                "first_failing_status": f.failing_record["status"] if f.failing_record else None,
                "first_failing_need_bytes": need_bytes(f.failing_record)
                if f.failing_record else None,
                "probes": f.probes}

    return {"run_dir": str(run_dir), "vary": key, "gpu_memory_bytes": budget,
            "variants": {f.variant: row(f) for f in fits_}}


def write(fits_: list[Fit], key: str, budget: int, run_dir: Path) -> tuple[str, dict]:
    """fit.md and fit.csv beside the probes' records (a .json would read as a record)."""
    text, data = table(fits_, key, budget), summary(fits_, key, budget, run_dir)
    (run_dir / "fit.md").write_text(text)
    with open(run_dir / "fit.csv", "w", newline="") as f:
        writer = csv.writer(f)
        fields = ["largest", "largest_need_bytes", "first_failing", "first_failing_status",
                  "first_failing_need_bytes"]
        writer.writerow(["variant", "vary", *fields, "probes"])
        for name, row in data["variants"].items():
            writer.writerow([name, key, *(row[k] for k in fields),
                             " ".join(map(str, row["probes"]))])
    return text, data
