"""Records → a tidy pandas DataFrame → summary.csv and summary.md (always regenerated from the
records, never the other way round).

    import harness
    df = harness.load_results("results/_scratch/smoke_tiny")   # one row per record
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pandas as pd

from harness import gpus
from harness.compare import record_key
from harness.record import read_record
from harness.scenario import point_label
from harness.techniques import stack_label
from harness.units import CATEGORIES, GIB, unit_for

BREAKDOWN = (*CATEGORIES, "unattributed")
PHASE_NAMES = ("load", "reference", "forward", "backward", "optimizer", "eval", "generate",
               "save")


def _record_paths(path: Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    # A run folder holds its records at the top; deeper folders are runs of their own.
    return sorted(p for p in path.rglob("*.json")
                  if not p.name.startswith(".") and p.parent.name != "logs")


def _flatten(record: dict[str, Any], path: Path) -> dict[str, Any]:
    memory = record["memory"] or {}
    breakdown = memory.get("breakdown_bytes") or {}
    phases = memory.get("phases") or {}
    env = record.get("env") or {}
    train = record["train"]
    row = {
        "scenario": record["scenario"]["name"],
        "scenario_sha256": record["scenario"].get("sha256"),
        "run_id": record["run_id"],
        "variant": record["variant"]["name"],
        "sweep_point": point_label(record["sweep_point"]) if record.get("sweep_point") else None,
        "sweep_values": record.get("sweep_point"),  # the point itself: {train key: value}
        "job": record_key(record),  # the variant with its sweep point, as the file is named
        "variant_index": record["variant"].get("index"),
        "baseline": record["scenario"].get("baseline"),
        "techniques": stack_label(record["variant"]["techniques"],
                                  (record.get("train") or {}).get("optimizer")),
        "objective": objective_label(record.get("objective")),
        "sequences_per_step": (record.get("objective") or {}).get("sequences_per_step"),
        "images": images_label(record.get("images")),
        "parallel": parallel_label(record.get("parallel")),
        "world_size": (record.get("parallel") or {}).get("world_size"),
        "max_rank": memory.get("rank"),  # a parallel record's figures are this rank's
        "imbalance": memory.get("imbalance"),
        "status": record["status"],
        "error": record["error"],
        "device": record["device"],
        "method": record["method"],
        "model_config": record["model"]["config"],
        "params_total": record["model"]["params_total"],
        "params_trainable": record["model"]["params_trainable"],
        "quantized_params": record["model"].get("quantized_params"),
        **{k: train.get(k) for k in ("batch_size", "seq_len", "optimizer", "lr", "steps",
                                      "warmup_steps", "seed")},
        "gradient_accumulation_steps": train.get("gradient_accumulation_steps", 1),
        "effective_batch_size": train.get("effective_batch_size", train.get("batch_size")),
        "batch": batch_label(train),
        "seq": seq_label(train, record["model"].get("virtual_tokens")),
        "virtual_tokens": (record["model"].get("virtual_tokens") or {}).get("count"),
        "peak_allocated_bytes": memory.get("peak_allocated_bytes"),
        "peak_reserved_bytes": memory.get("peak_reserved_bytes"),
        "peak_phase": memory.get("peak_phase"),
        "target": gpus.target_of(record),  # what device the figures are for: cuda or cpu
        **{f"{name}_peak_allocated_bytes": (phases.get(name) or {}).get("peak_allocated_bytes")
           for name in PHASE_NAMES},
        **{f"{k}_bytes": breakdown.get(k) for k in BREAKDOWN},
        "step_time_s_median": record["timing"].get("step_time_s_median"),
        "tokens_per_s": record["timing"].get("tokens_per_s"),
        "torch": env.get("torch"),
        "transformers": env.get("transformers"),
        "peft": env.get("peft"),
        "bitsandbytes": env.get("bitsandbytes"),
        "gpu_name": env.get("gpu_name"),
        "git_sha": env.get("git_sha"),
        "git_dirty": env.get("git_dirty"),
        "path": str(path),
    }
    return row


def batch_label(train: dict[str, Any]) -> str:
    """`4`, or with accumulation micro-batch × micro-batches per step: `4 × 8`."""
    accumulation = train.get("gradient_accumulation_steps") or 1
    return f"{train.get('batch_size')}" + (f" × {accumulation}" if accumulation > 1 else "")


def seq_label(train: dict[str, Any], virtual: dict | None) -> str:
    """`512`, or with a PEFT method's virtual tokens `512 + 200` (prepended: every layer runs
    712 positions) or `512 (+30 kv)` (keys and values attended beside the sequence)."""
    seq = f"{train.get('seq_len')}"
    if not virtual:
        return seq
    return f"{seq} + {virtual['count']}" if virtual["where"] == "sequence" else \
        f"{seq} (+{virtual['count']} kv)"


def objective_label(objective: dict[str, Any] | None) -> str | None:
    """`dpo · copy`: the objective and what serves as its reference (GRPO's with its
    completions a prompt: `grpo ×8 · none`); None: sft."""
    if not objective:
        return None
    reference = objective.get("reference")
    generations = objective.get("num_generations") or \
        (objective.get("args") or {}).get("num_generations")
    name = objective["name"] + (f" ×{generations}" if generations else "")
    return name + (f" · {reference}" if reference else "")


def images_label(images: dict[str, Any] | None) -> str | None:
    """`1 × 1024×1024 (1227 tok)`: images a sample, their size, and the tokens they take of
    the sequence; None: text only."""
    if not images:
        return None
    tokens = images.get("tokens_per_sample")
    return f"{images['count']} × {images['height']}×{images['width']}" + \
        (f" ({tokens} tok)" if tokens is not None else "")


def _images_column(table: pd.DataFrame) -> bool:
    return "images" in table and bool(table["images"].notna().any())


def _objective_column(table: pd.DataFrame) -> bool:
    """Whether the tables show each row's objective: some row's is not sft."""
    return "objective" in table and bool(table["objective"].notna().any())


def parallel_label(parallel: dict[str, Any] | None) -> str | None:
    """`fsdp2×8`, with the options that differ from the defaults: `fsdp2×8 param_dtype=bfloat16`."""
    if not parallel:
        return None
    from harness.scenario import ParallelSpec

    default = ParallelSpec(parallel["strategy"], parallel["world_size"]).as_dict()
    changed = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in parallel.items()
               if k in default and v != default[k]]
    return " ".join([f"{parallel['strategy']}×{parallel['world_size']}", *changed])


def load_results(path: str | Path) -> pd.DataFrame:
    """Every record under `path` (a record, a run folder, or a folder of runs) as one tidy
    DataFrame: one row per record, bytes as integers, missing values as NA."""
    return _frame(_record_paths(Path(path)))


def _frame(paths: list[Path]) -> pd.DataFrame:
    frame = pd.DataFrame([_flatten(read_record(p), p) for p in paths])
    if frame.empty:
        return frame
    for col in [c for c in frame.columns if c.endswith("_bytes") or c.startswith("params_")]:
        frame[col] = frame[col].astype("Int64")
    return frame.sort_values(["scenario", "run_id", "variant_index", "variant"],
                             na_position="last").reset_index(drop=True)


def summary_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per variant (and sweep point) in scenario order, with % vs the baseline and vs
    the previous variant — at the same sweep point."""
    table = frame.copy()
    peak = table["peak_allocated_bytes"].astype("Float64")
    ok = table["status"] == "ok"
    baseline_name = table["baseline"].dropna().iloc[0] if table["baseline"].notna().any() else None
    point = table["sweep_point"].fillna("") if "sweep_point" in table else pd.Series(
        "", index=table.index)
    base = table.loc[(table["variant"] == baseline_name) & ok]
    base_peak = dict(zip(point[base.index], base["peak_allocated_bytes"].astype(float),
                         strict=True))
    base_of_row = pd.array([base_peak.get(p, pd.NA) for p in point], dtype="Float64")
    table["vs_baseline_pct"] = (peak / base_of_row - 1) * 100
    previous = pd.Series(pd.NA, index=table.index, dtype="Float64")
    for _, rows in table.groupby(point, sort=False):
        index = rows.index
        previous[index] = peak[index].shift(1).where(ok[index].shift(1, fill_value=False))
    table["vs_previous_pct"] = (peak / previous - 1) * 100
    table.loc[~ok, ["vs_baseline_pct", "vs_previous_pct"]] = pd.NA
    # What a card must hold, by the one rule (gpus.py): reserved where known, else allocated
    # plus the fragmentation margin; the smallest preset it fits with the headroom to spare.
    need = [gpus.need_bytes(None if pd.isna(a) else int(a), None if pd.isna(r) else int(r), t)
            if good else None for a, r, t, good in zip(
                table["peak_allocated_bytes"], table["peak_reserved_bytes"], table["target"], ok,
                strict=True)]
    fits = [fits_on(n, t) for n, t in zip(need, table["target"], strict=True)]
    table["fits_need_bytes"] = pd.array(need, dtype="Int64")
    table["fits_on"] = pd.array([f[0] for f in fits], dtype="string")
    table["fits_left_bytes"] = pd.array([f[1] for f in fits], dtype="Int64")
    return table


