"""Command line: run | estimate | compare-methods | validate | ls | report.

Exit codes: 0 done (every selected variant has its record, whatever its status), 2 bad input
(one line naming file, variant and key; nothing run or written), 130 interrupted.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import shutil
import signal
import sys
from pathlib import Path

from harness import gpus as _gpus
from harness.fit import VARIED
from harness.units import parse_size

DEFAULT_OUT = Path("results") / "_scratch"  # of the folder the user stands in
REPO_RESULTS = Path(__file__).resolve().parent.parent / "results"  # the committed reference runs


class BadInput(Exception):
    pass


def _err(line: str) -> None:
    print(f"harness: error: {line}", file=sys.stderr)


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _resolve_device(choice: str) -> str:
    if choice != "auto":
        return choice
    import torch

    # Without a GPU, predict what one would need rather than measure this CPU.
    return "cuda" if torch.cuda.is_available() else "simulate"


def _forks(device: str) -> bool:
    """Whether this device's workers fork from the fork server (every device but CUDA). For
    auto, no nvidia-smi means no CUDA: known without importing torch."""
    return device in ("cpu", "simulate") or (device == "auto" and not shutil.which("nvidia-smi"))


def _timeout(text: str) -> float:
    """`--timeout`: a positive, finite number of seconds (argparse reports exit 2, one line)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0 < value < float("inf")):
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return value


def _check_target(args: argparse.Namespace) -> None:
    if args.target is not None and args.device in ("cpu", "cuda"):
        raise BadInput(f"--target: applies to a simulation, not to --device {args.device}")


def cmd_run(args: argparse.Namespace) -> int:
    from harness import report
    from harness.job import RunOptions
    from harness.record import new_run_id
    from harness.runner import run_scenario, start_fork_server
    from harness.scenario import load_scenario

    budget = None
    if args.memory_budget is not None:
        try:
            budget = parse_size(args.memory_budget)
        except ValueError as e:
            raise BadInput(f"--memory-budget: {e}") from None
    if args.steps is not None and args.steps < 1:
        raise BadInput(f"--steps: must be ≥ 1, got {args.steps}")
    _check_target(args)
    gpu = args.gpu
    if gpu is not None:
        if args.device in ("cpu", "cuda"):
            raise BadInput(f"--gpu: names the card a simulation simulates, not for --device "
                           f"{args.device}")
        try:
            _gpus.card(gpu)
        except _gpus.UnknownGpu as e:
            raise BadInput(f"--gpu: {e}") from None
    if _forks(args.device):
        start_fork_server()  # its imports overlap the scenario's validation
    scenario = load_scenario(args.scenario)
    variants = _selected(scenario, args.variant)
    _warn_positions(scenario, variants)
    device = _resolve_device(args.device)
    run_id = new_run_id()
    run_dir = Path(args.out) / scenario.name / run_id
    _progress(f"{scenario.name}: {len(variants)} variant(s) on {device} → {run_dir}")
    options = RunOptions(device, steps=args.steps, budget_bytes=budget, timeout_s=args.timeout,
                         full_depth=args.full_depth, target=args.target or "cuda",
                         snapshot=args.snapshot, gpu=gpu)
    outcome = run_scenario(scenario, variants, options, run_dir=run_dir, run_id=run_id,
                           progress=_progress)
    _plot(run_dir)
    print(report.write_summary(run_dir, wide=args.wide))
    print(report.run_summary(run_dir, report.load_results_in(run_dir), outcome.interrupted))
    return 130 if outcome.interrupted else 0


def _warn_positions(scenario, variants) -> None:
    """One stderr line per sequence length beyond the model's positions (the records say it
    too): a warning, not bad input — the memory of that many tokens is still a question."""
    from harness.models import beyond_positions, resolve_config

    for model, seq_len in sorted({(scenario.model_of(v), v.train.seq_len) for v in variants},
                                 key=lambda pair: (pair[0].config, pair[1])):
        warning = beyond_positions(resolve_config(model, scenario.path), seq_len,
                                   model.trust_remote_code)
        if warning:
            print(f"harness: warning: {scenario.path}: {warning}", file=sys.stderr)


