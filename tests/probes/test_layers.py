"""A deep model's allocation trace assembled from a labelled 3-layer simulation: event for event
the trace of simulating every layer, on hand-made traces and on real models' steps."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from harness.probes import make_probe
from harness.probes.allocator import replay
from harness.probes.layers import NotAssembled, assemble
from harness.probes.timeline import Phase
from tests.conftest import REPO, write_scenario


def canonical(trace) -> list[tuple[int, int]]:
    """(±bytes, which allocation) per event in time order: equal for two traces when the same
    sizes are allocated and freed in the same order, whatever their ids and clocks."""
    order, out = {}, []
    for _, key, delta in sorted(trace, key=lambda a: (a[0], a[2] < 0)):
        if delta > 0:
            order[key] = len(order)
        out.append((delta, order[key]))
    return out


def layered(depth: int) -> tuple[list, list, dict, list[Phase]]:
    """A hand-made labelled step of `depth` layers: each layer's forward keeps an activation
    and drops the previous layer's output; backward frees the activation and the gradient
    the layer above handed down; a global block lives throughout."""
    trace, labels, owners = [], [], {}
    ids = iter(range(1, 10_000))

    def event(key, delta, label, owner=None):
        trace.append((len(trace) * 10 + 5, key, delta))
        labels.append(label)
        if delta > 0:
            owners[key] = owner if owner is not None else label

    glob = next(ids)
    event(glob, 4096, None)
    outputs, saved = [], []
    for layer in range(depth):
        saved.append(next(ids))
        event(saved[-1], 1024, layer)
        outputs.append(next(ids))
        event(outputs[-1], 512, layer)
        if layer:
            event(outputs[layer - 1], -512, layer)
    forward_end = len(trace) * 10
    grad = outputs[-1]  # the head hands the top layer its gradient in the top output's block
    for layer in reversed(range(depth)):
        new = next(ids)
        event(new, 512, layer)
        event(saved[layer], -1024, layer)
        event(grad, -512, layer)
        grad = new
    event(grad, -512, None, None)
    event(glob, -4096, None)
    phases = [Phase("forward", 0, 0, forward_end), Phase("backward", 0, forward_end + 1,
                                                          len(trace) * 10)]
    return trace, labels, owners, phases


@pytest.mark.parametrize("layers", [3, 4, 7])
def test_a_hand_made_step_assembles_into_the_deeper_one(layers):
    trace, phases, origin = assemble(*layered(3), layers)
    assert canonical(trace) == canonical(layered(layers)[0])
    assert set(origin) == {key for _, key, delta in trace if delta > 0}
    # Phases keep their events: forward holds every layer's allocations.
    forward = [e for e in trace if phases[0].start_ns <= e[0] <= phases[0].end_ns]
    assert sum(1 for e in forward if e[2] == 1024) == layers


def test_a_repeated_layer_that_frees_a_global_block_is_not_assembled():
    trace, labels, owners, phases = layered(3)
    # Layer 1 now frees the global block (id 1) instead of its saved activation.
    i = next(i for i, (_, key, delta) in enumerate(trace) if delta == -1024 and labels[i] == 1)
    trace[i] = (trace[i][0], 1, -4096)
    with pytest.raises(NotAssembled, match="belongs to no layer"):
        assemble(trace, labels, owners, phases, 7)


def test_a_layer_that_frees_a_block_two_layers_away_is_not_assembled():
    trace, labels, owners, phases = layered(3)
    # Layers 0 and 2 swap which saved activation their backward frees.
    frees = {labels[i]: i for i, (_, _, delta) in enumerate(trace) if delta == -1024}
    (a, b) = frees[0], frees[2]
    trace[a], trace[b] = (trace[a][0], trace[b][1], -1024), (trace[b][0], trace[a][1], -1024)
    with pytest.raises(NotAssembled, match="frees a block of layer"):
        assemble(trace, labels, owners, phases, 7)


LORA = {"lora": {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj",
                                                                "o_proj"]}}
STACKS = {
    "fp32": [],
    "bf16-gc-sgd": ["bf16", "gradient_checkpointing"],
    "lora-gc-chunked": ["bf16", LORA, "gradient_checkpointing", {"chunked_nll": {"chunk_size": 64}}],
    "qlora": [{"qlora": LORA["lora"]}],
    "bf16-adamw-8bit": ["bf16"],
    "bf16-adafactor": ["bf16"],  # a per-parameter loop of scalar ops in its step
}
OPTIMIZER = {"bf16-gc-sgd": "sgd", "bf16-adamw-8bit": "adamw_8bit", "bf16-adafactor": "adafactor"}


@pytest.fixture(scope="module")
def deep_scenario(tmp_path_factory):
    from harness.models import resolve_config
    from harness.scenario import load_scenario

    folder = tmp_path_factory.mktemp("layers")
    config = json.loads((REPO / "scenarios" / "models" / "tiny-llama.json").read_text())
    (folder / "deep.json").write_text(json.dumps({**config, "num_hidden_layers": 6}))
    variants = [{"name": name, "techniques": stack,
                 **({"train": {"optimizer": OPTIMIZER[name]}} if name in OPTIMIZER else {})}
                for name, stack in STACKS.items()]
    scenario = load_scenario(write_scenario(folder, "deep", variants,
                                            model={"config": "./deep.json"}))
    return scenario, resolve_config(scenario.model, scenario.path)


def simulate(scenario, source, name: str, layers: int, assemble_to: int | None = None):
    from harness.train import measure

    variant = scenario.variant(name)
    probe = make_probe(torch.device("cpu"), None, simulate=True)
    probe.label_layers, probe.assemble_to = assemble_to is not None, assemble_to
    outcome, memory, *_ = measure(scenario, dataclasses.replace(source, layers=layers), variant,
                                  variant.train, torch.device("cpu"), None, True, "cuda", probe)
    assert outcome["status"] == "ok", outcome
    probe.stop_memory = memory
    return probe


@pytest.mark.slow  # two simulations per stack, of a 3- and a 6-layer model
@pytest.mark.parametrize("name", list(STACKS))
def test_a_simulated_step_assembled_from_three_layers_is_the_six_layer_one(deep_scenario, name):
    """Event for event: the same sizes allocated and freed in the same order, so the
    caching-allocator replay reserves exactly what it reserves for the real 6-layer trace."""
    scenario, source = deep_scenario
    memory, trace = simulate(scenario, source, name, 3, assemble_to=6).assembly()
    full = simulate(scenario, source, name, 6)
    assert canonical(trace) == canonical(full.tracker.allocations)
    for expandable in (False, True):
        assert max(r for _, r in replay(trace, expandable)) == \
            max(r for _, r in replay(full.tracker.allocations, expandable))


@pytest.mark.slow
def test_assembly_gets_right_what_one_layer_at_a_time_does_not(deep_scenario):
    """With checkpointing and SGD the forward peak of a shallow model is the previous step's
    grads still held at zero_grad; deeper, the kept hidden states win. Peaks are maxima, not
    affine in depth: carried from 2 and 3 layers they miss that; the assembled trace does not."""
    from harness.probes.simulate import extrapolate

    scenario, source = deep_scenario
    name = "bf16-gc-sgd"
    shallow, deeper = (simulate(scenario, source, name, depth).stop_memory for depth in (2, 3))
    full = simulate(scenario, source, name, 6).stop_memory
    assembled = simulate(scenario, source, name, 3, assemble_to=6).assembly()[0]
    affine = extrapolate(shallow, deeper, 6)
    forward = {m["phases"]["forward"]["peak_allocated_bytes"] for m in (full, assembled)}
    assert len(forward) == 1
    assert affine["phases"]["forward"]["peak_allocated_bytes"] < forward.pop()
    # Every figure of the step (paged and quantized bytes come from the build, not the trace).
    assert assembled == {k: v for k, v in full.items()
                         if k not in ("paged_optimizer_bytes", "quantized_weight_bytes")}


@pytest.mark.slow
def test_a_step_that_cannot_be_assembled_is_carried_one_layer_at_a_time(deep_scenario,
                                                                        monkeypatch):
    """Where assembly fails, allocated figures are extrapolated, reserved memory is unknown
    (null, not a guess) and the record says why."""
    from harness.depth import simulate_deep
    from harness.probes import simulate as simulation

    def refuse(*args):
        raise NotAssembled("refused for the test")

    monkeypatch.setattr(simulation, "assemble", refuse)
    scenario, source = deep_scenario
    variant = scenario.variant("fp32")
    outcome, memory, result, notes = simulate_deep(scenario, source, variant, variant.train,
                                                   torch.device("cpu"), 6)
    full = simulate(scenario, source, "fp32", 6).stop_memory
    assert outcome["status"] == "ok"
    assert memory["peak_allocated_bytes"] == full["peak_allocated_bytes"]
    assert memory["peak_reserved_bytes"] is None and memory["reserved_model"] is None
    assert "refused for the test" in notes[0] and "--full-depth" in notes[0]
