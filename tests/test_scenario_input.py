"""Scenario input a user gets wrong, or writes in standard YAML we must accept: each mistake is
one line naming the file, the variant and the key (the ScenarioError a CLI exits 2 with)."""

from __future__ import annotations

import pytest
import yaml

from harness.scenario import MAX_NAME, ScenarioError, TrainSpec, load_scenario

HEAD = "name: s\nmodel: {config: tiny-llama}\n"


def _load(tmp_path, body: str, name: str = "s"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(body)
    return load_scenario(path)


def _refused(tmp_path, body: str, name: str = "s") -> str:
    with pytest.raises(ScenarioError) as caught:
        _load(tmp_path, body, name)
    text = str(caught.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("train, key, words", [
    ("[]", "train", "must be a mapping, got list"),
    ("0", "train", "must be a mapping, got int"),
    ("{optimizer: AdamW}", "train.optimizer", "did you mean 'adamw'"),
    ("{max_grad_norm: .nan}", "train.max_grad_norm", "finite"),
    ("{seed: -1}", "train.seed", "≥ 0"),
    ("{seed: 18446744073709551616}", "train.seed", "< 2**64"),
    ("{weight_decay: -0.1}", "train.weight_decay", "≥ 0"),
])
def test_train_values_are_checked_by_their_field(tmp_path, train, key, words):
    text = _refused(tmp_path, HEAD + f"train: {train}\nvariants: [{{name: a}}]\n")
    assert f"key {key!r}" in text and words in text


def test_train_with_every_key_commented_out_is_the_defaults(tmp_path):
    scenario = _load(tmp_path, HEAD + "train:\n  # batch_size: 4\nvariants: [{name: a}]\n")
    assert scenario.train == TrainSpec()


def test_a_variants_key_reads_from_the_top(tmp_path):
    text = _refused(tmp_path, HEAD + "variants:\n  - {name: a}\n  - {name: b, train: {lr: 0}}\n")
    assert "variant 'b'" in text and "key 'variants[1].train.lr'" in text and "> 0" in text
    text = _refused(tmp_path, HEAD + "variants:\n  - {name: a}\n  - {name: b, techniques: [BF16]}\n")
    assert "key 'variants[1].techniques[0]'" in text and "did you mean 'bf16'" in text


def test_a_parallel_world_beyond_what_can_be_simulated_is_refused(tmp_path):
    text = _refused(tmp_path, HEAD + "parallel: {strategy: fsdp2, world_size: 100000}\n"
                                     "variants: [{name: a}]\n")
    assert "key 'parallel.world_size'" in text and "≤ 1024" in text


def test_merge_keys_are_standard_yaml(tmp_path):
    scenario = _load(tmp_path, HEAD +
                     "train: &base {batch_size: 2, seq_len: 64}\n"
                     "variants:\n"
                     "  - {name: a}\n"
                     "  - name: b\n"
                     "    train: {<<: *base, seq_len: 128}\n")
    assert scenario.variant("b").train.batch_size == 2
    assert scenario.variant("b").train.seq_len == 128  # its own key overrides the merged one
    text = _refused(tmp_path, HEAD + "train: {batch_size: 2, batch_size: 3}\nvariants: [{name: a}]\n")
    assert "duplicate key 'batch_size'" in text


def test_aliases_that_expand_beyond_any_scenario_are_refused(tmp_path):
    """833 bytes of nested aliases once expanded to a 100 MB record."""
    lines = ["a0: &a0 [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]"]
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    body = HEAD + "x:\n" + "\n".join("  " + line for line in lines) + "\nvariants: [{name: a}]\n"
    assert len(body) < 1000 and yaml.safe_load(body)  # small on disk, valid YAML
    text = _refused(tmp_path, body)
    assert "expands to more than 100,000 values" in text


@pytest.mark.parametrize("name", ["..", ".", "a" * (MAX_NAME + 1)])
def test_names_are_one_safe_path_component(tmp_path, name):
    text = _refused(tmp_path, f"name: '{name}'\nmodel: {{config: tiny-llama}}\n"
                              "variants: [{name: a}]\n", name=name)
    assert "key 'name'" in text and f"at most {MAX_NAME}" in text
    text = _refused(tmp_path, HEAD + f"variants: [{{name: '{name}'}}]\n")
    assert "key 'variants[0].name'" in text
    assert _load(tmp_path, HEAD + f"variants: [{{name: '{'a' * MAX_NAME}'}}]\n")


@pytest.mark.parametrize("techniques, key, words", [
    ("[{lora: {r: 0}}]", "variants[0].techniques[0].lora", "`r` should be a positive integer"),
    ("[{qlora: {r: 0}}]", "variants[0].techniques[0].qlora", "`r` should be a positive integer"),
    ("[{lora: {bias: everything}}]", "variants[0].techniques[0].lora", "bias: everything"),
    ("[{lora: {init_lora_weights: bogus}}]", "variants[0].techniques[0].lora", "bogus"),
    ("[{lora: {target_modules: []}}]", "variants[0].techniques[0].lora", "No `target_modules`"),
    ("[{lora: {target_modules: 'q_proj,v_proj'}}]", "variants[0].techniques[0].lora",
     "q_proj,v_proj not found"),
    ("[{lora: {target_modules: [input_layernorm]}}]", "variants[0].techniques[0].lora",
     "LlamaRMSNorm((256,), eps=1e-05) is not supported"),
    ("[{lora: {layers_to_transform: [50]}}]", "variants[0].techniques[0].lora",
     "'layers_to_transform': [50]"),
    ("[{lora: {target_modules: [q_proj], exclude_modules: [q_proj]}}]",
     "variants[0].techniques[0].lora", "No modules were targeted"),
    ("[{qlora: {bnb_4bit_compute_dtype: int8}}]", "variants[0].techniques[0].qlora",
     "not a floating-point dtype"),
    ("[{lora: {lora_dropout: -0.5}}]", "variants[0].techniques[0].lora.lora_dropout",
     "within [0, 1]"),
    ("[{lora: {lora_alpha: -1}}]", "variants[0].techniques[0].lora.lora_alpha", "within [0, inf]"),
    ("[{lora: {task_type: SEQ_CLS}}]", "variants[0].techniques[0].lora.task_type",
     "set by the harness"),
    # What PEFT takes but cannot mean what was meant.
    ("[{lora: {r: 512, target_modules: [q_proj, v_proj]}}]", "variants[0].techniques[0].lora",
     "r 512 is above the smallest adapted layer's smaller side"),
    ("[{lora: {modules_to_save: [nothing_here]}}]", "variants[0].techniques[0].lora",
     "modules_to_save ['nothing_here'] match no module"),
    ("[{trainable_tokens: {token_indices: [-1]}}]",
     "variants[0].techniques[0].trainable_tokens.token_indices", "token ids"),
    ("[{trainable_tokens: {token_indices: [4096]}}]", "variants[0].techniques[0].trainable_tokens",
     "in [0, 4096), the vocabulary size 4096"),
    ("[{lora: {target_modules: [q_proj], target_parameters: [mlp.experts.gate_up_proj]}}]",
     "variants[0].techniques[0].lora", "target_parameters ['mlp.experts.gate_up_proj'] match no "
     "parameter of this model; it has none outside its linear and embedding layers"),
    ("[bf16, {qlora: {bnb_4bit_compute_dtype: float16}}]", "variants[0].techniques[1].qlora",
     "bnb_4bit_compute_dtype float16 with bf16 (weights in bfloat16) mixes dtypes"),
])
def test_what_a_stack_cannot_mean_is_bad_input_naming_the_technique(tmp_path, techniques, key,
                                                                    words):
    """Validation applies each variant's stack to the model on the meta device as the worker
    would (PEFT's and transformers' own refusals, in their words), after the techniques' own
    checks of what PEFT would take silently — all before anything runs."""
    text = _refused(tmp_path, HEAD + f"variants: [{{name: v, techniques: {techniques}}}]\n")
    assert "variant 'v'" in text and f"key {key!r}" in text and words in text


@pytest.mark.parametrize("change, words", [
    ({"vocab_size": 0}, "vocab_size must be ≥ 1, got 0"),
    ({"num_hidden_layers": 0}, "num_hidden_layers must be ≥ 1, got 0"),
    ({"num_attention_heads": 5}, "not a multiple of the number of attention heads"),
    ({"rope_scaling": {"rope_type": "bogus", "factor": 2.0}}, "cannot be built from its config"),
])
def test_a_model_config_transformers_cannot_build_is_bad_input(tmp_path, change, words):
    import json

    from tests.conftest import REPO

    config = json.loads((REPO / "scenarios" / "models" / "tiny-llama.json").read_text())
    (tmp_path / "m.json").write_text(json.dumps({**config, **change}))
    text = _refused(tmp_path, "name: s\nmodel: {config: ./m.json}\n"
                              "variants: [{name: v, techniques: [lora]}]\n")
    assert "key 'model.config'" in text and words in text


def test_no_default_target_modules_names_the_linear_layers(tmp_path):
    """PEFT has no default for Phi-3 (fused qkv_proj, gate_up_proj): say what to name."""
    import json

    phi3 = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 64,
            "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4,
            "num_hidden_layers": 2, "vocab_size": 320, "eos_token_id": 1, "pad_token_id": 0}
    (tmp_path / "phi3.json").write_text(json.dumps(phi3))
    text = _refused(tmp_path, "name: s\nmodel: {config: ./phi3.json}\n"
                              "variants: [{name: v, techniques: [lora]}]\n")
    assert "key 'variants[0].techniques[0].lora'" in text
    assert ("PEFT has no default target_modules for model_type 'phi3': name them (or all-linear); "
            "its linear layers: down_proj, gate_up_proj, lm_head, o_proj, qkv_proj") in text
    assert _load(tmp_path, "name: s\nmodel: {config: ./phi3.json}\n"
                           "variants: [{name: v, techniques: [{lora: {target_modules: all-linear}}]}]\n")


def _remote_code_model(folder):
    """A model whose config names its own code, as a hub repository with custom code does."""
    import json

    from tests.conftest import REPO

    config = json.loads((REPO / "scenarios" / "models" / "tiny-llama.json").read_text())
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        **config, "model_type": "tinyremote", "architectures": ["TinyRemoteForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_tiny.TinyRemoteConfig",
                     "AutoModelForCausalLM": "modeling_tiny.TinyRemoteForCausalLM"}}))
    (folder / "configuration_tiny.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass TinyRemoteConfig(LlamaConfig):\n"
        "    model_type = 'tinyremote'\n")
    (folder / "modeling_tiny.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_tiny import "
        "TinyRemoteConfig\n\n\nclass TinyRemoteForCausalLM(LlamaForCausalLM):\n"
        "    config_class = TinyRemoteConfig\n")