def fits_on(need_bytes: int | None, target: str = "cuda") -> tuple[str | None, int | None]:
    """The preset with the least usable memory that `need_bytes` fits (gpus.verdict: with the
    default headroom left), and what is left on it."""
    if need_bytes is None:
        return None, None
    found = gpus.smallest_fitting(need_bytes, target)
    return (found[0].name, found[1].left_bytes) if found else (None, None)


def _fits_text(r) -> str:
    if r["status"] != "ok" or pd.isna(r["fits_need_bytes"]):
        return "—"
    if pd.isna(r["fits_on"]):
        return "none of the presets"
    return f"{r['fits_on']} (+{r['fits_left_bytes'] / GIB:.1f})"


def header_line(frame: pd.DataFrame) -> str:
    first = frame.iloc[0]
    swept = "sweep_point" in frame and frame["sweep_point"].notna().any()
    shape = ("swept: see each row" if swept else
             f"batch {first['batch_size']} × seq {first['seq_len']}")
    if not swept and _batch_column(frame):
        shape = f"seq {first['seq_len']} · batch: see each row"
    model = "model: see each row" if _model_column(frame) else f"model {first['model_config']}"
    return (f"{first['scenario']} · {model} · {shape} · "
            f"{first['optimizer']} lr {first['lr']:g} · "
            f"{first['steps']} steps (+{first['warmup_steps']} warm-up) · device {first['device']} · "
            f"{first['method']} · run {first['run_id']}")