def _plot(run_dir: Path) -> list[Path]:
    """The run's PNGs; a plotting failure is said in one line, and loses no record."""
    from harness.plot import plot_run

    try:
        return plot_run(run_dir)
    except Exception as e:  # noqa: BLE001 - pictures are a convenience, records are the result
        print(f"harness: warning: no plots for {run_dir}: {type(e).__name__}: {e}",
              file=sys.stderr)
        return []


def _run_folder(arg: str) -> Path:
    run_dir = Path(arg)
    if not run_dir.is_dir() or not any(run_dir.glob("*.json")):
        raise BadInput(f"{run_dir}: not a run folder (no records)")
    return run_dir


def cmd_plot(args: argparse.Namespace) -> int:
    from harness import report

    run_dir = _run_folder(args.run_dir)
    for path in _plot(run_dir):
        print(path)
    report.write_summary(run_dir)  # links the pictures
    return 0


def _selected(scenario, names: list[str] | None) -> list:
    variants = list(scenario.variants)
    if not names:
        return variants
    # A declared name selects each of its sweep points; a full name, one of them.
    known = list(dict.fromkeys([v.declared for v in variants] + [v.name for v in variants]))
    for name in names:
        if name not in known:
            hint = difflib.get_close_matches(name, known, n=1)
            raise BadInput(f"{scenario.path}: --variant {name!r}: no such variant" +
                           (f" (did you mean {hint[0]!r}?)" if hint else
                            f"; known: {', '.join(known)}"))
    return [v for v in variants if v.name in names or v.declared in names]


def estimate_run(scenario, variants, run_dir: Path, run_id: str, steps: int | None,
                 target: str = "cuda") -> None:
    """Write the closed-form estimate of each variant as records, and their summary."""
    from harness import report
    from harness.estimate import estimate_record
    from harness.record import write_record

    records = [estimate_record(scenario, v, run_id, steps, target) for v in variants]
    for variant, record in zip(variants, records, strict=True):
        write_record(run_dir / f"{variant.name}.json", record)
    report.write_summary(run_dir)


def cmd_estimate(args: argparse.Namespace) -> int:
    from harness import report
    from harness.record import new_run_id
    from harness.scenario import load_scenario

    scenario = load_scenario(args.scenario)
    if args.steps is not None and args.steps < 1:
        raise BadInput(f"--steps: must be ≥ 1, got {args.steps}")
    variants = _selected(scenario, args.variant)
    run_id = new_run_id()
    run_dir = Path(args.out) / scenario.name / run_id
    estimate_run(scenario, variants, run_dir, run_id, args.steps, args.target)
    frame = report.load_results_in(run_dir)
    print(report.write_summary(run_dir, wide=args.wide))
    if args.terms:
        print(report.terms_markdown(run_dir))
    print(report.run_summary(run_dir, frame))
    return 0


def cmd_compare_methods(args: argparse.Namespace) -> int:
    """Estimate, simulate (and, with --cpu, measure) the same variants; add measured run folders
    given with --measured; print one row per variant with each method's peak and error."""
    from harness import report
    from harness.job import RunOptions
    from harness.record import new_run_id
    from harness.runner import run_scenario, start_fork_server
    from harness.scenario import load_scenario

    if args.steps is not None and args.steps < 1:
        raise BadInput(f"--steps: must be ≥ 1, got {args.steps}")
    for folder in args.measured or []:
        if not Path(folder).is_dir() or not any(Path(folder).glob("*.json")):
            raise BadInput(f"--measured {folder}: not a run folder (no records)")
    try:
        gpu = _gpus.card(args.gpu or _gpus.SIMULATED)
    except _gpus.UnknownGpu as e:
        raise BadInput(f"--gpu: {e}") from None
    start_fork_server()  # simulation (and --cpu) workers fork: its imports overlap validation
    scenario = load_scenario(args.scenario)
    variants = _selected(scenario, args.variant)
    measured = []
    for folder in args.measured or []:
        frame = report.load_results_in(Path(folder))
        if set(frame["scenario"]) != {scenario.name}:
            raise BadInput(f"--measured {folder}: records of {sorted(set(frame['scenario']))}, "
                           f"not of {scenario.name!r}")
        measured.append(frame)
    run_id = new_run_id()
    top = Path(args.out) / scenario.name / f"{run_id}-methods"
    estimate_run(scenario, variants, top / "estimated", run_id, args.steps, args.target)
    runs = {"estimated": top / "estimated"}
    devices = [("simulated", "simulate")] + ([("measured-cpu", "cpu")] if args.cpu else [])
    for label, device in devices:
        _progress(f"{scenario.name}: {len(variants)} variant(s) on {device}")
        options = RunOptions(device, steps=args.steps, timeout_s=args.timeout,
                             full_depth=args.full_depth, target=args.target)
        outcome = run_scenario(scenario, variants, options, run_dir=top / label, run_id=run_id,
                               progress=_progress)
        report.write_summary(top / label)
        runs[label] = top / label
        if outcome.interrupted:
            return 130
    frames = {label: report.load_results_in(path) for label, path in runs.items()}
    tools = _other_tools(scenario, variants, frames["simulated"], gpu)
    table = report.methods_table(frames, measured, scenario.sha256, tools)
    text = report.methods_markdown(table, scenario.name, run_id)
    table.to_csv(top / "methods.csv", index=False)
    (top / "methods.md").write_text(text)
    print(text)
    print(json.dumps({"run_dir": str(top), "scenario": scenario.name,
                      "runs": {k: str(v) for k, v in runs.items()}}))
    return 0


