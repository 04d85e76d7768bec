"""--device simulate: the same step on fake tensors agrees with the real CPU run, byte for byte
where both can run, and says what it cannot simulate instead of guessing."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import harness, last_json, records, write_scenario

pytestmark = pytest.mark.slow  # every test reads `harness run`'s records (CPU and simulated)

LORA = {"lora": {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj",
                                                                "o_proj"]}}
BOTH = [  # every technique and optimizer that both a real CPU run and a simulation can run
    {"name": "full-fp32", "techniques": []},
    {"name": "full-bf16", "techniques": ["bf16"]},
    {"name": "amp-bf16", "techniques": ["amp_bf16"]},
    # GradScaler: simulated as if no step overflowed (the real run's steps here do not).
    {"name": "amp-fp16", "techniques": ["amp_fp16"]},
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
COMPILED = [  # Inductor's generated C++ wrapper, its kernels never run
    {"name": "compiled", "techniques": ["bf16", "compile"]},
]
NOT_SIMULATED = [
    {"name": "int8-lora", "techniques": ["int8", LORA]},
    {"name": "bf16-paged-8bit", "techniques": ["bf16"], "train": {"optimizer": "paged_adamw_8bit"}},
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("simulate")
    path = write_scenario(folder, "both", BOTH + QUANTIZED + BNB_OPTIMIZERS + COMPILED + NOT_SIMULATED,
                          train={"steps": 2, "warmup_steps": 1})
    got = {}
    for device, only in (("cpu", BOTH + QUANTIZED + BNB_OPTIMIZERS + COMPILED),
                         ("simulate", BOTH + QUANTIZED + BNB_OPTIMIZERS + COMPILED +
                          NOT_SIMULATED)):
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


def test_compiled_step_simulated_from_inductors_own_code_agrees_within_two_percent(runs):
    """torch.compile on fake tensors: Dynamo captures the whole model (a graph break would fall
    back to eager, silently: the record counts them), Inductor generates its CPU wrapper, and
    the wrapper's own buffers are traced; held to a real compiled CPU run at the peak and in
    every phase. (Measured: equal at the peak and in backward, forward 0.4 % low.)"""
    real, sim = runs["cpu"]["compiled"], runs["simulate"]["compiled"]
    assert real["status"] == "ok" and sim["status"] == "ok", (real["error"], sim["error"])
    assert any("with 0 graph break(s)" in note for note in sim["notes"]), sim["notes"]
    assert sim["memory"]["peak_allocated_bytes"] == pytest.approx(
        real["memory"]["peak_allocated_bytes"], rel=0.02)
    for phase in ("load", "forward", "backward", "optimizer"):
        assert sim["memory"]["phases"][phase]["peak_allocated_bytes"] == pytest.approx(
            real["memory"]["phases"][phase]["peak_allocated_bytes"], rel=0.02), phase
    # Compiled, not eager: the fused loss keeps less than the eager run of the same stack.
    eager = runs["simulate"]["full-bf16"]["memory"]["peak_allocated_bytes"]
    assert sim["memory"]["peak_allocated_bytes"] < eager
    assert sim["timing"]["warmup_s"] > 0  # the compile, on this machine


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