def _batch_column(table: pd.DataFrame) -> bool:
    """Whether the tables show each row's batch: some row accumulates gradients, or (no sweep
    point saying so) the rows' batches differ, as where variants set their own."""
    if "batch" not in table:
        return False
    swept = "sweep_point" in table and table["sweep_point"].notna().any()
    return bool((table["gradient_accumulation_steps"] > 1).any()) or \
        (not swept and table["batch"].nunique() > 1)


def _model_column(table: pd.DataFrame) -> bool:
    """Whether the tables show each row's model: the variants train different ones."""
    return "model_config" in table and table["model_config"].nunique() > 1


def _virtual_column(table: pd.DataFrame) -> bool:
    """Whether the tables show each row's sequence: some row's PEFT method adds tokens."""
    return "virtual_tokens" in table and bool(table["virtual_tokens"].notna().any())


def _unit(table: pd.DataFrame) -> tuple[str, int]:
    peaks = table["peak_allocated_bytes"].dropna()
    return unit_for(peaks.max() if len(peaks) else None)


def _size(value, scale: int) -> str:
    return "—" if pd.isna(value) else f"{value / scale:.3f}" if scale == GIB else f"{value / scale:.1f}"


def _short(value, scale: int) -> str:
    return "—" if pd.isna(value) else f"{value / scale:.2f}" if scale == GIB else \
        f"{value / scale:.1f}"


def _pct(value) -> str:
    return "—" if pd.isna(value) else f"{value:+.1f}%"


