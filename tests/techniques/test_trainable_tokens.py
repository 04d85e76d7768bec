"""Trainable tokens train a few embedding rows; modules_to_save trains a whole embedding copy."""

from __future__ import annotations

import pytest

from harness.scenario import ScenarioError, load_scenario
from tests.conftest import run_cpu, write_scenario

TOKENS = list(range(32))
LORA = {"r": 8, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_cpu(tmp_path_factory.mktemp("tokens"), "tokens", [
        {"name": "lora-whole-embedding",
         "techniques": ["bf16", {"lora": {**LORA, "modules_to_save": ["embed_tokens"]}}]},
        {"name": "lora-trainable-tokens",
         "techniques": ["bf16", {"lora": {**LORA, "trainable_token_indices": {
             "embed_tokens": TOKENS}}}]},
        {"name": "trainable-tokens", "techniques": ["bf16", {"trainable_tokens": {
            "token_indices": TOKENS}}]},
    ])


def _state(record) -> int:
    end = record["memory"]["end_of_step_bytes"]
    return end["grads"] + end["optimizer"]


@pytest.mark.slow
def test_trainable_tokens_cost_far_less_than_training_the_whole_embedding(runs):
    whole, tokens = runs["lora-whole-embedding"], runs["lora-trainable-tokens"]
    hidden, vocab = 256, 4096  # tiny-llama
    assert whole["model"]["params_trainable"] - tokens["model"]["params_trainable"] == \
        vocab * hidden - len(TOKENS) * hidden
    assert _state(tokens) < 0.1 * _state(whole)
    assert tokens["memory"]["peak_allocated_bytes"] < whole["memory"]["peak_allocated_bytes"]


@pytest.mark.slow
def test_trainable_tokens_alone_train_only_those_rows(runs):
    assert runs["trainable-tokens"]["model"]["params_trainable"] == len(TOKENS) * 256


@pytest.mark.parametrize("indices, words", [([], "non-empty list"), ([5000], "vocabulary size")])
def test_trainable_tokens_need_valid_token_ids(tmp_path, indices, words):
    path = write_scenario(tmp_path, "bad", [{"name": "v", "techniques": [
        {"trainable_tokens": {"token_indices": indices}}]}])
    with pytest.raises(ScenarioError, match=words):
        load_scenario(path)
