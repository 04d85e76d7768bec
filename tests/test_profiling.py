"""Profiling your own training code: `harness.profile()` around a hand-written loop and
`harness.MemoryCallback` in transformers' Trainer and TRL's SFT, DPO and GRPO trainers write
the record `harness run` writes — and for the same shape, the same peak."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import harness
from harness.objectives import word_tokenizer
from tests.conftest import REPO, last_json, write_scenario
from tests.conftest import harness as cli

BATCH, SEQ = 2, 64


def tiny_lora():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(REPO / "scenarios" / "models" / "tiny-llama.json")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16)), config


def batches(vocab: int, n: int):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": (ids := torch.randint(0, vocab, (SEQ,), generator=g)), "labels": ids}
            for _ in range(n)]


@pytest.fixture(scope="module")
def harness_run(tmp_path_factory) -> dict:
    """The same shape through `harness run` on CPU: two steps (one warm-up), LoRA r=8."""
    folder = tmp_path_factory.mktemp("profiled")
    path = write_scenario(folder, "same", [
        {"name": "lora", "techniques": ["bf16", {"lora": {"r": 8, "lora_alpha": 16}}]}],
        train={"batch_size": BATCH, "seq_len": SEQ})
    proc = cli("run", str(path), "--device", "cpu", "--out", str(folder / "out"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((Path(last_json(proc.stdout)["run_dir"]) / "lora.json").read_text())


@pytest.mark.slow
def test_a_profiled_loop_measures_what_harness_run_measures(tmp_path, harness_run, capsys):
    model, config = tiny_lora()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)  # as harness run's adamw
    data = batches(config.vocab_size, 2 * BATCH)
    with harness.profile("loop", model=model, optimizer=optimizer, out=tmp_path,
                         train={"batch_size": BATCH, "seq_len": SEQ}) as prof:
        for step in range(2):
            batch = {k: torch.stack([d[k] for d in data[step * BATCH:(step + 1) * BATCH]])
                     for k in ("input_ids", "labels")}
            with prof.phase("forward", step):
                optimizer.zero_grad(set_to_none=True)
                loss = model(**batch, use_cache=False).loss
            with prof.phase("backward", step):
                loss.backward()
            with prof.phase("optimizer", step):
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
            del loss
    record = json.loads(prof.record_path.read_text())
    assert record["status"] == "ok" and record["method"] == "measured-cpu"
    assert f"record {prof.record_path.resolve()}" in capsys.readouterr().err  # says where
    mine, theirs = record["memory"], harness_run["memory"]
    assert mine["peak_allocated_bytes"] == pytest.approx(theirs["peak_allocated_bytes"], rel=0.01)
    for phase in ("forward", "backward", "optimizer"):
        assert mine["phases"][phase]["peak_allocated_bytes"] == pytest.approx(
            theirs["phases"][phase]["peak_allocated_bytes"], rel=0.01), phase
    # The model existed before the profile began: its parameters are counted all the same.
    assert mine["end_of_step_bytes"]["params"] == theirs["end_of_step_bytes"]["params"]
    assert mine["end_of_step_bytes"]["optimizer"] == theirs["end_of_step_bytes"]["optimizer"]
    # The record lands in the same tables.
    assert len(harness.load_results(prof.record_path.parent)) == 1


@pytest.mark.slow
def test_the_trainer_callback_record_matches_harness_run(tmp_path, harness_run):
    from transformers import Trainer, TrainingArguments

    model, config = tiny_lora()
    callback = harness.MemoryCallback("trainer", out=tmp_path)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=BATCH,
                             max_steps=2, report_to="none", save_strategy="no", use_cpu=True,
                             optim="adamw_torch", learning_rate=1e-4, logging_strategy="no",
                             remove_unused_columns=False, dataloader_num_workers=0)
    Trainer(model=model, args=args, train_dataset=batches(config.vocab_size, 8),
            callbacks=[callback]).train()
    record = json.loads(callback.record_path.read_text())
    assert record["status"] == "ok"
    assert (record["train"]["batch_size"], record["train"]["seq_len"], record["train"]["steps"]) \
        == (BATCH, SEQ, 2)
    mine, theirs = record["memory"], harness_run["memory"]
    # Trainer's AdamW on CPU loops over parameters (no foreach temporaries): LoRA's state is
    # tiny, so the peak — the start of backward — is the same.
    assert mine["peak_phase"] == theirs["peak_phase"] == "backward"
    assert mine["peak_allocated_bytes"] == pytest.approx(theirs["peak_allocated_bytes"], rel=0.01)
    assert mine["breakdown_bytes"]["activations"] == pytest.approx(
        theirs["breakdown_bytes"]["activations"], rel=0.01)


@pytest.mark.slow
def test_the_callback_attributes_accumulated_micro_batches_as_harness_run_does(tmp_path,
                                                                               harness_run):
    """With accumulation the second micro-batch's forward is a forward: its saved tensors are
    activations (as many as one micro-batch's without accumulation), the first one's grads
    are held beside them, and the record says so."""
    from transformers import Trainer, TrainingArguments

    model, config = tiny_lora()
    callback = harness.MemoryCallback("accumulated", out=tmp_path)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=BATCH,
                             gradient_accumulation_steps=2, max_steps=2, report_to="none",
                             save_strategy="no", use_cpu=True, optim="adamw_torch",
                             learning_rate=1e-4, logging_strategy="no",
                             remove_unused_columns=False, dataloader_num_workers=0)
    Trainer(model=model, args=args, train_dataset=batches(config.vocab_size, 8),
            callbacks=[callback]).train()
    record = json.loads(callback.record_path.read_text())
    assert record["status"] == "ok"
    assert (record["train"]["batch_size"], record["train"]["gradient_accumulation_steps"],
            record["train"]["effective_batch_size"]) == (BATCH, 2, 2 * BATCH)
    mine, theirs = record["memory"], harness_run["memory"]
    assert mine["peak_phase"] == "backward" and mine["peak_micro_batch"] == 1
    adapters = record["model"]["params_trainable"] * 2  # bf16 grads
    assert mine["breakdown_bytes"]["grads"] >= adapters
    assert mine["breakdown_bytes"]["activations"] == pytest.approx(
        theirs["breakdown_bytes"]["activations"], rel=0.02)
    assert mine["breakdown_bytes"]["other"] <= 1.1 * theirs["breakdown_bytes"]["other"]


@pytest.mark.slow
def test_an_evaluation_inside_train_is_a_phase_and_can_set_the_peak(tmp_path):
    """Trainer keeps every eval batch's logits on the device unless told otherwise
    (eval_accumulation_steps): with a larger eval batch that outgrows the training step."""
    from transformers import Trainer, TrainingArguments

    model, config = tiny_lora()
    callback = harness.MemoryCallback("evaluated", out=tmp_path)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=BATCH,
                             per_device_eval_batch_size=16, eval_strategy="steps", eval_steps=1,
                             max_steps=2, report_to="none", save_strategy="no", use_cpu=True,
                             optim="adamw_torch", learning_rate=1e-4, logging_strategy="no",
                             remove_unused_columns=False, dataloader_num_workers=0)
    Trainer(model=model, args=args, train_dataset=batches(config.vocab_size, 8),
            eval_dataset=batches(config.vocab_size, 64), callbacks=[callback]).train()
    memory = json.loads(callback.record_path.read_text())["memory"]
    evaluated = memory["phases"]["eval"]
    logits = 64 * SEQ * config.vocab_size * 2  # every eval batch's, bf16
    assert memory["peak_phase"] == "eval"
    assert evaluated["breakdown_bytes"]["other"] >= logits
    assert evaluated["breakdown_bytes"]["grads"] == 0  # zeroed at the step's end
    training = max(memory["phases"][p]["peak_allocated_bytes"]
                   for p in ("forward", "backward", "optimizer"))
    assert max(memory["per_step_peak_allocated_bytes"]) == training  # the steps' own


@pytest.mark.slow
def test_a_checkpoint_the_trainer_saves_is_the_save_phase(tmp_path):
    """save_steps: Trainer writes each checkpoint (the adapters, the optimizer's and the
    scheduler's state) after the step and any evaluation: the phase save, holding the
    weights and AdamW's state, the grads already zeroed; the checkpoints are on disk."""
    from transformers import Trainer, TrainingArguments

    model, config = tiny_lora()
    callback = harness.MemoryCallback("saved", out=tmp_path / "records")
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=BATCH,
                             per_device_eval_batch_size=BATCH, eval_strategy="steps",
                             eval_steps=2, save_strategy="steps", save_steps=1, max_steps=2,
                             report_to="none", use_cpu=True, optim="adamw_torch",
                             learning_rate=1e-4, logging_strategy="no",
                             remove_unused_columns=False, dataloader_num_workers=0)
    Trainer(model=model, args=args, train_dataset=batches(config.vocab_size, 8),
            eval_dataset=batches(config.vocab_size, 4), callbacks=[callback]).train()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["checkpoint-1",
                                                                    "checkpoint-2"]
    memory = json.loads(callback.record_path.read_text())["memory"]
    saved = memory["phases"]["save"]
    at_peak = saved["breakdown_bytes"]
    assert at_peak["grads"] == 0 and at_peak["activations"] <= 4096
    assert at_peak["params"] >= record_params(callback) and at_peak["optimizer"] > 0
    assert memory["phases"]["eval"] is not None  # evaluated after step 2, then saved


def record_params(callback) -> int:
    """The model's bf16 weights (and fp32 adapters), from the record's parameter counts."""
    model = json.loads(callback.record_path.read_text())["model"]
    return 2 * (model["params_total"] - model["params_trainable"])


@pytest.mark.slow
def test_the_callback_profiles_sft_trainer(tmp_path):
    from datasets import Dataset
    from peft import LoraConfig
    from tokenizers import Tokenizer, models
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    config = AutoConfig.from_pretrained(REPO / "scenarios" / "models" / "tiny-llama.json")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    vocab = {f"t{i}": i for i in range(config.vocab_size)}  # no tokenizer files: one in code
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), pad_token="t0",
        eos_token="t1")
    data = Dataset.from_list([{"input_ids": b["input_ids"].tolist()}
                              for b in batches(config.vocab_size, 8)])
    callback = harness.MemoryCallback("sft", out=tmp_path)
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=BATCH, max_steps=2,
                     report_to="none", save_strategy="no", use_cpu=True, learning_rate=1e-4,
                     logging_strategy="no", max_length=SEQ, packing=False,
                     dataloader_num_workers=0)
    SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
               peft_config=LoraConfig(r=8, lora_alpha=16), callbacks=[callback]).train()
    record = json.loads(callback.record_path.read_text())
    memory = record["memory"]
    assert record["status"] == "ok" and memory["peak_phase"] == "backward"
    trainable = record["model"]["params_trainable"]
    # AdamW's two fp32 moments per adapter weight (and a step count per tensor).
    assert memory["end_of_step_bytes"]["optimizer"] == pytest.approx(8 * trainable, rel=0.1)
    assert all(memory["phases"][p]["peak_allocated_bytes"] > memory["end_of_step_bytes"]["params"]
               for p in ("forward", "backward", "optimizer"))


