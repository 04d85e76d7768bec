"""The job after the training steps: evaluation (`eval:`) and generation (`generate:`), each a
phase of the record with its own peak and breakdown, run with the optimizer state live.

Measured on CPU (tiny Llama in fp32, in this process) and simulated (CPU target)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, measured_variants, write_scenario

TRAIN = {"batch_size": 2, "seq_len": 128, "steps": 1, "warmup_steps": 0}
EVAL_BATCH, EVAL_BATCHES = 8, 3
GENERATE = {"batch_size": 4, "prompt_len": 16, "max_new_tokens": 24}
VARIANTS = [
    # At the training shape, prediction loss only (Trainer.evaluate's default).
    {"name": "eval", "techniques": []},
    # A larger eval batch whose logits are kept for compute_metrics, batch after batch.
    {"name": "eval-logits", "techniques": [],
     "eval": {"batch_size": EVAL_BATCH, "batches": EVAL_BATCHES, "keep_logits": True}},
    {"name": "generate", "techniques": [], "eval": None, "generate": GENERATE},
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each variant measured on CPU and simulated: {(name, simulated): Measured}."""
    return measured_variants(tmp_path_factory.mktemp("job"), "job", VARIANTS, train=TRAIN,
                             eval={"batches": 2})[1]


def _phase(runs, name, phase, simulate=False) -> dict:
    return runs[name, simulate].memory["phases"][phase]


def _training_peak(runs, name) -> int:
    return max(_phase(runs, name, p)["peak_allocated_bytes"]
               for p in ("forward", "backward", "optimizer"))


def _config() -> dict:
    return json.loads((REPO / "scenarios" / "models" / "tiny-llama.json").read_text())


def test_evaluation_at_the_training_shape_peaks_below_the_training_step(runs):
    """No grads (Trainer zeroes them after the step) and nothing saved for backward: the eval
    peak is below the step's, yet holds the optimizer state, which outlives the steps."""
    evaluation = _phase(runs, "eval", "eval")
    assert evaluation["peak_allocated_bytes"] < _training_peak(runs, "eval")
    at_peak = evaluation["breakdown_bytes"]
    assert at_peak["grads"] == 0 and at_peak["activations"] <= 4096
    # AdamW's two fp32 moments (and a step count per parameter)
    assert at_peak["optimizer"] == pytest.approx(2 * at_peak["params"], rel=0.001)
    assert runs["eval", False].memory["peak_phase"] != "eval"


def test_kept_logits_of_a_larger_eval_batch_set_the_job_peak(runs):
    """keep_logits concatenates each batch's logits on the device, as Trainer's evaluation
    loop does: at the last batch the earlier batches' logits, the new ones and their
    concatenation are live at once — at least every batch's logits, in fp32 here."""
    logits = EVAL_BATCH * TRAIN["seq_len"] * _config()["vocab_size"] * 4
    evaluation = _phase(runs, "eval-logits", "eval")
    assert evaluation["breakdown_bytes"]["other"] >= EVAL_BATCHES * logits
    assert evaluation["peak_allocated_bytes"] > _training_peak(runs, "eval-logits")
    assert runs["eval-logits", False].memory["peak_phase"] == "eval"


def test_generation_holds_the_kv_cache_of_every_token_fed(runs):
    """2 · layers · batch · tokens · kv_heads · head_dim · bytes, tokens the prompt and every
    generated token but the last (which is never fed back), fp32 here."""
    config = _config()
    tokens = GENERATE["prompt_len"] + GENERATE["max_new_tokens"] - 1
    expected = (2 * config["num_hidden_layers"] * GENERATE["batch_size"] * tokens
                * config["num_key_value_heads"] * config["head_dim"] * 4)
    memory = runs["generate", False].memory
    assert memory["kv_cache_bytes"] == pytest.approx(expected, rel=0.01)
    generation = memory["phases"]["generate"]
    assert 0 < generation["breakdown_bytes"]["kv_cache"] <= memory["kv_cache_bytes"] * 1.25
    assert generation["breakdown_bytes"]["grads"] == 0
    assert runs["eval", False].memory.get("kv_cache_bytes") is None  # nothing generated


