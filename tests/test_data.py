"""Real length distributions (`data:`): the batches Trainer's sampler draws, padded as a
collator pads them, step after step — per-step peaks, their p50/p99/max, and which batch set
the maximum.

Measured on CPU (tiny Llama in fp32, in this process) and simulated (CPU target)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import harness, measured_variants, write_scenario

SEQ_LEN = 256
TRAIN = {"batch_size": 2, "seq_len": SEQ_LEN, "steps": 6, "warmup_steps": 0}
# A few long samples among short ones: which batches are long depends on the sampler.
LENGTHS = [40, 36, 52, 300, 44, 28, 60, 48, 180, 32, 56, 24]
VARIANTS = [
    {"name": "longest", "techniques": []},
    {"name": "max-length", "techniques": [], "data": {"padding": "max_length"}},
    {"name": "grouped", "techniques": [],
     "data": {"synthetic": {"median": 60, "p99": 400}, "group_by_length": True}},
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{(name, simulated): Measured} for each variant (max-length measured only)."""
    return measured_variants(tmp_path_factory.mktemp("data"), "data", VARIANTS, train=TRAIN,
                             data={"lengths": LENGTHS},
                             modes=lambda name: (False,) if name == "max-length" else
                             (False, True))[1]


def _padded(run) -> list[int]:
    """Each step's padded length (one micro-batch a step here)."""
    return [step[0].padded for step in run.result.drawn]


def _peaks(run) -> list[int]:
    return run.memory["per_step_peak_allocated_bytes"]


def test_longest_padding_peaks_at_the_longest_batch_drawn(runs):
    """Padded to each batch's longest sample (truncated at seq_len), the step that draws the
    longest batch sets the peak — from the second step on, when AdamW's state exists — and a
    longer batch never peaks lower."""
    run = runs["longest", False]
    padded, peaks = _padded(run), _peaks(run)
    assert len(set(padded)) > 2 and max(padded) == SEQ_LEN  # the 300 is truncated
    later = range(1, len(peaks))
    assert max(later, key=peaks.__getitem__) == max(later, key=padded.__getitem__)
    for a in later:
        for b in later:
            if padded[a] > padded[b]:
                assert peaks[a] >= peaks[b], (padded, peaks)


def test_padding_to_max_length_costs_every_step_the_longest_one(runs):
    """Every batch padded to seq_len: each step after the first peaks as the longest batch of
    longest-padding does, so its p50 is its max."""
    fixed, longest = _peaks(runs["max-length", False]), _peaks(runs["longest", False])
    assert fixed[1:] == pytest.approx([max(longest[1:])] * (len(fixed) - 1), rel=0.001)
    assert max(fixed) == pytest.approx(max(longest), rel=0.001)


def test_grouping_by_length_draws_batches_of_alike_lengths(runs):
    """transformers' LengthGroupedSampler (over the micro-batch times the accumulation, as
    Trainer makes it): the longest sample's mega-batch first, each batch's rows of alike
    lengths — a fraction of the padding random batches of the same samples carry."""
    from harness.data import plan
    from harness.scenario import DataSpec, TrainSpec

    run = runs["grouped", False]
    assert run.result.drawn[0][0].padded == SEQ_LEN
    train = TrainSpec(**{**TRAIN, "steps": 50})

    def waste(group: bool) -> int:
        steps = plan(DataSpec(synthetic={"median": 60, "p99": 400}, group_by_length=group),
                     run.result.lengths, train)
        return sum(m.padded * len(m.lengths) - sum(m.lengths) for s in steps for m in s)

    assert waste(True) < waste(False) / 4


def test_simulated_steps_match_the_cpu_run(runs):
    """Every step's peak simulated as measured within 1 %, the batches drawn the same."""
    for name in ("longest", "grouped"):
        measured, simulated = runs[name, False], runs[name, True]
        assert simulated.result.drawn == measured.result.drawn
        assert _peaks(simulated) == pytest.approx(_peaks(measured), rel=0.01)
        # Reserved memory step by step: the replayed caching allocator keeps what it reserved,
        # and reserves more as longer batches come.
        reserved = simulated.memory["per_step_peak_reserved_bytes"]
        assert reserved == sorted(reserved) and reserved[-1] > reserved[0]
        assert measured.memory["per_step_peak_reserved_bytes"] is None  # CPU: no reserve


