"""Parallel training: FSDP2 and DDP ranks under torchrun on CPU (gloo), and FSDP2 ranks simulated
on the fake process group — against each other and against one process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO, harness, last_json, records, write_scenario

TRAIN = {"batch_size": 2, "seq_len": 128, "steps": 1, "warmup_steps": 1}
VARIANTS = [
    {"name": "single"},
    {"name": "fsdp2", "parallel": {"strategy": "fsdp2", "world_size": 2}},
    # Three ranks of a model whose rows do not divide by three: the last rank's shards are
    # shorter (padded to the same storage), its AdamW state smaller.
    {"name": "fsdp2-3", "parallel": {"strategy": "fsdp2", "world_size": 3}},
    {"name": "fsdp2-keep", "parallel": {"strategy": "fsdp2", "world_size": 2,
                                        "reshard_after_forward": False}},
    {"name": "ddp", "parallel": {"strategy": "ddp", "world_size": 2}},
    # Two micro-batches a step: the first one's grads held, unsharded, until the last's.
    {"name": "fsdp2-accum", "parallel": {"strategy": "fsdp2", "world_size": 2},
     "train": {"gradient_accumulation_steps": 2}},
    # A full state dict gathered after the step, kept on each rank's device or offloaded.
    {"name": "fsdp2-save", "parallel": {"strategy": "fsdp2", "world_size": 2},
     "save": [{"full": {"cpu_offload": False}}]},
    {"name": "fsdp2-save-offload", "parallel": {"strategy": "fsdp2", "world_size": 2},
     "save": ["full"]},
]


def _layer_params() -> int:
    """One tiny-llama decoder layer's parameters (692,736: 2,770,944 bytes in fp32)."""
    from harness.models import meta_model, resolve_config
    from harness.scenario import ModelSpec

    spec = ModelSpec(config="tiny-llama")
    model = meta_model(spec, resolve_config(spec, REPO / "scenarios" / "x.yaml"))
    return sum(p.numel() for p in model.model.layers[0].parameters())


LAYER_PARAMS = _layer_params()
FSDP_TINY = REPO / "results" / "fsdp_tiny" / "20261201T105116720Z-a1eae4f"  # committed


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict[str, dict]]:
    """The same scenario measured on CPU (torchrun, gloo) and simulated (CPU target), side by
    side (the simulation is one process; the measured ranks wait on each other)."""
    folder = tmp_path_factory.mktemp("parallel")
    path = write_scenario(folder, "par", VARIANTS, train=TRAIN)
    procs = {}
    for device in ("cpu", "simulate"):
        target = ["--target", "cpu"] if device == "simulate" else []
        procs[device] = subprocess.Popen(
            [sys.executable, "-m", "harness", "run", str(path), "--device", device, *target,
             "--out", str(folder / device)], cwd=REPO, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
    out = {}
    for device, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
        out[device] = records(Path(last_json(stdout)["run_dir"]))
    return out


def _end(record: dict, category: str) -> int:
    return record["memory"]["end_of_step_bytes"][category]


@pytest.mark.slow
def test_fsdp2_shards_params_grads_and_state_across_the_ranks(runs):
    single, fsdp2 = runs["cpu"]["single"], runs["cpu"]["fsdp2"]
    assert fsdp2["status"] == "ok", fsdp2["error"]
    assert fsdp2["parallel"]["world_size"] == 2
    ranks = fsdp2["memory"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["status"] == "ok" for r in ranks)
    for rank in ranks:
        for category in ("params", "grads", "optimizer"):
            # Each rank holds half, up to the shards' 512-byte rounding (a few hundred tensors).
            ratio = rank["end_of_step_bytes"][category] / _end(single, category)
            assert ratio == pytest.approx(0.5, abs=0.005), (rank["rank"], category, ratio)
    # …and gathers one layer's full parameters at a time to compute with them: at the peak
    # (start of backward) the gathered buffers are `other`, on top of what one process has.
    peak = fsdp2["memory"]["breakdown_bytes"]
    assert peak["other"] >= single["memory"]["phases"]["backward"]["breakdown_bytes"]["other"] \
        + LAYER_PARAMS * 4
    # The saved activations are the single process's: gathered weights autograd saves are not.
    assert peak["activations"] == pytest.approx(
        single["memory"]["phases"]["backward"]["breakdown_bytes"]["activations"], rel=0.001)
    assert fsdp2["memory"]["peak_allocated_bytes"] < single["memory"]["peak_allocated_bytes"]
    assert fsdp2["memory"]["peak_allocated_bytes"] == max(r["peak_allocated_bytes"] for r in ranks)
    attributed = [_attributed(r) for r in ranks]
    assert max(attributed) / min(attributed) - 1 < 0.001  # the ranks are alike


def _attributed(rank: dict) -> int:
    """A rank's peak without its unattributed bytes. On CPU the profiler records the allocator
    events of the threads it profiles: a buffer of a collective whose last reference gloo's
    worker thread drops is freed unseen and may still look allocated — at most a layer's
    gathered parameters here (padded to a multiple of the ranks' rows: 2 % more for three),
    and never named (unattributed)."""
    unattributed = rank["breakdown_bytes"]["unattributed"]
    assert unattributed <= LAYER_PARAMS * 4 * 1.02, rank
    return rank["peak_allocated_bytes"] - unattributed


@pytest.mark.slow
def test_keeping_gathered_layers_after_forward_costs_their_full_size(runs):
    keep, reshard = runs["cpu"]["fsdp2-keep"], runs["cpu"]["fsdp2"]
    extra = max(map(_attributed, keep["memory"]["ranks"])) - \
        max(map(_attributed, reshard["memory"]["ranks"]))
    # tiny-llama's 4 decoder layers: those whose backward does not follow their forward at
    # once stay gathered (half of them sharded already) until it.
    assert extra >= 2 * LAYER_PARAMS * 4, extra


@pytest.mark.slow
def test_uneven_shards_make_the_last_rank_lighter(runs):
    record = runs["cpu"]["fsdp2-3"]
    ranks = record["memory"]["ranks"]
    assert len(ranks) == 3
    state = [r["end_of_step_bytes"]["optimizer"] for r in ranks]
    assert state[0] == state[1] > state[2]  # 1366 + 1366 + 1364 rows of the embedding, ...
    assert _attributed(ranks[2]) < min(_attributed(ranks[0]), _attributed(ranks[1]))
    assert record["memory"]["imbalance"] > 0


@pytest.mark.slow
def test_ddp_keeps_a_replica_plus_gradient_buckets(runs):
    single, ddp = runs["cpu"]["single"], runs["cpu"]["ddp"]
    for category in ("params", "grads", "optimizer"):
        assert _end(ddp, category) == _end(single, category)
    # The reducer's buckets: one more copy of every gradient, held for the whole run.
    assert _end(ddp, "other") - _end(single, "other") >= _end(single, "grads")
    assert runs["simulate"]["ddp"]["status"] == "unsupported"
    assert "DDP is not simulated" in runs["simulate"]["ddp"]["error"]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["fsdp2", "fsdp2-3", "fsdp2-keep"])
