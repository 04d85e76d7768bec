"""--snapshot: each variant's memory snapshot in PyTorch's format, which PyTorch's own
memory_viz code reads — simulated through the allocator model (its alloc events replay to the
record's peak, its segments sum to the reserved peak) and measured on CPU."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from tests.conftest import harness, last_json, records, write_scenario

pytestmark = pytest.mark.slow  # each test runs `harness run --snapshot`

VARIANTS = [{"name": "bf16", "techniques": ["bf16"]},
            {"name": "lora-gc", "techniques": ["bf16", {"lora": {"r": 8}},
                                               "gradient_checkpointing"]}]


def replayed_peak(events: list[dict]) -> int:
    level = peak = 0
    for e in events:
        if e["action"] == "alloc":
            level += e["size"]
            peak = max(peak, level)
        elif e["action"] == "free_completed":
            level -= e["size"]
    return peak


def snapshots(tmp_path: Path, *args: str) -> dict[str, tuple]:
    path = write_scenario(tmp_path, "snap", VARIANTS)
    proc = harness("run", str(path), *args, "--snapshot", "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = Path(last_json(proc.stdout)["run_dir"])
    got = {}
    for name, record in records(run_dir).items():
        assert record["memory"]["snapshot_file"] == f"{name}.snapshot.pickle"
        with open(run_dir / record["memory"]["snapshot_file"], "rb") as f:
            got[name] = record, pickle.load(f)
    return got


@pytest.mark.parametrize("conf, grows", [(None, "segment_alloc"),
                                          ("expandable_segments:True", "segment_map")])
def test_a_simulated_snapshot_is_the_allocator_replay_of_the_run(tmp_path, monkeypatch, conf,
                                                                 grows):
    from torch.cuda import _memory_viz

    if conf:
        monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", conf)
    for name, (record, snapshot) in snapshots(tmp_path, "--device", "simulate").items():
        memory, events = record["memory"], snapshot["device_traces"][0]
        assert replayed_peak(events) == memory["peak_allocated_bytes"], name
        assert sum(e["size"] for e in events if e["action"] == grows) == \
            memory["peak_reserved_bytes"], name
        assert sum(s["total_size"] for s in snapshot["segments"]) == memory["peak_reserved_bytes"]
        # PyTorch's own readers take it: the text trace names each segment's cudaMalloc, the
        # HTML viewer embeds it.
        if grows == "segment_alloc":
            assert _memory_viz.trace(snapshot).count("cudaMalloc") == \
                sum(e["action"] == grows for e in events)
        assert "snapshot.pickle" in _memory_viz.trace_plot(snapshot)


def test_a_cpu_snapshot_has_the_allocator_events_at_their_addresses(tmp_path):
    for name, (record, snapshot) in snapshots(tmp_path, "--device", "cpu",
                                              "--variant", "lora-gc").items():
        events = snapshot["device_traces"][0]
        assert snapshot["segments"] == []  # the CPU allocator caches nothing
        # Unrounded CPU requests: at most 511 bytes a block under the record's rounded peak.
        peak = replayed_peak(events)
        assert 0.99 * record["memory"]["peak_allocated_bytes"] <= peak <= \
            record["memory"]["peak_allocated_bytes"], name
        assert all(e["addr"] > 0 for e in events)