@pytest.mark.slow
def test_the_callback_profiles_dpo_trainer_with_its_reference_forward_in_forward(tmp_path):
    """TRL's DPOTrainer with a LoRA adapter: its reference is the base with the adapter
    disabled, a forward without grad that TRL runs after the policy's. That forward is inside
    the forward phase (backward starts where the first gradient reaches the policy's output),
    and it adds nothing to grads or optimizer state: those are the adapter's alone. The
    pairs are chosen + rejected: the forward sees twice the batch."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoConfig, AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    config = AutoConfig.from_pretrained(REPO / "scenarios" / "models" / "tiny-llama.json")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    g = torch.Generator().manual_seed(0)

    def text(n):
        return " ".join(f"w{i}" for i in torch.randint(2, config.vocab_size, (n,), generator=g))

    data = Dataset.from_list([{"prompt": text(16) + " ", "chosen": text(15), "rejected": text(15)}
                              for _ in range(8)])
    callback = harness.MemoryCallback("dpo", out=tmp_path)
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=BATCH, max_steps=2,
                     report_to="none", save_strategy="no", use_cpu=True, learning_rate=1e-4,
                     logging_strategy="no", dataloader_num_workers=0, optim="adamw_torch")
    trainer = DPOTrainer(model=model, args=args, train_dataset=data,
                         processing_class=word_tokenizer(config.vocab_size),
                         peft_config=LoraConfig(r=8, lora_alpha=16), callbacks=[callback])
    forwards = []  # (grad enabled, the callback's phase, sequences) at each forward's start
    trainer.model.register_forward_pre_hook(
        lambda module, args, kwargs: forwards.append(
            (torch.is_grad_enabled(), callback.prof.current, *kwargs["input_ids"].shape)),
        with_kwargs=True)
    assert trainer.ref_model is None  # the adapter-disabled base
    trainer.train()
    pairs = (2 * BATCH, 16 + 15 + 1)  # chosen and rejected, each prompt + completion + EOS
    assert forwards == [(True, "forward", *pairs), (False, "forward", *pairs)] * 2
    record = json.loads(callback.record_path.read_text())
    memory, trainable = record["memory"], record["model"]["params_trainable"]
    assert record["status"] == "ok" and record["train"]["seq_len"] == 16 + 15 + 1  # + EOS
    lora = sum(p.numel() for n, p in trainer.model.named_parameters() if "lora_" in n)
    assert trainable == lora
    # At the optimizer step's peak the grads are the adapter's (Trainer zeroes them at the
    # step's end), the state AdamW's two fp32 moments of it.
    # (Each tensor's allocation rounds up to 512 bytes; AdamW keeps a step count per tensor.)
    tensors = len([n for n, _ in trainer.model.named_parameters() if "lora_" in n])
    at_step = memory["phases"]["optimizer"]["breakdown_bytes"]
    assert 4 * lora <= at_step["grads"] <= 4 * lora + 512 * tensors
    assert 8 * lora <= memory["end_of_step_bytes"]["optimizer"] <= 8 * lora + 3 * 512 * tensors


@pytest.mark.slow
def test_the_callback_profiles_grpo_trainer_with_its_generation_a_phase(tmp_path):
    """TRL's GRPOTrainer makes its completions inside the step: that `generate` is the phase
    generate, holding the KV cache of prompts × num_generations sequences (each prompt's
    positions and all but the last completion token's); the policy's forward over prompt +
    completion follows, in forward."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoConfig, AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    config = AutoConfig.from_pretrained(REPO / "scenarios" / "models" / "tiny-llama.json")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    g = torch.Generator().manual_seed(0)
    prompt, completion, generations, completions = 16, 8, 2, 4  # 2 prompts a step

    def text(n):
        return " ".join(f"w{i}" for i in torch.randint(2, config.vocab_size, (n,), generator=g))

    callback = harness.MemoryCallback("grpo", out=tmp_path)
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=completions,
                      num_generations=generations, max_completion_length=completion,
                      generation_kwargs={"min_new_tokens": completion}, max_steps=2,
                      report_to="none", save_strategy="no", use_cpu=True, learning_rate=1e-4,
                      logging_strategy="no", dataloader_num_workers=0, optim="adamw_torch")
    trainer = GRPOTrainer(
        model=model, args=args, train_dataset=Dataset.from_list([{"prompt": text(prompt)}] * 8),
        processing_class=word_tokenizer(config.vocab_size),
        reward_funcs=lambda completions, **kwargs: [float(len(c)) for c in completions],
        peft_config=LoraConfig(r=8, lora_alpha=16), callbacks=[callback])
    forwards = []
    trainer.model.register_forward_pre_hook(
        lambda module, args, kwargs: forwards.append(
            (torch.is_grad_enabled(), callback.prof.current, *kwargs["input_ids"].shape)),
        with_kwargs=True)
    trainer.train()
    assert forwards == [(True, "forward", completions, prompt + completion)] * 2
    record = json.loads(callback.record_path.read_text())
    memory = record["memory"]
    assert record["status"] == "ok" and memory["phases"]["generate"] is not None
    head_dim = config.hidden_size // config.num_attention_heads
    per_position = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * \
        model.dtype.itemsize  # keys and values, every layer
    assert memory["kv_cache_bytes"] == completions * (prompt + completion - 1) * per_position