def test_simulated_ranks_agree_with_the_gloo_run(runs, variant):
    measured, simulated = runs["cpu"][variant], runs["simulate"][variant]
    assert simulated["status"] == "ok", simulated["error"]
    assert simulated["method"] == "simulated" and simulated["parallel"] == measured["parallel"]
    for real, sim in zip(measured["memory"]["ranks"], simulated["memory"]["ranks"], strict=True):
        assert sim["peak_allocated_bytes"] == pytest.approx(_attributed(real), rel=0.02)
        for category in ("params", "grads", "optimizer", "activations", "other"):
            assert sim["breakdown_bytes"][category] == pytest.approx(
                real["breakdown_bytes"][category], rel=0.02, abs=4096), category
        for category in ("params", "grads", "optimizer"):  # what persists between steps
            assert sim["end_of_step_bytes"][category] == real["end_of_step_bytes"][category]
    # (Not phase by phase: away from the peak, when gloo's worker thread lets go of a
    # collective's buffers shifts a free by a little, differently each run.)


@pytest.mark.slow
def test_fsdp2_accumulation_holds_unsharded_grads_until_the_last_micro_batch(runs):
    """accelerate's no_sync under FSDP2 (set_requires_gradient_sync(False)): the first
    micro-batch's backward keeps every gradient whole on each rank, not its shard, until the
    last micro-batch reduce-scatters them — so the second micro-batch's backward peaks with
    the whole model's grads more than a rank without accumulation (FSDP2 keeps them outside
    `.grad`: they are `other`), and the step ends with the shards as before. Simulated as
    measured."""
    full_grads = _end(runs["cpu"]["single"], "grads")  # one process's: every gradient, whole
    for device in ("cpu", "simulate"):
        accum, plain = runs[device]["fsdp2-accum"], runs[device]["fsdp2"]
        assert accum["status"] == "ok", accum["error"]
        assert accum["train"]["effective_batch_size"] == 2 * TRAIN["batch_size"]
        assert accum["memory"]["peak_phase"] == "backward"
        assert accum["memory"]["peak_micro_batch"] == 1
        for rank, base in zip(accum["memory"]["ranks"], plain["memory"]["ranks"], strict=True):
            held = rank["breakdown_bytes"]["other"] - base["breakdown_bytes"]["other"]
            assert held == pytest.approx(full_grads, rel=0.01), (device, rank["rank"], held)
            # (Attributed: a layer's gathered parameters freed unseen by gloo's thread may
            # still look allocated in either run, differently each run.)
            assert _attributed(rank) - _attributed(base) == pytest.approx(full_grads, rel=0.01)
            for category in ("params", "grads", "optimizer"):
                assert rank["end_of_step_bytes"][category] == \
                    base["end_of_step_bytes"][category]
    for real, sim in zip(runs["cpu"]["fsdp2-accum"]["memory"]["ranks"],
                         runs["simulate"]["fsdp2-accum"]["memory"]["ranks"], strict=True):
        assert sim["peak_allocated_bytes"] == pytest.approx(_attributed(real), rel=0.02)