def reason_line(error: str | None, limit: int = 200) -> str:
    """An error's one meaningful line: the exception's (`OutOfMemoryError: …`) where a
    traceback tail holds one — its last — else the first line that is not a traceback's
    frame, source or caret line."""
    lines = [line.strip() for line in str(error or "").splitlines()]
    lines = [line for line in lines if line and not set(line) <= set("^~ ") and
             not line.startswith(("File \"", "Traceback (most recent call last)"))]
    raised = [line for line in lines if _EXCEPTION.match(line)]
    return (raised[-1] if raised else lines[0] if lines else "no reason recorded")[:limit]


_EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*)?(Error|Exception|Interrupt|Unsupported|Exit)\b"
                        r"[\w.]*:")


def narrow_markdown(table: pd.DataFrame) -> str:
    """The table a terminal shows: what decides the question — peak, reserved, the change vs
    the baseline, the phase and the category that set the peak, the smallest card it fits —
    one row per variant; `--wide` and summary.md/summary.csv have every column."""
    unit, scale = _unit(table)
    swept = "sweep_point" in table and table["sweep_point"].notna().any()
    batches = _batch_column(table)
    virtual = _virtual_column(table)
    objective = _objective_column(table)
    models = _model_column(table)
    images = _images_column(table)
    rows = []
    for _, r in table.iterrows():
        ok = r["status"] == "ok"
        shown = ok or r["status"] == "oom"  # an OOM keeps the peak it reached
        largest = max(CATEGORIES, key=lambda k: -1 if pd.isna(r[f"{k}_bytes"]) else
                      r[f"{k}_bytes"])
        rows.append({
            "variant": r["variant"],
            **({"model": r["model_config"]} if models else {}),
            **({"point": r["sweep_point"] or "—"} if swept else {}),
            **({"batch": r["batch"]} if batches else {}),
            **({"seq": r["seq"]} if virtual else {}),
            **({"objective": r["objective"] if isinstance(r["objective"], str) else "sft"}
               if objective else {}),
            **({"images": r["images"] if isinstance(r["images"], str) else "—"}
               if images else {}),
            "status": r["status"],
            "peak": _short(r["peak_allocated_bytes"] if shown else pd.NA, scale),
            "reserved": _short(r["peak_reserved_bytes"] if shown else pd.NA, scale),
            "vs base": _pct(r["vs_baseline_pct"]),
            "phase": r["peak_phase"] if ok and isinstance(r["peak_phase"], str) else "—",
            "largest": _SHORT.get(largest, largest)
            if ok and not pd.isna(r[f"{largest}_bytes"]) else "—",
            **({"fits on": _fits_text(r).replace(" (+", " +").rstrip(")")}
               if unit == "GiB" else {}),
        })
    body = _pipe(rows)
    return (header_line(table) + f"\n\nSizes in {unit}; largest: the category that is "
            "largest at the peak (activ: saved for backward); fits on: the smallest GPU preset "
            f"that holds it with the headroom left, and {unit} left. Every column: summary.md, "
            "--wide.\n\n" + body +
            "\n" + _notes(table))


_SHORT = {"params": "params", "grads": "grads", "optimizer": "optim", "activations": "activ",
          "vision_activations": "vision", "kv_cache": "kv", "other": "other"}
# Columns a table shows only where some row's peak holds them.
_OPTIONAL = ("vision_activations", "kv_cache")


def _categories(table: pd.DataFrame) -> tuple[str, ...]:
    """The breakdown's columns: vision_activations and kv_cache only where some row's peak
    holds an image encoder's activations or a KV cache."""
    def held(k: str) -> bool:
        return f"{k}_bytes" in table and bool((table[f"{k}_bytes"].fillna(0) > 0).any())

    return tuple(k for k in BREAKDOWN if k not in _OPTIONAL or held(k))


def _pipe(rows: list[dict[str, str]]) -> str:
    """A markdown pipe table padded to its widest cell only (to_markdown pads more)."""
    heads = list(rows[0])
    widths = [max(len(h), *(len(str(r[h])) for r in rows)) for h in heads]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True)) + " |",
             "|" + "|".join(":" + "-" * (w + 1) for w in widths) + "|"]
    lines += ["| " + " | ".join(str(r[h]).ljust(w) for h, w in zip(heads, widths, strict=True))
              + " |" for r in rows]
    return "\n".join(lines)


