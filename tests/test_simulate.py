"""--device simulate: the same step on fake tensors agrees with the real CPU run, byte for byte
where both can run, and says what it cannot simulate instead of guessing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.report import CARDS_GB, fits_on
from tests.conftest import REPO, harness, last_json, records, write_scenario

LORA = {"lora": {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj",
                                                                "o_proj"]}}
BOTH = [  # every technique and optimizer that both a real CPU run and a simulation can run
    {"name": "full-fp32", "techniques": []},
    {"name": "full-bf16", "techniques": ["bf16"]},
    {"name": "amp-bf16", "techniques": ["amp_bf16"]},
    {"name": "bf16-fused", "techniques": ["bf16"], "train": {"optimizer": "adamw_fused"}},
    {"name": "bf16-sgd", "techniques": ["bf16"], "train": {"optimizer": "sgd"}},
    {"name": "bf16-adafactor", "techniques": ["bf16"], "train": {"optimizer": "adafactor"}},
    {"name": "lora", "techniques": ["bf16", LORA]},
    {"name": "lora-tokens", "techniques": ["bf16", {"lora": {
        **LORA["lora"], "trainable_token_indices": {"embed_tokens": [0, 1, 2, 3]}}}]},
    {"name": "lora-gc", "techniques": ["bf16", LORA, "gradient_checkpointing"]},
    {"name": "lora-gc-chunked", "techniques": ["bf16", LORA, "gradient_checkpointing",
                                               {"chunked_nll": {"chunk_size": 64}}]},
    {"name": "lora-gc-trl-head", "techniques": ["bf16", LORA, "gradient_checkpointing",
                                                {"chunked_nll": {"impl": "trl"}}]},
]
QUANTIZED = [  # bitsandbytes' own 4-bit layers, on fake activations (see probes/simulate.py)
    {"name": "qlora", "techniques": [{"qlora": LORA["lora"]}]},
    {"name": "qlora-gc", "techniques": [{"qlora": LORA["lora"]}, "gradient_checkpointing"]},
    {"name": "qlora-fp4-all-linear", "techniques": [{"qlora": {
        "r": 8, "target_modules": "all-linear", "bnb_4bit_quant_type": "fp4",
        "bnb_4bit_use_double_quant": False, "prepare_model_for_kbit_training": False}}]},
]
BNB_OPTIMIZERS = [  # bitsandbytes' own step, through its registered fake kernels
    {"name": "bf16-adamw-8bit", "techniques": ["bf16"], "train": {"optimizer": "adamw_8bit"}},
    {"name": "fp16-adamw-32bit", "techniques": ["fp16"], "train": {"optimizer": "adamw_32bit"}},
]
NOT_SIMULATED = [
    {"name": "int8-lora", "techniques": ["int8", LORA]},
    {"name": "compiled", "techniques": ["bf16", "compile"]},
    {"name": "amp-fp16", "techniques": ["amp_fp16"]},
    {"name": "bf16-paged-8bit", "techniques": ["bf16"], "train": {"optimizer": "paged_adamw_8bit"}},
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("simulate")
    path = write_scenario(folder, "both", BOTH + QUANTIZED + BNB_OPTIMIZERS + NOT_SIMULATED,
                          train={"steps": 2, "warmup_steps": 1})
    got = {}
    for device, only in (("cpu", BOTH + QUANTIZED + BNB_OPTIMIZERS),
                         ("simulate", BOTH + QUANTIZED + BNB_OPTIMIZERS + NOT_SIMULATED)):
        selected = [arg for v in only for arg in ("--variant", v["name"])]
        # --target cpu: only what the CPU kernels allocate, like with like against the real run.
        target = ["--target", "cpu"] if device == "simulate" else []
        proc = harness("run", str(path), "--device", device, *target, "--out", str(folder / device),
                       *selected)
        assert proc.returncode == 0, proc.stderr[-3000:]
        got[device] = records(Path(last_json(proc.stdout)["run_dir"]))
    return got


@pytest.mark.parametrize("name", [v["name"] for v in BOTH])
def test_simulation_agrees_with_the_real_cpu_run_within_one_percent(runs, name):
    real, sim = runs["cpu"][name], runs["simulate"][name]
    assert real["status"] == "ok" and sim["status"] == "ok", (real["error"], sim["error"])
    assert sim["method"] == "simulated" and real["method"] == "measured-cpu"
    assert sim["memory"]["peak_allocated_bytes"] == pytest.approx(
        real["memory"]["peak_allocated_bytes"], rel=0.01)
    for phase in ("load", "forward", "backward", "optimizer"):
        assert sim["memory"]["phases"][phase]["peak_allocated_bytes"] == pytest.approx(
            real["memory"]["phases"][phase]["peak_allocated_bytes"], rel=0.01), phase
    # The same categories at the peak: what persists exactly, the step's own bytes within 1 %.
    for key in ("params", "grads", "optimizer"):
        assert sim["memory"]["end_of_step_bytes"][key] == real["memory"]["end_of_step_bytes"][key]


@pytest.mark.parametrize("name", [v["name"] for v in QUANTIZED])
def test_simulated_4bit_layers_agree_with_real_bitsandbytes_within_two_percent(runs, name):
    """The packed weights and their quantization state are laid out by bitsandbytes' own
    quantizer (on meta) and match to the byte; the de-quantised temporaries of forward and
    backward come from its fake kernels. Load is not compared: a real CPU build draws each
    weight in bf16 before quantizing it (and PEFT's preparation up-casts with a copy), a
    transient the simulation, which builds the final layout directly, does not have."""
    real, sim = runs["cpu"][name], runs["simulate"][name]
    assert real["status"] == "ok" and sim["status"] == "ok", (real["error"], sim["error"])
    assert sim["memory"]["quantized_weight_bytes"] == real["memory"]["quantized_weight_bytes"]
    assert sim["memory"]["end_of_step_bytes"]["params"] == real["memory"]["end_of_step_bytes"]["params"]
    for phase in ("forward", "backward", "optimizer"):
        assert sim["memory"]["phases"][phase]["peak_allocated_bytes"] == pytest.approx(
            real["memory"]["phases"][phase]["peak_allocated_bytes"], rel=0.02), phase
    assert sim["memory"]["peak_allocated_bytes"] == pytest.approx(
        real["memory"]["peak_allocated_bytes"], rel=0.02)


@pytest.mark.parametrize("name", [v["name"] for v in BNB_OPTIMIZERS])
def test_bitsandbytes_optimizer_state_and_step_are_simulated(runs, name):
    """8-bit and 32-bit bitsandbytes AdamW: the state (8-bit moments and absmax, or fp32 moments
    for fp16 weights) equal to the byte, forward and backward within 1 %. The step: CUDA's
    kernel updates in place, which the simulation follows; bitsandbytes' CPU implementation
    allocates temporaries besides (unattributed on CPU), so the real CPU step is the larger."""
    real, sim = runs["cpu"][name], runs["simulate"][name]
    assert real["status"] == "ok" and sim["status"] == "ok", (real["error"], sim["error"])
    for key in ("params", "grads", "optimizer"):
        assert sim["memory"]["end_of_step_bytes"][key] == real["memory"]["end_of_step_bytes"][key]
    for phase in ("forward", "backward"):
        assert sim["memory"]["phases"][phase]["peak_allocated_bytes"] == pytest.approx(
            real["memory"]["phases"][phase]["peak_allocated_bytes"], rel=0.01), phase
    step = sim["memory"]["phases"]["optimizer"]
    assert step["breakdown_bytes"]["other"] < 2**20  # in place: norms for clipping only
    assert step["peak_allocated_bytes"] <= real["memory"]["phases"]["optimizer"][
        "peak_allocated_bytes"]


def test_what_fake_tensors_cannot_run_is_unsupported_with_the_reason(runs):
    for variant in NOT_SIMULATED:
        record = runs["simulate"][variant["name"]]
        assert record["status"] == "unsupported" and "cannot be simulated" in record["error"]


def test_simulation_runs_two_steps_and_reports_no_step_time(runs):
    record = runs["simulate"]["full-bf16"]
    assert len(record["memory"]["per_step_peak_allocated_bytes"]) == 2  # 3 asked: 1 + 2
    assert any("simulated 2 of 3 steps" in note for note in record["notes"])
    assert record["timing"]["step_time_s_median"] is None
    assert record["timing"]["tokens_per_s"] is None


def test_a_full_size_model_is_simulated_and_sized_against_common_cards(tmp_path):
    """Mistral-7B LoRA, never allocated: its bf16 base is exactly 2 bytes per parameter and its
    fp32 adapters 4; the allocator replay predicts what it reserves, and the table names the
    smallest card that holds that."""
    proc = harness("run", "qlora_mistral", "--device", "simulate", "--variant", "lora",
                   "--full-depth", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = records(Path(last_json(proc.stdout)["run_dir"]))["lora"]
    assert record["status"] == "ok", record["error"]
    total, trainable = record["model"]["params_total"], record["model"]["params_trainable"]
    assert record["memory"]["end_of_step_bytes"]["params"] == pytest.approx(
        2 * (total - trainable) + 4 * trainable, abs=512 * 1000)  # 512-B rounding per tensor
    # Reserved comes from the caching-allocator replay: whole segments, so never below allocated.
    memory = record["memory"]
    assert memory["reserved_model"].startswith("cuda-caching-allocator")
    assert memory["peak_allocated_bytes"] <= memory["peak_reserved_bytes"] \
        < 1.1 * memory["peak_allocated_bytes"]
    need = memory["peak_reserved_bytes"]  # what the card must hold
    card = next(c for c in CARDS_GB if need <= c * 2**30)
    assert f"| {card} GB (+{(card * 2**30 - need) / 2**30:.1f})" in proc.stdout


def test_fits_on_picks_the_smallest_card_that_holds_the_peak():
    assert fits_on(24 * 2**30) == (24, 0)
    assert fits_on(24 * 2**30 + 1) == (40, 16 * 2**30 - 1)
    assert fits_on(142 * 2**30) == (None, None)


def test_a_deep_model_extrapolated_from_two_and_three_layers_equals_simulating_every_layer(
        tmp_path):
    """Identical decoder layers make every allocated byte count affine in depth: a 7-layer model
    simulated at 2 and 3 layers and extrapolated (four layers' worth) equals the 7-layer
    simulation to the byte."""
    config = json.loads((REPO / "scenarios" / "models" / "tiny-llama.json").read_text())
    (tmp_path / "deep.json").write_text(json.dumps({**config, "num_hidden_layers": 7}))
    variants = [{"name": "full-bf16", "techniques": ["bf16"]},
                {"name": "lora-gc-chunked", "techniques": ["bf16", LORA, "gradient_checkpointing",
                                                           {"chunked_nll": {"chunk_size": 64}}]},
                {"name": "qlora-gc", "techniques": [{"qlora": LORA["lora"]},
                                                    "gradient_checkpointing"]}]
    path = write_scenario(tmp_path, "deep", variants, model={"config": "./deep.json"})
    got = {}
    for mode in ("extrapolated", "full"):
        proc = harness("run", str(path), "--device", "simulate", "--out", str(tmp_path / mode),
                       *(["--full-depth"] if mode == "full" else []))
        assert proc.returncode == 0, proc.stderr[-3000:]
        got[mode] = records(Path(last_json(proc.stdout)["run_dir"]))
    for variant in variants:
        fast, full = got["extrapolated"][variant["name"]], got["full"][variant["name"]]
        assert fast["status"] == full["status"] == "ok", (fast["error"], full["error"])
        assert any("2 and 3 of the 7 identical decoder layers" in n for n in fast["notes"])
        assert not any("identical decoder layers" in n for n in full["notes"])
        for key in ("peak_allocated_bytes", "peak_phase", "breakdown_bytes", "end_of_step_bytes",
                    "per_step_peak_allocated_bytes", "quantized_weight_bytes"):
            assert fast["memory"][key] == full["memory"][key], (variant["name"], key)
        for phase in ("load", "forward", "backward", "optimizer"):
            assert fast["memory"]["phases"][phase]["peak_allocated_bytes"] == \
                full["memory"]["phases"][phase]["peak_allocated_bytes"], phase
        assert fast["model"]["params_total"] == full["model"]["params_total"]
        # Reserved memory is not affine in depth: only the full simulation predicts it.
        assert fast["memory"]["peak_reserved_bytes"] is None
        assert full["memory"]["peak_reserved_bytes"] >= full["memory"]["peak_allocated_bytes"]


def test_tied_weights_stay_one_tensor_in_real_and_simulated_builds(tmp_path):
    """An LM head tied to the embedding (Llama-3.2-1B/3B) is one tensor, whatever the build:
    plain, QLoRA (built on meta, then quantized) or simulated (materialised from meta)."""
    import torch

    from harness.models import resolve_config
    from harness.scenario import load_scenario
    from harness.worker import _measure

    config = json.loads((REPO / "scenarios" / "models" / "tiny-llama.json").read_text())
    (tmp_path / "tied.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    variants = [{"name": "bf16", "techniques": ["bf16"]},
                {"name": "qlora", "techniques": [{"qlora": {"r": 8}}]}]
    scenario = load_scenario(write_scenario(tmp_path, "tied", variants,
                                            model={"config": "./tied.json"},
                                            train={"batch_size": 1, "seq_len": 32}))
    source = resolve_config(scenario.model, scenario.path)
    params, total = {}, {}
    for name in ("bf16", "qlora"):
        variant = scenario.variant(name)
        for simulate in (False, True):
            outcome, memory, result, _ = _measure(scenario, source, variant, variant.train,
                                                  torch.device("cpu"), None, simulate)
            assert outcome["status"] == "ok", outcome
            params[name, simulate] = memory["end_of_step_bytes"]["params"]
            total[name] = result.params_total
    embedding = config["vocab_size"] * config["hidden_size"]
    for simulate in (False, True):
        # Two bytes per parameter counted once: a second copy of the head would not be.
        assert params["bf16", simulate] == pytest.approx(2 * total["bf16"], rel=0.01)
        # QLoRA: PEFT up-casts the embedding to fp32; the rest (4-bit layers, adapters, norms)
        # is far smaller than a second fp32 copy of it would be.
        assert params["qlora", simulate] - 4 * embedding < 4 * embedding / 2
    for name in ("bf16", "qlora"):
        assert params[name, True] == params[name, False], name