@pytest.mark.slow
def test_a_full_state_dict_under_fsdp2_is_the_whole_model_on_the_ranks_that_gather_it(runs):
    """get_model_state_dict(full_state_dict=True) gathers every parameter whole: without CPU
    offload every rank holds the full model beside its shards and AdamW state; with it only
    rank 0 gathers (into host memory on a GPU; on this CPU into the same memory), the others
    hold what they trained with. Rank 0 writes the one file. Simulated as measured."""
    trained = runs["cpu"]["fsdp2"]["memory"]["ranks"]
    full = 4 * runs["cpu"]["single"]["model"]["params_total"]  # fp32
    for device in ("cpu", "simulate"):
        gathered = runs[device]["fsdp2-save"]["memory"]["ranks"]
        offload = runs[device]["fsdp2-save-offload"]["memory"]["ranks"]
        for before, kept, moved in zip(trained, gathered, offload, strict=True):
            resting = before["end_of_step_bytes"]["params"] + \
                before["end_of_step_bytes"]["optimizer"]
            assert kept["phase_peaks_bytes"]["save"] >= resting + full, device
            if kept["rank"] == 0:
                assert moved["phase_peaks_bytes"]["save"] >= resting + full, device
            else:  # nothing gathered: its shards and state, the optimizer step's leftovers
                assert moved["phase_peaks_bytes"]["save"] < resting + full / 2, device
        (entry,) = runs[device]["fsdp2-save-offload"]["save"]
        assert entry["files"][-1] == "model.safetensors"
        assert full <= entry["written_bytes"] <= full + 64 * 1024
    for variant in ("fsdp2-save", "fsdp2-save-offload"):
        for real, sim in zip(runs["cpu"][variant]["memory"]["ranks"],
                             runs["simulate"][variant]["memory"]["ranks"], strict=True):
            assert sim["phase_peaks_bytes"]["save"] == pytest.approx(
                real["phase_peaks_bytes"]["save"], rel=0.01)


@pytest.mark.slow
def test_the_table_shows_the_strategy_and_the_busiest_rank(runs):
    import pandas as pd

    from harness.report import _flatten, markdown, summary_table

    frame = pd.DataFrame([_flatten(r, Path(f"{k}.json")) for k, r in runs["cpu"].items()])
    table = markdown(summary_table(frame))
    assert "| parallel" in table and "fsdp2×2 reshard_after_forward=false" in table
    assert "busiest rank" in table
    header = next(line for line in table.splitlines() if line.startswith("| variant "))
    column = [c.strip() for c in header.split("|")].index("parallel")
    single = next(line for line in table.splitlines() if line.startswith("| single "))
    assert single.split("|")[column].strip() == "—"  # one process: no strategy


@pytest.mark.slow
def test_compare_flags_a_rank_that_grew_when_the_busiest_did_not(runs, tmp_path):
    base = runs["cpu"]["fsdp2-3"]
    lighter = min(base["memory"]["ranks"], key=lambda r: r["peak_allocated_bytes"])
    new = json.loads(json.dumps(base))
    grown = new["memory"]["ranks"][lighter["rank"]]
    # A per-rank figure that moved while the record's own (the busiest rank's, as the record
    # was written) did not: a regression on that rank all the same.
    grown["peak_allocated_bytes"] = int(lighter["peak_allocated_bytes"] * 1.05)
    for folder, record in (("base", base), ("new", new)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "fsdp2-3.json").write_text(json.dumps(record))
    proc = harness("compare", str(tmp_path / "base"), str(tmp_path / "new"), "--fail-above", "1%")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"rank {lighter['rank']}:" in proc.stdout
    # Another world size is another experiment, not a regression.
    new["parallel"]["world_size"] = 4
    (tmp_path / "new" / "fsdp2-3.json").write_text(json.dumps(new))
    proc = harness("compare", str(tmp_path / "base"), str(tmp_path / "new"))
    assert proc.returncode == 0 and "parallel changed" in proc.stdout


