"""Objectives beyond the supervised step: TRL's trainers' losses, run by TRL's own code.

`objective: dpo` (or `{dpo: {beta: 0.1, precompute_ref_log_probs: true}}`; `orpo`, `kto`,
`reward`, `grpo`) at the top of a scenario or in a variant replaces the step's loss with TRL's
trainer's: the harness builds the trainer (`trl.DPOTrainer`, …, `METHODS`) around the model its
techniques made — the trainer never trains — and each micro-batch's loss is its
`compute_loss`, on batches its own data collator makes from synthetic rows its own dataset
preparation tokenized (GRPO: on the completions its own `_prepare_inputs` generates and
scores). The probe, the phases, the optimizer and the record are the same as for `sft`, so a
TRL upgrade shows in the figures.

What sets the memory of these steps, and the record's `objective` says:
  sequences   DPO, ORPO, reward: chosen and rejected, 2 × batch sequences a forward; KTO: the
              batch, and as many mismatched KL sequences in forwards without grad; GRPO: the
              batch is completions, prompts × num_generations a step
  reference   adapter_disabled  PEFT's base with the adapter disabled (TRL given a
                                `peft_config`): no second copy, one more forward without grad
              ref_adapter       a frozen copy of the adapter, named "ref" (TRL given a PeftModel)
              copy              a second model, frozen (TRL's `ref_model`; its default for a
                                full fine-tune)
              precomputed       `precompute_ref_log_probs: true` (DPO, KTO): the reference
                                forwards run once before training (phase `reference`)
              none              ORPO, reward modelling; GRPO with `beta: 0` (its default)
  head        DPO, KTO, GRPO: TRL's fused LM head scores only completion positions (on CUDA) in
              tiles, never the [sequences, length, vocabulary] logits; ORPO: the model's full
              logits; reward: a sequence classifier's one score per sequence, no LM head at all
  generation  GRPO: each step first generates its completions (phase `generate`, the KV cache
              of every sequence), then scores them without grad (phase `reference`: the
              reference's log-probs, and the old policy's where TRL needs them)

Arguments are TRL's config fields, checked against its config class (`beta`, `loss_type`,
`precompute_ref_log_probs`, `num_generations`, `max_completion_length`, …); what the scenario's
`train:` and techniques say (batch, learning rate, checkpointing, precision) are not objective
arguments. Two keys are the harness's own: `reference` (above) and `prompt_len`, the prompt's
share of `seq_len` tokens (default half; the completion fills the rest and ends with the
tokenizer's EOS; GRPO generates exactly `seq_len - prompt_len` tokens, its
`max_completion_length`, never stopping early).
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


@dataclass(frozen=True)
class Method:
    """What the harness knows of one TRL objective: where TRL keeps it, and what shapes its
    step's memory."""

    config: str  # TRL's config class, as an importable path
    trainer: str  # its trainer class
    data: str  # the rows it trains on: "pairs" (prompt, chosen, rejected), "unpaired"
    #            (prompt, completion, label) or "prompts" (GRPO: it generates the completions)
    reference: bool = False  # whether its loss can compare with a reference model
    head: str = "causal_lm"  # the model's head: "sequence_classification" for a reward model
    # The batch keys TRL's precompute pass fills (`precompute_ref_log_probs`); () where none.
    precomputed_keys: tuple[str, ...] = ()
    # Config fields that, set, take a path the harness has not built: field → what it is.
    not_built: Mapping[str, str] = field(default_factory=dict)

    @property
    def generates(self) -> bool:
        return self.data == "prompts"


