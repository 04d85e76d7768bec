"""One variant's run, resolved once: what the runner hands its worker, as a JSON file.

The CLI turns its flags into `RunOptions`; the runner makes one `Job` per variant from the
loaded scenario and those options and writes it beside the variant's log
(`logs/<variant>.job.json`); the worker reads that file and nothing else — never the YAML, so
what runs is what was validated, and a variant at a point no sweep declares (what `fit`
probes) needs no name to re-parse. `python -m harness.worker logs/<variant>.job.json` reruns
one variant by hand.

The file is the dataclasses' fields as JSON; reading it back is driven by the fields' types,
so a new field of a job, variant or train spec needs no code here. A tuple nested in a
technique's free-form arguments comes back as a list, as it reads in a record.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.scenario import Scenario, Variant


def method_for(device: str) -> str:
    if device == "simulate":
        return "simulated"
    return "measured-cuda" if device.startswith("cuda") else "measured-cpu"


@dataclass(frozen=True)
class RunOptions:
    """The run flags every variant of one run shares (`harness run`, `fit`, `compare-methods`)."""

    device: str  # "cpu" | "cuda" | "cuda:N" | "simulate" (auto is resolved before)
    steps: int | None = None  # measured steps instead of the scenario's
    budget_bytes: int | None = None  # a simulated OOM above this many bytes
    timeout_s: float | None = None  # per variant; the runner kills a worker past it
    full_depth: bool = False  # simulate every decoder layer, no extrapolation
    target: str = "cuda"  # a simulation's target: CUDA kernels' scratch modelled or not
    snapshot: bool = False  # write each variant's memory_viz snapshot beside its record
    gpu: str | None = None  # the card a CUDA-target simulation simulates (gpus.card); None: SIMULATED


@dataclass(frozen=True)
class Job:
    """Everything one worker needs: the variant as it will run and where its record goes."""

    scenario: Scenario  # the scenario's header; `variants` holds only this job's variant
    variant: Variant  # resolved: sweep point and --steps applied
    index: int  # the variant's place in the scenario's order
    device: str
    run_id: str
    result: Path  # where the worker writes its record (ranks: beside it, rank_record_path)
    budget_bytes: int | None = None
    target: str = "cuda"
    full_depth: bool = False
    snapshot: Path | None = None  # where the memory snapshot goes, or None for none
    gpu: str | None = None  # see RunOptions

    @property
    def method(self) -> str:
        return method_for(self.device)

    @classmethod
    def make(cls, scenario: Scenario, variant: Variant, options: RunOptions, *, run_id: str,
             result: Path, snapshot: Path | None = None) -> Job:
        index = scenario.index(variant)
        if options.steps is not None:
            variant = dataclasses.replace(
                variant, train=dataclasses.replace(variant.train, steps=options.steps))
        # The job's scenario header names the variant's own model, if it has one: the worker
        # reads `scenario.model`.
        header = dataclasses.replace(scenario, model=scenario.model_of(variant),
                                     variants=(variant,))
        return cls(scenario=header, variant=variant,
                   index=index, device=options.device, run_id=run_id, result=result, budget_bytes=options.budget_bytes,
                   target=options.target, full_depth=options.full_depth,
                   snapshot=snapshot if options.snapshot else None, gpu=options.gpu)

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_encode(self), indent=1) + "\n")

    @classmethod
    def read(cls, path: Path) -> Job:
        return _decode(cls, json.loads(Path(path).read_text()))


def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_encode(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _decode(kind: Any, value: Any) -> Any:
    """`value` (as JSON gave it) as an instance of the annotation `kind`."""
    if kind is Any or value is None:
        return value
    if dataclasses.is_dataclass(kind):
        hints = typing.get_type_hints(kind)
        return kind(**{f.name: _decode(hints[f.name], value[f.name])
                       for f in dataclasses.fields(kind) if f.init and f.name in value})
    origin, params = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        arms = [p for p in params if p is not type(None)]
        return _decode(arms[0], value) if len(arms) == 1 else value
    if kind is tuple or origin is tuple:
        if len(params) == 2 and params[1] is Ellipsis:
            return tuple(_decode(params[0], v) for v in value)
        if params:
            return tuple(_decode(p, v) for p, v in zip(params, value, strict=True))
        return tuple(value)
    if origin in (Mapping, dict) or kind in (Mapping, dict):
        inner = params[1] if params else Any
        return {k: _decode(inner, v) for k, v in value.items()}
    if kind is Path:
        return Path(value)
    return value
