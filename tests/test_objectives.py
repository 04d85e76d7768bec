"""objective: TRL's DPO, ORPO, KTO, reward and GRPO losses in the harness's step
(harness/objectives.py).

Fast: what a scenario may say (TRL's spelling, checked against its config class and, with the
step's batch, by the class itself; what contradicts itself). Slow: real CPU steps through TRL's
own trainers, and their simulation.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.scenario import ScenarioError, load_scenario
from tests.conftest import REPO, harness, last_json, measured_variants, write_scenario

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
    ("ktoo", "objective", "did you mean 'kto'?"),
    ({"kto": {"desirable_wieght": 1.0}}, "objective.kto.desirable_wieght",
     "did you mean 'desirable_weight'?"),
    ({"kto": {"loss_type": "apo_zero"}}, "objective.kto.loss_type",
     "did you mean 'apo_zero_unpaired'?"),
    ({"reward": {"reference": "copy"}}, "objective.reward.reference", "no reference model"),
    ({"reward": {"center_rewards": 0.01}}, "objective.reward.center_rewards",
     "did you mean 'center_rewards_coefficient'?"),
    ({"grpo": {"num_generation": 2}}, "objective.grpo.num_generation",
     "did you mean 'num_generations'?"),
    ({"grpo": {"num_generations": 2, "reference": "copy"}}, "objective.grpo.reference",
     "beta 0 has no KL term"),
    ({"grpo": {"num_generations": 2, "prompt_len": 8, "max_completion_length": 8}},
     "objective.grpo.prompt_len", "not seq_len 32"),
    ({"grpo": {"num_generations": 1}}, "objective.grpo", "at least 2 generations"),
    ({"grpo": {"num_generations": 2, "use_vllm": True}}, "objective.grpo.use_vllm",
     "vLLM is not built yet"),
    ({"grpo": {"num_generations": 2, "max_completion_length": 32}},
     "objective.grpo.max_completion_length", "no prompt"),
    # GRPOConfig's own check, with the step's batch: whole prompt groups of completions
    ("grpo", "objective.grpo", "must be divisible by num_generations (8)"),
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
    # SFT at the batch, through the same fused head: what KTO's policy forward sees
    {"name": "sft-b", "techniques": [*STACK, {"chunked_nll": {"impl": "trl"}}]},
    {"name": "kto", "techniques": STACK, "objective": "kto"},
    {"name": "kto-pre", "techniques": STACK,
     "objective": {"kto": {"precompute_ref_log_probs": True}}},
    {"name": "reward", "techniques": STACK, "objective": "reward"},
    # GRPO in fp32: on this CPU a bf16 generation's LM head expands its weight inside the
    # kernel (8 MiB no op returns), which a simulation does not see
    {"name": "grpo", "techniques": [LORA], "objective": {"grpo": {"num_generations": 2}}},
    {"name": "grpo-kl", "techniques": [LORA],
     "objective": {"grpo": {"num_generations": 2, "beta": 0.04}}},
    {"name": "grpo-acc", "techniques": [LORA], "objective": {"grpo": {"num_generations": 2}},
     "train": {"gradient_accumulation_steps": 2}},
    {"name": "grpo-copy", "techniques": [],
     "objective": {"grpo": {"num_generations": 2, "beta": 0.04}}},
]
SIMULATED = ("dpo", "orpo", "kto", "reward", "grpo")


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    _, got = measured_variants(
        tmp_path_factory.mktemp("dpo"), "dpo", RUNS,
        modes=lambda name: (False, True) if name.startswith(SIMULATED) else (False,),
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
def test_kto_trains_on_the_batch_and_scores_its_kl_sequences_without_grad(steps):
    """KTO's rows are unpaired: the policy's forward with grad sees the batch, as SFT's does
    through the same fused head — within the per-token outputs its metrics ask the head for
    (entropy, mean logit: 2 × B × 63 × 4 bytes) and a few loss scalars. Each row's mismatched
    KL sequence runs without grad, through the policy and the reference, as does the
    reference's forward of the batch: three forwards that save nothing. Precomputed, only the
    policy's KL forward stays."""
    kto, sft = steps["kto", False], steps["sft-b", False]
    objective = kto.result.objective
    assert objective["trainer"] == "trl.KTOTrainer" and objective["reference"] == \
        "adapter_disabled"
    assert objective["sequences_per_step"] == objective["kl_sequences_per_step"] == BATCH
    assert objective["desirable_per_step"] == BATCH // 2
    assert objective["forwards_per_micro_batch"] == {"with_grad": 1, "without_grad": 3}
    saved = _phase(kto, "forward")["breakdown_bytes"]["activations"]
    sft_saved = _phase(sft, "forward")["breakdown_bytes"]["activations"]
    assert abs(saved - sft_saved) <= 2 * BATCH * (SEQ - 1) * 4 + 16 * 512, (saved, sft_saved)
    pre = steps["kto-pre", False]
    assert pre.result.objective["reference"] == "precomputed"
    assert pre.result.objective["forwards_per_micro_batch"] == {"with_grad": 1,
                                                               "without_grad": 1}
    assert _phase(pre, "reference")["breakdown_bytes"]["activations"] == 0