def _notes(table: pd.DataFrame) -> str:
    """Why each row that did not end ok ended so, one line each."""
    notes = [f"- `{r['job']}` ({r['status']}): {reason_line(r['error'])}"
             for _, r in table.iterrows() if r["status"] != "ok" and isinstance(r["error"], str)]
    return ("\n" + "\n".join(notes) + "\n") if notes else ""


def markdown(table: pd.DataFrame) -> str:
    unit, scale = _unit(table)
    swept = "sweep_point" in table and table["sweep_point"].notna().any()
    parallel = "parallel" in table and table["parallel"].notna().any()
    batches = _batch_column(table)
    virtual = _virtual_column(table)
    objective = _objective_column(table)
    models = _model_column(table)
    images = _images_column(table)
    categories = _categories(table)
    rows = []
    for _, r in table.iterrows():
        shown = r["status"] in ("ok", "oom")  # an error's partial figures are not a result
        rows.append({
            "variant": r["variant"],
            **({"model": r["model_config"]} if models else {}),
            **({"sweep point": r["sweep_point"] or "—"} if swept else {}),
            **({"batch": r["batch"]} if batches else {}),
            **({"seq": r["seq"]} if virtual else {}),
            "techniques": r["techniques"],
            **({"images": r["images"] if isinstance(r["images"], str) else "—"}
               if images else {}),
            **({"objective": r["objective"] if isinstance(r["objective"], str) else "sft",
                "seqs/step": "—" if pd.isna(r["sequences_per_step"])
                else str(int(r["sequences_per_step"]))} if objective else {}),
            **({"parallel": r["parallel"] if isinstance(r["parallel"], str) else "—",
                "imbalance": _pct(r["imbalance"] * 100 if pd.notna(r["imbalance"]) else pd.NA)}
               if parallel else {}),
            "status": r["status"],
            f"peak {unit}": _size(r["peak_allocated_bytes"] if shown else pd.NA, scale),
            f"reserved {unit}": _size(r["peak_reserved_bytes"] if shown else pd.NA, scale),
            "vs baseline": _pct(r["vs_baseline_pct"]),
            "vs prev": _pct(r["vs_previous_pct"]),
            **{k: _size(r[f"{k}_bytes"] if shown else pd.NA, scale) for k in categories},
            "trainable": "—" if pd.isna(r["params_trainable"]) else f"{r['params_trainable']:,}",
            "step s": "—" if pd.isna(r["step_time_s_median"]) else f"{r['step_time_s_median']:.3f}",
            "tok/s": "—" if pd.isna(r["tokens_per_s"]) else f"{r['tokens_per_s']:,.0f}",
            **({"fits on (GiB left)": _fits_text(r)} if unit == "GiB" else {}),
        })
    body = pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)
    fits = (" Fits on: the GPU preset with the least usable memory (harness ls gpus: the "
            "driver's share and a CUDA context taken off) that holds the peak — reserved where "
            f"known, else allocated + {gpus.FRAGMENTATION:.0%} — with "
            f"{gpus.HEADROOM_BYTES / GIB:g} GiB left." if unit == "GiB" else "")
    ranks = (" A parallel row's figures are its busiest rank's (the highest peak; every rank's "
             "are in the record's memory.ranks), its shares of params, grads and optimizer "
             "state that rank's shards; imbalance: the highest rank peak over the ranks' mean."
             if parallel else "")
    return (header_line(table) + f"\n\nSizes in {unit}; breakdown at the moment of the peak."
            f"{fits}{ranks}\n\n" + body + "\n" + _notes(table))


CSV_COLUMNS = ["variant", "sweep_point", "batch_size", "gradient_accumulation_steps",
               "effective_batch_size", "seq_len", "virtual_tokens", "images", "techniques",
               "objective",
               "sequences_per_step", "parallel",
               "world_size", "max_rank", "imbalance", "status",
               "peak_allocated_bytes", "peak_reserved_bytes", "vs_baseline_pct",
               "vs_previous_pct", *[f"{k}_bytes" for k in BREAKDOWN],
               "params_trainable", "params_total", "step_time_s_median", "tokens_per_s",
               "fits_need_bytes", "fits_on", "fits_left_bytes", "peak_phase", "device", "method",
               "run_id", "error"]


