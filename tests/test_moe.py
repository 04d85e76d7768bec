"""Mixture-of-experts models (tiny Mixtral, tiny Qwen3-MoE, committed configs): what their
experts hold under each technique, measured on CPU and simulated, and the routing behind it.

Fast: what a scenario may say of experts. Slow: real CPU steps and their simulation.
"""

from __future__ import annotations

import json

import pytest

from harness.scenario import ScenarioError, load_scenario
from tests.conftest import REPO, measured_variants, write_scenario

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]  # 3-D parameters, PEFT's way
RUNS = [
    {"name": "bf16", "techniques": ["bf16"]},
    {"name": "lora-experts", "techniques": ["bf16", {"lora": {
        "r": 8, "target_modules": ["q_proj", "v_proj"], "target_parameters": EXPERTS}}]},
    {"name": "qlora", "techniques": [{"qlora": {"r": 8, "target_modules": "all-linear"}}]},
]
TRAIN = {"batch_size": 2, "seq_len": 64, "steps": 1, "warmup_steps": 0}


def _config(name: str) -> dict:
    return json.loads((REPO / "scenarios" / "models" / f"{name}.json").read_text())


def _error(tmp_path, model: dict, variants=None) -> str:
    with pytest.raises(ScenarioError) as caught:
        load_scenario(write_scenario(tmp_path, "moe", variants or [{"name": "v"}], model=model))
    return str(caught.value)


@pytest.mark.parametrize(("model", "key", "says"), [
    ({"config": "tiny-llama", "experts": "eager"}, "model.experts", "no mixture of experts"),
    ({"config": "tiny-mixtral", "experts": "groupedmm"}, "model.experts",
     "did you mean 'grouped_mm'?"),
    ({"config": "tiny-mixtral", "routing": "worst"}, "model.routing",
     "routing decides what eager experts hold"),
    ({"config": "tiny-mixtral", "experts": "eager", "routing": "skewd"}, "model.routing",
     "must be one of balanced, worst"),
])
def test_bad_expert_settings_name_the_key(tmp_path, model, key, says):
    message = _error(tmp_path, model)
    assert f"key '{key}'" in message and says in message, message


def test_lora_on_a_mixture_of_experts_needs_its_targets(tmp_path):
    """PEFT has no default targets for Mixtral: bad input, in PEFT's words, not a crash."""
    message = _error(tmp_path, {"config": "tiny-mixtral"},
                     [{"name": "lora", "techniques": [{"lora": {"r": 8}}]}])
    assert "variants[0].techniques[0].lora" in message and "target_modules" in message


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    _, got = measured_variants(tmp_path_factory.mktemp("mixtral"), "mixtral", RUNS,
                               model={"config": "tiny-mixtral"}, train=TRAIN)
    return got


@pytest.fixture(scope="module")
def qwen_eager(tmp_path_factory):
    """Qwen3-MoE's eager experts (a loop over the experts the router chose), measured (routed
    by its random router) and simulated balanced and worst."""
    got = {}
    for routing in ("balanced", "worst"):
        _, runs = measured_variants(
            tmp_path_factory.mktemp(routing), "qwen", [{"name": "bf16", "techniques": ["bf16"]}],
            modes=lambda name, r=routing: (False, True) if r == "balanced" else (True,),
            model={"config": "tiny-qwen3-moe", "experts": "eager", "routing": routing},
            train=TRAIN)
        got.update({(routing, simulated): m for (_, simulated), m in runs.items()})
    return got


def _phases(measured) -> dict:
    return {k: v for k, v in measured.memory["phases"].items() if v}


@pytest.mark.slow
@pytest.mark.parametrize("name", [run["name"] for run in RUNS])
def test_mixtral_simulated_agrees_with_the_cpu_step_within_one_percent(mixtral, name):
    real, sim = mixtral[name, False], mixtral[name, True]
    assert real.result.experts == sim.result.experts == {
        "count": 4, "top_k": 2, "implementation": "grouped_mm", "routing": "any"}
    for phase, figures in _phases(real).items():
        scratch = figures["breakdown_bytes"]["unattributed"]
        assert _phases(sim)[phase]["peak_allocated_bytes"] == pytest.approx(
            figures["peak_allocated_bytes"] - scratch, rel=0.01), phase


