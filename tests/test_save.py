"""The job's last phases: `save:` — adapters, merged (merge_and_unload, then save_pretrained),
full — each a `save` phase of the record with its own peak, written into a temporary folder
that is removed, host memory sampled meanwhile.

Measured on CPU (tiny Llama, in this process) and simulated (CPU target)."""

from __future__ import annotations

import json
import tempfile

import pytest

from tests.conftest import REPO, harness, measured_variants, write_scenario

TRAIN = {"batch_size": 2, "seq_len": 64, "steps": 1, "warmup_steps": 0}
VARIANTS = [
    {"name": "full", "techniques": [], "save": ["full"]},
    {"name": "lora", "techniques": ["lora"]},  # the scenario's save: adapters, then merged
    {"name": "qlora", "techniques": ["qlora"]},
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{(name, simulated): Measured}, and the temporary folder every save was made under."""
    folder = tmp_path_factory.mktemp("save")
    scratch = folder / "tmp"
    scratch.mkdir()
    before, tempfile.tempdir = tempfile.tempdir, str(scratch)
    try:
        _, out = measured_variants(folder, "save", VARIANTS, train=TRAIN,
                                   save=["adapters", "merged"])
    finally:
        tempfile.tempdir = before
    return out, scratch


def _saves(runs, name, simulate=False) -> list[dict]:
    return runs[0][name, simulate].result.saves


def _peaks(runs, name, simulate=False) -> list[int]:
    return runs[0][name, simulate].memory["phases"]["save"]["per_save_peak_allocated_bytes"]


def _config() -> dict:
    return json.loads((REPO / "scenarios" / "models" / "tiny-llama.json").read_text())


def test_full_save_holds_weights_and_optimizer_state_and_writes_every_weight(runs):
    """After the last step (grads zeroed, as Trainer's final save finds them) the save holds
    the fp32 weights and AdamW's two moments — and, on the CPU, adds nothing to them: the
    safetensors file is written from the tensors themselves."""
    memory = runs[0]["full", False].memory
    save = memory["phases"]["save"]
    at_peak = save["breakdown_bytes"]
    assert at_peak["grads"] == 0
    assert at_peak["optimizer"] == pytest.approx(2 * at_peak["params"], rel=0.001)
    assert save["peak_allocated_bytes"] <= 1.001 * (at_peak["params"] + at_peak["optimizer"])
    assert memory["peak_phase"] != "save"
    (full,) = _saves(runs, "full")
    params = runs[0]["full", False].result.params_total
    assert "model.safetensors" in full["files"]
    # Every fp32 weight once (safetensors' header adds a few KiB)
    assert 4 * params <= full["written_bytes"] <= 4 * params + 64 * 1024


def test_adapters_alone_are_a_small_file_and_merging_writes_the_whole_model(runs):
    """`adapters` writes the LoRA matrices only (fp32 here); `merged` folds them into the
    base and writes every base weight, the adapters gone."""
    result = runs[0]["lora", False].result
    adapters, merged = _saves(runs, "lora")
    assert "adapter_model.safetensors" in adapters["files"]
    assert adapters["written_bytes"] <= 4 * result.params_trainable + 64 * 1024
    assert merged["files"] == ["config.json", "generation_config.json", "model.safetensors"]
    base = result.params_total - result.params_trainable
    assert 4 * base <= merged["written_bytes"] <= 4 * base + 64 * 1024


def test_merging_into_a_4bit_base_holds_a_dequantised_layer(runs):
    """PEFT's merge_and_unload on bitsandbytes 4-bit weights de-quantises an adapted layer to
    the compute dtype (bf16), adds the LoRA delta and quantises it again, layer by layer: the
    merge's peak holds at least one whole de-quantised weight above what saving the
    adapters held."""
    adapters_peak, merged_peak = _peaks(runs, "qlora")
    hidden = _config()["hidden_size"]
    q_proj = hidden * hidden * 2  # one of LoRA's default targets, in bf16
    assert merged_peak - adapters_peak >= q_proj
    merged = _saves(runs, "qlora")[1]
    # The merged layers are 4-bit again: half a byte a weight and their quantization state,
    # not bf16's two; the rest (embedding, head, norms) in fp32 after k-bit preparation.
    result = runs[0]["qlora", False].result
    quantized, rest = result.quantized_params, result.params_total - result.quantized_params
    assert 4 * rest + quantized // 4 <= merged["written_bytes"] < 4 * rest + quantized


def test_simulated_save_matches_the_cpu_run(runs):
    """Each save's peak simulated as measured within 1 %, and the same files, as large as their
    tensors (a simulated file holds none: it is sparse, without safetensors' header of a few
    KiB)."""
    for name in ("full", "lora"):
        assert _peaks(runs, name, True) == pytest.approx(_peaks(runs, name), rel=0.01)
        for measured, simulated in zip(_saves(runs, name), _saves(runs, name, True),
                                       strict=True):
            assert simulated["files"] == measured["files"]
            assert simulated["written_bytes"] == pytest.approx(measured["written_bytes"],
                                                               rel=0.01, abs=16 * 1024)
            assert simulated["host_rss_peak_bytes"] is None
    assert _peaks(runs, "qlora", True)[0] == pytest.approx(_peaks(runs, "qlora")[0], rel=0.01)


def test_a_simulated_merge_into_4bit_weights_says_why_it_did_not_run(runs):
    saves = _saves(runs, "qlora", True)
    assert "bitsandbytes" in saves[1]["skipped"]
    assert len(_peaks(runs, "qlora", True)) == 1


def test_host_memory_is_sampled_and_the_temporary_folders_are_gone(runs):
    for name in ("full", "lora", "qlora"):
        for entry in _saves(runs, name):
            assert entry["host_rss_peak_bytes"] > 0 and entry["host_rss_growth_bytes"] >= 0
    assert list(runs[1].glob("harness-save-*")) == []  # (other libraries may leave theirs)


@pytest.mark.parametrize(("save", "variant", "key", "says"), [
    (["mergd"], {}, "save[0]", "did you mean 'merged'"),
    (["adapters"], {"techniques": []}, "save[0]", "needs adapters"),
    (["full"], {}, "save[0]", "save adapters or merged"),
    (["merged", "adapters"], {}, "save[1]", "comes after merged"),
    ([{"merged": {"device": "gpu"}}], {}, "save[0].merged.device", "must be one of cpu"),
    ([{"adapters": {"cpu_offload": True}}], {}, "save[0].adapters.cpu_offload", "unknown key"),
    ({"adapters": None}, {}, "save", "must be a list"),
])
def test_bad_save_keys_are_exit_2(tmp_path, save, variant, key, says):
    path = write_scenario(tmp_path, "bad", [{"name": "v", "techniques": ["lora"], **variant}],
                          save=save)
    done = harness("run", str(path), "--device", "cpu", "--out", str(tmp_path / "out"))
    assert done.returncode == 2, done.stderr
    assert key in done.stderr and says in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