METHODS = {
    "dpo": Method("trl.DPOConfig", "trl.DPOTrainer", "pairs", reference=True,
                  precomputed_keys=("ref_chosen_logps", "ref_rejected_logps")),
    "orpo": Method("trl.experimental.orpo.ORPOConfig", "trl.experimental.orpo.ORPOTrainer",
                   "pairs"),
    "kto": Method("trl.KTOConfig", "trl.KTOTrainer", "unpaired", reference=True,
                  precomputed_keys=("ref_logps", "ref_KL_logps")),
    "reward": Method("trl.RewardConfig", "trl.RewardTrainer", "pairs",
                     head="sequence_classification"),
    "grpo": Method("trl.GRPOConfig", "trl.GRPOTrainer", "prompts", reference=True,
                   not_built={"use_vllm": "generation with vLLM",
                              "use_transformers_continuous_batching":
                                  "generation with transformers' continuous batching",
                              "use_transformers_paged":
                                  "generation with transformers' continuous batching"}),
}
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
    prompt_len: int | None = None  # None: half of seq_len (GRPO: or what its completion leaves)

    @property
    def method(self) -> Method:
        return METHODS[self.name]

    def prompt_tokens(self, seq_len: int) -> int:
        if self.prompt_len is not None:
            return self.prompt_len
        if self.method.generates and self.args.get("max_completion_length") is not None:
            return seq_len - self.args["max_completion_length"]
        return seq_len // 2

    @property
    def precomputed(self) -> bool:
        return bool(self.args.get("precompute_ref_log_probs"))

    @property
    def compares(self) -> bool:
        """Whether the loss compares with a reference: GRPO's only with a KL term (beta > 0,
        TRL's default 0)."""
        if not self.method.reference:
            return False
        if self.method.generates:
            return self.args.get("beta", _default(self.method.config, "beta")) != 0
        return True

    def reference_of(self, adapters: bool) -> str:
        """What serves as the reference for a stack with (or without) PEFT adapters."""
        if not self.compares:
            return "none"
        if self.precomputed:
            return "precomputed"
        return self.reference or ("adapter_disabled" if adapters else "copy")


def parse(value: Any) -> ObjectiveSpec | None:
    """`dpo`, `{dpo: {…}}` or `sft` (None); raises ObjectiveError naming the key. What needs
    the scenario's batch too is `check`'s."""
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
    if name not in METHODS:
        close = difflib.get_close_matches(str(name), [SFT, *METHODS], n=1)
        raise ObjectiveError(f"unknown objective {name!r}" + (
            f" (did you mean {close[0]!r}?)" if close else
            f"; known: {', '.join([SFT, *METHODS])}"))
    args = dict(args)
    own = {key: args.pop(key) for key in OWN_KEYS if key in args}
    _check_trl_args(name, args)
    for key, what in METHODS[name].not_built.items():
        if args.get(key):
            raise ObjectiveError(f"{name} with {what} is not built yet", key=f"{name}.{key}")
    prompt_len = own.get("prompt_len")
    if prompt_len is not None and (not isinstance(prompt_len, int) or isinstance(prompt_len, bool)
                                   or prompt_len < 1):
        raise ObjectiveError(f"must be a positive integer, got {prompt_len!r}",
                             key=f"{name}.prompt_len")
    spec = ObjectiveSpec(name, args, own.get("reference"), prompt_len)
    reference = spec.reference
    if reference is not None:
        if not spec.method.reference:
            raise ObjectiveError(f"{name} compares with no reference model",
                                 key=f"{name}.reference")
        if not spec.compares:
            raise ObjectiveError(f"{name} with beta 0 has no KL term and builds no reference "
                                 "model; give beta above 0 to choose one",
                                 key=f"{name}.reference")
        if reference not in REFERENCES:
            raise ObjectiveError(f"must be one of {', '.join(REFERENCES)}, got {reference!r}",
                                 key=f"{name}.reference")
        if spec.precomputed:
            raise ObjectiveError("precompute_ref_log_probs: true computes the reference "
                                 "log-probs before training, from the model itself: no "
                                 "reference to choose", key=f"{name}.reference")
    return spec


