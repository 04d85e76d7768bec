"""chunked_nll computes the model's own loss, gradients included, without the full logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from harness.techniques.chunked_nll import chunked_causal_lm_loss
from tests.techniques.conftest import TOKENS, VOCAB

MODELS = Path(__file__).resolve().parent.parent.parent / "scenarios" / "models"


@pytest.fixture(scope="module")
def full_loss():
    """The model's own loss and gradients on one batch: what every chunk size must give."""
    torch.manual_seed(0)
    # dtype explicitly: from_config would take the config's torch_dtype (bfloat16).
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(MODELS / "tiny-llama.json"),
                                             dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (2, 64))
    labels = ids.clone()
    labels[0, :5] = -100  # ignored positions count in neither
    full = model(input_ids=ids, labels=labels).loss
    full.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return model, ids, labels, full.item(), grads


@pytest.mark.parametrize("chunk_size", [1, 37, 256, 10_000])
def test_chunked_loss_and_grads_equal_the_full_loss(full_loss, chunk_size):
    model, ids, labels, expected_loss, expected = full_loss
    model.zero_grad(set_to_none=True)
    chunked = chunked_causal_lm_loss(model, ids, labels, chunk_size)
    chunked.backward()
    assert chunked.item() == pytest.approx(expected_loss, rel=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_chunked_nll_cuts_the_peak_where_logits_dominate(bigvocab):
    full, chunked = (bigvocab[n]["memory"]["peak_allocated_bytes"]
                     for n in ("full-loss", "chunked-256"))
    logits_fp32 = TOKENS * VOCAB * 4
    # The full loss holds the fp32 logits and their gradient at once; chunks hold 256 rows.
    assert full - chunked > logits_fp32, (full, chunked)
    assert chunked < 0.6 * full


def test_trl_fused_head_gives_the_models_own_loss():
    """impl: trl runs what SFTTrainer runs; its loss is the model's own at temperature 1."""
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(MODELS / "tiny-llama.json"),
                                             dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (2, 64))
    full = model(input_ids=ids, labels=ids).loss
    add_fused_lm_head(model)
    fused = model(input_ids=ids, labels=ids, fused_lm_head=True).loss
    assert fused.item() == pytest.approx(full.item(), rel=1e-4)