def _other_tools(scenario, variants, simulated, gpu) -> dict[str, dict[str, dict]]:
    """variant → what accelerate and the guides' rule of thumb answer for it (rules.py)."""
    from harness import rules

    out = {}
    for variant in variants:
        rows = simulated[simulated["job"] == variant.name] if not simulated.empty else simulated
        reference = None if rows.empty else rows.iloc[-1].to_dict()
        out[variant.name] = rules.answers(scenario, variant, reference, gpu)
    return out


def cmd_validate(args: argparse.Namespace) -> int:
    from harness.scenario import ScenarioError, list_scenarios, load_scenario

    paths = args.scenarios or [str(p) for p in list_scenarios()]
    failed = 0
    for arg in paths:
        try:
            scenario = load_scenario(arg)
        except ScenarioError as e:
            _err(str(e))
            failed += 1
            continue
        print(f"ok  {scenario.path}  ({len(scenario.variants)} variants)")
    return 2 if failed else 0


def cmd_ls(args: argparse.Namespace) -> int:
    from harness.models import MODEL_DIR
    from harness.scenario import list_scenarios
    from harness.techniques import REGISTRY

    if args.what == "gpus":
        print(_gpu_listing())
        return 0
    if args.what == "peft":
        print(_peft_listing())
        return 0
    if args.what == "models":
        print(_model_listing())
        return 0
    print("scenarios:")
    for path in list_scenarios():
        print(_listing(path))
    print("techniques:")
    for name, tech in sorted(REGISTRY.items()):
        print(f"  {name:<24} {tech.stage.name.lower():<6} {tech.doc}")
    print("peft methods (harness ls peft: those the installed PEFT has, from its registry)")
    print("models (scenarios/models; harness ls models: parameters, layers, experts):")
    print("  " + " ".join(path.stem for path in sorted(MODEL_DIR.glob("*.json"))))
    print("gpus (harness ls gpus: their figures and sources):")
    print("  " + " ".join(_gpus.PRESETS))
    return 0


def _model_listing() -> str:
    """Each committed config: its family, parameters (built on meta, tied ones once), layers
    (alike, or the period of their kinds), experts, and its hub id with the published count."""
    from harness.models import (
        MODEL_DIR,
        ConfigSource,
        describe_layers,
        expert_count,
        load_config,
        parameter_count,
        published,
    )

    known = published()
    rows = ["| model | family | parameters | published | layers | experts | hub id |",
            "|:--|:--|--:|--:|:--|:--|:--|"]
    for path in sorted(MODEL_DIR.glob("*.json")):
        config = load_config(ConfigSource("file", str(path), path.stem))
        text = config.get_text_config()
        experts = expert_count(config)
        entry = known.get(path.stem, {})
        rows.append(
            f"| {path.stem} | {config.model_type} | {_count(parameter_count(config))} | "
            f"{_count(entry['params'] - entry.get('tied_stored', 0)) if 'params' in entry else '—'} | "
            f"{describe_layers(config)} | "
            f"{f'{experts} × top {text.num_experts_per_tok}' if experts else '—'} | "
            f"{entry.get('hub', '—')} |")
    return "\n".join(rows)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def _peft_listing() -> str:
    """The methods the installed PEFT has (`peft: {method: NAME, ...}`), from its registry:
    each with its config class and the arguments it needs; those the step cannot drive say
    why."""
    import peft

    from harness.techniques.peft_methods import NOT_BUILT, methods, needed_args

    rows = [f"PEFT {peft.__version__}: `peft: {{method: NAME, ...}}`, the arguments as NAME's "
            "config class spells them (lora is also the lora technique).", "",
            "| method | config class | needs | |", "|:--|:--|:--|:--|"]
    for name, cls in sorted(methods().items()):
        rows.append(f"| {name} | {cls.__name__} | {', '.join(needed_args(cls)) or '—'} | "
                    f"{'not built: ' + NOT_BUILT[name] if name in NOT_BUILT else ''} |")
    return "\n".join(rows)


