"""QLoRA and LLM.int8 base weights, quantized by bitsandbytes on CPU from random weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from harness.models import resolve_config
from harness.scenario import ModelSpec, ScenarioError, load_scenario
from harness.techniques import REGISTRY, TechniqueUse
from harness.train import build
from tests.conftest import REPO, run_cpu, write_scenario

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    return run_cpu(tmp_path_factory.mktemp("quantized"), "quantized", [
        {"name": "lora", "techniques": ["bf16", {"lora": {"r": 16, "target_modules": ALL_LINEAR}}]},
        {"name": "qlora", "techniques": [{"qlora": {"r": 16, "target_modules": ALL_LINEAR}}]},
        {"name": "qlora-no-upcast", "techniques": [{"qlora": {
            "r": 16, "target_modules": ALL_LINEAR, "prepare_model_for_kbit_training": False}}]},
        {"name": "int8-lora", "techniques": ["int8", {"lora": {"r": 16, "target_modules": ALL_LINEAR}}]},
        {"name": "qdora", "techniques": [{"qlora": {"r": 16, "target_modules": ALL_LINEAR,
                                                   "use_dora": True}}]},
    ])


def _ratio_to_bf16(record) -> float:
    return record["memory"]["quantized_weight_bytes"] / (2 * record["model"]["quantized_params"])


@pytest.mark.slow
def test_qlora_base_weights_take_a_quarter_to_a_third_of_bf16(quantized):
    assert 0.25 <= _ratio_to_bf16(quantized["qlora"]) <= 1 / 3
    assert quantized["qlora"]["model"]["params_total"] == quantized["lora"]["model"]["params_total"]


@pytest.mark.slow
def test_int8_base_weights_take_about_half_of_bf16(quantized):
    assert 0.5 <= _ratio_to_bf16(quantized["int8-lora"]) <= 0.55


@pytest.mark.slow
def test_the_fp32_upcast_of_kbit_preparation_is_visible(quantized):
    upcast, plain = quantized["qlora"], quantized["qlora-no-upcast"]
    model = upcast["model"]
    # Embeddings, norms and the LM head go from bf16 to fp32: 2 more bytes each.
    not_quantized = model["params_total"] - model["quantized_params"] - model["params_trainable"]
    extra = (upcast["memory"]["breakdown_bytes"]["params"]
             - plain["memory"]["breakdown_bytes"]["params"])
    assert extra == pytest.approx(2 * not_quantized, rel=0.05)


def test_the_model_is_4bit_as_peft_and_transformers_see_it():
    import bitsandbytes as bnb

    spec = ModelSpec(config="tiny-llama")
    use = TechniqueUse("qlora", REGISTRY["qlora"].resolve_args({"r": 8}))
    ctx = build(spec, resolve_config(spec, Path("x.yaml")), (use,), torch.device("cpu"))
    base = ctx.model.get_base_model()
    assert base.is_quantized and base.is_loaded_in_4bit
    assert base.config.quantization_config.load_in_4bit
    q_proj = base.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)
    assert q_proj.base_layer.weight.quant_state.quant_type == "nf4"


@pytest.mark.parametrize("techniques, words", [
    (["int8"], "needs one of 'lora'"),
    ([{"qlora": {}}, {"lora": {}}], "conflicts"),
    ([{"qlora": {"bnb_4bit_quant_type": "nf5"}}], "nf4 or fp4"),
    ([{"qlora": {"prepare_model_for_kbit_training": "yes"}}], "true or false"),
])
def test_contradicting_quantization_stacks_are_bad_input(tmp_path, techniques, words):
    path = write_scenario(tmp_path, "bad", [{"name": "v", "techniques": techniques}])
    with pytest.raises(ScenarioError, match=words):
        load_scenario(path)


def test_a_quantization_on_meta_leaves_real_ones_working():
    """A simulated QLoRA quantizes on meta; bitsandbytes caches its double-quant code map on
    the device of its first use. A real QLoRA build in the same process must still quantize,
    with the same packed layout as the meta one."""
    spec = ModelSpec(config="tiny-llama")
    use = TechniqueUse("qlora", REGISTRY["qlora"].resolve_args({"r": 8}))
    source = resolve_config(spec, Path("x.yaml"))
    meta = build(spec, source, (use,), torch.device("meta")).model
    real = build(spec, source, (use,), torch.device("cpu")).model
    layer = "base_model.model.model.layers.0.mlp.down_proj.weight"
    a, b = meta.get_parameter(layer), real.get_parameter(layer)
    assert a.device.type == "meta" and b.device.type == "cpu"
    assert a.shape == b.shape and a.quant_state.absmax.shape == b.quant_state.absmax.shape
    assert b.quant_state.state2.code.device.type == "cpu"


@pytest.mark.slow
def test_qdora_trains_for_real_and_keeps_a_magnitude_vector_per_output(quantized):
    """QLoRA with use_dora: the same 4-bit base, plus DoRA's trainable magnitude (one value per
    output feature of each adapted linear) beside the adapters."""
    qlora, qdora = quantized["qlora"], quantized["qdora"]
    assert qdora["status"] == "ok", qdora["error"]
    assert qdora["memory"]["quantized_weight_bytes"] == qlora["memory"]["quantized_weight_bytes"]
    config = json.loads((REPO / "scenarios" / "models" / "tiny-llama.json").read_text())
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    outputs = layers * (h + kv + kv + h + i + i + h)  # q k v o gate up down
    assert qdora["model"]["params_trainable"] - qlora["model"]["params_trainable"] == outputs


def test_qdora_is_valid_and_a_simulation_says_why_it_cannot_run_it(tmp_path):
    """Not bad input (a real run trains it): validation passes; a simulation is unsupported."""
    from harness.optimizers import OPTIMIZERS
    from harness.techniques import simulation_reason

    path = write_scenario(tmp_path, "qdora", [{"name": "v", "techniques": [
        {"qlora": {"r": 8, "use_dora": True}}]}])
    variant = load_scenario(path).variant("v")
    assert "QDoRA" in simulation_reason(variant.techniques, OPTIMIZERS["adamw"])
    plain = load_scenario(write_scenario(tmp_path, "plain", [{"name": "v", "techniques": [
        {"qlora": {"r": 8}}]}])).variant("v")
    assert simulation_reason(plain.techniques, OPTIMIZERS["adamw"]) is None
