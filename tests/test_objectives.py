"""objective: TRL's DPO loss in the harness's step (harness/objectives.py).

Fast: what a scenario may say (TRL's spelling, checked against its config class; what
contradicts itself). Slow: real CPU steps through TRL's own trainer, and their simulation.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.scenario import ScenarioError, load_scenario
from tests.conftest import harness, last_json, measured_variants, write_scenario

LORA = {"lora": {"r": 8}}
STACK = ["bf16", LORA]


def _error(folder, variants, **scenario) -> str:
    with pytest.raises(ScenarioError) as caught:
        load_scenario(write_scenario(folder, "objectives", variants, **scenario))
    return str(caught.value)


@pytest.mark.parametrize(("objective", "key", "says"), [
    ({"dpo": {"betta": 0.1}}, "objective.dpo.betta", "did you mean 'beta'?"),
    ({"dpo": {"loss_type": ["sigmoid", "hinj"]}}, "objective.dpo.loss_type",
     "did you mean 'hinge'?"),
    ({"dpo": {"learning_rate": 1e-5}}, "objective.dpo.learning_rate", "train.lr"),
    ({"dpo": {"gradient_checkpointing": True}}, "objective.dpo.gradient_checkpointing",
     "the gradient_checkpointing technique"),
    ({"dpo": {"logging_steps": 5}}, "objective.dpo.logging_steps",
     "TrainingArguments field"),
    ({"dpo": {"beta": "high"}}, "objective.dpo.beta", "must be float"),
    # DPOTrainer's own checks, as it is built around the model on meta
    ({"dpo": {"loss_type": "exo_pair"}}, "objective.dpo", "Label smoothing must be greater"),
    ({"dpo": {"reference": "base"}}, "objective.dpo.reference", "adapter_disabled, ref_adapter"),
    ({"dpo": {"reference": "copy", "precompute_ref_log_probs": True}},
     "objective.dpo.reference", "no reference to choose"),
    ({"dpo": {"prompt_len": 31}}, "objective.dpo.prompt_len", "no completion"),
    ({"orpo": {"reference": "copy"}}, "objective.orpo.reference", "no reference model"),
    ({"orpo": {"max_completion_len": 8}}, "objective.orpo.max_completion_len",
     "did you mean 'max_completion_length'?"),
    ("dpx", "objective", "did you mean 'dpo'?"),
    ("grpo", "objective", "not built yet"),
    ({"sft": {"beta": 0.1}}, "objective.sft", "no arguments"),
])
def test_bad_objectives_name_the_key_in_trl_spelling(tmp_path, objective, key, says):
    message = _error(tmp_path, [{"name": "v", "techniques": STACK, "objective": objective}],
                     train={"seq_len": 32})
    assert f"key 'variants[0].{key}'" in message and says in message, message


def test_an_objective_contradicting_its_stack_is_bad_input(tmp_path):
    no_adapter = _error(tmp_path, [{"name": "v", "techniques": ["bf16"],
                                    "objective": {"dpo": {"reference": "ref_adapter"}}}])
    assert "needs a PEFT adapter" in no_adapter
    two_losses = _error(tmp_path, [{"name": "v", "objective": "dpo",
                                    "techniques": [*STACK, "chunked_nll"]}])
    assert "chunked_nll replaces the model's loss" in two_losses
    evaluated = _error(tmp_path, [{"name": "v", "objective": "dpo", "techniques": STACK,
                                   "eval": {"batches": 1}}])
    assert "key 'variants[0].eval'" in evaluated and "not built yet" in evaluated


def test_the_scenario_objective_is_every_variant_s_unless_it_says_its_own(tmp_path):
    loaded = load_scenario(write_scenario(
        tmp_path, "objectives", [{"name": "dpo", "techniques": STACK},
                                 {"name": "sft", "techniques": STACK, "objective": "sft"},
                                 {"name": "full", "techniques": ["bf16"],
                                  "objective": {"dpo": {"beta": 0.5}}}],
        objective={"dpo": {"precompute_ref_log_probs": True}}))
    dpo, sft, full = loaded.variants
    assert dpo.objective.name == "dpo" and dpo.objective.reference_of(True) == "precomputed"
    assert sft.objective is None  # the model's own loss
    assert dict(full.objective.args) == {"beta": 0.5} and full.objective.reference_of(False) \
        == "copy"  # TRL's reference for a full fine-tune: a second model


def test_an_unknown_objective_argument_exits_2_naming_file_variant_and_key(tmp_path):
    path = write_scenario(tmp_path, "objectives", [
        {"name": "v", "techniques": STACK, "objective": {"dpo": {"bta": 0.1}}}])
    proc = harness("validate", str(path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "variant 'v'" in proc.stderr and "objective.dpo.bta" in proc.stderr
    assert "did you mean 'beta'?" in proc.stderr


# -- real steps through TRL's DPOTrainer, and their simulation --------------------------------

BATCH, SEQ = 2, 64
RUNS = [
    # SFT through TRL's fused LM head, at twice the batch: the same head, every position scored
    {"name": "sft-2b", "techniques": [*STACK, {"chunked_nll": {"impl": "trl"}}],
     "train": {"batch_size": 2 * BATCH}},
    {"name": "dpo", "techniques": STACK, "objective": "dpo"},
    {"name": "dpo-copy", "techniques": STACK, "objective": {"dpo": {"reference": "copy"}}},
    {"name": "dpo-pre", "techniques": STACK,
     "objective": {"dpo": {"precompute_ref_log_probs": True}}},
    {"name": "orpo", "techniques": STACK, "objective": "orpo"},
]


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    _, got = measured_variants(
        tmp_path_factory.mktemp("dpo"), "dpo", RUNS,
        modes=lambda name: (False, True) if name.startswith(("dpo", "orpo")) else (False,),
        train={"batch_size": BATCH, "seq_len": SEQ, "steps": 1, "warmup_steps": 0})
    return got


def _phase(measured, name: str) -> dict:
    return measured.memory["phases"][name]


@pytest.mark.slow
def test_dpo_at_batch_b_saves_what_sft_saves_at_2b(steps):
    """Chosen and rejected: the policy's forward runs 2B sequences; the reference's forward
    runs without grad and saves nothing. So the activations at the forward's peak are SFT's
    at 2B through the same fused head — within the per-token outputs DPO's metrics ask the
    head for (entropy, mean logit, top-1: 3 × 2B × 63 × 4 bytes) and a few loss scalars."""
    dpo, sft = steps["dpo", False], steps["sft-2b", False]
    assert dpo.result.objective["sequences_per_step"] == 2 * BATCH
    assert dpo.result.objective["forwards_per_micro_batch"] == {"with_grad": 1,
                                                               "without_grad": 1}
    saved = _phase(dpo, "forward")["breakdown_bytes"]["activations"]
    sft_saved = _phase(sft, "forward")["breakdown_bytes"]["activations"]
    assert abs(saved - sft_saved) <= 3 * 2 * BATCH * (SEQ - 1) * 4 + 16 * 512, (saved, sft_saved)


@pytest.mark.slow
def test_a_separate_reference_copy_adds_its_parameters_and_nothing_else(steps):
    copy, shared = steps["dpo-copy", False], steps["dpo", False]
    assert copy.result.objective["reference"] == "copy"
    # The base's parameters again (the policy's, less its adapter), in bf16 as the base is.
    base = copy.result.params_total - copy.result.params_trainable
    assert copy.result.objective["reference_params"] == base
    second = 2 * base
    for phase in ("load", "forward", "backward", "optimizer"):
        one, two = _phase(shared, phase)["breakdown_bytes"], _phase(copy, phase)["breakdown_bytes"]
        assert two["params"] - one["params"] == second, phase
        assert two["grads"] == one["grads"] and two["optimizer"] == one["optimizer"], phase
    assert copy.memory["end_of_step_bytes"]["optimizer"] == \
        shared.memory["end_of_step_bytes"]["optimizer"]


@pytest.mark.slow
def test_precomputed_reference_log_probs_leave_the_step_one_forward(steps):
    """TRL's precompute pass runs before training (phase `reference`: forwards without grad,
    nothing saved); the step then runs the policy's forward alone."""
    pre, live = steps["dpo-pre", False], steps["dpo", False]
    assert pre.result.objective["reference"] == "precomputed"
    assert pre.result.objective["forwards_per_micro_batch"] == {"with_grad": 1,
                                                               "without_grad": 0}
    reference = _phase(pre, "reference")
    assert reference["breakdown_bytes"]["activations"] == 0
    assert reference["breakdown_bytes"]["grads"] == 0
    assert _phase(pre, "forward")["peak_allocated_bytes"] <= \
        _phase(live, "forward")["peak_allocated_bytes"]
    assert "reference" not in live.memory["phases"]