def write_summary(run_dir: str | Path, wide: bool = True) -> str:
    """Regenerate summary.csv and summary.md (every column) from the run folder's records;
    return the markdown a terminal shows: that, or the narrow table (`wide=False`)."""
    run_dir = Path(run_dir)
    frame = load_results_in(run_dir)
    if frame.empty:
        return "no records\n"
    table = summary_table(frame)
    table[CSV_COLUMNS].to_csv(run_dir / "summary.csv", index=False)
    text = markdown(table)
    pictures = [p for p in ("breakdown.png", "sweep.png") if (run_dir / p).is_file()]
    if pictures:  # made by harness plot (plot.py), from the same records
        text += "\n" + "\n".join(f"![{p[:-4]}]({p})" for p in pictures) + "\n"
    (run_dir / "summary.md").write_text(text)
    return text if wide else narrow_markdown(table)


def terms_markdown(run_dir: Path) -> str:
    """The closed-form terms of an estimated run, one column per variant."""
    records = sorted((read_record(p) for p in Path(run_dir).glob("*.json")
                      if not p.name.startswith(".")),
                     key=lambda r: (r["variant"].get("index") or 0, r["variant"]["name"]))
    columns = {record_key(r): r["memory"].get("terms_bytes") or {} for r in records
               if r["status"] == "ok"}
    if not columns:
        return "no estimated terms\n"
    names = list(dict.fromkeys(n for terms in columns.values() for n in terms))
    peak = max(b for terms in columns.values() for b in terms.values())
    unit, scale = unit_for(peak)
    body = pd.DataFrame([{"term": n, **{v: _size(t.get(n), scale) if n in t else "—"
                                        for v, t in columns.items()}} for n in names])
    return f"Terms in {unit}:\n\n" + body.to_markdown(index=False, disable_numparse=True) + "\n"


def load_results_in(run_dir: Path) -> pd.DataFrame:
    """Only the run folder's own records (its top level)."""
    return _frame(sorted(p for p in run_dir.glob("*.json") if not p.name.startswith(".")))


def run_summary(run_dir: Path, frame: pd.DataFrame, interrupted: bool = False) -> str:
    """The last stdout line of `run`: one JSON object a script can read."""
    counts = frame["status"].value_counts().to_dict() if not frame.empty else {}
    return json.dumps({
        "run_dir": str(run_dir),
        "scenario": None if frame.empty else frame["scenario"].iloc[0],
        "device": None if frame.empty else frame["device"].iloc[0],
        "method": None if frame.empty else frame["method"].iloc[0],
        "interrupted": interrupted,
        "counts": {k: int(v) for k, v in counts.items()},
        "variants": {r["job"]: {"status": r["status"],
                                "peak_allocated_bytes": None if pd.isna(r["peak_allocated_bytes"])
                                else int(r["peak_allocated_bytes"])}
                     for _, r in frame.iterrows()},
    })


# ---------------------------------------------------------------------------------------------
# Methods side by side: estimated, simulated, measured