@pytest.mark.slow
def test_a_reward_model_scores_each_sequence_with_no_lm_head(steps):
    """RewardTrainer trains a sequence classifier: a score head of hidden × 1 in place of the
    LM head (PEFT keeps a trainable copy of it beside the frozen one), one score a sequence,
    chosen and rejected: 2 × batch sequences and never a [sequences, length, vocabulary]
    tensor — what the forward holds besides weights and activations is under one such
    tensor's size in bf16."""
    config = json.loads((REPO / "scenarios" / "models" / "tiny-llama.json").read_text())
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    reward, dpo = steps["reward", False], steps["dpo", False]
    objective = reward.result.objective
    assert objective["trainer"] == "trl.RewardTrainer" and objective["reference"] == "none"
    assert objective["head"] == "sequence_classification"
    assert objective["sequences_per_step"] == 2 * BATCH
    assert objective["completion_tokens_per_step"] is None  # no token is scored
    # the score head twice: the frozen one and PEFT's trainable copy (modules_to_save)
    assert reward.result.params_total == dpo.result.params_total - vocab * hidden + 2 * hidden
    assert reward.result.params_trainable == dpo.result.params_trainable + hidden
    params = _phase(reward, "load")["breakdown_bytes"]["params"]
    assert params == _phase(dpo, "load")["breakdown_bytes"]["params"] - 2 * vocab * hidden \
        + 2 * 2 * hidden
    logits = 2 * BATCH * SEQ * vocab * 2
    assert _phase(reward, "forward")["breakdown_bytes"]["other"] < logits


def _per_position(config: dict, itemsize: int = 4) -> int:
    """A KV cache's bytes per position: keys and values of every layer."""
    return 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * \
        config["head_dim"] * itemsize


@pytest.mark.slow
def test_grpo_generates_its_completions_first_holding_their_kv_cache(steps):
    """GRPO's batch is completions: prompts × num_generations sequences, generated at the
    step's start (phase generate, one forward a completion token; every completion runs to
    max_completion_length), so the KV cache holds each sequence's prompt and all but its last
    token. With beta above 0 the reference (the adapter disabled) scores them without grad
    (phase reference, nothing saved) before the policy's forward with grad."""
    config = json.loads((REPO / "scenarios" / "models" / "tiny-llama.json").read_text())
    prompt = completion = SEQ // 2
    grpo, kl = steps["grpo", False], steps["grpo-kl", False]
    objective = grpo.result.objective
    assert objective["trainer"] == "trl.GRPOTrainer" and objective["reference"] == "none"
    assert objective["sequences_per_step"] == BATCH and objective["num_generations"] == 2
    assert objective["prompts_per_step"] == BATCH // 2
    assert objective["max_completion_length"] == completion
    assert objective["completion_tokens_per_step"] == BATCH * completion
    assert objective["forwards_per_generation"] == {"generate": completion}
    assert grpo.memory["kv_cache_bytes"] == BATCH * (prompt + completion - 1) * \
        _per_position(config)
    generation = _phase(grpo, "generate")["breakdown_bytes"]
    assert generation["kv_cache"] > 0 and generation["grads"] == generation["activations"] == 0
    assert "reference" not in grpo.memory["phases"]
    assert kl.result.objective["reference"] == "adapter_disabled"
    assert kl.result.objective["forwards_per_generation"] == {"generate": completion,
                                                             "reference": 1}
    assert _phase(kl, "reference")["breakdown_bytes"]["activations"] == 0


@pytest.mark.slow
def test_grpo_generates_for_the_whole_step_and_trains_a_micro_batch_at_a_time(steps):
    """With gradient accumulation TRL generates once a step, for every micro-batch's
    completions (steps_per_generation = the accumulation): the KV cache of B × A sequences,
    while each forward trains on B of them — saving what the step without accumulation
    saves."""
    plain, accumulated = steps["grpo", False], steps["grpo-acc", False]
    objective = accumulated.result.objective
    assert objective["generation_batch_size"] == objective["sequences_per_step"] == 2 * BATCH
    assert objective["prompts_per_step"] == 2 * BATCH // 2  # num_generations 2
    assert accumulated.memory["kv_cache_bytes"] == 2 * plain.memory["kv_cache_bytes"]
    assert _phase(accumulated, "forward")["breakdown_bytes"]["activations"] == pytest.approx(
        _phase(plain, "forward")["breakdown_bytes"]["activations"], abs=4 * 512)  # scalars


@pytest.mark.slow
def test_grpo_s_reference_copy_for_a_full_fine_tune_adds_its_parameters(steps):
    """GRPOTrainer takes no ref_model; for a full fine-tune with beta above 0 the harness
    hands it the copy TRL would load: the model's parameters once more, frozen."""
    copy = steps["grpo-copy", False]
    assert copy.result.objective["reference"] == "copy"
    assert copy.result.objective["reference_params"] == copy.result.params_total
    params = _phase(copy, "load")["breakdown_bytes"]["params"]
    assert params == 2 * 4 * copy.result.params_total  # fp32, twice
    assert copy.memory["end_of_step_bytes"]["optimizer"] >= 8 * copy.result.params_total


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dpo", "dpo-copy", "dpo-pre", "orpo", "kto", "kto-pre",
                                  "reward", "grpo", "grpo-kl", "grpo-acc", "grpo-copy"])
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