@pytest.mark.slow
def test_a_packed_batch_peaks_as_a_full_length_one(tmp_path):
    """TRL's packing (best-fit decreasing into rows of seq_len, a micro-batch of rows collated
    padding-free into one row with per-sequence position ids): as many tokens as a batch
    padded to seq_len, nearly all of them real, and the same peak within 3 % (SDPA attends
    within each sequence through a block mask, with K and V expanded to every head)."""
    _, runs = measured_variants(tmp_path, "packing", [
        {"name": "packed", "techniques": [], "data": {"packing": True}},
        {"name": "full", "techniques": [], "data": {"padding": "max_length"}}],
        train={**TRAIN, "steps": 3}, data={"synthetic": {"median": 60, "p99": 400}},
        modes=lambda name: (False, True) if name == "packed" else (False,))
    packed, full, simulated = runs["packed", False], runs["full", False], runs["packed", True]
    for step in packed.result.drawn:
        (micro,) = step
        assert micro.shape == (1, micro.padded) and len(micro.packed) == TRAIN["batch_size"]
        assert 0.95 * TRAIN["batch_size"] * SEQ_LEN <= micro.padded <= \
            TRAIN["batch_size"] * SEQ_LEN
    assert max(_peaks(packed)) == pytest.approx(max(_peaks(full)), rel=0.03)
    # Simulated: the block mask too (fake position ids cannot say where each sequence starts;
    # the batch tells the simulation), each step within 1 %.
    assert _peaks(simulated) == pytest.approx(_peaks(packed), rel=0.01)


@pytest.mark.slow
def test_the_record_summarises_the_steps(tmp_path):
    """`harness run`: the record's `data` says the source, the lengths it held, each step's
    shapes and tokens, and the p50 / p99 / max of the per-step peaks with the step and shapes
    of the maximum; tokens per second count the real tokens, padding included."""
    path = write_scenario(tmp_path, "lengths", [{"name": "v", "techniques": []}], train=TRAIN,
                          data={"lengths": LENGTHS})
    done = harness("run", str(path), "--device", "cpu", "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    (record_path,) = (tmp_path / "out" / "lengths").glob("*/v.json")
    record = json.loads(record_path.read_text())
    data = record["data"]
    assert data["source"] == "lengths" and data["samples"] == len(LENGTHS)
    assert data["length_max"] == 300 and data["truncated_samples"] == 1
    peaks = record["memory"]["per_step_peak_allocated_bytes"]
    assert data["peak_max_bytes"] == max(peaks) == record["memory"]["peak_allocated_bytes"]
    assert data["peak_max_shapes"] == data["step_shapes"][data["peak_max_step"]]
    assert data["peak_p50_bytes"] <= data["peak_p99_bytes"] <= data["peak_max_bytes"]
    assert len(data["step_shapes"]) == TRAIN["steps"]
    assert record["timing"]["tokens_per_s"] > 0


def test_lengths_from_a_file_and_from_a_tokenized_local_dataset(tmp_path):
    """`lengths_file` (one a line) and `dataset` (JSONL) tokenized by a local tokenizer
    folder (a real tokenizers word-level tokenizer, saved as transformers saves one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from harness.data import read_lengths
    from harness.scenario import load_scenario

    words = [f"w{i}" for i in range(50)]
    texts = [" ".join(words[: 3 + 7 * i]) for i in range(6)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    model = models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]")
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(tmp_path / "tok")
    (tmp_path / "lengths.txt").write_text("12\n7\n300\n")
    path = write_scenario(tmp_path, "sources", [
        {"name": "file", "techniques": [], "data": {"lengths_file": "lengths.txt"}},
        {"name": "dataset", "techniques": [],
         "data": {"dataset": "train.jsonl", "tokenizer": "tok"}}], train=TRAIN,
        data={"lengths": [1]})
    scenario = load_scenario(path)
    file, dataset = (read_lengths(v.data, 0) for v in scenario.variants)
    assert file == [12, 7, 300]
    assert dataset == [3 + 7 * i for i in range(6)]


def test_synthetic_lengths_have_the_median_and_p99_asked():
    from harness.data import percentile, synthetic_lengths

    lengths = synthetic_lengths(180, 640, seed=0)
    assert percentile(lengths, 50) == pytest.approx(180, rel=0.03)
    assert percentile(lengths, 99) == pytest.approx(640, rel=0.08)


@pytest.mark.parametrize(("data", "key", "says"), [
    ({"padding": "longest"}, "data", "needs one source"),
    ({"lengths": [10, 0]}, "data.lengths", "positive token counts"),
    ({"lengths": [10], "synthetic": {"median": 5, "p99": 9}}, "data.synthetic", "one source"),
    ({"synthetic": {"median": 300, "p99": 200}}, "data.synthetic.p99", "above the median"),
    ({"synthetic": {"median": 300}}, "data.synthetic.p99", "positive token count"),
    ({"lengths_file": "missing.txt"}, "data.lengths_file", "no such file"),
    ({"lengths": [10], "padding": "left"}, "data.padding", "must be one of longest"),
    ({"lengths": [10], "pad": "longest"}, "data.pad", "unknown key"),
    ({"lengths": [10], "packing": True, "padding": "max_length"}, "data.padding", "packs"),
])
def test_bad_data_keys_are_exit_2(tmp_path, data, key, says):
    path = write_scenario(tmp_path, "bad", [{"name": "v", "techniques": []}], data=data)
    done = harness("run", str(path), "--device", "cpu", "--out", str(tmp_path / "out"))
    assert done.returncode == 2, done.stderr
    assert key in done.stderr and says in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