@pytest.mark.slow
def test_qlora_leaves_the_experts_unquantized_and_in_fp32(mixtral):
    """bitsandbytes quantizes nn.Linear layers: a layer's attention projections, not its
    experts (3-D parameters), and PEFT's k-bit preparation casts what it left to fp32 — so a
    Mixtral under QLoRA holds more parameter bytes than in bf16. Simulated on the fake CUDA
    device too, where transformers' grouped_mm runs the fp32 experts through CUDA's fallback."""
    config = _config("tiny-mixtral")
    h, layers = config["hidden_size"], config["num_hidden_layers"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    experts = config["num_local_experts"] * 3 * h * config["intermediate_size"]
    qlora, bf16 = mixtral["qlora", False], mixtral["bf16", False]
    assert qlora.result.quantized_params == layers * (2 * h * h + 2 * h * kv)
    params = _phases(qlora)["load"]["breakdown_bytes"]["params"]
    assert params >= 4 * layers * experts  # fp32 experts
    assert params > _phases(bf16)["load"]["breakdown_bytes"]["params"]


@pytest.mark.slow
def test_lora_on_the_experts_trains_a_rank_for_each_expert(mixtral):
    """PEFT's target_parameters: each 3-D expert weight gets LoRA factors of r × experts rows
    (an adapter an expert), trained beside q_proj's and v_proj's."""
    config = _config("tiny-mixtral")
    h, inner, layers = config["hidden_size"], config["intermediate_size"], \
        config["num_hidden_layers"]
    r, experts = 8, config["num_local_experts"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    attention = r * (h + h) + r * (h + kv)  # q_proj, v_proj
    expert_lora = r * experts * (h + 2 * inner) + r * experts * (inner + h)  # gate_up, down
    assert mixtral["lora-experts", False].result.params_trainable == \
        layers * (attention + expert_lora)


@pytest.mark.slow
def test_eager_experts_simulated_balanced_agree_with_the_cpu_step(qwen_eager):
    """A random router spreads tokens about evenly: the balanced simulation's phases are
    within 1 % of the CPU step's, and the record says which routing the figures assume."""
    real, sim = qwen_eager["balanced", False], qwen_eager["balanced", True]
    assert real.result.experts["routing"] == "as routed"
    assert sim.result.experts == {"count": 8, "top_k": 2, "implementation": "eager",
                                  "routing": "balanced"}
    for phase, figures in _phases(real).items():
        assert _phases(sim)[phase]["peak_allocated_bytes"] == pytest.approx(
            figures["peak_allocated_bytes"], rel=0.01), phase


@pytest.mark.slow
def test_routing_changes_each_expert_s_share_not_what_a_layer_saves(qwen_eager):
    """However tokens are routed, a layer saves tokens × top_k rows for backward: the forward's
    activations agree between balanced and worst within a few blocks of the experts' own
    index tensors."""
    balanced, worst = qwen_eager["balanced", True], qwen_eager["worst", True]
    assert worst.result.experts["routing"] == "worst"
    saved = [_phases(m)["forward"]["breakdown_bytes"]["activations"] for m in (balanced, worst)]
    assert saved[0] == pytest.approx(saved[1], rel=0.01)


@pytest.mark.slow
def test_qlora_on_experts_simulates_on_the_fake_cuda_device(tmp_path):
    """On CUDA transformers' grouped_mm takes the fp32 experts through the kernel's fallback
    (a matmul a group); the meta kernel a simulation runs checks bf16 only, and the simulation
    answers as the device does: the step is a result, not an error."""
    import torch

    from harness import gpus
    from harness.models import resolve_config
    from harness.probes import make_probe
    from harness.train import measure

    scenario = load_scenario(write_scenario(tmp_path, "moe", [RUNS[2]], train=TRAIN,
                                            model={"config": "tiny-mixtral"}))
    variant = scenario.variants[0]
    cuda = torch.device("cuda")
    probe = make_probe(cuda, None, simulate=True, target="cuda",
                       card=gpus.simulated_card(gpus.card("h200")))
    got = measure(scenario, resolve_config(scenario.model, scenario.path), variant,
                  variant.train, cuda, None, True, "cuda", probe)
    assert got.outcome["status"] == "ok", got.outcome
    assert got.result.experts["implementation"] == "grouped_mm"