def test_custom_code_needs_trust_remote_code_and_runs_with_it(tmp_path):
    _remote_code_model(tmp_path / "remote")
    body = ("name: s\nmodel: {config: ./remote%s}\n"
            "variants: [{name: v, techniques: [{lora: {target_modules: [q_proj, v_proj]}}]}]\n")
    text = _refused(tmp_path, body % "")
    assert "key 'model.config'" in text and "hf.co" not in text
    assert ("names custom code (AutoConfig → configuration_tiny.TinyRemoteConfig, "
            "AutoModelForCausalLM → modeling_tiny.TinyRemoteForCausalLM): set "
            "model.trust_remote_code: true") in text
    scenario = _load(tmp_path, body % ", trust_remote_code: true")  # built on meta: it loads
    assert scenario.model.trust_remote_code


def test_a_hub_id_that_cannot_be_fetched_is_refused_at_once(tmp_path, monkeypatch):
    """Not in the cache: offline is said as such, and an unreachable hub after one request,
    not after the hub library's five retries (about 25 s)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    body = "name: s\nmodel: {config: org/some-model, weights: %s}\nvariants: [{name: v}]\n"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for weights in ("random", "pretrained"):
        text = _refused(tmp_path, body % weights)
        assert "key 'model.config'" in text and "hub id 'org/some-model'" in text
        assert "not in the local cache" in text and "HF_HUB_OFFLINE is set" in text
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    text = _refused(tmp_path, body % "pretrained")
    assert "not in the local cache, and http://127.0.0.1:9 cannot be reached" in text


def test_validation_leaves_nothing_behind_in_the_process():
    """Building each stack on meta must not patch the libraries for whatever this process runs
    next: qlora_mistral stacks Liger, which replaces transformers' Mistral classes when applied."""
    from transformers.models.mistral import modeling_mistral

    before = dict(vars(modeling_mistral))
    load_scenario("qlora_mistral")
    after = vars(modeling_mistral)
    assert [k for k in before if after.get(k) is not before[k]] == []



def test_a_hub_id_resolves_to_its_config_in_the_hub_cache_layout(tmp_path, monkeypatch):
    """`config: org/name` with random weights needs the config only: found in a cache laid out
    as the hub library lays it out (models--org--name/snapshots/<sha>/, refs/main naming the
    snapshot), offline, and the model built from it trains."""
    from huggingface_hub import constants

    from tests.conftest import REPO, measured_variants

    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--acme--tiny-moe"
    (repo / "snapshots" / sha).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    (repo / "snapshots" / sha / "config.json").write_text(
        (REPO / "scenarios" / "models" / "tiny-mixtral.json").read_text())
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _, got = measured_variants(tmp_path, "hub", [{"name": "bf16", "techniques": ["bf16"]}],
                               modes=lambda name: (False,), model={"config": "acme/tiny-moe"},
                               train={"batch_size": 1, "seq_len": 16, "steps": 1,
                                      "warmup_steps": 0})
    assert got["bf16", False].result.experts["count"] == 4  # the cached config's, built
