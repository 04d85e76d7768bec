"""Real length distributions (`data:`): which batches a training run draws, and their shapes.

A scenario's `data:` replaces fixed-shape batches by the sequence lengths of a dataset: a list
(`lengths`), a file of them (`lengths_file`: one integer a line, or a JSON list), a local
dataset (`dataset`: a `datasets.save_to_disk` folder or a JSONL file, tokenized with the local
`tokenizer` folder unless it has `input_ids`) or a log-normal distribution given by its median
and 99th percentile (`synthetic`), for people who have no data at hand. `train.seq_len` is then
the truncation limit.

The batches are the ones Trainer's sampler draws: a seeded `RandomSampler`, or with
`group_by_length` transformers' own `LengthGroupedSampler` over the micro-batch times the
accumulation (as Trainer makes it), `batch_size` samples a micro-batch, epoch after epoch.
Each micro-batch is padded to its longest sample (`padding: longest`, what
DataCollatorWithPadding does) or to `seq_len` (`max_length`); padded positions have attention
mask 0 and label -100. The plan is a list per step of micro-batches, each the lengths of its
rows (truncated), and the padded length.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import is_fake, unset_fake_temporarily

from harness.scenario import DATA_SOURCES

# On a packed batch's position ids: each token's sequence (0, 0, …, 1, 1, …), as transformers'
# find_packed_sequence_indices reads it from their values — which a simulation's fake position
# ids do not have (patches.unpacked_batches answers from this instead).
SEQUENCE_INDEX = "harness_sequence_index"
SYNTHETIC_SAMPLES = 10_000  # drawn once, seeded; the sampler draws from them
Z99 = 2.3263478740408408  # the standard normal's 99th percentile


class DataError(ValueError):
    """A data source that cannot be read: bad input, naming the key."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key, self.message = key, message


@dataclass(frozen=True)
class MicroBatch:
    lengths: tuple[int, ...]  # each row's tokens, truncated at seq_len
    padded: int  # the length every row is padded to
    # Packing: each packed row's sequences, flattened into one row of all their tokens.
    packed: tuple[tuple[int, ...], ...] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        if self.packed is not None:
            return 1, self.padded
        return len(self.lengths), self.padded


def pack(lengths: list[int], seq_len: int) -> list[tuple[int, ...]]:
    """The sequences' lengths packed into rows of at most `seq_len` tokens by TRL's own
    `pack_dataset` (best-fit decreasing, as SFTTrainer packs: a longer sequence truncated)."""
    import datasets
    from trl import pack_dataset

    rows = datasets.Dataset.from_dict({"input_ids": [[1] * n for n in lengths]})
    packed = pack_dataset(rows, seq_len, strategy="bfd", map_kwargs={"desc": None})
    return [tuple(row) for row in packed["seq_lengths"]]


def synthetic_lengths(median: int, p99: int, seed: int,
                      samples: int = SYNTHETIC_SAMPLES) -> list[int]:
    """Log-normal lengths: median `median`, 99th percentile `p99` (μ = ln median,
    σ = (ln p99 − ln median) / z₀.₉₉), at least one token each."""
    mu, sigma = math.log(median), (math.log(p99) - math.log(median)) / Z99
    generator = torch.Generator().manual_seed(seed)
    drawn = torch.randn(samples, generator=generator, dtype=torch.float64) * sigma + mu
    return [max(1, round(v)) for v in drawn.exp().tolist()]


def read_lengths(spec, seed: int) -> list[int]:
    """The source's sequence lengths, untruncated (its paths are absolute: scenario.py made
    them so). Raises DataError."""
    if spec.lengths is not None:
        return list(spec.lengths)
    if spec.synthetic is not None:
        return synthetic_lengths(spec.synthetic["median"], spec.synthetic["p99"], seed)
    if spec.lengths_file is not None:
        return _lengths_file(_existing(spec.lengths_file, "data.lengths_file"))
    return _dataset_lengths(spec)


def _existing(name: str, key: str) -> Path:
    """The path, still there at run time (it was when the scenario was read)."""
    if not Path(name).exists():
        raise DataError(key, f"no such file or folder: {name}")
    return Path(name)


def _lengths_file(path: Path) -> list[int]:
    text = path.read_text()
    try:
        values = json.loads(text) if text.lstrip().startswith("[") else \
            [int(line) for line in text.split() if line]
    except ValueError as e:
        raise DataError("data.lengths_file", f"{path}: not one integer a line or a JSON list "
                                             f"({e})") from None
    if not values or not all(isinstance(v, int) and v >= 1 for v in values):
        raise DataError("data.lengths_file", f"{path}: needs positive integer lengths")
    return values


