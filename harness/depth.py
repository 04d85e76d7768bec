"""A deep model from shallow simulations: `simulate_deep` is the one entry.

A model whose decoder layers are all alike is simulated at EXTRAPOLATE_FROM[1] layers with each
allocation event labelled by its layer — one whose layers' kinds repeat (Gemma's sliding and
global layers) at as many periods of them, each event labelled by its period (models.Units) —
and the `layers`-deep step is assembled from that trace
(probes/layers.py: the trace, its peaks, breakdown and reserved memory). It is simulated at
EXTRAPOLATE_FROM[0] layers too, to check the assembly against what one layer adds, and to carry
every allocated byte count to `layers` where the step cannot be assembled (reserved memory is
then unknown: null, and the record says why). Seconds for a 7B model instead of minutes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from harness.models import Units
from harness.probes.layers import NotAssembled
from harness.train import Measured, measure


class NotExtrapolated(Exception):
    """A shallow simulation did not end ok: simulate every layer instead, and let that run say
    what went wrong of the whole model."""


def layers_to_extrapolate(scenario, source) -> Units | None:
    """The model's decoder layers as units (models.Units: one layer each where they are all
    alike, a period of their kinds where those repeat), or None to simulate every layer (too
    few units to gain anything)."""
    from harness.models import layer_units
    from harness.probes.simulate import EXTRAPOLATE_FROM

    units = layer_units(source, scenario.model.trust_remote_code)
    if units is None or units.count <= EXTRAPOLATE_FROM[1] + 1:
        return None
    if units.size > 1 and sum(map(units.layers, EXTRAPOLATE_FROM)) >= units.layers(units.count):
        return None  # periods of many layers: the two shallow runs would cost more than all
    return units


def simulate_deep(scenario, source, variant, train, torch_device, units: Units | int,
                  target: str = "cuda", snapshot_path: Path | None = None,
                  card=None) -> Measured:
    """The step of the model `units` units deep (an int: that many identical layers) from two
    shallow simulations, as `train.measure` would give it; its first note says how it was
    obtained. Raises NotExtrapolated."""
    from harness.probes import make_probe
    from harness.probes.simulate import EXTRAPOLATE_FROM, extrapolate, repeak

    if isinstance(units, int):
        units = Units(1, 0, units)
    layers = units.count
    probes = {depth: make_probe(torch_device, None, simulate=True, target=target, card=card)
              for depth in EXTRAPOLATE_FROM}
    deep = probes[EXTRAPOLATE_FROM[1]]
    deep.label_layers, deep.assemble_to, deep.units = True, layers, units
    (low_outcome, shallow, low, _), (outcome, deeper, result, notes) = (
        measure(scenario, dataclasses.replace(source, layers=units.layers(depth)), variant,
                train, torch_device, None, True, target, probes[depth])
        for depth in EXTRAPOLATE_FROM)
    if low_outcome["status"] != "ok" or outcome["status"] != "ok":
        raise NotExtrapolated(low_outcome["error"] or outcome["error"])
    memory = extrapolate(shallow, deeper, layers)
    shallow_depth, deep_depth = EXTRAPOLATE_FROM
    # How the notes name what was simulated: layers, or periods of layers.
    of = (f"{deep_depth} of the {layers} identical decoder layers" if units.size == 1 else
          f"{deep_depth} of the {layers} periods of {units.size} decoder layers "
          f"({units.layers(deep_depth)} of {units.layers(layers)} layers)")
    what = "layer" if units.size == 1 else "period"
    try:
        assembled, trace = deep.assembly()
        _check(assembled, trace, memory, [len(p.tracker.allocations) for p in probes.values()],
               layers)
    except NotAssembled as why:
        for phase in memory["phases"].values():  # reserved is not affine in depth
            if phase:
                phase["peak_reserved_bytes"] = None
        memory = repeak({**memory, "reserved_model": None})
        note = (f"simulated with {shallow_depth} and {of}, every allocated byte count "
                f"extrapolated one {what} at a time; reserved memory needs --full-depth, which "
                f"simulates every layer (not assembled: {why})")
    else:
        affine = ("paged_optimizer_bytes", "quantized_weight_bytes", "kv_cache_bytes")
        memory = {**assembled, **{key: memory[key] for key in affine  # not in the trace
                                  if key in memory}}
        if snapshot_path is not None:
            from harness.probes.simulate import snapshot_of
            from harness.probes.snapshot import write

            snapshot = snapshot_of(trace)
            if snapshot is not None:
                write(snapshot_path, snapshot)
        note = (f"simulated with {of}, the {units.layers(layers)}-layer step assembled from "
                f"them {what} by {what} (allocation trace, peaks, breakdown, reserved memory) "
                f"and checked against {shallow_depth} {what}s")
    for key in ("params_total", "params_trainable", "quantized_params", "quantized_weight_bytes",
                "saves"):  # a save's written bytes too
        setattr(result, key, extrapolate(getattr(low, key), getattr(result, key), layers))
    return Measured(outcome, memory, result, [note, *notes])


def _check(memory: dict, trace: list, affine: dict, events: list[int], layers: int) -> None:
    """An assembled `layers`-deep step must hold what persists (parameters, grads, state) as
    one layer at a time adds it, and have as many allocation events as one layer at a time
    adds. Raises NotAssembled."""
    from harness.probes.simulate import EXTRAPOLATE_FROM

    low, high = EXTRAPOLATE_FROM
    expected = events[1] + (layers - high) * (events[1] - events[0]) // (high - low)
    if len(trace) != expected:
        raise NotAssembled(f"{len(trace)} allocation events, not {expected}")
    if memory["end_of_step_bytes"] != affine["end_of_step_bytes"]:
        raise NotAssembled("what persists between steps is not what each layer adds")
