"""The library internals the harness patches (harness/patches.py): each symbol still where, and
shaped as, the patch was written against — a failure names the symbol and the versions — and
each patch has its effect: with it the behaviour it exists for happens, without it not."""

from __future__ import annotations

import contextlib
import importlib.metadata
import inspect
import re

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

from harness import patches
from harness.patches import PATCHES, Patch, SteppingScaler, check_targets, resolve
from harness.probes.timeline import Kind, round_block
from harness.probes.tracker import Tracker
from tests.conftest import REPO

TARGETS = [(patch, target) for patch in PATCHES for target in patch.targets]
BY_NAME = {patch.name: patch for patch in PATCHES}


@pytest.mark.parametrize(("patch", "target"), TARGETS, ids=[t for _, t in TARGETS])
def test_each_patched_symbol_is_where_and_as_it_was_written_against(patch, target):
    problems = check_targets([Patch(patch.name, {target: patch.targets[target]},
                                    patch.written_against, patch.why)])
    if problems:
        pytest.fail("a patched library symbol moved or changed its parameters — re-read it and "
                    "update harness/patches.py:\n" + "\n".join(problems), pytrace=False)


def test_a_moved_or_reshaped_symbol_is_reported_with_the_symbol_and_the_versions():
    torch_version = importlib.metadata.version("torch")
    moved = Patch("moved", {"torch.amp.grad_scaler:GradScaler._gone": ("self",),
                            "torch.no_such_module:thing": ()}, {"torch": "2.13.0"}, "")
    reshaped = Patch("reshaped", {patches.MAYBE_OPT_STEP: ("self", "optimizer")},
                     {"torch": "2.13.0"}, "")
    problems = check_targets([moved, reshaped])
    assert len(problems) == 3, problems
    for problem, symbol in zip(problems, ["GradScaler._gone", "torch.no_such_module",
                                          patches.MAYBE_OPT_STEP], strict=True):
        assert symbol in problem
        assert "written against torch 2.13.0" in problem
        assert f"installed: torch {torch_version}" in problem
    assert "(self, optimizer, optimizer_state, *args, **kwargs)" in problems[2]


def test_the_table_names_what_the_module_applies_and_every_target_resolves():
    for patch in PATCHES:
        assert hasattr(patches, patch.name), patch.name
        assert patch.written_against and patch.why
        for target in patch.targets:
            owner, name, symbol = resolve(target)
            assert getattr(owner, name) is symbol


def test_no_other_module_patches_library_internals():
    # What the patches module is for: a patch written anywhere else has no versions and no test.
    pattern = re.compile(r"mock\.patch|import mock|def _maybe_opt_step|\bmasking_utils\b"
                         r"|\b_fsdp_param")
    offenders = [str(path.relative_to(REPO)) for path in (REPO / "harness").rglob("*.py")
                 if path.name != "patches.py" and pattern.search(path.read_text())]
    assert not offenders, offenders


# ---------------------------------------------------------------------------------------------
# unpacked_batches


def _causal_mask(position_ids: torch.Tensor):
    from transformers import LlamaConfig, masking_utils

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=4, num_hidden_layers=1, vocab_size=64)
    config._attn_implementation = "sdpa"
    batch, seq = position_ids.shape
    # The cache argument is `cache` in transformers 5.2x, `past_key_values` in 5.17.
    names = inspect.signature(masking_utils.create_causal_mask).parameters
    cache = {"cache": None} if "cache" in names else {"past_key_values": None}
    return masking_utils.create_causal_mask(config=config, inputs_embeds=torch.empty(
        batch, seq, config.hidden_size), attention_mask=None, position_ids=position_ids,
        **cache)