def _gpu_listing() -> str:
    """Every preset: the driver's total, what a training process can use, and the sources."""
    rows = [f"GPU presets (--gpu NAME, or a size such as 24GiB). Usable: the total less the "
            f"driver's share and a CUDA context ({_gpus.CONTEXT_BYTES / 2**20:.0f} MiB until a "
            "GPU run measures it); "
            f"'fits' leaves at least the headroom (default {_gpus.HEADROOM_BYTES / 2**30:g} "
            "GiB). See harness/gpus.py.", "",
            "| gpu | card | total bytes | total GiB | driver GiB | usable GiB | source |",
            "|:--|:--|--:|--:|--:|--:|:--|"]
    for g in _gpus.measured_presets().values():
        source = g.source + (f"; CUDA's total: {g.cuda_source}" if g.cuda_source else
                             "; driver share: the default") + \
            (f"; context: {g.context_source}" if g.context_source != "default" else "")
        rows.append(f"| {g.name} | {g.label} | {g.total_bytes} | {g.total_bytes / 2**30:.2f} | "
                    f"{g.driver_reserve_bytes / 2**30:.2f} | {g.usable_bytes() / 2**30:.2f} | "
                    f"{source} |")
    return "\n".join(rows)


def _listing(path: Path) -> str:
    """A scenario's line in `ls`, from its outline (checking it whole is `validate`'s job); a
    file without one is loaded whole, so that its line names the problem as `validate` does."""
    from harness.scenario import ScenarioError, load_scenario, outline

    try:
        name, config, count, description = outline(path)
    except ScenarioError:
        try:
            s = load_scenario(path)
        except ScenarioError as e:
            return f"  {path.stem:<22} INVALID: {e}"
        name, config, count, description = s.name, s.model.config, len(s.variants), s.description
    return f"  {name:<22} {config:<18} {count:>2} variants  {description}"


def cmd_fit(args: argparse.Namespace) -> int:
    """The largest --vary value that fits --gpu-memory, per variant, by bisection over runs."""
    from harness import fit as fitting
    from harness import report
    from harness.job import RunOptions
    from harness.record import new_run_id, read_record
    from harness.runner import run_scenario, start_fork_server
    from harness.scenario import load_scenario

    target = "cpu" if args.device == "cpu" or args.target == "cpu" else "cuda"
    if args.gpu is not None:
        try:
            gpu = _gpus.card(args.gpu)
        except _gpus.UnknownGpu as e:
            raise BadInput(f"--gpu: {e}") from None
        budget = gpu.usable_bytes(target)
        within = f"{gpu.name} ({_gpus.size(budget)} usable)"
    else:
        try:
            budget = parse_size(args.gpu_memory)
        except ValueError as e:
            raise BadInput(f"--gpu-memory: {e}") from None
        within = args.gpu_memory
    if args.multiple_of < 1 or args.max < args.multiple_of:
        raise BadInput(f"--multiple-of {args.multiple_of} / --max {args.max}: need "
                       "1 ≤ multiple-of ≤ max")
    _check_target(args)
    if _forks(args.device):
        start_fork_server()
    scenario = load_scenario(args.scenario)
    if args.vary in dict(scenario.sweep):
        raise BadInput(f"{scenario.path}: --vary {args.vary}: the scenario's sweep sets it "
                       "already; fit varies a train key the sweep does not")
    variants = _selected(scenario, args.variant)
    device = _resolve_device(args.device)
    run_id = new_run_id()
    run_dir = Path(args.out) / scenario.name / f"{run_id}-fit"
    _progress(f"{scenario.name}: largest {args.vary} within {within}, "
              f"{len(variants)} variant(s) on {device} → {run_dir}")
    # Simulated peaks are compared with the budget; real runs meet it as an OOM.
    options = RunOptions(device, budget_bytes=None if device == "simulate" else budget,
                         timeout_s=args.timeout, full_depth=args.full_depth,
                         target=args.target or "cuda", gpu=args.gpu)
    results = []
    for variant in variants:
        def probe(value: int, variant=variant) -> dict:
            job = scenario.at_point(variant.declared,
                                    {**dict(variant.sweep_point), args.vary: value})
            outcome = run_scenario(scenario, [job], options, run_dir=run_dir, run_id=run_id,
                                   progress=_progress)
            if outcome.interrupted:
                raise KeyboardInterrupt
            return read_record(run_dir / f"{job.name}.json")

        found = fitting.search(probe, getattr(variant.train, args.vary), budget,
                               args.multiple_of, args.max)
        found.variant = variant.name
        results.append(found)
    report.write_summary(run_dir)  # every probe, as any run's table
    text, data = fitting.write(results, args.vary, budget, run_dir)
    print(text)
    print(json.dumps(data))
    return 0


