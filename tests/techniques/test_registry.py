"""What a technique can do is declared on it: the estimate, the simulator, parallel training and
the tables ask the technique (or the optimizer), never a list of names."""

from __future__ import annotations

import pytest

from harness.estimate import NotModelled, read_stack
from harness.optimizers import OPTIMIZERS, OptimizerSpec
from harness.parallel import unsupported_reason
from harness.scenario import ParallelSpec, TrainSpec, load_scenario
from harness.techniques import (
    APPLY_ORDER,
    REGISTRY,
    Stage,
    TechniqueUse,
    ordered,
    stack_label,
    technique,
)


def test_apply_order_names_every_technique_once_with_stages_in_order():
    assert sorted(APPLY_ORDER) == sorted(REGISTRY)
    stages = [REGISTRY[name].stage for name in APPLY_ORDER]
    assert stages == sorted(stages)
    yaml_order = (TechniqueUse("compile"), TechniqueUse("gradient_checkpointing"),
                  TechniqueUse("chunked_nll", {"chunk_size": 256, "impl": "harness"}),
                  TechniqueUse("bf16"))
    assert [t.name for t, _ in ordered(yaml_order)] == [
        "bf16", "chunked_nll", "gradient_checkpointing", "compile"]


def test_a_technique_must_say_its_estimate_or_why_it_has_none():
    with pytest.raises(RuntimeError, match="estimate or why"):
        technique("bf16_new", stage=Stage.LOAD)(lambda ctx: None)
    with pytest.raises(RuntimeError, match="no place in APPLY_ORDER"):
        technique("brand_new", stage=Stage.MODEL, not_estimated="x")(lambda ctx: None)
    with pytest.raises(RuntimeError, match="estimate or why"):
        OptimizerSpec("new", lambda params, train: None, "doc")
    assert "bf16_new" not in REGISTRY and "brand_new" not in REGISTRY


@pytest.mark.parametrize("name", [n for n, t in REGISTRY.items() if t.estimate is None])
def test_a_technique_without_an_estimate_is_not_modelled_with_its_reason(name):
    tech = REGISTRY[name]
    with pytest.raises(NotModelled, match=f"^{name}: ") as e:
        read_stack([TechniqueUse(name, {})], TrainSpec(), "sdpa")
    assert tech.not_estimated in str(e.value)


def test_estimates_compose_in_apply_order():
    train = TrainSpec()
    qlora = load_scenario("qlora_mistral").variant("qlora-gc-chunked")
    stack = read_stack(qlora.techniques, train, "sdpa")
    assert stack.quantized and stack.checkpointing and stack.chunk == 256
    assert not stack.trainable_base and stack.rank == 16
    assert read_stack([TechniqueUse("bf16")], train, "sdpa").weight_bytes == 2
    # QLoRA applies after bf16, whatever the YAML's order: PEFT's k-bit preparation up-casts
    # the non-quantized weights to fp32, over bf16's 2 bytes; without it, the compute dtype.
    quantized = next(u for u in qlora.techniques if u.name == "qlora")
    assert read_stack([quantized, TechniqueUse("bf16")], train, "sdpa").weight_bytes == 4
    unprepared = TechniqueUse("qlora", {**quantized.args, "prepare_model_for_kbit_training": False})
    assert read_stack([unprepared, TechniqueUse("bf16")], train, "sdpa").weight_bytes == 2


def test_optimizers_declare_their_estimate_as_techniques_do():
    assert OPTIMIZERS["adafactor"].estimate is None and OPTIMIZERS["adafactor"].not_estimated
    from harness.estimate import Tensor, optimizer_state

    with pytest.raises(NotModelled, match="^optimizer adafactor: "):
        optimizer_state([], "adafactor")
    weights = [Tensor(numel=8192, nbytes=32768, trainable=True)]
    foreach, paged = optimizer_state(weights, "adamw"), optimizer_state(weights, "paged_adamw_8bit")
    assert foreach == (2 * 32768, 0, 32768)  # two moments (the step count: a CPU scalar on
    # CUDA); one moment's temporary
    assert optimizer_state(weights, "adamw", "cpu")[0] == 2 * 32768 + 512  # on CPU it counts
    assert optimizer_state(weights, "adamw_fused")[0] == 2 * 32768 + 512  # fused: on the device
    assert paged[0] == 0 and paged[1] > 0  # paged state is not on the device


def test_the_table_label_tells_apart_rows_that_differ_by_arguments_or_optimizer():
    scenario = load_scenario("qlora_mistral")
    labels = [stack_label(v.techniques, v.train.optimizer) for v in scenario.variants]
    assert len(set(labels)) == len(labels)
    assert labels[-1].endswith(" · adamw_8bit") and "qlora(r=16, " in labels[-1]


def test_the_parallel_reason_comes_from_the_technique():
    qlora = load_scenario("qlora_mistral").variant("qlora")
    import torch

    fsdp2, ddp = ParallelSpec("fsdp2", 2), ParallelSpec("ddp", 2)
    assert "QLoRA under FSDP2" in unsupported_reason(fsdp2, qlora.techniques,
                                                      torch.device("cpu"), False)
    assert unsupported_reason(ddp, qlora.techniques, torch.device("cpu"), False) is None
