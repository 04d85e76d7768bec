"""A deep model's allocation trace, assembled from a shallow simulation of it: reserved memory
for every layer without simulating every layer.

Allocated bytes are affine in depth when the decoder layers are alike (worker.py extrapolates
them from 2 and 3 layers); reserved bytes are not — they depend on which cached segments each
request finds free — so the caching-allocator replay needs the deep trace itself. A 3-layer
simulation labels every allocation event with the layer it belongs to (`label_layers`: layer
i's forward and backward by hooks, its parameters by module, the optimizer step's temporaries
by the parameters they are made from). Layer 1 then is a template: its runs of events are
repeated for layers 1 … N−2, each copy freeing its own blocks and those of its neighbours as
layer 1 frees layer 0's and layer 2's; layer 0 stays first, layer 2 becomes layer N−1.

The one thing to know: the assembly checks itself. Every free must find its block live, every
free of a neighbour's block must find the template's matching one, and worker.py holds the
result to a 2-layer run (one layer adds as many allocation events, and what persists between
steps, as assembly added per layer); otherwise allocated bytes are extrapolated one layer at
a time and reserved stays unknown rather than guessed. Peaks come from the assembled trace, not
from that extrapolation: a peak is a maximum over moments, and which moment is highest can
change with depth (kept hidden states outgrow the previous step's grads).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from harness.probes.timeline import Phase

TEMPLATE = 1  # the layer that is repeated; layers 0 and 2 keep the ends as they are
DEPTH = 3  # layers in the labelled simulation


class NotAssembled(ValueError):
    """The labelled trace does not repeat layer by layer as assembly needs (the reason)."""


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The model's list of decoder layers (under PEFT's wrappers too): the list of
    `num_hidden_layers` modules of one class (Llama's `model.layers`, GPT-2's `transformer.h`),
    never the image encoder's blocks (a vision-language model's)."""
    from harness.images import vision_encoder

    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    count = getattr(text, "num_hidden_layers", None)  # a multimodal model's language model's
    encoder = vision_encoder(model)
    vision = set() if encoder is None else {id(m) for m in encoder.modules()}
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count and \
                len({type(layer) for layer in module}) == 1 and id(module) not in vision:
            return module
    return None


def own_layers(tracker, model: torch.nn.Module, layers: torch.nn.ModuleList,
               copy_of=lambda t: t, unit_of=lambda layer: layer) -> None:
    """Each layer's parameters, buffers and quantization state belong to it (to its unit,
    `unit_of`: a period of layers where their kinds repeat); the model's others (embedding,
    final norm, head) to no layer."""
    from harness.models import quantized_weights

    if tracker.labels is None:
        tracker.labels = [None] * len(tracker.allocations)  # no layer ran before
    for t in itertools.chain(model.parameters(), model.buffers(), quantized_weights(model)):
        tracker.own(copy_of(t), None)
    for index, layer in enumerate(layers):
        for t in itertools.chain(layer.parameters(), layer.buffers(), quantized_weights(layer)):
            tracker.own(copy_of(t), unit_of(index))