def test_unpacked_batches_lets_sdpa_run_causal_on_fake_position_ids():
    with FakeTensorMode(allow_non_fake_inputs=True):
        positions = torch.arange(16).expand(2, 16)
        unanswered = _causal_mask(positions)
        with patches.unpacked_batches():
            answered = _causal_mask(positions)
    assert unanswered is not None and tuple(unanswered.shape) == (2, 1, 16, 16)
    assert answered is None  # as a real run of one sequence per row: no mask, is_causal


def test_unpacked_batches_leaves_real_position_ids_to_transformers():
    from transformers import masking_utils

    original = masking_utils.find_packed_sequence_indices
    packed = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])
    with patches.unpacked_batches():
        assert masking_utils.find_packed_sequence_indices is not original
        assert _causal_mask(torch.arange(8).expand(2, 8)) is None
        assert torch.equal(masking_utils.find_packed_sequence_indices(packed),
                           original(packed))
    assert masking_utils.find_packed_sequence_indices is original


# ---------------------------------------------------------------------------------------------
# SteppingScaler


def _overflowed_step(scaler_type) -> tuple[torch.Tensor, float]:
    """The weights and the scale after a step whose gradient overflowed."""
    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scaler = scaler_type("cpu", init_scale=1024.0)
    (scaler.scale(weight.sum()) * float("inf")).backward()
    scaler.step(optimizer)
    scaler.update()
    return weight.detach(), scaler.get_scale()


def test_stepping_scaler_steps_where_gradscaler_would_skip_and_still_backs_off():
    skipped, plain_scale = _overflowed_step(torch.amp.GradScaler)
    stepped, stepping_scale = _overflowed_step(SteppingScaler)
    assert torch.equal(skipped, torch.ones(4))  # GradScaler skips an overflowed step
    assert not torch.equal(stepped, torch.ones(4))  # ours takes it
    assert plain_scale == stepping_scale == 512.0  # overflow check and update as ever


def test_stepping_scaler_steps_on_fake_tensors_where_gradscaler_cannot():
    for scaler_type in (torch.amp.GradScaler, SteppingScaler):
        with FakeTensorMode():
            weight = torch.nn.Parameter(torch.ones(4))
            optimizer = torch.optim.SGD([weight], lr=0.1)
            scaler = scaler_type("cpu")
            scaler.scale(weight.sum()).backward()
            raised = pytest.raises(DataDependentOutputException) \
                if scaler_type is torch.amp.GradScaler else contextlib.nullcontext()
            with raised:  # GradScaler asks found_inf.item(), which a fake tensor cannot answer
                scaler.step(optimizer)


def test_stepping_scaler_overrides_the_method_gradscaler_steps_through():
    assert "_maybe_opt_step" in vars(SteppingScaler)
    assert "self._maybe_opt_step(" in inspect.getsource(torch.amp.GradScaler.step)


# ---------------------------------------------------------------------------------------------
# fsdp2_storage_traced

LAYERS, WIDTH = 2, 64