def check(spec: ObjectiveSpec, train) -> None:
    """The objective against the scenario's step: a prompt that leaves a completion of at
    least a word and the EOS (GRPO: prompt and completion that make `seq_len`), and TRL's
    config built with the step's batch, where TRL checks its own fields together (GRPO: a
    generation batch of whole prompt groups). Raises ObjectiveError naming the key."""
    prompt = spec.prompt_tokens(train.seq_len)
    completion = spec.args.get("max_completion_length")
    if spec.method.generates and spec.prompt_len is not None and completion is not None \
            and prompt + completion != train.seq_len:
        raise ObjectiveError(f"prompt_len {prompt} and max_completion_length {completion} "
                             f"make {prompt + completion} tokens, not seq_len {train.seq_len}: "
                             "give one, the other follows", key=f"{spec.name}.prompt_len")
    if prompt > train.seq_len - 2:
        raise ObjectiveError(f"prompt_len {prompt} leaves seq_len {train.seq_len} no "
                             "completion of at least a word and the EOS",
                             key=f"{spec.name}.prompt_len")
    if prompt < 1:
        raise ObjectiveError(f"max_completion_length {completion} leaves seq_len "
                             f"{train.seq_len} no prompt", key=f"{spec.name}.max_completion_length")
    try:
        with tempfile.TemporaryDirectory() as out:
            config(spec, train, out, use_cpu=True)
    except Exception as e:  # noqa: BLE001 - TRL's refusal, in its words, is bad input
        raise ObjectiveError(f"{_config_class(spec.name).__name__} refuses it: "
                             f"{type(e).__name__}: {' '.join(str(e).split())[:300]}",
                             key=spec.name) from None


def config(spec: ObjectiveSpec, train, output_dir: str, use_cpu: bool, **more):
    """TRL's config as a user who wrote this scenario would make it: batch, accumulation, seed
    and learning rate from `train`, precision left to the techniques, the maximum length the
    sequence's (GRPO: the completion, what `seq_len` leaves of the prompt), logging and saving
    off; then the objective's own arguments."""
    cls = _config_class(spec.name)
    own = {f.name for f in dataclasses.fields(cls)}
    args = {**({"max_length": train.seq_len} if "max_length" in own else {}), **spec.args}
    if spec.method.generates:
        # Every completion runs to its maximum length, as a step of long answers does (random
        # weights would stop anywhere): the step's memory at its worst, the same every run.
        completion = train.seq_len - spec.prompt_tokens(train.seq_len)
        args["max_completion_length"] = completion
        args["generation_kwargs"] = {**(spec.args.get("generation_kwargs") or {}),
                                     "min_new_tokens": completion}
    return cls(output_dir=output_dir, report_to="none", save_strategy="no",
               logging_strategy="no", use_cpu=use_cpu,
               per_device_train_batch_size=train.batch_size,
               gradient_accumulation_steps=train.gradient_accumulation_steps,
               learning_rate=train.lr, seed=train.seed, bf16=False, fp16=False,
               dataloader_num_workers=0, **more, **args)


def _config_class(name: str):
    return _load(METHODS[name].config)


def _default(config_path: str, name: str):
    field_ = next(f for f in dataclasses.fields(_load(config_path)) if f.name == name)
    return field_.default


def _check_trl_args(name: str, args: dict) -> None:
    """Each key a field of TRL's config class (not of TrainingArguments beneath it), each value
    of the field's type and among the values TRL lists for it."""
    import transformers

    config_class = _config_class(name)
    base = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    own = [f.name for f in dataclasses.fields(config_class) if f.name not in base]
    for key in args:
        if key in _FROM_SCENARIO:
            raise ObjectiveError(f"is set by the scenario ({_FROM_SCENARIO[key]}), not by the "
                                 "objective", key=f"{name}.{key}")
        if key in base:
            raise ObjectiveError(f"is a TrainingArguments field, which the harness's step does "
                                 f"not read; {config_class.__name__}'s own: {', '.join(own)}",
                                 key=f"{name}.{key}")
        if key not in own:
            close = difflib.get_close_matches(str(key), [*own, *OWN_KEYS], n=1)
            raise ObjectiveError(f"not a {config_class.__name__} field" + (
                f" (did you mean {close[0]!r}?)" if close else f"; its fields: {', '.join(own)}"),
                key=f"{name}.{key}")
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    hints = typing.get_type_hints(config_class)
    for key, value in args.items():
        if not _fits(value, hints[key]):
            raise ObjectiveError(f"must be {_spelled(hints[key])}, got {value!r}",
                                 key=f"{name}.{key}")
        allowed = _choices(fields[key])
        for one in (value if isinstance(value, list) else [value]):
            if allowed and isinstance(one, str) and one not in allowed:
                close = difflib.get_close_matches(one, allowed, n=1)
                raise ObjectiveError(f"{one!r} is not one of {config_class.__name__}'s values" + (
                    f" (did you mean {close[0]!r}?)" if close else
                    f": {', '.join(allowed)}"), key=f"{name}.{key}")


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


