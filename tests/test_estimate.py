"""`harness estimate`: the closed form agrees with the simulation within 10 % across models,
batch sizes, sequence lengths and technique stacks — and where it does not, says which term."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import last_json, records, write_scenario

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
STACKS = {
    "fp32": {"techniques": []},
    "bf16": {"techniques": ["bf16"]},
    "lora": {"techniques": ["bf16", {"lora": {"r": 16, "target_modules": QKVO}}]},
    "lora-all-gc": {"techniques": ["bf16", {"lora": {"r": 8, "target_modules": "all-linear"}},
                                   "gradient_checkpointing"]},
    "qlora": {"techniques": [{"qlora": {"r": 16}}]},
    "qlora-gc-chunked": {"techniques": [{"qlora": {"r": 16, "target_modules": "all-linear"}},
                                        "gradient_checkpointing", "chunked_nll"]},
    "bf16-gc-sgd": {"techniques": ["bf16", "gradient_checkpointing"],
                    "train": {"optimizer": "sgd"}},
}
# (model config, attention) → [(stack, batch, seq)]: every stack, both attention kernels, tied
# and untied heads, 4k to 152k vocabularies, GQA 4:1 and 7:1, biases, short and long sequences.
GRID = {
    ("tiny-mistral", "eager"): [("fp32", 1, 256), ("qlora", 4, 1024), ("bf16-gc-sgd", 1, 1024)],
    ("llama-3.2-1b", "sdpa"): [("bf16", 1, 256), ("lora-all-gc", 1, 2048),
                               ("qlora-gc-chunked", 4, 512)],
    ("qwen2.5-7b", "sdpa"): [("lora", 4, 256), ("qlora", 2, 1024), ("qlora-gc-chunked", 1, 4096)],
}
CATEGORIES = ("params", "grads", "optimizer", "activations", "other")


def _points():
    return [(model, attn, stack, b, s) for (model, attn), points in GRID.items()
            for stack, b, s in points]


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """{(model, variant): (estimated record, simulated record)}, both made in this process
    (the CLI's own path is tested below): the closed form, and the simulation a worker runs."""
    from harness.estimate import estimate_record
    from harness.job import Job, RunOptions
    from harness.record import read_record
    from harness.scenario import load_scenario
    from harness.worker import run_variant

    folder = tmp_path_factory.mktemp("estimate")
    got = {}
    for (model, attn), points in GRID.items():
        variants = []
        for stack, b, s in points:
            spec = STACKS[stack]
            variants.append({"name": f"{stack}.{b}x{s}", "techniques": spec["techniques"],
                             "train": {**spec.get("train", {}), "batch_size": b, "seq_len": s}})
        name = "grid_" + model.replace("-", "_").replace(".", "_")
        path = write_scenario(folder, name, variants,
                              model={"config": model, "attn_implementation": attn})
        scenario = load_scenario(path)
        for v in variants:
            result = folder / f"{name}.{v['name']}.json"
            run_variant(Job.make(scenario, scenario.variant(v["name"]), RunOptions("simulate"),
                                 run_id="test", result=result))
            got[model, v["name"]] = (estimate_record(scenario, scenario.variant(v["name"]),
                                                     "test").as_dict(),
                                     read_record(result))
    return got


def _diverging(est: dict, sim: dict) -> str:
    """Which category at the peak diverges most, and by how much (GiB)."""
    a, b = est["memory"]["breakdown_bytes"], sim["memory"]["breakdown_bytes"]
    worst = max(CATEGORIES, key=lambda k: abs(a[k] - b[k]))
    return (f"{worst} diverges most: estimated {a[worst] / 2**30:.3f} GiB, simulated "
            f"{b[worst] / 2**30:.3f} GiB (peak phase {est['memory']['peak_phase']} vs "
            f"{sim['memory']['peak_phase']}); terms: {est['memory']['terms_bytes']}")


@pytest.mark.slow  # the grid simulates every point (7B models among them) in this process
@pytest.mark.parametrize("model,attn,stack,batch,seq", _points())
def test_the_estimate_is_within_ten_percent_of_the_simulation(grid, model, attn, stack, batch,
                                                              seq):
    est, sim = grid[model, f"{stack}.{batch}x{seq}"]
    assert sim["status"] == "ok", sim["error"]
    assert est["status"] == "ok" and est["method"] == "estimated", est["error"]
    peak, truth = est["memory"]["peak_allocated_bytes"], sim["memory"]["peak_allocated_bytes"]
    assert peak == pytest.approx(truth, rel=0.10), _diverging(est, sim)
    # What persists is arithmetic the simulation must agree with to the block.
    for key in ("params", "optimizer"):
        assert est["memory"]["phases"]["optimizer"]["breakdown_bytes"][key] == pytest.approx(
            sim["memory"]["end_of_step_bytes"][key], rel=0.001), key
    assert est["model"]["params_total"] == sim["model"]["params_total"]
    assert est["model"]["params_trainable"] == sim["model"]["params_trainable"]


def test_the_cli_estimates_what_it_covers_and_says_why_not_the_rest(tmp_path, cli):
    variants = [{"name": "compiled", "techniques": ["bf16", "compile"]},
                {"name": "amp", "techniques": ["amp_bf16"]},
                {"name": "bf16", "techniques": ["bf16"]}]
    path = write_scenario(tmp_path, "uncovered", variants)
    proc = cli("estimate", str(path), "--out", str(tmp_path / "out"), "--terms")
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = records(Path(last_json(proc.stdout)["run_dir"]))
    assert got["compiled"]["status"] == "unsupported" and "compile" in got["compiled"]["error"]
    assert got["amp"]["status"] == "unsupported" and "autocast" in got["amp"]["error"]
    assert got["bf16"]["status"] == "ok" and got["bf16"]["method"] == "estimated"
    # Every named term is printed; the breakdown at the peak is made of them: the parameters
    # (2 bytes each, counted from the model) and AdamW's two bf16 moments persist there whole.
    assert "| optimizer state" in proc.stdout and "| gradients" in proc.stdout
    memory, params = got["bf16"]["memory"], got["bf16"]["model"]["params_total"]
    breakdown, terms = memory["breakdown_bytes"], memory["terms_bytes"]
    assert breakdown["params"] == terms["parameters"] == 2 * params
    assert breakdown["optimizer"] == terms["optimizer state"] == pytest.approx(4 * params, rel=0.01)
    # Bad input: one line, exit 2, nothing written.
    proc = cli("estimate", str(path), "--variant", "bf61", "--out", str(tmp_path / "bad"))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "did you mean 'bf16'" in proc.stderr
    assert not (tmp_path / "bad").exists()


def test_the_guides_worked_example_counts_gradients_and_peaks_without_activations():
    """docs/guide_worked_example.md: Mistral-7B, batch 1 × 1024, fp16 weights with fp32 AdamW
    moments. The guide sums weights + moments + activations and forgets the gradients; the peak
    holds weights, gradients and moments, when no activation is left — so checkpointing does not
    lower it, and it misses an 80 GiB card."""
    from harness.estimate import estimate_record
    from harness.scenario import load_scenario

    scenario = load_scenario("guide_mistral_fp16")
    got = {v.name: estimate_record(scenario, v, "test").as_dict() for v in scenario.variants}
    guide = got["guide"]["memory"]
    terms = guide["terms_bytes"]
    params = got["guide"]["model"]["params_total"]
    assert terms["parameters"] == pytest.approx(2 * params, rel=0.001)  # fp16
    assert terms["gradients"] == terms["parameters"]
    assert terms["optimizer state"] == pytest.approx(8 * params, rel=0.001)  # 2 fp32 moments
    assert guide["breakdown_bytes"]["activations"] == 0
    assert guide["peak_allocated_bytes"] == pytest.approx(12 * params, rel=0.001)
    assert guide["peak_allocated_bytes"] > 80 * 2**30
    assert got["guide-gc"]["memory"]["peak_allocated_bytes"] == guide["peak_allocated_bytes"]
    assert got["pure-fp16-fused"]["memory"]["peak_allocated_bytes"] < 80 * 2**30
    assert got["trainer-fp16"]["status"] == "unsupported"


@pytest.mark.slow
def test_the_cuda_target_adds_what_cuda_kernels_allocate_in_both_methods(tmp_path, monkeypatch):
    """CUDA's flash-attention backward allocates an fp32 softmax_d and dq accumulator and, for
    GQA, dk/dv expanded to every query head; each cuBLAS handle (the loop's thread, autograd's
    backward thread) holds a workspace, sized by CUBLAS_WORKSPACE_CONFIG; the CPU kernels the
    simulation runs allocate none of it. On a model whose attention backward is the peak (32
    heads of 64 on a 256-wide model, a tiny MLP and vocabulary), the simulation's CUDA target
    adds exactly those sizes, and the estimate the same."""
    import json

    from harness import fake_cuda
    from harness.estimate import estimate_record
    from harness.job import Job, RunOptions
    from harness.record import read_record
    from harness.scenario import load_scenario
    from harness.worker import run_variant
    from tests.conftest import REPO

    config = json.loads((REPO / "scenarios" / "models" / "tiny-llama.json").read_text())
    config.update(intermediate_size=64, vocab_size=512, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=64, num_hidden_layers=2)
    (tmp_path / "wide.json").write_text(json.dumps(config))
    b, s = 2, 1024
    path = write_scenario(tmp_path, "wide", [
        {"name": "bf16-lora-gc", "techniques": ["bf16", {"lora": {"r": 8}},
                                                "gradient_checkpointing"]}],
        model={"config": "./wide.json"}, train={"batch_size": b, "seq_len": s})
    scenario = load_scenario(path)
    variant = scenario.variant("bf16-lora-gc")
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:2:16:8")  # PyTorch's default before sm90
    peaks = {}
    for target in ("cpu", "cuda"):
        out = tmp_path / f"{target}.json"
        run_variant(Job.make(scenario, variant, RunOptions("simulate", target=target),
                             run_id="test", result=out))
        sim = read_record(out)  # the CUDA target: on the fake CUDA device
        assert sim["memory"]["target"] == target
        est = estimate_record(scenario, variant, "test", target=target).as_dict()
        assert est["memory"]["peak_allocated_bytes"] == pytest.approx(
            sim["memory"]["peak_allocated_bytes"], rel=0.05)
        # The added terms alone: both targets on fake CPU tensors, as where no fake CUDA
        # device can be built (it also changes the kernels' own outputs, by a few KiB:
        # tests/probes/test_fake_cuda.py).
        with monkeypatch.context() as without:
            without.setattr(fake_cuda, "_why_not", "no compiler (this test)")
            run_variant(Job.make(scenario, variant, RunOptions("simulate", target=target),
                                 run_id="test", result=out))
        sim = read_record(out)
        if target == "cuda":
            assert "no fake CUDA device (no compiler (this test))" in " ".join(sim["notes"])
        peaks[target] = sim["memory"]["peak_allocated_bytes"], \
            est["memory"]["peak_allocated_bytes"]
    heads, d = 32, 64
    workspace = (4 * b * heads * s  # softmax_d, fp32, S rounded up to 128 (already)
                 + 4 * b * s * heads * d  # dq accumulator, fp32
                 + 2 * 2 * b * s * heads * d  # dk and dv expanded to 32 heads, bf16
                 + 2 * (4096 * 1024 * 2 + 16 * 1024 * 8))  # two cuBLAS handles' workspaces
    assert peaks["cuda"][0] - peaks["cpu"][0] == workspace  # simulated
    # estimated: the same, less AdamW's step counts, CPU scalars on CUDA (one per adapter
    # matrix: 2 layers × q/v, PEFT's default for Llama, × A/B), on the device's memory on CPU
    assert peaks["cuda"][1] - peaks["cpu"][1] == workspace - 2 * 2 * 2 * 512
