"""Objectives beyond the supervised step: TRL's preference losses, run by TRL's own code.

`objective: dpo` (or `{dpo: {beta: 0.1, precompute_ref_log_probs: true}}`; `orpo`) at the top
of a scenario or in a variant replaces the step's loss with TRL's trainer's: the harness builds
`trl.DPOTrainer` (`trl.experimental.orpo.ORPOTrainer`) around the model its techniques made
(the trainer never trains: its
`compute_loss` is the step's loss, called on batches its own data collator makes from
synthetic pairs, tokenized by its own dataset preparation), and runs the step, the probe and
the optimizer as for `sft`. A TRL upgrade therefore shows in the figures.

What sets the memory of a preference step, and the record's `objective` says:
  sequences   chosen and rejected: every forward sees 2 × batch sequences
  reference   adapter_disabled  PEFT's base with the adapter disabled (TRL given a
                                `peft_config`): no second copy, one more forward without grad
              ref_adapter       a frozen copy of the adapter, named "ref" (TRL given a PeftModel)
              copy              a second model, frozen (TRL's `ref_model`; its default for a
                                full fine-tune)
              precomputed       `precompute_ref_log_probs: true`: the reference forwards run
                                once before training (phase `reference`); the step has none
              none              ORPO: an odds-ratio term beside the NLL, no reference
  completion  DPO: TRL's fused LM head scores only completion positions (on CUDA) in tiles,
              never the [sequences, length, vocabulary] logits; ORPO: the model's full logits

Arguments are TRL's config fields, checked against its config class (`beta`, `loss_type`,
`precompute_ref_log_probs`, `max_length`, …); what the scenario's `train:` and techniques say
(batch, learning rate, checkpointing, precision) are not objective arguments. Two keys are the
harness's own: `reference` (above) and `prompt_len`, the prompt's share of `seq_len` tokens
(default half; the completion ends with the tokenizer's EOS).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import tempfile
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

SFT = "sft"
# name → (TRL config class, trainer class), as importable paths
TRAINERS = {"dpo": ("trl.DPOConfig", "trl.DPOTrainer"),
            "orpo": ("trl.experimental.orpo.ORPOConfig", "trl.experimental.orpo.ORPOTrainer")}
WITH_REFERENCE = ("dpo",)  # objectives whose loss compares with a reference model
NOT_BUILT = ("kto", "reward", "grpo")
REFERENCES = ("adapter_disabled", "ref_adapter", "copy")
OWN_KEYS = ("reference", "prompt_len")  # the harness's, beside TRL's config fields
# TrainingArguments fields the scenario sets through train: and the techniques.
_FROM_SCENARIO = {"per_device_train_batch_size": "train.batch_size",
                  "gradient_accumulation_steps": "train.gradient_accumulation_steps",
                  "learning_rate": "train.lr", "max_grad_norm": "train.max_grad_norm",
                  "seed": "train.seed", "optim": "train.optimizer",
                  "gradient_checkpointing": "the gradient_checkpointing technique",
                  "bf16": "the bf16 / amp_bf16 techniques",
                  "fp16": "the fp16 / amp_fp16 techniques"}


class ObjectiveError(ValueError):
    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.message, self.key = message, key


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str  # "dpo", …; sft is None (the step's own loss)
    args: Mapping[str, Any] = field(default_factory=dict)  # TRL's config fields, as given
    reference: str | None = None  # as given; resolved per stack (`reference_of`)
    prompt_len: int | None = None  # None: half of seq_len

    def prompt_tokens(self, seq_len: int) -> int:
        return self.prompt_len if self.prompt_len is not None else seq_len // 2

    @property
    def precomputed(self) -> bool:
        return bool(self.args.get("precompute_ref_log_probs"))

    def reference_of(self, adapters: bool) -> str:
        """What serves as the reference for a stack with (or without) PEFT adapters."""
        if self.name not in WITH_REFERENCE:
            return "none"
        if self.precomputed:
            return "precomputed"
        return self.reference or ("adapter_disabled" if adapters else "copy")


def parse(value: Any) -> ObjectiveSpec | None:
    """`dpo`, `{dpo: {…}}` or `sft` (None); raises ObjectiveError naming the key."""
    if isinstance(value, str):
        name, args = value, {}
    elif isinstance(value, Mapping) and len(value) == 1:
        name, args = next(iter(value.items()))
        args = {} if args is None else args
        if not isinstance(args, Mapping):
            raise ObjectiveError(f"arguments must be a mapping, got {type(args).__name__}",
                                 key=str(name))
    else:
        raise ObjectiveError("must be an objective name or a one-key mapping {name: {arguments}}")
    if name == SFT:
        if args:
            raise ObjectiveError("sft is the step's own loss: it takes no arguments", key=SFT)
        return None
    if name in NOT_BUILT:
        raise ObjectiveError(f"{name} is not built yet (built: sft, {', '.join(TRAINERS)})")
    if name not in TRAINERS:
        close = difflib.get_close_matches(str(name), [SFT, *TRAINERS], n=1)
        raise ObjectiveError(f"unknown objective {name!r}" + (
            f" (did you mean {close[0]!r}?)" if close else
            f"; known: {', '.join([SFT, *TRAINERS])}"))
    args = dict(args)
    own = {key: args.pop(key) for key in OWN_KEYS if key in args}
    _check_trl_args(name, args)
    reference = own.get("reference")
    if reference is not None:
        if name not in WITH_REFERENCE:
            raise ObjectiveError(f"{name} compares with no reference model",
                                 key=f"{name}.reference")
        if reference not in REFERENCES:
            raise ObjectiveError(f"must be one of {', '.join(REFERENCES)}, got {reference!r}",
                                 key=f"{name}.reference")
        if args.get("precompute_ref_log_probs"):
            raise ObjectiveError("precompute_ref_log_probs: true computes the reference "
                                 "log-probs before training, from the model itself: no "
                                 "reference to choose", key=f"{name}.reference")
    prompt_len = own.get("prompt_len")
    if prompt_len is not None and (not isinstance(prompt_len, int) or isinstance(prompt_len, bool)
                                   or prompt_len < 1):
        raise ObjectiveError(f"must be a positive integer, got {prompt_len!r}",
                             key=f"{name}.prompt_len")
    return ObjectiveSpec(name, args, reference, prompt_len)


def _check_trl_args(name: str, args: dict) -> None:
    """Each key a field of TRL's config class (not of TrainingArguments beneath it), and the
    class accepting the values: TRL's own checks, in its words."""
    import transformers

    config = _load(TRAINERS[name][0])
    base = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    own = [f.name for f in dataclasses.fields(config) if f.name not in base]
    for key in args:
        if key in _FROM_SCENARIO:
            raise ObjectiveError(f"is set by the scenario ({_FROM_SCENARIO[key]}), not by the "
                                 "objective", key=f"{name}.{key}")
        if key in base:
            raise ObjectiveError(f"is a TrainingArguments field, which the harness's step does "
                                 f"not read; {config.__name__}'s own: {', '.join(own)}",
                                 key=f"{name}.{key}")
        if key not in own:
            close = difflib.get_close_matches(str(key), [*own, *OWN_KEYS], n=1)
            raise ObjectiveError(f"not a {config.__name__} field" + (
                f" (did you mean {close[0]!r}?)" if close else f"; its fields: {', '.join(own)}"),
                key=f"{name}.{key}")
    fields = {f.name: f for f in dataclasses.fields(config)}
    hints = typing.get_type_hints(config)
    for key, value in args.items():
        if not _fits(value, hints[key]):
            raise ObjectiveError(f"must be {_spelled(hints[key])}, got {value!r}",
                                 key=f"{name}.{key}")
        allowed = _choices(fields[key])
        for one in (value if isinstance(value, list) else [value]):
            if allowed and isinstance(one, str) and one not in allowed:
                close = difflib.get_close_matches(one, allowed, n=1)
                raise ObjectiveError(f"{one!r} is not one of {config.__name__}'s values" + (
                    f" (did you mean {close[0]!r}?)" if close else
                    f": {', '.join(allowed)}"), key=f"{name}.{key}")
    try:
        with tempfile.TemporaryDirectory() as out:
            config(output_dir=out, report_to="none", use_cpu=True, bf16=False, **args)
    except Exception as e:  # noqa: BLE001 - TRL's refusal, in its words, is bad input
        message = " ".join(str(e).split())[:300]
        raise ObjectiveError(f"{config.__name__} refuses it: {type(e).__name__}: {message}",
                             key=name) from None