# The words a synthetic text is made of: ids 2 … WORDS − 1 (or the vocabulary's end). Which ids
# a text holds changes no memory; a tokenizer of a 150k-word vocabulary takes a second to build.
WORDS = 4096


def word_tokenizer(vocab_size: int):
    """A tokenizer built in code (no files): `w<id>` words split on whitespace, ids 0 and 1 the
    padding and end-of-sequence tokens, ids 2 … min(vocab_size, WORDS) − 1 a word each, so a
    text of n words is exactly n tokens. Decoding skips the ids past those (a generated token
    of a large vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, min(vocab_size, WORDS))}}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="<eos>")


def rows(data: str, count: int, prompt: int, completion: int, vocab_size: int, seed: int):
    """`count` synthetic rows in TRL's format for `data` (Method.data): "pairs" {prompt,
    chosen, rejected}, "unpaired" {prompt, completion, label} (every other one desirable,
    the first of them) or "prompts" {prompt}. Prompts of `prompt` words; completions of
    `completion` - 1 words (TRL appends the EOS)."""
    import torch
    from datasets import Dataset

    generator = torch.Generator().manual_seed(seed)

    def text(n: int) -> str:
        return " ".join(f"w{i}" for i in torch.randint(2, min(vocab_size, WORDS), (n,),
                                                      generator=generator))

    def row(index: int) -> dict:
        if data == "prompts":
            return {"prompt": text(prompt)}
        if data == "unpaired":
            return {"prompt": text(prompt) + " ", "completion": text(completion - 1),
                    "label": index % 2 == 0}
        return {"prompt": text(prompt) + " ", "chosen": text(completion - 1),
                "rejected": text(completion - 1)}

    return Dataset.from_list([row(i) for i in range(count)])


def completion_words(completions: list[str], **kwargs) -> list[float]:
    """GRPO's reward: each completion's length in words. A reward function's value sizes
    nothing; a reward *model* would add its own weights and forward (not built)."""
    return [float(len(text.split())) for text in completions]


def _counts(batch: dict) -> dict[str, Any]:
    """A collated batch's sequences, whether its attention masks pad nothing, and its
    completion tokens after the shift — where the loss scores them: all (`labels`), and
    those of the chosen (desirable) and rejected (undesirable) rows. DPO's collator stacks the
    halves with a `completion_mask`, ORPO's keeps them apart with their labels, KTO's batch
    has a `label` per row and its KL sequences, a reward model's scores whole sequences."""
    if "label" in batch:  # KTO
        shifted, desirable = batch["completion_mask"][:, 1:], batch["label"].bool()
        masks = [batch[k] for k in ("attention_mask", "KL_attention_mask") if k in batch]
        return {"labels": int(shifted.sum()), "chosen": int(shifted[desirable].sum()),
                "rejected": int(shifted[~desirable].sum()),
                "desirable": int(desirable.sum()), "undesirable": int((~desirable).sum()),
                "sequences": len(shifted),
                "kl_sequences": len(batch["KL_input_ids"]) if "KL_input_ids" in batch else 0,
                "unpadded": all(bool(m.all()) for m in masks)}
    if "completion_mask" in batch:  # DPO
        shifted = batch["completion_mask"][:, 1:]
        chosen, rejected = (int(half.sum()) for half in shifted.chunk(2))
        masks = [batch["attention_mask"]]
    elif "chosen_labels" in batch:  # ORPO
        chosen, rejected = (int((batch[f"{half}_labels"][:, 1:] != -100).sum())
                            for half in ("chosen", "rejected"))
        masks = [batch["chosen_attention_mask"], batch["rejected_attention_mask"]]
        shifted = masks[0].repeat(2, 1)
    else:  # reward: one score a sequence, no token scored
        return {"labels": None, "sequences": len(batch["input_ids"]),
                "unpadded": bool(batch["attention_mask"].all())}
    return {"labels": chosen + rejected, "chosen": chosen, "rejected": rejected,
            "sequences": len(shifted), "unpadded": all(bool(m.all()) for m in masks)}