class _Item(argparse.Action):
    """`--technique SPEC` and its shorthands, kept in command-line order in `items`."""

    def __call__(self, parser, namespace, values, option_string=None):
        from harness import ask

        try:
            item = ask.technique(values) if self.const is None else \
                ask.shorthand(self.const, values) if self.nargs == "?" else self.const
        except ask.AskError as e:
            raise argparse.ArgumentError(self, str(e)) from None
        namespace.items = [*(getattr(namespace, "items", None) or []), item]


def _images_flag(text: str) -> dict[str, int]:
    """`--images 2x768x768` → {count: 2, height: 768, width: 768} (x or ×; count 1 if left
    out)."""
    parts = re.split(r"[x×]", text.strip().lower())
    if len(parts) not in (2, 3) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected H×W or N×H×W in pixels, got {text!r}")
    numbers = [int(p) for p in parts]
    count = numbers.pop(0) if len(numbers) == 3 else 1
    return {"count": count, "height": numbers[0], "width": numbers[1]}


def cmd_ask(args: argparse.Namespace) -> int:
    """The question in one line: fits or not on each card, and the cheapest change that fits."""
    from harness import ask

    _check_target(args)
    try:
        cards = [_gpus.card(g) for g in args.gpu or []]
        headroom = parse_size(args.headroom) if args.headroom != "0" else 0
    except (_gpus.UnknownGpu, ValueError) as e:
        raise BadInput(f"harness ask: --gpu/--headroom: {e}") from None
    if _forks(args.device):
        from harness.runner import start_fork_server

        start_fork_server()
    try:
        lines, answer = ask.answer(args, args.items, cards, headroom,
                                   _resolve_device(args.device), _progress)
    except ask.AskError as e:
        raise BadInput(str(e)) from None
    print("\n".join(lines))
    print(json.dumps(answer))
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    from harness import history

    results = Path(args.results)
    if not results.is_dir():
        raise BadInput(f"--results {results}: no such folder")
    if args.scenario and not (results / args.scenario).is_dir():
        raise BadInput(f"{results / args.scenario}: no results for scenario {args.scenario!r}")
    table = history.history(results, args.scenario, args.metric)
    if table.empty:
        raise BadInput(f"{results}: no records")
    if table[args.metric].isna().all():
        raise BadInput(f"--metric {args.metric}: no record has it (peak_allocated_bytes, "
                       "peak_reserved_bytes, a phase's, step_time_s_median, ...)")
    out = Path(args.out) / (args.scenario or "all")
    out.mkdir(parents=True, exist_ok=True)
    text = history.markdown(table, args.metric)
    (out / "history.md").write_text(text)
    table.to_csv(out / "history.csv", index=False)
    history.plot(table, args.metric, out / "history.png")
    print(text)
    print(json.dumps({"out": str(out), "rows": len(table),
                      "series": int(table.groupby(["scenario", "variant", "method",
                                                   "device"]).ngroups)}))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from harness.compare import CompareError, compare

    try:
        code, table, summary = compare(args.base, args.new, args.metric, args.fail_above)
    except CompareError as e:
        raise BadInput(str(e)) from None
    print(table)
    print(json.dumps(summary))
    return code


