"""A deep model from shallow simulations: `simulate_deep` is the one entry.

A model whose decoder layers are all alike is simulated at EXTRAPOLATE_FROM[1] layers with each
allocation event labelled by its layer, and the `layers`-deep step is assembled from that trace
(probes/layers.py: the trace, its peaks, breakdown and reserved memory). It is simulated at
EXTRAPOLATE_FROM[0] layers too, to check the assembly against what one layer adds, and to carry
every allocated byte count to `layers` where the step cannot be assembled (reserved memory is
then unknown: null, and the record says why). Seconds for a 7B model instead of minutes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from harness.probes.layers import NotAssembled
from harness.train import Measured, measure


class NotExtrapolated(Exception):
    """A shallow simulation did not end ok: simulate every layer instead, and let that run say
    what went wrong of the whole model."""


def layers_to_extrapolate(scenario, source) -> int | None:
    """The depth to extrapolate to, or None to simulate every layer (layers not all alike, or
    too few to gain anything)."""
    from harness.models import identical_layers
    from harness.probes.simulate import EXTRAPOLATE_FROM

    layers = identical_layers(source, scenario.model.trust_remote_code)
    return layers if layers is not None and layers > EXTRAPOLATE_FROM[1] + 1 else None


def simulate_deep(scenario, source, variant, train, torch_device, layers: int,
                  target: str = "cuda", snapshot_path: Path | None = None,
                  card=None) -> Measured:
    """The `layers`-deep step from two shallow simulations, as `train.measure` would give it;
    its first note says how it was obtained. Raises NotExtrapolated."""
    from harness.probes import make_probe
    from harness.probes.simulate import EXTRAPOLATE_FROM, extrapolate, repeak

    probes = {depth: make_probe(torch_device, None, simulate=True, target=target, card=card)
              for depth in EXTRAPOLATE_FROM}
    deep = probes[EXTRAPOLATE_FROM[1]]
    deep.label_layers, deep.assemble_to = True, layers
    (low_outcome, shallow, low, _), (outcome, deeper, result, notes) = (
        measure(scenario, dataclasses.replace(source, layers=depth), variant, train,
                torch_device, None, True, target, probes[depth]) for depth in EXTRAPOLATE_FROM)
    if low_outcome["status"] != "ok" or outcome["status"] != "ok":
        raise NotExtrapolated(low_outcome["error"] or outcome["error"])
    memory = extrapolate(shallow, deeper, layers)
    shallow_depth, deep_depth = EXTRAPOLATE_FROM
    try:
        assembled, trace = deep.assembly()
        _check(assembled, trace, memory, [len(p.tracker.allocations) for p in probes.values()],
               layers)
    except NotAssembled as why:
        for phase in memory["phases"].values():  # reserved is not affine in depth
            if phase:
                phase["peak_reserved_bytes"] = None
        memory = repeak({**memory, "reserved_model": None})
        note = (f"simulated with {shallow_depth} and {deep_depth} of the {layers} identical "
                "decoder layers, every allocated byte count extrapolated one layer at a time; "
                f"reserved memory needs --full-depth, which simulates every layer (not "
                f"assembled: {why})")
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
        note = (f"simulated with {deep_depth} of the {layers} identical decoder layers, the "
                f"{layers}-layer step assembled from them layer by layer (allocation trace, "
                f"peaks, breakdown, reserved memory) and checked against {shallow_depth} layers")
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
