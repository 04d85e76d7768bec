"""The models a scenario trains: the committed zoo (each config's parameters against its
published count), how its layers are described, and a variant's own model.

Fast: a variant's `model:` keys, the layer pattern. Slow: every committed config built on
meta, `harness ls models`, a run over two models.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.job import Job, RunOptions
from harness.scenario import ScenarioError, load_scenario
from tests.conftest import REPO, harness, last_json, write_scenario

MODELS = REPO / "scenarios" / "models"


def test_a_variant_trains_its_own_model_keys_on_top_of_the_scenario_s(tmp_path):
    loaded = load_scenario(write_scenario(
        tmp_path, "two", [{"name": "llama"},
                          {"name": "mixtral", "model": {"config": "tiny-mixtral",
                                                        "experts": "eager"}}],
        model={"config": "tiny-llama", "attn_implementation": "eager"}))
    llama, mixtral = loaded.variants
    assert llama.model is None and loaded.model_of(llama) == loaded.model
    assert loaded.model_of(mixtral).config == "tiny-mixtral"
    assert loaded.model_of(mixtral).attn_implementation == "eager"  # the scenario's, kept
    job = Job.make(loaded, mixtral, RunOptions("simulate"), run_id="r",
                   result=tmp_path / "r.json")
    assert job.scenario.model.config == "tiny-mixtral"  # what the worker reads


@pytest.mark.parametrize(("model", "key", "says"), [
    ({"config": "tiny-lama"}, "variants[1].model.config", "did you mean 'tiny-llama'?"),
    ({"experts": "eager"}, "variants[1].model.experts", "no mixture of experts"),
    ({"config": "tiny-mixtral", "atn_implementation": "sdpa"},
     "variants[1].model.atn_implementation", "did you mean 'attn_implementation'?"),
    ("tiny-mixtral", "variants[1].model", "must be a mapping"),
])
def test_a_variant_s_bad_model_names_the_variant_and_key(tmp_path, model, key, says):
    with pytest.raises(ScenarioError) as caught:
        load_scenario(write_scenario(tmp_path, "two", [{"name": "a"}, {"name": "b",
                                                                         "model": model}]))
    message = str(caught.value)
    assert "variant 'b'" in message and f"key '{key}'" in message and says in message, message


def test_a_variant_s_model_is_checked_against_its_own_stack(tmp_path):
    """LoRA without targets builds on Llama (PEFT's default q/v) and not on Mixtral, whose
    variant is the one named."""
    with pytest.raises(ScenarioError) as caught:
        load_scenario(write_scenario(tmp_path, "two", [
            {"name": "llama", "techniques": [{"lora": {"r": 4}}]},
            {"name": "mixtral", "model": {"config": "tiny-mixtral"},
             "techniques": [{"lora": {"r": 4}}]}]))
    assert "variant 'mixtral'" in str(caught.value) and "target_modules" in str(caught.value)


def test_interleaved_layers_are_described_by_their_period():
    from transformers import Gemma3TextConfig, LlamaConfig

    from harness.models import describe_layers, layer_pattern

    gemma = Gemma3TextConfig(num_hidden_layers=26)  # 5 sliding-window layers to 1 global
    assert layer_pattern(gemma) == (["sliding_attention"] * 5 + ["full_attention"], 26)
    assert describe_layers(gemma) == "26: (5 sliding, 1 full) ×4 + 2 sliding"
    assert describe_layers(LlamaConfig(num_hidden_layers=16)) == "16 alike"


@pytest.mark.slow
def test_every_real_size_config_has_its_published_parameter_count_within_half_a_percent():
    """Each committed config but the tiny test models, built on meta, against the count its
    publisher states (scenarios/models/published.yaml says where; a checkpoint that stores a
    tied output embedding again, as Qwen3's smallest do, counts it twice: `tied_stored`)."""
    from harness.models import ConfigSource, load_config, parameter_count, published

    known = published()
    configs = sorted(p.stem for p in MODELS.glob("*.json") if not p.stem.startswith("tiny-"))
    assert sorted(known) == configs  # every real-size config, and only those
    for name in configs:
        entry = known[name]
        assert entry["hub"] and entry["source"], name
        built = parameter_count(load_config(ConfigSource("file", str(MODELS / f"{name}.json"),
                                                         name)))
        assert built == pytest.approx(entry["params"] - entry.get("tied_stored", 0),
                                      rel=0.005), (name, built)


@pytest.mark.slow
def test_ls_models_prints_each_config_with_its_parameters_and_layers(cli):
    proc = cli("ls", "models")
    assert proc.returncode == 0
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line}
    assert set(rows) >= {p.stem for p in MODELS.glob("*.json")}
    family, params, _, layers, experts, _ = rows["tiny-mixtral"]
    assert family == "mixtral" and params == "9.1 M" and layers == "4 alike"
    assert experts == "4 × top 2"
    assert rows["llama-3.1-8b"][1] == "8.03 B" and rows["llama-3.1-8b"][5] == \
        "meta-llama/Llama-3.1-8B"


@pytest.mark.slow
def test_a_run_over_two_models_records_each_variant_s_and_tables_them(tmp_path):
    path = write_scenario(tmp_path, "two", [
        {"name": "llama", "techniques": ["bf16"]},
        {"name": "mixtral", "model": {"config": "tiny-mixtral"}, "techniques": ["bf16"]}],
        train={"batch_size": 1, "seq_len": 32, "steps": 1, "warmup_steps": 0})
    proc = harness("run", str(path), "--device", "simulate", "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = Path(last_json(proc.stdout)["run_dir"])
    records = {n: json.loads((run_dir / f"{n}.json").read_text()) for n in ("llama", "mixtral")}
    assert records["llama"]["model"]["config"] == "tiny-llama"
    assert records["llama"]["model"]["experts"] is None
    assert records["mixtral"]["model"]["config"] == "tiny-mixtral"
    assert records["mixtral"]["model"]["experts"]["count"] == 4
    table = {cells[0]: cells for cells in ([c.strip() for c in line.split("|")[1:-1]]
                                           for line in proc.stdout.splitlines()
                                           if line.startswith("| "))}
    assert "model: see each row" in proc.stdout
    assert table["mixtral"][1] == "tiny-mixtral" and table["llama"][1] == "tiny-llama"


def _trains_on_text(folder: Path, config) -> None:
    """A vision-language config, built by the harness and trained on text one step: measured
    and simulated, the whole model (its vision tower too: transformers' own build of the
    config has as many parameters) within 1 % at the peak."""
    from harness.models import parameter_count
    from tests.conftest import measured_variants

    config.save_pretrained(folder / "vlm")
    _, got = measured_variants(folder, "vlm", [{"name": "bf16", "techniques": ["bf16"]}],
                               model={"config": "./vlm"},
                               train={"batch_size": 1, "seq_len": 32, "steps": 1,
                                      "warmup_steps": 0})
    real, sim = got["bf16", False], got["bf16", True]
    assert real.result.params_total == sim.result.params_total == parameter_count(config)
    assert sim.memory["peak_allocated_bytes"] == pytest.approx(
        real.memory["peak_allocated_bytes"], rel=0.01)


@pytest.mark.slow
def test_a_multimodal_config_trains_on_text_its_vocabulary_in_its_text_config(tmp_path):
    """Gemma-3 4B and up are multimodal (Gemma3ForConditionalGeneration): their vocabulary
    lives in `text_config`. Trained on text, the vision tower is built beside the language
    model, frozen or not as the techniques say."""
    from transformers import Gemma3Config

    _trains_on_text(tmp_path, Gemma3Config(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                         vocab_size=1024, sliding_window=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=28, patch_size=14),
        mm_tokens_per_image=4))


@pytest.mark.slow
def test_a_model_only_image_text_to_text_builds_trains_on_text(tmp_path):
    """Qwen2.5-VL has no causal-LM class: the harness builds its image-text-to-text model (the
    vision tower beside the language model) and trains it on text."""
    from transformers import Qwen2_5_VLConfig

    _trains_on_text(tmp_path, Qwen2_5_VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, vocab_size=1024,
                         bos_token_id=1, eos_token_id=2,
                         rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]}),
        vision_config=dict(hidden_size=32, intermediate_size=64, depth=1, num_heads=2,
                           out_hidden_size=64, fullatt_block_indexes=[0], window_size=28,
                           patch_size=14, spatial_merge_size=2)))