def test_a_committed_runs_table_shows_each_strategy_and_its_busiest_rank():
    """The table of the committed fsdp_tiny run (gloo ranks on CPU), made again from its
    records: a parallel row's figures are its busiest rank's, its params that rank's shards."""
    from harness.report import load_results_in, markdown, summary_table

    got = records(FSDP_TINY)
    lines = markdown(summary_table(load_results_in(FSDP_TINY))).splitlines()
    assert any("busiest rank" in line for line in lines)
    header = next(line for line in lines if line.startswith("| variant "))
    columns = [c.strip() for c in header.split("|")[1:-1]]
    rows = {}
    for line in lines[lines.index(header) + 2:]:
        if line.startswith("| "):
            cells = [c.strip() for c in line.split("|")[1:-1]]
            rows[cells[0]] = dict(zip(columns, cells, strict=True))
    assert set(rows) == set(got)
    assert rows["one-process"]["parallel"] == "—"
    assert rows["fsdp2-keep"]["parallel"] == "fsdp2×2 reshard_after_forward=false"
    for name, record in got.items():
        ranks = record["memory"].get("ranks") or [record["memory"]]
        busiest = max(r["peak_allocated_bytes"] for r in ranks)
        assert rows[name]["peak MiB"] == f"{busiest / 2**20:.1f}", name
    # Two FSDP2 ranks hold half the parameters each; DDP's two, a whole replica each.
    one = float(rows["one-process"]["params"])
    assert float(rows["fsdp2"]["params"]) == pytest.approx(one / 2, abs=0.1)
    assert float(rows["ddp"]["params"]) == one


def test_compare_flags_a_committed_rank_that_grew_when_the_busiest_did_not(tmp_path, cli):
    base = json.loads((FSDP_TINY / "fsdp2.json").read_text())
    new = json.loads(json.dumps(base))
    # One rank's peak grows 5 %; the record's own figure (the busiest rank's when it was
    # written) stays: a regression on that rank all the same.
    new["memory"]["ranks"][1]["peak_allocated_bytes"] = int(
        base["memory"]["ranks"][1]["peak_allocated_bytes"] * 1.05)
    for folder, record in (("base", base), ("new", new)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "fsdp2.json").write_text(json.dumps(record))
    proc = cli("compare", str(tmp_path / "base"), str(tmp_path / "new"), "--fail-above", "1%")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert last_json(proc.stdout)["rows"]["fsdp2"]["mark"] == "+" and "rank 1:" in proc.stdout
    new["parallel"]["world_size"] = 4  # another world size: another experiment
    (tmp_path / "new" / "fsdp2.json").write_text(json.dumps(new))
    proc = cli("compare", str(tmp_path / "base"), str(tmp_path / "new"))
    assert proc.returncode == 0 and "parallel changed" in proc.stdout


@pytest.mark.slow
def test_a_rank_that_dies_ends_as_an_error_record_not_a_hang(tmp_path):
    path = write_scenario(tmp_path, "dies", [
        {"name": "single"},
        {"name": "fsdp2", "parallel": {"strategy": "fsdp2", "world_size": 2}},
    ], train={**TRAIN, "steps": 2000})  # long enough to be killed while training
    run = subprocess.Popen([sys.executable, "-m", "harness", "run", str(path), "--device", "cpu",
                            "--variant", "fsdp2", "--out", str(tmp_path / "out"),
                            "--timeout", "300"], cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    started = time.monotonic()
    victim = _wait_for_rank(str(tmp_path / "out"), rank=1, within_s=90)
    time.sleep(max(0.0, 8 - (time.time() - victim.create_time())))  # past imports: training
    victim.send_signal(signal.SIGKILL)
    stdout, stderr = run.communicate(timeout=120)
    assert time.monotonic() - started < 150
    assert run.returncode == 0, stderr[-2000:]  # a variant's failure is its record's status
    record = json.loads((Path(last_json(stdout)["run_dir"]) / "fsdp2.json").read_text())
    assert record["status"] == "error"
    assert "wrote no record" in record["error"] and "SIGKILL" in record["error"]
    assert not list((Path(last_json(stdout)["run_dir"]) / "logs").glob("*.rank*.json"))


def _wait_for_rank(out: str, rank: int, within_s: float) -> psutil.Process:
    """The worker process of rank `rank` of a run writing under `out` (its job file is there)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        for proc in psutil.process_iter(["cmdline"]):
            try:
                cmdline = proc.info["cmdline"] or []
                if "harness.worker" in cmdline and any(a.startswith(out) for a in cmdline) and \
                        proc.environ().get("RANK") == str(rank):
                    return proc
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        time.sleep(0.2)
    raise AssertionError(f"rank {rank} never started")
