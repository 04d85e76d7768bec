"""The same relationships on a CUDA device, read from the caching allocator. Skipped without one."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import harness, last_json, records, write_scenario

pytestmark = [pytest.mark.gpu, pytest.mark.slow]  # `harness run --device cuda`

LORA = {"lora": {"r": 16, "target_modules": ["q_proj", "v_proj"]}}


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpu")
    path = write_scenario(folder, "gpu", [
        {"name": "full-fp32", "techniques": []},
        {"name": "full-bf16", "techniques": ["bf16"]},
        {"name": "lora", "techniques": ["bf16", LORA]},
        {"name": "lora-gc", "techniques": ["bf16", LORA, "gradient_checkpointing"]},
    ], train={"batch_size": 4, "seq_len": 512})
    proc = harness("run", str(path), "--device", "cuda", "--out", str(folder / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return records(Path(last_json(proc.stdout)["run_dir"]))


def test_cuda_records_are_the_allocators_figures(cuda_run):
    for name, record in cuda_run.items():
        assert record["status"] == "ok", (name, record["error"])
        memory = record["memory"]
        assert record["method"] == "measured-cuda" and record["device"].startswith("cuda:")
        assert memory["peak_reserved_bytes"] >= memory["peak_allocated_bytes"] > 0
        for phase in memory["phases"].values():
            assert phase["peak_active_bytes"] >= phase["peak_allocated_bytes"] * 0.99
        assert record["env"]["gpu_name"] and record["env"]["cuda"]
        breakdown = memory["breakdown_bytes"]
        assert breakdown is not None, memory["breakdown_note"]
        # Kernel workspaces (cuBLAS) are allocator blocks no tensor names.
        assert breakdown["unattributed"] <= 0.15 * memory["peak_allocated_bytes"]


def test_cuda_bf16_halves_parameters_and_checkpointing_cuts_activations(cuda_run):
    fp32 = cuda_run["full-fp32"]["memory"]["breakdown_bytes"]["params"]
    bf16 = cuda_run["full-bf16"]["memory"]["breakdown_bytes"]["params"]
    assert bf16 == pytest.approx(fp32 / 2, rel=0.01)
    plain = cuda_run["lora"]["memory"]["phases"]["forward"]["breakdown_bytes"]["activations"]
    gc = cuda_run["lora-gc"]["memory"]["phases"]["forward"]["breakdown_bytes"]["activations"]
    assert gc <= 0.67 * plain


def test_cuda_budget_is_a_real_allocator_oom(tmp_path):
    path = write_scenario(tmp_path, "gpubudget", [{"name": "full-fp32", "techniques": []},
                                                  {"name": "lora", "techniques": ["bf16", LORA]}])
    proc = harness("run", str(path), "--device", "cuda", "--out", str(tmp_path / "out"),
                   "--memory-budget", "60MiB")
    assert proc.returncode == 0
    got = records(Path(last_json(proc.stdout)["run_dir"]))
    assert got["full-fp32"]["status"] == "oom"
    assert "out of memory" in got["full-fp32"]["error"].lower()
    assert got["lora"]["status"] in ("ok", "oom")  # recorded either way, never lost


def test_fsdp2_on_cuda_ranks_shard_and_the_simulation_predicts_them(tmp_path):
    """FSDP2 under torchrun with NCCL: one rank per GPU (one rank where only one is visible),
    each rank's sharded parameters and state 1/N of one process's, and the simulation of the
    same ranks within 5 % of the allocator's peak."""
    import torch

    ranks = min(torch.cuda.device_count(), 2)
    path = write_scenario(tmp_path, "gpu_fsdp", [
        {"name": "single", "techniques": ["bf16"]},
        {"name": "fsdp2", "techniques": ["bf16"],
         "parallel": {"strategy": "fsdp2", "world_size": ranks}},
    ], train={"batch_size": 4, "seq_len": 512})
    got = {}
    for device in ("cuda", "simulate"):
        proc = harness("run", str(path), "--device", device, "--out", str(tmp_path / device))
        assert proc.returncode == 0, proc.stderr[-3000:]
        got[device] = records(Path(last_json(proc.stdout)["run_dir"]))
    single, fsdp2 = got["cuda"]["single"], got["cuda"]["fsdp2"]
    assert fsdp2["status"] == "ok", fsdp2["error"]
    assert len(fsdp2["memory"]["ranks"]) == ranks
    for rank in fsdp2["memory"]["ranks"]:
        assert rank["end_of_step_bytes"]["optimizer"] == pytest.approx(
            single["memory"]["end_of_step_bytes"]["optimizer"] / ranks, rel=0.01)
    simulated = got["simulate"]["fsdp2"]["memory"]["peak_allocated_bytes"]
    assert simulated == pytest.approx(fsdp2["memory"]["peak_allocated_bytes"], rel=0.05)