def cmd_report(args: argparse.Namespace) -> int:
    from harness import report

    print(report.write_summary(_run_folder(args.run_dir), wide=args.wide))
    return 0


# Flags several verbs share, each defined once. A verb passes its own help where the flag tells
# it something of its own (what OUT holds, what the timeout limits).
_FLAGS: dict[str, dict] = {
    "scenario": {"help": "a name under scenarios/ or a path to a YAML file"},
    "--variant": {"action": "append", "metavar": "NAME", "help": "repeatable"},
    "--device": {"choices": ("auto", "cuda", "cpu", "simulate"), "default": "auto"},
    "--out": {"default": str(DEFAULT_OUT), "type": lambda text: Path(text).resolve(),
              "metavar": "OUT"},
    "--steps": {"type": int, "help": "measured steps (overrides the scenario)"},
    "--full-depth": {"action": "store_true", "help": "simulate every decoder layer"},
    "--target": {"choices": ("cuda", "cpu")},
    "--wide": {"action": "store_true",
               "help": "print every column (summary.md and summary.csv always have them)"},
    "--timeout": {"type": _timeout, "default": 3600.0, "metavar": "SECONDS",
                  "help": "per-variant wall-clock limit (default 3600)"},
}


def _flag(parser: argparse.ArgumentParser, name: str, **own) -> None:
    """Add the shared flag `name`, with this verb's own help or default where given."""
    flag = {**_FLAGS[name], **own}
    if name == "--out" and "default" not in own:
        flag["help"] = flag.get("help", "where records go") + " (default: ./results/_scratch)"
    parser.add_argument(name, **flag)