@dataclass
class Objective:
    """A built objective: TRL's trainer around the model, and what the record says of it."""

    trainer: Any
    spec: ObjectiveSpec
    reference: str
    reference_model: Any = None  # `copy`: the frozen second model
    counts: list[dict[str, Any]] = field(default_factory=list)  # per micro-batch (`batches`)
    # The first micro-batch's forwards of the model (and reference copy) in its loss, with
    # and without grad: the policy's, and the reference's where the step runs it.
    forwards: dict[str, int] = field(default_factory=lambda: {"with_grad": 0, "without_grad": 0})
    # GRPO: the first generation's forwards by phase (`generate`: one per new token; `reference`:
    # the scoring passes without grad), and its generation batch's rows.
    generation: dict[str, int] | None = None
    rows: list[dict] | None = None

    @property
    def generates(self) -> bool:
        return self.spec.method.generates

    def watch_forwards(self, model, into: dict | None = None, key=None) -> list:
        """Count each forward of `model` and of the reference copy into `into` (default
        `forwards`) under `key()` (default: with or without grad); returns the hooks."""
        import torch

        into = self.forwards if into is None else into
        key = key or (lambda: "with_grad" if torch.is_grad_enabled() else "without_grad")

        def count(module, args):
            into[key()] = into.get(key(), 0) + 1

        return [m.register_forward_pre_hook(count)
                for m in (model, self.reference_model) if m is not None]

    def batches(self, count: int, device, host=contextlib.nullcontext) -> list:
        """The first `count` micro-batches of the trainer's data collator, collated on the host
        (`host()`: where tensors have values) and moved to `device` as Trainer moves them, their
        counts kept in `counts`. GRPO: each micro-batch is the generation batch's rows (each
        prompt `num_generations` times in a row, as TRL's sampler repeats it), which its
        `_prepare_inputs` turns into completions every `steps_per_generation` micro-batches."""
        args, rows = self.trainer.args, self.trainer.train_dataset
        size = args.per_device_train_batch_size
        if self.generates:
            completion = args.max_completion_length
            self.rows = [rows[i // self.trainer.num_generations]
                         for i in range(args.generation_batch_size)]
            stops = {*self.trainer.eos_token_ids, self.trainer.processing_class.pad_token_id}
            self.counts = [{"labels": size * completion, "sequences": size,
                            "unpadded": True,  # prompts of one length, completions too
                            # a token a completion may hold: a word, no EOS, no padding
                            "word": next(i for i in range(2, 2 + len(stops) + 1)
                                         if i not in stops)}] * count
            return [self.rows] * count
        out = []
        for index in range(count):
            with host():
                batch = self.trainer.data_collator(
                    [rows[i] for i in range(index * size, (index + 1) * size)])
                self.counts.append(_counts(batch))
            out.append({k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()})
        return out

    def prepare(self, probe, model, step: int, micro: int, accumulation: int, autocast,
                rows: list[dict]) -> dict:
        """GRPO: the micro-batch's inputs from TRL's `_prepare_inputs` — at the first of every
        `steps_per_generation × num_iterations` micro-batches its generation: completions of
        every row (phase `generate`, the KV cache named) then their scoring without grad (phase
        `reference`: the reference's log-probs, the old policy's where TRL needs them); the
        others take their slice of what it buffered. Run before the micro-batch's forward, the
        grads of the last step already released, as in Trainer."""

        trainer = self.trainer
        trainer._step = step * accumulation + micro  # TRL counts micro-batches (training_step)
        trainer.current_gradient_accumulation_steps = accumulation
        phases = _Phases(probe, model, step)
        trainer.harness_phases = phases
        counting = []
        if self.generation is None:  # forwards of the inner model: generate() calls it
            self.generation = {}
            inner = model.get_base_model() if hasattr(model, "get_base_model") else model
            counting = self.watch_forwards(inner, self.generation, lambda: phases.current)
        try:
            with autocast:
                return trainer._prepare_inputs(rows)
        finally:
            phases.leave()
            for handle in counting:
                handle.remove()

    def loss(self, model, batch: dict):
        return self.trainer.compute_loss(model, batch)

    @property
    def scales_loss(self) -> bool:
        """Whether TRL's loss is already divided for gradient accumulation (GRPO's is)."""
        return self.generates

    def record(self, train) -> dict[str, Any]:
        """The record's `objective`: what ran, and what sets its memory."""
        import trl

        labels = [c["labels"] for c in self.counts]
        out = {
            "name": self.spec.name, "trainer": self.spec.method.trainer,
            "trl_version": trl.__version__, "args": dict(self.spec.args),
            "reference": self.reference,
            "reference_params": (sum(p.numel() for p in self.reference_model.parameters())
                                 if self.reference_model is not None else None),
            "head": self.spec.method.head,
            "sequences_per_step": sum(c["sequences"] for c in self.counts),
            "completion_tokens_per_step": None if None in labels else sum(labels),
            "forwards_per_micro_batch": dict(self.forwards),
            "prompt_len": self.spec.prompt_tokens(train.seq_len)}
        if "kl_sequences" in self.counts[0]:  # KTO
            out["kl_sequences_per_step"] = sum(c["kl_sequences"] for c in self.counts)
            out["desirable_per_step"] = sum(c["desirable"] for c in self.counts)
        if self.generates:
            args = self.trainer.args
            out.update(num_generations=self.trainer.num_generations,
                       prompts_per_step=out["sequences_per_step"] // self.trainer.num_generations,
                       max_completion_length=args.max_completion_length,
                       generation_batch_size=args.generation_batch_size,
                       forwards_per_generation=dict(self.generation or {}))
        return out


class _Phases:
    """The phases of a GRPO generation, entered as TRL's code reaches them (the probe's phases
    are one at a time): `generate`, its KV cache named as transformers makes it, then
    `reference`."""

    def __init__(self, probe, model, step: int):
        self.probe, self.model, self.step = probe, model, step
        self.current: str | None = None
        self._open = self._hook = None

    def enter(self, name: str) -> None:
        if name == self.current:
            return
        self.leave()
        self._open = self.probe.phase(name, self.step)
        self._open.__enter__()
        self.current = name
        if name == "generate":
            self._hook = self.probe.watch_cache(self.model)

    def leave(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._open is not None:
            opened, self._open, self.current = self._open, None, None
            opened.__exit__(None, None, None)


def build(ctx, spec: ObjectiveSpec, train, device, gradient_checkpointing: bool,
          adapters: bool) -> Objective:
    """TRL's trainer around `ctx.model`, on `device` (after the model is there: Trainer moves
    it), with `config`'s arguments, checkpointing as the techniques set it (non-reentrant),
    and the reference as `spec` resolves it."""
    import torch
    from datasets.utils.logging import disable_progress_bar

    from harness.models import vocab_size
    from harness.patches import reference_unhashed

    method = spec.method
    trainer_class = _load(method.trainer)
    reference = spec.reference_of(adapters)
    model = ctx.model
    prompt = spec.prompt_tokens(train.seq_len)
    if prompt > train.seq_len - 2:
        raise ValueError(f"prompt_len {prompt} leaves no completion in seq_len {train.seq_len}")
    args = config(spec, train, tempfile.mkdtemp(prefix="harness-trl-"),
                  use_cpu=device.type == "cpu", gradient_checkpointing=gradient_checkpointing,
                  gradient_checkpointing_kwargs={"use_reentrant": False})
    disable_progress_bar()  # its preparation's maps: a bar each, on a few rows
    count = train.batch_size * train.gradient_accumulation_steps
    if method.generates:  # prompts: each makes num_generations completions
        count = max(args.generation_batch_size // args.num_generations, 1)
    data = rows(method.data, count, prompt, train.seq_len - prompt, vocab_size(model),
                train.seed)
    beta = getattr(args, "beta", None)
    handed = method.generates and reference == "copy"
    if handed:  # GRPOTrainer takes no ref_model: given a full model it loads one by hub id
        args.beta = 0.0
    # TRL given a PeftModel adds a "ref" adapter; the harness removes it below unless it is the
    # reference. Made on meta there (as on a simulation's meta build): nothing allocated for it.
    where = torch.device("meta") if device.type == "meta" or (
        method.reference and reference != "ref_adapter") else contextlib.nullcontext()
    extra = {"ref_model": ctx.reference} if method.reference and not method.generates else {}
    if method.generates:
        extra["reward_funcs"] = completion_words
    with reference_unhashed(), where:
        trainer = _deferred(trainer_class)(
            model=model, args=args, train_dataset=data,
            processing_class=word_tokenizer(vocab_size(model)), **extra)
    if handed:
        _hand_reference(trainer, ctx.reference, beta)
    if method.generates and trainer.reward_weights.is_meta:  # made under `where`: as TRL does
        trainer.reward_weights = torch.tensor(
            args.reward_weights or [1.0] * len(trainer.reward_funcs), dtype=torch.float32)
    if reference != "ref_adapter" and "ref" in getattr(model, "peft_config", {}):
        # TRL given a PeftModel copies its adapter as the reference; given a `peft_config` it
        # wraps the model itself and disables the adapter instead: the latter, here (and for
        # the precomputed pass).
        model.delete_adapter("ref")
    return Objective(trainer, spec, reference, ctx.reference)


def _hand_reference(trainer, reference, beta: float) -> None:
    """The harness's reference copy given to a GRPOTrainer built with beta 0, as TRL's own
    construction would have made it (trl 1.16 `GRPOTrainer.__init__`): dropout off, its fused
    LM head at the trainer's temperature; then the KL term's beta back."""
    from trl.trainer.utils import add_fused_lm_head, disable_dropout_in_model

    args = trainer.args
    if args.cast_lm_head_to_fp32:
        raise ValueError("grpo with reference: copy and cast_lm_head_to_fp32 is not built")
    if args.disable_dropout:
        disable_dropout_in_model(reference)
    add_fused_lm_head(reference, temperature=trainer.temperature)
    trainer.ref_model = reference
    trainer.beta = args.beta = beta


def _deferred(trainer_class):
    """The trainer as the harness builds it: built where the model is (on meta for a
    simulation, materialised after), it moves no model — the harness placed them on their
    device as it built them, as `device_map` does — and `precompute_ref_log_probs`' pass is
    deferred: the harness runs it as the phase `reference` (`precompute`), with TRL's own
    `compute_ref_log_probs`, on the device's tensors (TRL's pass writes a dataset cache,
    which needs their values). GRPO's generation and scoring enter their phases as TRL
    reaches them (`Objective.prepare`)."""
    import torch

    class Trainer(trainer_class):
        harness_phases: _Phases | None = None

        def _move_model_to_device(self, model, device):
            pass

        def _build_accelerator_args(self, **kwargs):
            return {**super()._build_accelerator_args(**kwargs), "device_placement": False}

        def _precompute_ref_logps(self, dataset, name, batch_size):
            return dataset

        def _generate_and_score_completions(self, inputs):
            self.harness_phases.enter("generate")
            return super()._generate_and_score_completions(inputs)

        def _get_per_token_logps_and_entropies(self, *args, **kwargs):
            if not torch.is_grad_enabled() and self.harness_phases is not None \
                    and self.harness_phases.current is not None:
                self.harness_phases.enter("reference")  # scoring, after the generation
            return super()._get_per_token_logps_and_entropies(*args, **kwargs)

    return Trainer


def precompute(objective: Objective, batches: list[dict], autocast, known: dict) -> None:
    """TRL's `precompute_ref_log_probs` pass over the step's batches: each row's reference
    log-probs computed once (no grad, adapters disabled or the model itself), kept on the host
    as TRL keeps them in its dataset, and handed to the steps with their batch, as TRL's
    collator hands them over (DPO: each half's; KTO: each row's and its KL sequence's)."""
    trainer = objective.trainer
    keys = objective.spec.method.precomputed_keys
    for batch, counts in zip(batches, objective.counts, strict=True):
        known.update(counts)
        with autocast:
            computed = trainer.compute_ref_log_probs(trainer.model, batch)
        for key, value in zip(keys, computed, strict=True):
            if value is not None:  # KTO without its KL term: none for the KL sequences
                batch[key] = value.cpu().to(batch["input_ids"].device)