@pytest.mark.parametrize("name, phase", [("eval", "eval"), ("eval-logits", "eval"),
                                         ("generate", "generate")])
def test_the_job_phases_simulated_agree_with_the_cpu_run_within_one_percent(runs, name, phase):
    measured, simulated = _phase(runs, name, phase), _phase(runs, name, phase, simulate=True)
    assert simulated["peak_allocated_bytes"] == pytest.approx(
        measured["peak_allocated_bytes"], rel=0.01)
    for category in ("params", "optimizer", "kv_cache", "other"):
        assert simulated["breakdown_bytes"][category] == pytest.approx(
            measured["breakdown_bytes"][category], rel=0.01, abs=4096), category


@pytest.mark.parametrize("top, variant, key, says", [
    ({"eval": {"batchsize": 4}}, {}, "eval.batchsize", "did you mean 'batch_size'"),
    ({"eval": {"every_steps": 5}}, {}, "eval.every_steps", "no evaluation would run"),
    ({}, {"eval": {"keep_logits": "yes"}}, "eval.keep_logits", "must be bool"),
    ({}, {"eval": [4]}, "eval", "must be a mapping"),
    ({"generate": {"prompt_len": 16}}, {}, "generate.max_new_tokens", "missing"),
    ({}, {"generate": {"prompt_len": 16, "max_new_tokens": 0}}, "generate.max_new_tokens",
     "must be ≥ 1"),
    ({}, {"genrate": {"prompt_len": 1}}, "genrate", "did you mean 'generate'"),
])
def test_bad_eval_and_generate_keys_are_refused_naming_the_key(tmp_path, cli, top, variant, key,
                                                               says):
    path = write_scenario(tmp_path, "bad", [{"name": "v", "techniques": [], **variant}],
                          train=TRAIN, **top)
    proc = cli("validate", str(path))
    assert proc.returncode == 2, proc.stdout
    line = proc.stderr.strip().splitlines()[-1]
    assert key in line and says in line, line


def test_a_variant_with_eval_and_generate_survives_its_job_file(tmp_path):
    from harness.job import Job, RunOptions
    from harness.scenario import load_scenario

    scenario = load_scenario(write_scenario(tmp_path, "job", VARIANTS, train=TRAIN,
                                            eval={"batches": 2, "every_steps": 1}))
    for variant in scenario.variants:
        job = Job.make(scenario, variant, RunOptions("simulate"), run_id="r",
                       result=tmp_path / "r.json", snapshot=tmp_path / "s.pickle")
        job.write(tmp_path / "job.json")
        assert Job.read(tmp_path / "job.json").variant == variant


@pytest.mark.slow  # a run: each variant a worker process
def test_records_and_tables_say_which_phase_of_the_job_set_the_peak(tmp_path):
    """As a user reads it: the record's eval and generate settings (the training shape filled
    in), the table's phase column, a kv_cache column only where a row's peak holds a cache."""
    import csv
    from pathlib import Path

    from tests.conftest import harness, last_json, records

    path = write_scenario(tmp_path, "job", VARIANTS, train=TRAIN, eval={"batches": 2})
    proc = harness("run", str(path), "--device", "cpu", "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    run_dir = Path(last_json(proc.stdout)["run_dir"])
    got = records(run_dir)
    assert got["eval"]["eval"] == {"batch_size": 2, "seq_len": 128, "batches": 2,
                                   "every_steps": None, "keep_logits": False}
    assert got["eval"]["generate"] is None and got["generate"]["eval"] is None
    assert got["generate"]["generate"] == {**GENERATE}
    assert got["eval-logits"]["memory"]["peak_phase"] == "eval"
    rows = {r["variant"]: r for r in csv.DictReader((run_dir / "summary.csv").open())}
    assert rows["eval-logits"]["peak_phase"] == "eval"
    # The training step peaks above this small generation: its breakdown is the phase's own.
    assert rows["generate"]["peak_phase"] != "generate" and rows["generate"]["kv_cache_bytes"] == "0"
    assert got["generate"]["memory"]["phases"]["generate"]["breakdown_bytes"]["kv_cache"] > 0
    table = proc.stdout.split("\n| variant")[1]
    assert "| eval " in table and "| kv " not in table  # no row's peak holds a KV cache