class _Parser(argparse.ArgumentParser):
    """Bad flags, like bad scenarios, are one line (and exit 2): the usage is a -h away."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="harness", description="Measure the GPU memory of LLM "
                     "fine-tuning setups, one technique stack per variant.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run every (or the chosen) variant of a scenario")
    _flag(run, "scenario")
    _flag(run, "--device", help="auto: cuda if available, else simulate (fake tensors: nothing "
                                "allocated); cpu: real steps measured on this CPU")
    _flag(run, "--variant")
    _flag(run, "--out", help="records go to OUT/<scenario>/<run id>")
    _flag(run, "--steps")
    _flag(run, "--full-depth", help="simulate: every decoder layer, not 3 assembled into the "
                                    "full depth (slower; the same figures)")
    _flag(run, "--target", help="simulate: cuda (the default) on the fake CUDA device, every "
                                "library on its CUDA branch, plus what CUDA kernels allocate "
                                "beside their outputs; cpu: fake CPU tensors, only what the CPU "
                                "kernels do (like with like against a --device cpu run)")
    run.add_argument("--gpu", metavar="NAME",
                     help="simulate, CUDA target: the card the fake CUDA device is — its name, "
                          "compute capability and multiprocessors, which kernels and libraries "
                          "choose by (a preset, harness ls gpus; default h200)")
    run.add_argument("--snapshot", action="store_true",
                     help="also write each variant's memory snapshot (<variant>.snapshot.pickle, "
                          "PyTorch's format: drag it onto pytorch.org/memory_viz); on CUDA the "
                          "allocator's own, simulated: the caching-allocator replay's")
    run.add_argument("--memory-budget", metavar="SIZE",
                     help="end a variant as out-of-memory past SIZE (e.g. 24GiB, 512MB)")
    _flag(run, "--timeout")
    _flag(run, "--wide")
    run.set_defaults(fn=cmd_run)

    est = sub.add_parser("estimate", help="closed-form estimate of every (or the chosen) variant: "
                         "no tensor created, instant")
    _flag(est, "scenario")
    _flag(est, "--variant")
    _flag(est, "--out", help="records go to OUT/<scenario>/<run id>")
    _flag(est, "--steps")
    est.add_argument("--terms", action="store_true", help="also print each variant's terms")
    _flag(est, "--wide")
    _flag(est, "--target", default="cuda",
          help="cuda (default): include what CUDA kernels allocate beside their outputs; cpu: "
               "only what the CPU kernels do")
    est.set_defaults(fn=cmd_estimate)

    cmp = sub.add_parser("compare-methods", help="estimated vs simulated (vs measured) peaks of "
                         "the same variants, with the error of each")
    _flag(cmp, "scenario")
    _flag(cmp, "--variant")
    cmp.add_argument("--measured", action="append", metavar="RUN_DIR",
                     help="a run folder of the same scenario measured elsewhere (a GPU run); "
                          "repeatable")
    cmp.add_argument("--cpu", action="store_true", help="also measure each variant on this CPU")
    _flag(cmp, "--out", help="everything goes to OUT/<scenario>/<run id>-methods")
    _flag(cmp, "--steps")
    _flag(cmp, "--full-depth")
    _flag(cmp, "--target", default="cuda",
          help="what the estimate and the simulation model (see run --target)")
    _flag(cmp, "--timeout")
    cmp.add_argument("--gpu", metavar="NAME",
                     help="the card accelerate's infer_auto_device_map places the weights on "
                          "(a preset, harness ls gpus; default h200)")
    cmp.set_defaults(fn=cmd_compare_methods)

    fit = sub.add_parser("fit", help="the largest batch size or sequence length that fits a GPU's "
                         "memory, per variant (bisection over runs)")
    _flag(fit, "scenario")
    card = fit.add_mutually_exclusive_group(required=True)
    card.add_argument("--gpu", metavar="NAME",
                      help="a GPU preset (harness ls gpus): its usable memory, the driver's "
                           "share and the CUDA context taken off, is the budget")
    card.add_argument("--gpu-memory", metavar="SIZE",
                      help="the memory a run may use, e.g. 23GiB (nothing taken off)")
    fit.add_argument("--vary", required=True, choices=VARIED)
    _flag(fit, "--variant")
    _flag(fit, "--device", help="as for run: auto is cuda if available, else simulate")
    fit.add_argument("--multiple-of", type=int, default=1, metavar="N",
                     help="search multiples of N only (e.g. 128 for seq_len); default 1")
    fit.add_argument("--max", type=int, default=2**16, metavar="N",
                     help="the largest value tried (default 65536)")
    _flag(fit, "--out", help="probe records go to OUT/<scenario>/<run id>-fit")
    _flag(fit, "--full-depth")
    _flag(fit, "--target", help="simulate: see run --target")
    _flag(fit, "--timeout", help="per-probe wall-clock limit (default 3600)")
    fit.set_defaults(fn=cmd_fit)

    ask = sub.add_parser("ask", help="one question as flags: does MODEL with these techniques "
                         "fit on these GPUs, with how much left, and what change would make it")
    ask.add_argument("model", metavar="MODEL",
                     help="as model.config is: a name under scenarios/models, a config path or "
                          "a hub id")
    ask.add_argument("--technique", action=_Item, metavar="SPEC",
                     help="repeatable; one item of a scenario's technique list: a name, or "
                          "'name: {key: value}' (YAML flow style)")
    for flag, tech, kind in (("--lora", "lora", "?"), ("--qlora", "qlora", "?"),
                             ("--gc", "gradient_checkpointing", 0), ("--bf16", "bf16", 0),
                             ("--chunked-nll", "chunked_nll", 0)):
        if kind == "?":
            ask.add_argument(flag, action=_Item, nargs="?", const=tech, metavar="ARGS",
                             help=f"{tech}, with ARGS as key=value pairs and target modules "
                                  "(e.g. r=16,all-linear)")
        else:
            ask.add_argument(flag, action=_Item, nargs=0, const=tech, help=tech)
    ask.add_argument("--batch", type=int, metavar="N", help="micro-batch size")
    ask.add_argument("--seq", type=int, metavar="N", help="sequence length")
    ask.add_argument("--optimizer", help="as train.optimizer (default adamw)")
    ask.add_argument("--images", type=_images_flag, metavar="[N×]H×W",
                     help="each sample holds N images (default 1) of H × W pixels before its "
                          "text, a vision-language model's (e.g. 1024x1024, 2x768x768)")
    ask.add_argument("--gpu", action="append", metavar="NAME",
                     help="repeatable: a preset (harness ls gpus) or a size such as 24GiB; "
                          "default: the smallest preset that fits")
    ask.add_argument("--headroom", default="1GiB", metavar="SIZE",
                     help="what must be left for 'fits' (less is 'tight'); default 1GiB")
    ask.add_argument("--vary", choices=VARIED, help="also the largest value that fits each card")
    ask.add_argument("--max", type=int, default=2**16, metavar="N",
                     help="with --vary: the largest value tried (default 65536)")
    ask.add_argument("--save-scenario", metavar="FILE",
                     help="write the scenario that ran (its name: FILE's stem) to rerun, sweep "
                          "or gate the answer")
    _flag(ask, "--device", help="auto: measured on CUDA if there is one, else simulated")
    _flag(ask, "--target", help="simulate: see run --target")
    _flag(ask, "--out", help="records go to OUT/<scenario>/<run id>")
    _flag(ask, "--timeout")
    ask.set_defaults(fn=cmd_ask, items=[])

    hist = sub.add_parser("history", help="every record under results/ over time: each variant's "
                          "peak per run, with what changed (commit, libraries, GPU), and a plot")
    hist.add_argument("scenario", nargs="?", help="one scenario's results (default: all)")
    hist.add_argument("--results", default=str(REPO_RESULTS), help="where the runs are")
    hist.add_argument("--metric", default="peak_allocated_bytes",
                      help="a column of the tidy table (peak_reserved_bytes, "
                           "backward_peak_allocated_bytes, step_time_s_median, ...)")
    _flag(hist, "--out", default=str(DEFAULT_OUT / "history"),
          help="history.md, history.csv and history.png go to OUT/<scenario|all>")
    hist.set_defaults(fn=cmd_history)

    gate = sub.add_parser("compare", help="BASE vs NEW run folders of one scenario, variant by "
                          "variant: exit 1 on a regression (+) or a newly failing variant (!)")
    gate.add_argument("base", help="a run folder, or a folder of runs (its newest)")
    gate.add_argument("new", help="a run folder, or a folder of runs (its newest)")
    gate.add_argument("--metric", default="peak_allocated_bytes",
                      help="a record field: peak_allocated_bytes (default), peak_reserved_bytes, "
                           "phases.backward.peak_allocated_bytes, step_time_s_median, ...")
    gate.add_argument("--fail-above", default="1%", metavar="THRESHOLD",
                      help="how far the metric may move: a percentage of BASE (2%%) or an "
                           "amount (256MiB); default 1%%")
    gate.set_defaults(fn=cmd_compare)

    validate = sub.add_parser("validate", help="check scenarios without running anything")
    validate.add_argument("scenarios", nargs="*", metavar="SCENARIO")
    validate.set_defaults(fn=cmd_validate)

    ls = sub.add_parser("ls", help="list scenarios, techniques and model configs (ls gpus: the "
                        "GPU presets, their memory and what a process can use of it)")
    ls.add_argument("what", nargs="?", choices=("gpus", "peft", "models"),
                    help="gpus: the GPU presets only; peft: the PEFT methods installed; models: "
                    "each committed config's parameters, layers and experts")
    ls.set_defaults(fn=cmd_ls)

    plot = sub.add_parser("plot", help="PNGs of a run folder (breakdown per variant; peak against "
                          "the swept value), linked from its summary.md")
    plot.add_argument("run_dir")
    plot.set_defaults(fn=cmd_plot)

    rep = sub.add_parser("report", help="regenerate summary.csv/summary.md of a run folder")
    rep.add_argument("run_dir")
    _flag(rep, "--wide")
    rep.set_defaults(fn=cmd_report)
    return parser


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (a CI job's cancel) stops as cleanly as Ctrl-C


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    # Also SIGINT: a process started in the background by a non-interactive shell inherits it
    # ignored, and Python then installs no handler of its own — Ctrl-C (or `kill -INT`) would
    # be lost rather than stop the run cleanly.
    signal.signal(signal.SIGINT, _interrupt)
    try:
        return args.fn(args)
    except Exception as e:
        from harness.scenario import ScenarioError  # here: most verbs never read a scenario

        if not isinstance(e, (BadInput, ScenarioError)):
            raise
        _err(str(e))
        return 2
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
