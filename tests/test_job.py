"""The job a worker runs: made once from the scenario and the run flags, read back from its file
unchanged, and all the worker needs (it never reads the scenario's YAML)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.job import Job, RunOptions
from harness.scenario import load_scenario
from tests.conftest import shipped, shipped_scenarios, write_scenario

ALL_FLAGS = RunOptions("cpu", steps=2, budget_bytes=3 << 30, timeout_s=60.0, full_depth=True,
                       target="cpu", snapshot=True)


@pytest.mark.parametrize("path", shipped_scenarios())
def test_every_committed_variant_survives_its_job_file(path, tmp_path):
    scenario = shipped(path)
    for variant in scenario.variants:
        for options in (RunOptions("simulate"), ALL_FLAGS):
            job = Job.make(scenario, variant, options, run_id="r", result=tmp_path / "r.json",
                           snapshot=tmp_path / "s.pickle")
            job.write(tmp_path / "job.json")
            assert Job.read(tmp_path / "job.json") == job, variant.name


def test_a_job_is_the_variant_as_it_runs(tmp_path):
    path = write_scenario(tmp_path, "s", [{"name": "a"}, {"name": "lora", "techniques": [
        {"lora": {"r": 4}}]}], train={"steps": 5})
    scenario = load_scenario(path)
    # A point no sweep declares (what `fit` probes) needs no name for the worker to re-parse.
    variant = scenario.at_point("lora", {"batch_size": 3})
    job = Job.make(scenario, variant, ALL_FLAGS, run_id="r", result=tmp_path / "r.json",
                   snapshot=tmp_path / "s.pickle")
    assert job.index == 1 and job.variant.name == "lora@batch_size=3"
    assert job.variant.train.batch_size == 3 and job.variant.train.steps == 2  # --steps
    assert job.scenario.variants == (job.variant,) and job.method == "measured-cpu"
    assert job.snapshot == tmp_path / "s.pickle"
    assert Job.make(scenario, variant, RunOptions("simulate"), run_id="r",
                    result=tmp_path / "r.json", snapshot=tmp_path / "s.pickle").snapshot is None
    job.write(tmp_path / "job.json")
    on_disk = json.loads((tmp_path / "job.json").read_text())
    assert on_disk["variant"]["techniques"] == [{"name": "lora", "args": job.variant.techniques[0]
                                                 .args}]
    path.unlink()  # what the worker reads is the job file alone
    assert Job.read(tmp_path / "job.json") == job


def test_the_worker_runs_a_job_without_its_scenario_file(tmp_path):
    from harness.record import read_record
    from harness.worker import main

    path = write_scenario(tmp_path, "s", [{"name": "lora", "techniques": ["lora"]}],
                          train={"batch_size": 1, "seq_len": 32})
    scenario = load_scenario(path)
    job = Job.make(scenario, scenario.variant("lora"), RunOptions("simulate", steps=1),
                   run_id="r", result=tmp_path / "out" / "lora.json")
    job.write(tmp_path / "lora.job.json")
    path.unlink()
    assert main([str(tmp_path / "lora.job.json")]) == 0
    record = read_record(job.result)
    assert record["status"] == "ok" and record["method"] == "simulated"
    assert record["train"]["steps"] == 1 and record["scenario"]["sha256"] == scenario.sha256
    assert record["memory"]["peak_allocated_bytes"] > record["memory"]["end_of_step_bytes"][
        "params"] > 0


def test_a_cpu_run_is_refused_by_the_ram_it_would_need_not_by_this_machine(tmp_path):
    """Mistral-7B in fp32: 29 GB of parameters. Refused with 16 GiB available, started with
    1 TiB — the same answer on any machine."""
    from harness.worker import _too_big_for_ram

    scenario = load_scenario(write_scenario(tmp_path, "s", [{"name": "full"}],
                                            model={"config": "mistral-7b-v0.1"}))
    full = scenario.variant("full")
    reason = _too_big_for_ram(scenario, full, 16 << 30)
    assert reason is not None and "half of the 16.0 GiB" in reason
    need = float(reason.split("need ")[1].split(" GiB")[0])
    assert 26 < need < 28, reason  # 7.24 B parameters × 4 bytes
    assert _too_big_for_ram(scenario, full, 1 << 40) is None


def test_preflight_gives_the_first_reason_a_job_cannot_run(tmp_path):
    from harness.worker import _preflight

    path = write_scenario(tmp_path, "s", [
        {"name": "ok"}, {"name": "liger", "techniques": ["bf16", "liger"]},
        {"name": "compiled", "techniques": ["bf16", "compile"]},
        {"name": "qlora-compiled", "techniques": [{"qlora": {"r": 8}}, "compile"]},
        {"name": "overhead", "techniques": ["bf16", {"compile": {"mode": "reduce-overhead"}}]}])
    scenario = load_scenario(path)

    def reason(name: str, device: str, target: str = "cuda") -> str | None:
        return _preflight(Job.make(scenario, scenario.variant(name), RunOptions(
            device, target=target), run_id="r", result=Path("/nonexistent")))

    assert reason("ok", "cpu") is None and reason("ok", "simulate") is None
    # Liger's Triton kernels: simulated on the fake CUDA device, not on fake CPU tensors
    assert reason("liger", "simulate") is None
    assert reason("liger", "simulate", "cpu").startswith("liger cannot be simulated")
    assert reason("liger", "cpu").startswith("liger: ")
    # Inductor's own code generation, for either target, 4-bit weights included; not CUDA
    # graphs' private pool.
    assert reason("compiled", "simulate") is None
    assert reason("compiled", "simulate", "cpu") is None
    assert reason("qlora-compiled", "simulate", "cpu") is None
    assert reason("qlora-compiled", "simulate") is None
    assert "CUDA graphs" in reason("overhead", "simulate")



@pytest.mark.parametrize("attn, device, says", [
    ("flex_attention", "cpu", "no backward on CPU"),
    ("flex_attention", "simulate", "cannot run on fake tensors"),
    ("flash_attention_2", "cpu", "runs only on a CUDA GPU"),
    ("flash_attention_3", "simulate", "runs only on a CUDA GPU"),
    ("sdpa", "simulate", None),
    ("eager", "cpu", None),
])
def test_an_attention_this_device_cannot_run_is_unsupported_not_a_crash(tmp_path, attn, device,
                                                                        says):
    """flex_attention segfaulted a simulating worker and raised in a CPU backward; flash
    attention without its package or a GPU was an `error` record."""
    from harness.worker import _preflight

    scenario = load_scenario(write_scenario(tmp_path, "s", [{"name": "v"}], model={
        "config": "tiny-llama", "attn_implementation": attn}))
    reason = _preflight(Job.make(scenario, scenario.variant("v"), RunOptions(device),
                                 run_id="r", result=tmp_path / "r.json"))
    assert (reason is None) if says is None else (says in reason), reason


def test_a_sequence_beyond_the_models_positions_is_a_warning_not_a_refusal(tmp_path):
    from harness.models import beyond_positions, resolve_config

    scenario = load_scenario(write_scenario(tmp_path, "s", [{"name": "v"}],
                                            train={"seq_len": 4096}))  # tiny-llama: 2,048
    source = resolve_config(scenario.model, scenario.path)
    assert "max_position_embeddings (2,048)" in beyond_positions(source, 4096)
    assert beyond_positions(source, 2048) is None


def test_a_cuda_target_simulates_on_the_fake_cuda_device_except_a_parallel_variant():
    """FSDP2's ranks are simulated on a fake process group of CPU tensors, which would meet
    the model's fake CUDA ones: a parallel variant stays on fake CPU tensors and says why."""
    from harness import fake_cuda
    from harness.worker import simulated_device

    if fake_cuda.unavailable() is not None:
        pytest.skip(f"no fake CUDA device: {fake_cuda.unavailable()}")
    scenario = load_scenario("fsdp_tiny")

    def on(name: str, target: str = "cuda"):
        return simulated_device(Job.make(scenario, scenario.variant(name), RunOptions(
            "simulate", target=target, gpu="a100-80"), run_id="r", result=Path("/nonexistent")))

    device, card, why = on("one-process")
    assert device.type == "cuda" and why is None
    assert (card.name, card.capability, card.multiprocessors) == ("NVIDIA A100-SXM4-80GB",
                                                                  (8, 0), 108)
    device, card, why = on("fsdp2")
    assert device.type == "cpu" and card is None and "fake process group" in why
    device, card, why = on("one-process", "cpu")
    assert (device.type, card, why) == ("cpu", None, None)