def _fits(value, hint) -> bool:
    """Whether a YAML value is of a config field's annotated type (dataclasses do not check):
    floats take integers, a list field its item alone (TRL's configs take one loss type)."""
    origin, arms = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arm) for arm in arms)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):
        return isinstance(value, (int, float) if hint is float else int) \
            and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is list:
        return (isinstance(value, list) and all(_fits(v, arms[0]) for v in value)) or \
            (bool(arms) and _fits(value, arms[0]))
    if origin is dict or hint is dict:
        return isinstance(value, Mapping)
    return True


def _spelled(hint) -> str:
    return " or ".join("null" if a is type(None) else getattr(a, "__name__", str(a))
                       for a in (typing.get_args(hint) if typing.get_origin(hint) in
                                 (typing.Union, types.UnionType) else (hint,)))


def _choices(field) -> list[str]:
    """A config field's values, as TRL declares them: its `choices`, or the ones its help
    lists ("Possible values are: `'sigmoid'`, `'hinge'`, …."); empty where it lists none."""
    import re

    if field.metadata.get("choices"):
        return [str(c) for c in field.metadata["choices"]]
    text = field.metadata.get("help", "")
    if "Possible values are:" not in text:
        return []
    listed = text.split("Possible values are:", 1)[1].split(". ", 1)[0]
    return re.findall(r"`'?([A-Za-z0-9_]+)'?`", listed)


