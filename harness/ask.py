"""`harness ask`: one question as flags — will this model with these techniques at this shape fit
on that card, with how much left, and if not, what is the cheapest change that makes it fit?

The question becomes a scenario (one variant, `asked`), validated and run as `harness run` runs
one (simulated without a GPU, measured on one); its record is judged against each card by the
one rule (gpus.py). Where it does not fit, the changes a user would try first — in the order
below, cheapest first — are each run as a variant of the same scenario, and a smaller batch is
searched (fit.py): every suggestion is a record, never a guess. The scenario that ran is kept
beside the records (and written to `--save-scenario`), so the answer can be rerun, swept or
gated as any scenario.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness import gpus

ASKED = "asked"
PRECISION = ("bf16", "fp16", "amp_bf16", "amp_fp16", "qlora", "int8")
ADAPTERS = ("lora", "qlora")


class AskError(ValueError):
    """Bad input to `ask`: one line naming the flag."""


def technique(text: str) -> Any:
    """`--technique SPEC`, spelled as one item of a scenario's technique list: a name, or
    `name: {args}` in YAML flow style."""
    try:
        item = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise AskError(f"--technique {text!r}: not YAML ({' '.join(str(e).split())[:120]})") \
            from None
    if isinstance(item, str) and item:
        return item
    if isinstance(item, dict) and len(item) == 1:
        (name, args), = item.items()
        if isinstance(name, str) and (args is None or isinstance(args, dict)):
            return {name: args or {}}
    raise AskError(f"--technique {text!r}: a technique name, or 'name: {{key: value, ...}}'")


def shorthand(name: str, text: str | None) -> Any:
    """`--lora r=16,all-linear`: `key=value` pairs (values read as YAML), a bare word being the
    target modules (`all-linear`, or `q_proj/v_proj`)."""
    args: dict[str, Any] = {}
    for part in filter(None, (text or "").split(",")):
        key, eq, value = part.partition("=")
        if eq:
            args[key.strip()] = yaml.safe_load(value)
        else:
            targets = part.strip().split("/")
            args["target_modules"] = targets[0] if len(targets) == 1 else targets
    return {name: args} if args else name


def _name(item: Any) -> str:
    return item if isinstance(item, str) else next(iter(item))


def scenario_body(name: str, model: str, techniques: list, train: dict[str, Any],
                  variants: list[dict] | None = None,
                  images: dict[str, int] | None = None) -> dict[str, Any]:
    config = model
    if model.endswith(".json") or model.startswith(("./", "../", "/", "~")):
        config = str(Path(model).expanduser().resolve())  # the YAML lives elsewhere
    return {
        "name": name,
        "description": f"harness ask {model}",
        "model": {"config": config, "weights": "random"},
        "train": train,
        **({"images": images} if images else {}),
        "baseline": ASKED,
        "variants": variants or [{"name": ASKED, "techniques": techniques}],
    }


def scenario_name(model: str) -> str:
    """`ask-llama-3.1-8b`: a safe name (scenario names are file names)."""
    stem = Path(model).stem if model.endswith(".json") else model.rsplit("/", 1)[-1]
    return ("ask-" + re.sub(r"[^A-Za-z0-9._+-]+", "-", stem).strip("-."))[:100]


@dataclass(frozen=True)
class Change:
    label: str  # how the answer names it: "+ chunked_nll"
    variant: str  # its variant name in the scenario
    techniques: list
    train: dict[str, Any] = field(default_factory=dict)


def changes(techniques: list, optimizer: str) -> list[Change]:
    """What a user would try first when a setup does not fit, cheapest first: the two that
    change only what is kept for backward, then the optimizer's state, then precision, then the
    adapters (LoRA for full fine-tuning, QLoRA for LoRA). Only those not already there."""
    names = [_name(t) for t in techniques]
    found: list[Change] = []
    if "gradient_checkpointing" not in names:
        found.append(Change("+ gradient_checkpointing", "with-gradient_checkpointing",
                            [*techniques, "gradient_checkpointing"]))
    if "chunked_nll" not in names:
        found.append(Change("+ chunked_nll", "with-chunked_nll", [*techniques, "chunked_nll"]))
    if optimizer in ("adamw", "adamw_fused"):
        found.append(Change("optimizer adamw_8bit", "with-adamw_8bit", list(techniques),
                            {"optimizer": "adamw_8bit"}))
    if not set(names) & set(PRECISION):
        found.append(Change("+ bf16", "with-bf16", [*techniques, "bf16"]))
    if "lora" in names and "qlora" not in names:
        qlora = [{"qlora": t["lora"]} if isinstance(t, dict) and "lora" in t else
                 "qlora" if t == "lora" else t for t in techniques]
        found.append(Change("lora → qlora", "with-qlora", qlora))
    if not set(names) & set(ADAPTERS):
        found.append(Change("+ lora", "with-lora", [*techniques, "lora"]))
    return found


@dataclass
class CardAnswer:
    gpu: gpus.Gpu
    verdict: gpus.Verdict | None  # None: the asked run did not end ok
    suggestion: tuple[Change, dict, gpus.Verdict] | None = None
    smaller_batch: tuple[int, dict, gpus.Verdict] | None = None
    largest: tuple[int, dict, gpus.Verdict] | None = None  # --vary


def best_change(tried: list[tuple[Change, dict]], gpu: gpus.Gpu, headroom: int):
    """The first change (cheapest first) whose record fits the card with the headroom, else the
    first that fits at all (tight); None if none does."""
    judged = [(c, r, gpus.record_verdict(r, gpu, headroom)) for c, r in tried]
    judged = [(c, r, v) for c, r, v in judged if v is not None]
    return next(((c, r, v) for c, r, v in judged if v.verdict == "fits"), None) or \
        next(((c, r, v) for c, r, v in judged if v.verdict == "tight"), None)


def largest_fitting(probe: Callable[[int], dict], start: int, gpu: gpus.Gpu, target: str,
                    headroom: int, maximum: int) -> tuple[int, dict, gpus.Verdict] | None:
    """The largest value in [1, maximum] whose run fits the card (fit.search's bisection)."""
    from harness.fit import search

    found = search(probe, start, gpu.usable_bytes(target), maximum=maximum)
    if found.largest is None:
        return None
    v = gpus.record_verdict(found.largest_record, gpu, headroom)
    return (found.largest, found.largest_record, v) if v is not None else None


def summary_lines(head: str, record: dict, answers: list[CardAnswer], vary: str | None) -> list[str]:
    from harness.gpus import size
    from harness.report import reason_line
    from harness.units import CATEGORIES

    lines = [head]
    memory = record.get("memory") or {}
    if record["status"] != "ok":
        lines.append(f"{record['status']}: {reason_line(record.get('error'), 300)}")
        return lines
    reserved = memory.get("peak_reserved_bytes")
    breakdown = memory.get("breakdown_bytes") or {}
    top = max((k for k in CATEGORIES if k in breakdown), key=lambda k: breakdown[k], default=None)
    lines.append(
        f"peak {size(memory['peak_allocated_bytes'])} allocated, " +
        (f"{size(reserved)} reserved" if reserved is not None else "reserved unknown "
         f"(+{gpus.FRAGMENTATION:.0%} assumed)") +
        f", in {memory.get('peak_phase')}" +
        (f" (largest: {top} {size(breakdown[top])})" if top else ""))
    for a in answers:
        line = f"{a.gpu.name} ({size(a.verdict.usable_bytes)} usable): {a.verdict.text()}"
        if a.verdict.verdict == "no":
            tips = []
            if a.suggestion:
                change, r, v = a.suggestion
                tips.append(f"{change.label}: {size(v.need_bytes)}, {v.text()}")
            if a.smaller_batch:
                batch, r, v = a.smaller_batch
                tips.append(f"batch {batch}: {size(v.need_bytes)}, {v.text()}")
            elif a.smaller_batch is None and record["train"]["batch_size"] > 1:
                tips.append("no smaller batch fits")
            line += " — " + ("; ".join(tips) if tips else "no single change tried fits")
        if vary and a.largest:
            value, r, v = a.largest
            line += f" · largest {vary} that fits: {value} ({v.text()})"
        elif vary:
            line += f" · no {vary} fits"
        lines.append(line)
    return lines


def answer_json(run_dir: Path, scenario_file: Path, record: dict,
                answers: list[CardAnswer], vary: str | None) -> dict[str, Any]:
    memory = record.get("memory") or {}

    def entry(a: CardAnswer) -> dict[str, Any]:
        out: dict[str, Any] = {"usable_bytes": a.verdict.usable_bytes if a.verdict else None,
                               "verdict": a.verdict.verdict if a.verdict else None,
                               "left_bytes": a.verdict.left_bytes if a.verdict else None}
        if a.suggestion:
            change, r, v = a.suggestion
            out["suggestion"] = {"change": change.label, "variant": change.variant,
                                 "need_bytes": v.need_bytes, "verdict": v.verdict,
                                 "left_bytes": v.left_bytes}
        if a.smaller_batch:
            batch, r, v = a.smaller_batch
            out["smaller_batch"] = {"batch_size": batch, "need_bytes": v.need_bytes,
                                    "verdict": v.verdict, "left_bytes": v.left_bytes}
        if vary:
            out[f"largest_{vary}"] = a.largest[0] if a.largest else None
        return out

    return {"run_dir": str(run_dir), "scenario_file": str(scenario_file),
            "status": record["status"], "method": record["method"],
            "peak_allocated_bytes": memory.get("peak_allocated_bytes"),
            "peak_reserved_bytes": memory.get("peak_reserved_bytes"),
            "peak_phase": memory.get("peak_phase"),
            "gpus": {a.gpu.name: entry(a) for a in answers}}


def write_yaml(path: Path, body: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(body, sort_keys=False))


def flag_error(e) -> str:
    """A ScenarioError of the scenario `ask` wrote, in the words of its flags."""
    key = e.key or ""
    flag = ("MODEL" if key.startswith("model") else
            "--batch" if key == "train.batch_size" else "--seq" if key == "train.seq_len" else
            "--optimizer" if key == "train.optimizer" else
            "--images" if key.startswith("images") else
            "--save-scenario (its file name is the scenario's name)" if key == "name" else "")
    match = re.match(r"variants\[0\]\.techniques\[(\d+)\]", key)
    if match:
        flag = f"technique #{int(match.group(1)) + 1}"
    return f"harness ask: {flag or key or 'the question'}: {e.message}"


def answer(args, items: list, cards: list[gpus.Gpu], headroom: int, device: str,
           progress: Callable[[str], None]) -> tuple[list[str], dict[str, Any]]:
    """Run the question (cli.py's `ask` flags in `args`) and every suggestion it needs; the
    answer's lines and its JSON. Raises AskError on bad input, before anything is written."""
    import dataclasses
    import tempfile

    from harness.job import RunOptions
    from harness.record import new_run_id, read_record
    from harness.report import write_summary
    from harness.runner import run_scenario
    from harness.scenario import ScenarioError, load_scenario
    from harness.techniques import stack_label

    name = Path(args.save_scenario).stem if args.save_scenario else scenario_name(args.model)
    train = {k: v for k, v in (("batch_size", args.batch), ("seq_len", args.seq),
                               ("optimizer", args.optimizer)) if v is not None}
    train.update(steps=1, warmup_steps=1)

    def load(body: dict):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{name}.yaml"
            write_yaml(path, body)
            return load_scenario(path)

    body = scenario_body(name, args.model, items, train, images=getattr(args, "images", None))
    try:
        scenario = load(body)
    except ScenarioError as e:
        raise AskError(flag_error(e)) from None
    asked = scenario.variant(ASKED)
    run_id = new_run_id()
    run_dir = Path(args.out) / name / run_id
    final = run_dir / f"{name}.yaml"
    write_yaml(final, body)
    scenario = dataclasses.replace(scenario, path=final)
    options = RunOptions(device, timeout_s=args.timeout, target=args.target or "cuda")
    images = asked.images
    head = (f"{args.model} · {stack_label(asked.techniques, asked.train.optimizer)} · batch "
            f"{asked.train.batch_size} × seq {asked.train.seq_len}" +
            (f" · {images.count} × {images.height}×{images.width} images" if images else "") +
            f" · {device} → {run_dir}")
    progress(head)

    def run(variants) -> None:
        outcome = run_scenario(scenario, variants, options, run_dir=run_dir, run_id=run_id,
                               progress=progress)
        if outcome.interrupted:
            raise KeyboardInterrupt

    run([asked])
    record = read_record(run_dir / f"{ASKED}.json")
    target = gpus.target_of(record)
    if not cards:  # no card named: the smallest preset that fits
        need = gpus.record_need(record) if record["status"] == "ok" else None
        found = gpus.smallest_fitting(need, target, headroom) if need else None
        cards = [found[0] if found else max(gpus.PRESETS.values(), key=lambda g: g.total_bytes)]
    judged = [a for a in (CardAnswer(g, gpus.record_verdict(record, g, headroom)) for g in cards)
              if a.verdict is not None]
    # The asked run is the probe at the asked value of either key: not run twice.
    probes: dict[tuple[str, int], dict] = {("batch_size", asked.train.batch_size): record,
                                           ("seq_len", asked.train.seq_len): record}

    def probe(key: str) -> Callable[[int], dict]:
        def at(value: int) -> dict:
            if (key, value) not in probes:
                job = scenario.at_point(ASKED, {key: value})
                run([job])
                probes[key, value] = read_record(run_dir / f"{job.name}.json")
            return probes[key, value]
        return at

    if any(a.verdict.verdict == "no" for a in judged):
        tried = []
        for change in changes(items, asked.train.optimizer):
            candidate = scenario_body(name, args.model, items, train, [
                body["variants"][0], {"name": change.variant, "techniques": change.techniques,
                                      **({"train": change.train} if change.train else {})}],
                images=getattr(args, "images", None))
            try:
                load(candidate)
            except ScenarioError:
                continue  # a change this stack cannot take (a conflict): not a suggestion
            body["variants"].append(candidate["variants"][1])
            tried.append(change)
        write_yaml(final, body)
        scenario = dataclasses.replace(load(body), path=final)
        run([scenario.variant(c.variant) for c in tried])
        records = [(c, read_record(run_dir / f"{c.variant}.json")) for c in tried]
        for a in judged:
            if a.verdict.verdict != "no":
                continue
            a.suggestion = best_change(records, a.gpu, headroom)
            if asked.train.batch_size > 1:
                a.smaller_batch = largest_fitting(probe("batch_size"), asked.train.batch_size - 1,
                                                  a.gpu, target, headroom,
                                                  asked.train.batch_size - 1)
    if args.vary:
        for a in judged:
            a.largest = largest_fitting(probe(args.vary), getattr(asked.train, args.vary), a.gpu,
                                        target, headroom, args.max)
    if args.save_scenario:
        write_yaml(Path(args.save_scenario), body)
    write_summary(run_dir)
    return (summary_lines(head, record, judged, args.vary),
            answer_json(run_dir, Path(args.save_scenario or final), record, judged, args.vary))
