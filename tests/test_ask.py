"""`harness ask`: the question as flags. Its answer is the record of the scenario it writes, and
every suggestion is a record of its own that fits by the same rule (gpus.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from harness import gpus
from harness.ask import changes
from tests.conftest import harness, last_json, records

FIGURES = ("peak_allocated_bytes", "peak_reserved_bytes", "phases", "breakdown_bytes")


@pytest.mark.slow
def test_ask_and_the_scenario_it_saves_give_the_same_record(tmp_path):
    saved = tmp_path / "question.yaml"
    ask = harness("ask", "tiny-llama", "--bf16", "--lora", "r=8,q_proj/v_proj", "--batch", "2",
                  "--seq", "64", "--target", "cpu", "--gpu", "1GiB", "--save-scenario",
                  str(saved), "--out", str(tmp_path / "ask"))
    assert ask.returncode == 0, ask.stderr[-3000:]
    answer = last_json(ask.stdout)
    asked = records(Path(answer["run_dir"]))["asked"]
    body = yaml.safe_load(saved.read_text())
    assert body["variants"][0]["techniques"] == [
        "bf16", {"lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]}}]
    assert body["train"]["batch_size"] == 2 and body["train"]["seq_len"] == 64
    proc = harness("run", str(saved), "--device", "simulate", "--target", "cpu",
                   "--out", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rerun = records(Path(last_json(proc.stdout)["run_dir"]))["asked"]
    assert asked["status"] == rerun["status"] == "ok"
    for key in FIGURES:
        assert asked["memory"][key] == rerun["memory"][key], key
    # The answer is the rule applied to that record: 1 GiB, a CPU target, nothing taken off.
    v = gpus.record_verdict(asked, gpus.card("1GiB"))
    assert answer["gpus"]["1GiB"] == {"usable_bytes": 2**30, "verdict": v.verdict,
                                      "left_bytes": v.left_bytes}
    assert f"1GiB (1.00 GiB usable): {v.text()}" in ask.stdout


@pytest.mark.slow
def test_each_suggestion_is_a_simulated_record_that_fits(tmp_path):
    """Full fp32 fine-tuning at batch 4 on a card it does not fit: the cheapest change that fits
    (in `changes` order) and the largest smaller batch that fits, each from its own record."""
    out = tmp_path / "ask"
    first = harness("ask", "tiny-llama", "--batch", "4", "--seq", "128", "--target", "cpu",
                    "--gpu", "400MiB", "--out", str(out))
    assert first.returncode == 0, first.stderr[-3000:]
    asked = records(Path(last_json(first.stdout)["run_dir"]))["asked"]
    need = gpus.need_bytes(asked["memory"]["peak_allocated_bytes"],
                           asked["memory"]["peak_reserved_bytes"], "cpu")
    card = f"{int(need * 0.9) // 2**20}MiB"  # 10 % short of the asked run's need
    proc = harness("ask", "tiny-llama", "--batch", "4", "--seq", "128", "--target", "cpu",
                   "--gpu", card, "--headroom", "0", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    answer = last_json(proc.stdout)["gpus"][card]
    got = records(Path(last_json(proc.stdout)["run_dir"]))
    gpu = gpus.card(card)
    assert answer["verdict"] == "no" and gpus.record_verdict(got["asked"], gpu, 0).verdict == "no"
    order = [c.variant for c in changes([], "adamw")]
    assert set(order) <= set(got)  # every change was run, each a record
    fitting = [v for v in order if gpus.record_verdict(got[v], gpu, 0).ok]
    assert fitting and answer["suggestion"]["variant"] == fitting[0]
    batch = answer["smaller_batch"]["batch_size"]
    assert 1 <= batch < 4
    assert gpus.record_verdict(got[f"asked@batch_size={batch}"], gpu, 0).ok
    if f"asked@batch_size={batch + 1}" in got:
        assert not gpus.record_verdict(got[f"asked@batch_size={batch + 1}"], gpu, 0).ok
    assert f"{card} (" in proc.stdout and "does not fit" in proc.stdout


@pytest.mark.slow
def test_ask_with_images_saves_them_and_records_what_the_processor_made(tmp_path):
    """`--images 2x224x224` is `images: {count: 2, height: 224, width: 224}` in the scenario
    it saves; the record holds each image's tokens as the model's processor made them."""
    saved = tmp_path / "question.yaml"
    ask = harness("ask", "tiny-qwen2.5-vl", "--images", "2x224x224", "--seq", "160",
                  "--target", "cpu", "--gpu", "1GiB", "--save-scenario", str(saved),
                  "--out", str(tmp_path / "ask"))
    assert ask.returncode == 0, ask.stderr[-3000:]
    assert yaml.safe_load(saved.read_text())["images"] == {"count": 2, "height": 224,
                                                           "width": 224}
    asked = records(Path(last_json(ask.stdout)["run_dir"]))["asked"]
    assert asked["status"] == "ok" and asked["images"]["tokens_per_sample"] == 2 * (64 + 2)


def test_a_bad_question_is_one_line_naming_the_flag_and_writes_nothing(tmp_path, cli):
    for args, says in (
            (["--technique", "lora: {r: 0}"], "technique #1"),
            (["--technique", "bogus"], "technique #1"),
            (["--gpu", "rtx4009"], "did you mean 'rtx4090'"),
            (["--technique", "lora: [1, 2]"], "--technique"),
            (["--images", "224x224"], "--images: llama has no vision tower"),
    ):
        proc = cli("ask", "tiny-llama", *args, "--out", str(tmp_path / "out"))
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.count("\n") == 1 and says in proc.stderr, (args, proc.stderr)
        assert not (tmp_path / "out").exists()


def test_ls_gpus_lists_every_preset_with_its_bytes_and_source(cli):
    proc = cli("ls", "gpus")
    assert proc.returncode == 0
    for gpu in gpus.PRESETS.values():
        row = next(line for line in proc.stdout.splitlines() if line.startswith(f"| {gpu.name} |"))
        assert str(gpu.total_bytes) in row and gpu.source.split(" (")[0] in row
        assert f"{gpu.usable_bytes() / 2**30:.2f}" in row


def test_the_changes_tried_are_only_those_not_already_in_the_stack():
    full = [c.label for c in changes([], "adamw")]
    assert full == ["+ gradient_checkpointing", "+ chunked_nll", "optimizer adamw_8bit",
                    "+ bf16", "+ lora"]
    lora = changes(["bf16", {"lora": {"r": 8}}, "gradient_checkpointing"], "adamw_8bit")
    assert [c.label for c in lora] == ["+ chunked_nll", "lora → qlora"]
    assert lora[1].techniques == ["bf16", {"qlora": {"r": 8}}, "gradient_checkpointing"]


@pytest.mark.slow
def test_vary_gives_the_largest_sequence_that_fits_each_card(tmp_path):
    proc = harness("ask", "tiny-llama", "--bf16", "--lora", "r=8", "--batch", "2", "--seq", "128",
                   "--target", "cpu", "--gpu", "40MiB", "--headroom", "0", "--vary", "seq_len",
                   "--max", "2048", "--out", str(tmp_path / "ask"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    answer = last_json(proc.stdout)
    got = records(Path(answer["run_dir"]))
    largest = answer["gpus"]["40MiB"]["largest_seq_len"]
    gpu = gpus.card("40MiB")
    at = got["asked"] if largest == 128 else got[f"asked@seq_len={largest}"]  # 128: asked
    assert 1 <= largest < 2048 and gpus.record_verdict(at, gpu, 0).ok
    assert "asked@seq_len=128" not in got  # the asked run is not probed again
    beyond = [int(k.split("=")[1]) for k in got if k.startswith("asked@seq_len=")
              and int(k.split("=")[1]) > largest]
    assert beyond and not gpus.record_verdict(got[f"asked@seq_len={min(beyond)}"], gpu, 0).ok
    assert min(beyond) == largest + 1  # bisected to one token
    assert f"largest seq_len that fits: {largest}" in proc.stdout