def _load(path: str):
    import importlib

    module, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def word_tokenizer(vocab_size: int):
    """A tokenizer built in code (no files): `w<id>` words split on whitespace, ids 0 and 1 the
    padding and end-of-sequence tokens, every other id its own word, so a text of n words is
    exactly n tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="<eos>")


def preference_pairs(count: int, prompt: int, completion: int, vocab_size: int, seed: int):
    """`count` text pairs, TRL's preference format ({prompt, chosen, rejected}): prompts of
    `prompt` words, completions of `completion` - 1 words (TRL appends the EOS)."""
    import torch
    from datasets import Dataset

    generator = torch.Generator().manual_seed(seed)

    def text(n: int) -> str:
        return " ".join(f"w{i}" for i in torch.randint(2, vocab_size, (n,), generator=generator))

    return Dataset.from_list([{"prompt": text(prompt) + " ", "chosen": text(completion - 1),
                               "rejected": text(completion - 1)} for _ in range(count)])


def _counts(batch: dict) -> dict[str, Any]:
    """A collated batch's completion tokens after the shift (`labels`: both halves; `chosen`,
    `rejected`), its sequences and whether its attention mask pads nothing: DPO's collator
    stacks the halves with a `completion_mask`, ORPO's keeps them apart with their labels."""
    if "completion_mask" in batch:
        shifted = batch["completion_mask"][:, 1:]
        chosen, rejected = (int(half.sum()) for half in shifted.chunk(2))
        masks = [batch["attention_mask"]]
    else:
        chosen, rejected = (int((batch[f"{half}_labels"][:, 1:] != -100).sum())
                            for half in ("chosen", "rejected"))
        masks = [batch["chosen_attention_mask"], batch["rejected_attention_mask"]]
        shifted = masks[0].repeat(2, 1)
    return {"labels": chosen + rejected, "chosen": chosen, "rejected": rejected,
            "sequences": len(shifted), "unpadded": all(bool(m.all()) for m in masks)}


@dataclass
class Preference:
    """A built objective: TRL's trainer around the model, and what the record says of it."""

    trainer: Any
    spec: ObjectiveSpec
    reference: str
    reference_model: Any = None  # `copy`: the frozen second model
    counts: list[dict[str, int]] = field(default_factory=list)  # per batch (`batches`)
    # The first micro-batch's forwards of the model (and reference copy), with and without
    # grad: the policy's, and the reference's where the step runs it (`watch_forwards`).
    forwards: dict[str, int] = field(default_factory=lambda: {"with_grad": 0, "without_grad": 0})

    def watch_forwards(self, model) -> list:
        """Count each forward of `model` and of the reference copy; returns the hooks."""
        import torch

        def count(module, args):
            self.forwards["with_grad" if torch.is_grad_enabled() else "without_grad"] += 1

        return [m.register_forward_pre_hook(count)
                for m in (model, self.reference_model) if m is not None]

    def batches(self, count: int, device, host=contextlib.nullcontext) -> list[dict]:
        """The first `count` batches of the trainer's data collator (pairs of batch_size: 2 ×
        batch_size sequences each), collated on the host (`host()`: where tensors have values)
        and moved to `device` as Trainer moves them. Each batch's completion tokens (after
        the shift, both halves and each) are kept in `counts`."""
        size = self.trainer.args.per_device_train_batch_size
        rows = self.trainer.train_dataset
        out = []
        for index in range(count):
            with host():
                batch = self.trainer.data_collator(
                    [rows[i] for i in range(index * size, (index + 1) * size)])
                self.counts.append(_counts(batch))
            out.append({k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()})
        return out

    def loss(self, model, batch: dict):
        return self.trainer.compute_loss(model, batch)

    def record(self, train) -> dict[str, Any]:
        """The record's `objective`: what ran, and what sets its memory."""
        import trl

        return {
            "name": self.spec.name, "trainer": TRAINERS[self.spec.name][1],
            "trl_version": trl.__version__, "args": dict(self.spec.args),
            "reference": self.reference,
            "reference_params": (sum(p.numel() for p in self.reference_model.parameters())
                                 if self.reference_model is not None else None),
            "sequences_per_step": sum(c["sequences"] for c in self.counts),
            "completion_tokens_per_step": sum(c["labels"] for c in self.counts),
            "forwards_per_micro_batch": dict(self.forwards),
            "prompt_len": self.spec.prompt_tokens(train.seq_len)}


