"""--device simulate at full size and depth: a 7B model sized against common cards, deep models
assembled from three layers, tied weights kept as one tensor. (Apart from
test_simulate.py so that the two files run on different test workers.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.gpus import HEADROOM_BYTES, smallest_fitting
from tests.conftest import REPO, harness, last_json, records, write_scenario

LORA = {"lora": {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj",
                                                                "o_proj"]}}


@pytest.mark.slow
def test_a_full_size_model_is_simulated_and_sized_against_common_cards(tmp_path):
    """Mistral-7B LoRA, never allocated: its bf16 base is exactly 2 bytes per parameter and its
    fp32 adapters 4; the allocator replay of its 32-layer step (assembled from 3 layers)
    predicts what it reserves, and the table names the smallest card that holds that."""
    proc = harness("run", "qlora_mistral", "--device", "simulate", "--variant", "lora",
                   "--out", str(tmp_path))
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
    gpu, verdict = smallest_fitting(need)
    assert verdict.left_bytes >= HEADROOM_BYTES and verdict.need_bytes == need
    assert f"| {gpu.name} +{verdict.left_bytes / 2**30:.1f} |" in proc.stdout  # the narrow table
    summary = (Path(last_json(proc.stdout)["run_dir"]) / "summary.md").read_text()
    assert f"| {gpu.name} (+{verdict.left_bytes / 2**30:.1f})" in summary  # every column


@pytest.mark.slow
def test_a_deep_model_assembled_from_three_layers_equals_simulating_every_layer(tmp_path):
    """A 7-layer model simulated at 3 layers (and 2, to check) and assembled layer by layer
    gives the record that simulating all 7 gives: every figure, reserved memory included —
    for a stack whose peak moves with depth (checkpointing + SGD) too, and for the job after
    the steps (evaluation, generation, saving and merging)."""
    config = json.loads((REPO / "scenarios" / "models" / "tiny-llama.json").read_text())
    (tmp_path / "deep.json").write_text(json.dumps({**config, "num_hidden_layers": 7}))
    variants = [{"name": "full-bf16", "techniques": ["bf16"]},
                {"name": "lora-gc-chunked", "techniques": ["bf16", LORA, "gradient_checkpointing",
                                                           {"chunked_nll": {"chunk_size": 64}}]},
                {"name": "qlora-gc", "techniques": [{"qlora": LORA["lora"]},
                                                    "gradient_checkpointing"]},
                {"name": "bf16-gc-sgd", "techniques": ["bf16", "gradient_checkpointing"],
                 "train": {"optimizer": "sgd"}},
                # The job after the steps: no-grad forwards, a KV cache, a merge layer by layer.
                {"name": "lora-whole-job", "techniques": ["bf16", LORA],
                 "eval": {"batch_size": 4, "keep_logits": True},
                 "generate": {"prompt_len": 16, "max_new_tokens": 8},
                 "save": ["adapters", "merged"]}]
    path = write_scenario(tmp_path, "deep", variants, model={"config": "./deep.json"})
    got = {}
    for mode in ("assembled", "full"):
        proc = harness("run", str(path), "--device", "simulate", "--out", str(tmp_path / mode),
                       *(["--full-depth"] if mode == "full" else []))
        assert proc.returncode == 0, proc.stderr[-3000:]
        got[mode] = records(Path(last_json(proc.stdout)["run_dir"]))
    for variant in variants:
        fast, full = got["assembled"][variant["name"]], got["full"][variant["name"]]
        assert fast["status"] == full["status"] == "ok", (fast["error"], full["error"])
        assert any("3 of the 7 identical decoder layers, the 7-layer step assembled" in n
                   for n in fast["notes"]), fast["notes"]
        assert not any("identical decoder layers" in n for n in full["notes"])
        assert fast["memory"] == full["memory"], variant["name"]
        assert fast["memory"]["peak_reserved_bytes"] >= fast["memory"]["peak_allocated_bytes"]
        assert fast["model"]["params_total"] == full["model"]["params_total"]
    job = got["assembled"]["lora-whole-job"]
    assert {"eval", "generate", "save"} <= job["memory"]["phases"].keys()
    assert [s["written_bytes"] for s in job["save"]] == \
        [s["written_bytes"] for s in got["full"]["lora-whole-job"]["save"]]


@pytest.mark.slow
def test_tied_weights_stay_one_tensor_in_real_and_simulated_builds(tmp_path):
    """An LM head tied to the embedding (Llama-3.2-1B/3B) is one tensor, whatever the build:
    plain, QLoRA (built on meta, then quantized) or simulated (materialised from meta)."""
    import torch

    from harness.models import resolve_config
    from harness.scenario import load_scenario
    from harness.train import measure

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
            outcome, memory, result, _ = measure(scenario, source, variant, variant.train,
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


@pytest.mark.slow
@pytest.mark.parametrize(("family", "layers", "period"), [("gemma2", 14, 2), ("gemma3", 19, 3)])
def test_interleaved_layers_assembled_from_periods_equal_every_layer(tmp_path, family, layers,
                                                                     period):
    """Layers whose kinds repeat (Gemma-2: sliding and global in turn; a Gemma-3 of 2 sliding
    to 1 global, 19 layers: 6 periods and 1 layer more, which the last period holds) are
    assembled period by period from 3 of them (and 2, to check) into the record simulating
    every layer gives, reserved memory included. (Where the two shallow runs would hold as
    many layers as the model, every layer is simulated: a 34-layer Gemma-3 of 5 to 1.)"""
    from transformers import Gemma2Config, Gemma3TextConfig

    shape = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=2048,
                 sliding_window=16)
    config = Gemma2Config(**shape, query_pre_attn_scalar=32) if family == "gemma2" else \
        Gemma3TextConfig(**shape, layer_types=[
            "full_attention" if i % period == period - 1 else "sliding_attention"
            for i in range(layers)])
    config.save_pretrained(tmp_path / family)
    path = write_scenario(tmp_path, "pattern", [
        {"name": "lora-gc", "techniques": ["bf16", {"lora": {"r": 8, "target_modules": [
            "q_proj", "v_proj"]}}, "gradient_checkpointing"]}],
        model={"config": f"./{family}",
               **({"attn_implementation": "eager"} if family == "gemma2" else {})},
        train={"batch_size": 2, "seq_len": 64, "steps": 1, "warmup_steps": 1})
    got = {}
    for mode in ("assembled", "full"):
        proc = harness("run", str(path), "--device", "simulate", "--out", str(tmp_path / mode),
                       *(["--full-depth"] if mode == "full" else []))
        assert proc.returncode == 0, proc.stderr[-3000:]
        got[mode] = records(Path(last_json(proc.stdout)["run_dir"]))["lora-gc"]
    fast, full = got["assembled"], got["full"]
    assert f"3 of the {layers // period} periods of {period} decoder layers" in fast["notes"][0]
    assert "assembled from them period by period" in fast["notes"][0], fast["notes"][0]
    assert fast["memory"] == full["memory"]
    assert fast["memory"]["peak_reserved_bytes"] is not None