def _sharded_step(world_size: int, traced: bool) -> tuple[Tracker, int]:
    """One forward + backward of a two-layer FSDP2 model (fake tensors, PyTorch's fake process
    group, as a simulation runs it); the tracker and its traced bytes alive after the forward."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from harness.parallel import fake_group
    from harness.scenario import ParallelSpec

    with fake_group(ParallelSpec("fsdp2", world_size), rank=0):
        with torch.device("meta"):
            model = torch.nn.Sequential(*(torch.nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)))
        mesh = init_device_mesh("cpu", (world_size,))
        for layer in model:
            fully_shard(layer, mesh=mesh)  # reshard_after_forward: gathered again in backward
        fully_shard(model, mesh=mesh)
        tracker = Tracker(trace_allocations=True)
        with FakeTensorMode(allow_non_fake_inputs=True):
            model.to_empty(device="cpu")
            tracker.sight(Kind.PARAM, list(model.parameters()))
            hooks = patches.fsdp2_storage_traced(tracker) if traced else contextlib.nullcontext()
            with hooks, tracker:
                out = model(torch.ones(2, WIDTH))
                after_forward = sum(delta for _, _, delta in tracker.allocations)
                out.sum().backward()
    return tracker, after_forward


@pytest.mark.parametrize("world_size", [1, 2])  # 1: FSDP2 copies in rather than all-gathers
def test_fsdp2_storage_traced_puts_the_frees_of_gathered_parameters_in_the_trace(world_size):
    traced, traced_after_forward = _sharded_step(world_size, traced=True)
    untraced, untraced_after_forward = _sharded_step(world_size, traced=False)
    # Each layer frees its gathered parameters after its forward by resizing their storage:
    # only with the patch does the trace see those frees.
    gathered = LAYERS * (round_block(WIDTH * WIDTH * 4) + round_block(WIDTH * 4))
    assert untraced_after_forward - traced_after_forward == gathered
    comm = [s for s in traced.sightings if s[2] == Kind.COMM]
    # Each parameter gathered twice (forward, backward): its all-gather output and the
    # unsharded parameter viewing it.
    assert len(comm) == 2 * 2 * 2 * LAYERS
    assert not [s for s in untraced.sightings if s[2] == Kind.COMM]


def _calls_by_global_name(module, name: str) -> bool:
    """Whether some function of `module` (or a method of its classes, decorated or not) looks
    `name` up in the module's globals, the lookup that setting the module's attribute reaches."""
    functions = [f for f in vars(module).values() if callable(f)]
    for cls in (c for c in vars(module).values() if inspect.isclass(c)):
        functions += [f for f in vars(cls).values() if callable(f)]
    codes = [inspect.unwrap(f).__code__ for f in functions
             if inspect.isfunction(inspect.unwrap(f))
             and inspect.unwrap(f).__module__ == module.__name__]
    return any(name in code.co_names for code in codes)


def test_fsdp2_storage_traced_traces_fsdp2s_own_resizes_as_they_happen():
    # Where a resize is followed by an op writing into the storage (the all-gather's copy-out)
    # the op's output is seen anyway; the patch puts the allocation where the resize is.
    from torch.distributed.fsdp._fully_shard import _fsdp_param, _fsdp_param_group

    for module, name in ((_fsdp_param, "alloc_storage"), (_fsdp_param, "free_storage"),
                         (_fsdp_param_group, "alloc_storage")):
        assert _calls_by_global_name(module, name), f"{module.__name__} no longer calls {name}"
    size = round_block(WIDTH * WIDTH * 4)
    for traced in (True, False):
        tracker = Tracker(trace_allocations=True)
        with FakeTensorMode():
            gathered = torch.empty(WIDTH, WIDTH)
            tracker.sight(Kind.COMM, gathered)
            hooks = patches.fsdp2_storage_traced(tracker) if traced else contextlib.nullcontext()
            with hooks:
                _fsdp_param.free_storage(gathered)
                freed = [delta for _, _, delta in tracker.allocations]
                _fsdp_param_group.alloc_storage(gathered)
                again = [delta for _, _, delta in tracker.allocations]
                _fsdp_param.free_storage(gathered)
                _fsdp_param.alloc_storage(gathered)
                last = [delta for _, _, delta in tracker.allocations]
        assert gathered.untyped_storage().nbytes() == WIDTH * WIDTH * 4
        if traced:
            assert (freed, again, last) == ([size, -size], [size, -size, size],
                                            [size, -size, size, -size, size])
        else:  # the trace keeps the first storage alive through every resize
            assert freed == again == last == [size]


def test_fsdp2_storage_traced_replaces_each_target_only_while_active():
    originals = {target: resolve(target)[2] for target in BY_NAME["fsdp2_storage_traced"].targets}
    with patches.fsdp2_storage_traced(Tracker()):
        for target, original in originals.items():
            assert resolve(target)[2] is not original, target
    for target, original in originals.items():
        assert resolve(target)[2] is original, target