def build(ctx, spec: ObjectiveSpec, train, device, gradient_checkpointing: bool,
          adapters: bool) -> Preference:
    """TRL's trainer around `ctx.model`, on `device` (after the model is there: Trainer moves
    it), with its config as a user who wrote this scenario would: batch, accumulation, seed and
    learning rate from `train`, checkpointing as the techniques set it (non-reentrant),
    precision left to the techniques, the maximum length the sequence's. The reference as
    `spec` resolves it."""
    config_class, trainer_class = (_load(p) for p in TRAINERS[spec.name])
    reference = spec.reference_of(adapters)
    model = ctx.model
    prompt = spec.prompt_tokens(train.seq_len)
    if prompt > train.seq_len - 2:
        raise ValueError(f"prompt_len {prompt} leaves no completion in seq_len {train.seq_len}")
    args = config_class(
        output_dir=tempfile.mkdtemp(prefix="harness-trl-"), report_to="none",
        save_strategy="no", logging_strategy="no", use_cpu=device.type == "cpu",
        per_device_train_batch_size=train.batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        learning_rate=train.lr, seed=train.seed, bf16=False, fp16=False,
        gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False}, dataloader_num_workers=0,
        **{"max_length": train.seq_len, **spec.args})
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # its preparation's maps: a bar each, on a few rows
    count = train.batch_size * train.gradient_accumulation_steps
    data = preference_pairs(count, prompt, train.seq_len - prompt, model.config.vocab_size,
                            train.seed)
    import torch

    from harness.patches import reference_unhashed

    # TRL given a PeftModel adds a "ref" adapter; the harness removes it below unless it is the
    # reference. Made on meta there (as on a simulation's meta build): nothing allocated for it.
    where = torch.device("meta") if device.type == "meta" or (
        spec.name in WITH_REFERENCE and reference != "ref_adapter") else contextlib.nullcontext()
    with reference_unhashed(), where:
        trainer = _deferred(trainer_class)(
            model=model, args=args, train_dataset=data,
            processing_class=word_tokenizer(model.config.vocab_size),
            **({"ref_model": ctx.reference} if spec.name in WITH_REFERENCE else {}))
    if reference != "ref_adapter" and "ref" in getattr(model, "peft_config", {}):
        # TRL given a PeftModel copies its adapter as the reference; given a `peft_config` it
        # wraps the model itself and disables the adapter instead: the latter, here (and for
        # the precomputed pass).
        model.delete_adapter("ref")
    return Preference(trainer, spec, reference, ctx.reference)


def _deferred(trainer_class):
    """The trainer as the harness builds it: built where the model is (on meta for a
    simulation, materialised after), it moves no model — the harness placed them on their
    device as it built them, as `device_map` does — and `precompute_ref_log_probs`' pass is
    deferred: the harness runs it as the phase `reference` (`precompute`), with TRL's own
    `compute_ref_log_probs`, on the device's tensors (TRL's pass writes a dataset cache,
    which needs their values)."""

    class Trainer(trainer_class):
        def _move_model_to_device(self, model, device):
            pass

        def _build_accelerator_args(self, **kwargs):
            return {**super()._build_accelerator_args(**kwargs), "device_placement": False}

        def _precompute_ref_logps(self, dataset, name, batch_size):
            return dataset

    return Trainer


def precompute(objective: Preference, batches: list[dict], autocast, known: dict) -> None:
    """TRL's `precompute_ref_log_probs` pass over the step's batches: each pair's reference
    log-probs computed once (no grad, adapters disabled or the model itself), kept on the host
    as TRL keeps them in its dataset, and handed to the steps with their batch, as TRL's
    collator hands them over."""
    trainer = objective.trainer
    for batch, counts in zip(batches, objective.counts, strict=True):
        known.update(counts)
        with autocast:
            chosen, rejected = trainer.compute_ref_log_probs(trainer.model, batch)
        batch["ref_chosen_logps"] = chosen.cpu().to(batch["input_ids"].device)
        batch["ref_rejected_logps"] = rejected.cpu().to(batch["input_ids"].device)