def label_layers(tracker, model: torch.nn.Module, layers: torch.nn.ModuleList,
                 copy_of=lambda t: t, unit_of=lambda layer: layer) -> list:
    """Label `tracker`'s trace by decoder layer — by unit, `unit_of`, where a period of layers
    repeats: the layers of one unit share its label — each layer's parameters and buffers
    belong to it (`copy_of` gives the fake tensor the tracker counts for a real one), and
    hooks set `tracker.layer` while its forward runs and from the moment the gradient of its
    output exists (its backward starts) until the next layer's does. Returns the hook
    handles."""
    own_layers(tracker, model, layers, copy_of, unit_of)
    handles = []

    def enter_backward(index):
        def hook(grad):
            tracker.layer = index
        return hook

    for index, layer in enumerate(layers):
        def pre(module, args, kwargs, index=index):
            tracker.layer = unit_of(index)
            hidden = args[0] if args else kwargs.get("hidden_states")
            # Below layer 0 no layer runs: its input's gradient ends the last layer backward.
            if index == 0 and isinstance(hidden, torch.Tensor) and hidden.requires_grad:
                hidden.register_hook(enter_backward(None))

        def post(module, args, kwargs, output, index=index):
            # The layer keeps its label until the next one starts: what the model's loop does
            # between layers (dropping the previous hidden state) repeats with each layer. After
            # the last, the head and loss are the top layer's, which is not repeated. (A
            # checkpointed layer's recomputation in backward runs these hooks again, with the
            # label backward gave it.)
            hidden = output[0] if isinstance(output, tuple) else output
            if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
                hidden.register_hook(enter_backward(unit_of(index)))

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.register_forward_hook(post, with_kwargs=True))

    def outside_layers(*_):
        # A no-grad forward of the whole model (an evaluation batch, a generated token) starts
        # and ends outside every layer: no backward hands the label back between two of them,
        # and what the caller frees afterwards (a generation's cache) is its owners' work.
        if not torch.is_grad_enabled():
            tracker.layer = None

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    for module in {id(model): model, id(inner): inner}.values():  # generate() calls the inner
        handles.append(module.register_forward_pre_hook(outside_layers))
        handles.append(module.register_forward_hook(outside_layers))
    return handles


@dataclass
class _Run:
    label: int | None
    events: list[int]  # indices into the trace
    cut: tuple[int, Phase] | None = None  # a phase boundary, a run of its own: (0 start | 1 end)


def assemble(allocations: Sequence[tuple[int, int, int]], labels: Sequence[int | None],
             owners: dict[int, int | None], phases: Sequence[Phase],
             layers: int) -> tuple[list[tuple[int, int, int]], list[Phase], dict[int, int]]:
    """The trace of a `layers`-deep model, from a labelled DEPTH-layer one: (allocations,
    phases, origin) on a new clock (one tick per event), origin mapping each new trace id to
    the one it repeats. Raises NotAssembled."""
    if layers < DEPTH:
        raise NotAssembled(f"cannot assemble {layers} layers from {DEPTH}")
    order = sorted(range(len(allocations)),
                   key=lambda i: (allocations[i][0], allocations[i][2] < 0))
    marks = sorted([(p.start_ns, 0, p) for p in phases] + [(p.end_ns, 1, p) for p in phases],
                   key=lambda m: (m[0], m[1]))
    # An event's label: the layer running when it happened, else the layer its block belongs to.
    label = [labels[i] if labels[i] is not None else owners.get(allocations[i][1])
             for i in range(len(allocations))]
    born = {allocations[i][1]: label[i] for i in order if allocations[i][2] > 0}

    def frees_only(run: _Run) -> bool:
        return run.cut is None and all(allocations[i][2] < 0 for i in run.events)

    runs: list[_Run] = []
    m = 0
    for i in order:
        t = allocations[i][0]
        # A phase holds the events at its start and end times (as timeline.peak_within reads).
        while m < len(marks) and (marks[m][0] < t or marks[m][0] == t and marks[m][1] == 0):
            runs.append(_Run(None, [], marks[m][1:]))
            m += 1
        if runs and runs[-1].label == label[i] and runs[-1].cut is None:
            runs[-1].events.append(i)
        else:
            runs.append(_Run(label[i], [i]))
        # Frees of another layer's blocks amid one layer's work (a per-parameter optimizer loop
        # drops the previous parameter's temporaries while at the next) are part of that work:
        # the same frees come at the same place in every layer's. (After the job's last phase
        # what remains is freed in whatever order its holders die, each block by its owner.)
        if m < len(marks) and len(runs) >= 3 and frees_only(runs[-2]) and \
                runs[-2].label != label[i] and runs[-3].label == label[i] is not None and \
                runs[-3].cut is None:
            kept = runs.pop()
            between = runs.pop()
            runs[-1].events += between.events + kept.events
    runs += [_Run(None, [], mark[1:]) for mark in marks[m:]]

    direction = _directions(runs)
    partner = _partners(runs, allocations)

    def source(layer: int) -> int:
        return 0 if layer == 0 else DEPTH - 1 if layer == layers - 1 else TEMPLATE

    out: list[tuple[int, int, int]] = []
    live: dict[tuple, int] = {}
    origin: dict[int, int] = {}
    new_ids = itertools.count(1)
    clock = itertools.count()
    spans: dict[int, list[int]] = {}  # phase → [start, end] on the new clock

    def emit(i: int, layer: int | None, own: int | None) -> None:
        """Event i, as an event of output layer `layer` (its source layer `own`)."""
        _, key, delta = allocations[i]
        owner = born.get(key)
        if delta > 0 or owner is None:
            if delta < 0 and own == TEMPLATE:
                raise NotAssembled(f"layer {TEMPLATE} frees a block that belongs to no layer")
            name = (layer if delta > 0 else None, key)
        else:  # a layer's block, freed by the same layer, a neighbour, or after the step
            target = layer + owner - own
            if abs(owner - own) > 1:
                raise NotAssembled(f"layer {own} frees a block of layer {owner}")
            if source(target) != owner:  # a repeated layer's: the template's block made there
                key = partner.get(key)
                if key is None:
                    raise NotAssembled(f"no block of layer {TEMPLATE} matches one of layer "
                                       f"{owner} that layer {own} frees")
            name = (target, key)
        if delta > 0:
            if name in live:
                raise NotAssembled("a block is allocated twice")
            live[name] = next(new_ids)
            origin[live[name]] = allocations[i][1]
            out.append((next(clock), live[name], delta))
        else:
            if name not in live:
                raise NotAssembled("a block is freed that is not live")
            out.append((next(clock), live.pop(name), delta))

    for r, run in enumerate(runs):
        if run.cut is not None:
            edge, phase = run.cut
            spans.setdefault(id(phase), [0, 0])[edge] = next(clock)
        elif run.label == TEMPLATE:
            copies = range(1, layers - 1)
            for layer in (copies if direction[r] > 0 else reversed(copies)):
                for i in run.events:
                    emit(i, layer, TEMPLATE)
        else:
            layer = None if run.label is None else 0 if run.label == 0 else layers - 1
            for i in run.events:
                emit(i, layer, run.label)
    return out, [dataclasses.replace(p, start_ns=spans[id(p)][0], end_ns=spans[id(p)][1])
                 for p in phases], origin