def _dataset_lengths(spec) -> list[int]:
    import datasets

    path = _existing(spec.dataset, "data.dataset")
    try:
        if path.is_dir():
            data = datasets.load_from_disk(str(path))
            if isinstance(data, datasets.DatasetDict):
                data = data["train"] if "train" in data else next(iter(data.values()))
        else:
            data = datasets.load_dataset("json", data_files=str(path), split="train")
    except Exception as e:  # noqa: BLE001 - whatever datasets refused, in its words
        raise DataError("data.dataset", f"{path}: {type(e).__name__}: {e}") from None
    if "input_ids" in data.column_names:
        return [len(ids) for ids in data["input_ids"]]
    if spec.tokenizer is None:
        raise DataError("data.tokenizer", f"{path} has no input_ids: name a local tokenizer "
                                          "folder to tokenize its text")
    if spec.text_field not in data.column_names:
        raise DataError("data.text_field", f"{path} has no column {spec.text_field!r} "
                                           f"(columns: {', '.join(data.column_names)})")
    from transformers import AutoTokenizer

    folder = _existing(spec.tokenizer, "data.tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001
        raise DataError("data.tokenizer", f"{folder}: {type(e).__name__}: {e}") from None
    return [len(ids) for ids in tokenizer(list(data[spec.text_field]))["input_ids"]]


def plan(spec, lengths: list[int], train) -> list[list[MicroBatch]]:
    """The micro-batches of every step (warm-up included) the sampler draws, in order."""
    batch, accumulation = train.batch_size, train.gradient_accumulation_steps
    generator = torch.Generator().manual_seed(train.seed)
    rows = pack(lengths, train.seq_len) if spec.packing else None
    if rows is not None:  # the sampler draws packed rows
        lengths = [sum(row) for row in rows]
    if spec.group_by_length:
        from transformers.trainer_pt_utils import LengthGroupedSampler

        sampler = LengthGroupedSampler(batch * accumulation, lengths=lengths,
                                       generator=generator)
    else:
        sampler = torch.utils.data.RandomSampler(range(len(lengths)), generator=generator)

    def samples():
        while True:  # epoch after epoch, as the dataloader
            yield from iter(sampler)

    drawn = samples()
    steps = []
    for _ in range(train.warmup_steps + train.steps):
        micro = []
        for _ in range(accumulation):
            picked = [next(drawn) for _ in range(batch)]
            if rows is not None:  # padding-free: the rows' tokens in one, as TRL collates
                micro.append(MicroBatch(tuple(lengths[i] for i in picked),
                                        sum(lengths[i] for i in picked),
                                        tuple(rows[i] for i in picked)))
                continue
            taken = tuple(min(lengths[i], train.seq_len) for i in picked)
            padded = train.seq_len if spec.padding == "max_length" else max(taken)
            micro.append(MicroBatch(taken, padded))
        steps.append(micro)
    return steps


def make_batch(micro: MicroBatch, vocab_size: int, device: torch.device,
               seed: int) -> dict[str, torch.Tensor]:
    """Random tokens in the micro-batch's padded shape: padding (right, token 0) masked out of
    attention and labels, as a padding collator leaves it. Packed: TRL's padding-free
    collator's batch (one row, position ids restarting at each sequence, and the sequence
    boundaries flash attention's variable-length kernel reads)."""
    if micro.packed is not None:
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
        draw = random.Random(seed)  # a list for the collator (a fake tensor has no values)
        ids = [draw.randrange(1, vocab_size) for _ in range(micro.padded)]
        rows, start = [], 0
        for row in micro.packed:
            rows.append({"input_ids": ids[start:start + sum(row)], "seq_lengths": list(row)})
            start += sum(row)
        # Collated on real tensors (it reads their values: where each sequence starts) and
        # copied, so a simulation's fake mode makes its own (which hold no values) from them.
        with unset_fake_temporarily():
            batch = collate(rows)
            starts = (batch["position_ids"] == 0).cumsum(-1) - 1  # each token's sequence
            several = int(starts[0, -1]) > 0
        batch = {k: v.clone().to(device) if isinstance(v, torch.Tensor) else v
                 for k, v in batch.items()}
        if several and is_fake(batch["position_ids"]):  # what a fake tensor cannot say
            setattr(batch["position_ids"], SEQUENCE_INDEX, starts.clone().to(device))
        return batch
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab_size, micro.shape, generator=generator)
    positions = torch.arange(micro.padded)
    mask = (positions[None, :] < torch.tensor(micro.lengths)[:, None]).long()
    ids = ids * mask
    labels = ids.masked_fill(mask == 0, -100)
    batch = {"input_ids": ids, "labels": labels}
    if min(micro.lengths) < micro.padded:  # padded: the collator's mask
        batch["attention_mask"] = mask
    return {k: v.to(device) for k, v in batch.items()}


def percentile(values: list[int], q: float) -> int:
    """The `q`-th percentile, nearest rank (a value that occurred)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summary(spec, lengths: list[int], steps: list[list[MicroBatch]], per_step_peaks: list[int],
            seq_len: int) -> dict:
    """The record's `data`: the source and what it held, the shapes drawn, and the per-step
    peaks' p50 / p99 / max with the step (and shapes) that set the maximum (the peaks
    themselves, and reserved memory step by step, are the record's `memory`)."""
    out = {
        "source": next(k for k in DATA_SOURCES if getattr(spec, k) is not None),
        "samples": len(lengths),
        "length_p50": percentile(lengths, 50), "length_p99": percentile(lengths, 99),
        "length_max": max(lengths),
        "truncated_samples": sum(n > seq_len for n in lengths),
        "step_shapes": [[list(m.shape) for m in step] for step in steps],
        "step_tokens": [sum(sum(m.lengths) for m in step) for step in steps],
        "peak_p50_bytes": None, "peak_p99_bytes": None, "peak_max_bytes": None,
        "peak_max_step": None, "peak_max_shapes": None,
    }
    if per_step_peaks:
        top = max(range(len(per_step_peaks)), key=per_step_peaks.__getitem__)
        out.update(peak_p50_bytes=percentile(per_step_peaks, 50),
                   peak_p99_bytes=percentile(per_step_peaks, 99),
                   peak_max_bytes=per_step_peaks[top], peak_max_step=top,
                   peak_max_shapes=out["step_shapes"][top] if top < len(steps) else None)
    return out