@pytest.mark.slow
def test_orpo_runs_both_halves_through_one_forward_and_no_reference(steps):
    orpo = steps["orpo", False].result.objective
    assert orpo["trainer"] == "trl.experimental.orpo.ORPOTrainer"
    assert orpo["reference"] == "none" and orpo["reference_params"] is None
    assert orpo["sequences_per_step"] == 2 * BATCH
    assert orpo["forwards_per_micro_batch"] == {"with_grad": 1, "without_grad": 0}
    assert orpo["completion_tokens_per_step"] == 2 * BATCH * (SEQ // 2)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dpo", "dpo-copy", "dpo-pre", "orpo"])
def test_simulated_objectives_agree_with_the_real_cpu_step_within_one_percent(steps, name):
    """Per phase. What no tensor explains in the real run (`unattributed`: a CPU kernel's own
    scratch: ORPO's step here allocates 1 MiB that no op returns) is not an op's output, which
    is what a simulation with a CPU target counts."""
    real, sim = steps[name, False], steps[name, True]
    assert sim.result.objective == real.result.objective
    for phase, figures in real.memory["phases"].items():
        scratch = figures["breakdown_bytes"]["unattributed"]
        assert _phase(sim, phase)["peak_allocated_bytes"] == pytest.approx(
            figures["peak_allocated_bytes"] - scratch, rel=0.01), phase


@pytest.mark.slow
def test_the_record_and_table_name_the_objective(tmp_path):
    path = write_scenario(tmp_path, "objectives", [
        {"name": "sft", "techniques": STACK},
        {"name": "dpo", "techniques": STACK, "objective": {"dpo": {"beta": 0.2}}}],
        train={"batch_size": BATCH, "seq_len": 32, "steps": 1, "warmup_steps": 0})
    proc = harness("run", str(path), "--device", "simulate", "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = Path(last_json(proc.stdout)["run_dir"])
    objective = json.loads((run_dir / "dpo.json").read_text())["objective"]
    assert objective["name"] == "dpo" and objective["args"] == {"beta": 0.2}
    assert objective["trainer"] == "trl.DPOTrainer" and objective["trl_version"]
    assert objective["reference"] == "adapter_disabled" and objective["prompt_len"] == 16
    assert objective["completion_tokens_per_step"] == 2 * BATCH * 16  # 15 words + EOS each
    assert json.loads((run_dir / "sft.json").read_text())["objective"] is None
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip()
            for line in proc.stdout.splitlines() if line.startswith("| ")}
    assert rows["sft"] == "sft" and rows["dpo"] == "dpo · adapter_disabled"


def test_the_closed_form_says_it_does_not_model_an_objective(tmp_path):
    from harness.estimate import estimate_record

    loaded = load_scenario(write_scenario(tmp_path, "objectives", [
        {"name": "dpo", "techniques": STACK, "objective": "dpo"}]))
    record = estimate_record(loaded, loaded.variants[0], run_id="t")
    assert record.status == "unsupported" and "objective dpo" in record.error
    assert record.objective == {"name": "dpo", "args": {}, "reference": "adapter_disabled",
                                "prompt_len": loaded.variants[0].train.seq_len // 2}