def methods_table(runs: dict[str, pd.DataFrame], measured: list[pd.DataFrame],
                  sha256: str, tools: dict[str, dict[str, dict]] | None = None) -> pd.DataFrame:
    """One row per variant: each method's peak and its error against the best reference there
    is — a measurement, else the simulation. `runs`: label → that method's records (in scenario
    order); `measured`: run folders from elsewhere, matched by variant name; a record of other
    scenario content is incomparable and left out. `tools`: variant → what other tools answer
    (rules.py: accelerate's estimate and the guides' rule, each a peak with its error; the
    device map a sentence)."""
    first = next(iter(runs.values()))
    rows = []
    for _, base in first.iterrows():
        name = base["job"]
        row: dict[str, Any] = {"variant": name, "techniques": base["techniques"]}
        found: dict[str, Any] = {}
        for label, frame in runs.items():
            found[label] = _one(frame, name)
        notes = []
        for frame in measured:
            r = _one(frame, name)
            if r is None:
                continue
            if r["scenario_sha256"] != sha256:
                notes.append(f"{r['run_id']}: other scenario content (x, left out)")
                continue
            found[str(r["method"])] = r
        answers = (tools or {}).get(name, {})
        for label in ("accelerate", "guide"):
            if label in answers:
                found[label] = answers[label]
        row["device_map"] = answers.get("device_map", {}).get("text")
        for label, r in found.items():
            ok = r is not None and r["status"] == "ok"
            row[f"{label}_peak_bytes"] = int(r["peak_allocated_bytes"]) if ok else None
            row[f"{label}_status"] = None if r is None else r["status"]
            row[f"{label}_error"] = None if r is None or ok else r["error"]
        measured_labels = [k for k in found if k.startswith("measured") and
                           row.get(f"{k}_peak_bytes") is not None]
        reference = measured_labels[0] if measured_labels else "simulated"
        row["reference"] = reference
        ref_peak = row.get(f"{reference}_peak_bytes")
        for label in found:
            peak = row.get(f"{label}_peak_bytes")
            row[f"{label}_error_pct"] = (100 * (peak / ref_peak - 1)
                                         if peak is not None and ref_peak and label != reference
                                         else None)
        est, ref = found.get("estimated"), found.get(reference)
        row["diverges_most"] = _diverging(est, ref) if est is not None and ref is not None and \
            est["status"] == ref["status"] == "ok" else None
        row["notes"] = "; ".join(notes) or None
        rows.append(row)
    return pd.DataFrame(rows)


def _one(frame: pd.DataFrame, job: str):
    hits = frame[frame["job"] == job] if not frame.empty else frame
    return None if hits.empty else hits.iloc[-1]  # the latest run's, when several


def _diverging(est, ref) -> str:
    """The breakdown category where the estimate and the reference differ most, at the peak."""
    diffs = {k: est[f"{k}_bytes"] - ref[f"{k}_bytes"] for k in CATEGORIES
             if not pd.isna(est[f"{k}_bytes"]) and not pd.isna(ref[f"{k}_bytes"])}
    if not diffs:
        return None
    worst = max(diffs, key=lambda k: abs(diffs[k]))
    return f"{worst} {diffs[worst] / 2**20:+,.1f} MiB"


def methods_markdown(table: pd.DataFrame, scenario: str, run_id: str) -> str:
    labels = [c[:-len("_peak_bytes")] for c in table.columns if c.endswith("_peak_bytes")]
    peaks = [v for c in table.columns if c.endswith("_peak_bytes") for v in table[c].dropna()]
    unit, scale = unit_for(max(peaks) if peaks else None)
    rows = []
    for _, r in table.iterrows():
        row = {"variant": r["variant"]}
        for label in labels:
            peak = r[f"{label}_peak_bytes"]
            status = r[f"{label}_status"]
            row[f"{label} {unit}"] = (_size(peak, scale) if not pd.isna(peak) else
                                      "—" if status is None or pd.isna(status) else status)
            if label != r["reference"]:
                err = r[f"{label}_error_pct"]
                row[f"{label} error"] = "—" if pd.isna(err) else f"{err:+.1f}%"
        row["reference"] = r["reference"]
        row["estimate vs reference, most"] = r["diverges_most"] or "—"
        if "device_map" in r and isinstance(r["device_map"], str):
            row["accelerate device map"] = r["device_map"]
        rows.append(row)
    body = pd.DataFrame(rows).fillna("—").to_markdown(index=False, disable_numparse=True)
    reasons = [f"- `{r['variant']}` {label}: {str(r[f'{label}_error']).splitlines()[0][:160]}"
               for _, r in table.iterrows() for label in labels
               if isinstance(r[f"{label}_error"], str)]
    notes = [f"- `{r['variant']}`: {r['notes']}" for _, r in table.iterrows()
             if isinstance(r["notes"], str)]
    return (f"{scenario} · methods side by side · run {run_id}\n\nPeak allocated, in {unit}; "
            "each error is against the reference (a measurement where one exists, else the "
            "simulation). accelerate: `accelerate estimate-memory`'s training figure for the "
            "dtype trained in; guide: the fine-tuning guides' weights + AdamW moments; device "
            "map: where accelerate's infer_auto_device_map puts the weights.\n\n" + body + "\n"
            + ("\n" + "\n".join(reasons + notes) + "\n" if reasons or notes else ""))