def _directions(runs: list[_Run]) -> dict[int, int]:
    """+1 where a template run sits between layer 0's and layer 2's (forward, the optimizer's
    parameter order), −1 where between layer 2's and 0's (backward)."""
    direction = {}
    for r, run in enumerate(runs):
        if run.label != TEMPLATE:
            continue
        before = next((x.label for x in reversed(runs[:r]) if x.label in (0, DEPTH - 1)), None)
        after = next((x.label for x in runs[r + 1:] if x.label in (0, DEPTH - 1)), None)
        votes = {+1 if before == 0 or after == DEPTH - 1 else 0,
                 -1 if before == DEPTH - 1 or after == 0 else 0} - {0}
        if len(votes) != 1:
            raise NotAssembled(f"layer {TEMPLATE}'s events (run {r}) sit between no other "
                               "layer's")
        direction[r] = votes.pop()
    return direction


def _partners(runs: list[_Run], allocations) -> dict[int, int]:
    """A block of layer 0 or 2 → the block of the template layer made at the same place: the
    same allocation, by order, in the nearest run of the template's. Where the run is longer
    than the template's (the last unit of a repeating pattern also holds the layers past its
    last whole period, which run after its period in forward and before it in backward), the
    order is counted from the side the two runs share: the start where the template's run
    comes first, the end where it follows."""
    template = [r for r, run in enumerate(runs) if run.label == TEMPLATE]
    partner = {}
    for r, run in enumerate(runs):
        if run.label not in (0, DEPTH - 1) or not template:
            continue
        near = min(template, key=lambda t: abs(t - r))
        mine = [allocations[i] for i in run.events if allocations[i][2] > 0]
        theirs = [allocations[i] for i in runs[near].events if allocations[i][2] > 0]
        if len(mine) != len(theirs) and near > r:
            mine, theirs = mine[::-1], theirs[::-1]
        for a, b in zip(mine, theirs, strict=False):
            if a[2] == b[2]:
                partner[a[1]] = b[1]
    return partner
