"""The record's schema (record.py's dataclasses): held when written and read, old records
upgraded, and everything a figure depends on seen by compare."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from harness.compare import Threshold, compare_records
from harness.record import (
    SCHEMA_VERSION,
    Memory,
    Record,
    RecordError,
    check_record,
    read_record,
    write_record,
)
from tests.conftest import REPO

COMMITTED = sorted(p for p in (REPO / "results").glob("*/*/*.json")
                   if not p.name.endswith(".job.json"))


def _record(name: str = "qlora_mistral") -> tuple[Path, dict]:
    path = next(p for p in COMMITTED if p.parent.parent.name == name)
    return path, read_record(path)


def test_every_committed_record_loads_at_this_schema():
    versions = {json.loads(p.read_text())["schema_version"] for p in COMMITTED}
    assert len(COMMITTED) > 50 and 1 in versions  # the upgrade below is exercised
    for path in COMMITTED:
        record = read_record(path)
        assert record["schema_version"] == SCHEMA_VERSION, path
        assert "cublas_workspace_config" in record["env"], path
        # As the dataclasses and back, nothing lost (a probe's extras stay inline in memory);
        # optional keys an older record lacks come back null.
        again = Record.of(record).as_dict()
        assert again.keys() == record.keys(), path
        for key, part in again.items():
            if isinstance(part, dict) and isinstance(record[key], dict):
                assert {k: part[k] for k in record[key]} == record[key], (path, key)
                assert all(part[k] is None for k in part.keys() - record[key].keys()), (path, key)
            else:
                assert part == record[key], (path, key)


def test_a_schema_1_record_is_upgraded_to_what_a_new_one_holds(tmp_path):
    path = next(p for p in COMMITTED if p.parent.parent.name == "smoke_tiny")
    old = json.loads(path.read_text())
    assert old["schema_version"] == 1 and "parallel" not in old  # written before ddp/fsdp2
    new = read_record(path)
    assert new["parallel"] is None and new["sweep_point"] is None
    assert new["env"]["cublas_workspace_config"] is None  # not said then: unknown, null
    assert new["memory"] == old["memory"] and new["train"] == old["train"]  # figures as written
    write_record(tmp_path / "r.json", Record.of(new))
    assert read_record(tmp_path / "r.json") == Record.of(new).as_dict()  # optional keys: null


@pytest.mark.parametrize("change, says", [
    (lambda r: r.pop("timing"), "lacks 'timing'"),
    (lambda r: r["memory"].pop("phases"), "lacks 'memory.phases'"),
    (lambda r: r["model"].update(param_total=1), "unknown key 'model.param_total'"),
    (lambda r: r.update(stauts="ok"), "unknown key 'stauts'"),
    (lambda r: r["memory"].update(peak_allocated_bytes=1.5), "memory.peak_allocated_bytes must be int"),
    (lambda r: r["memory"].update(peak_reserved_bytes=True), "memory.peak_reserved_bytes must be int"),
    (lambda r: r["timing"].update(wall_s="3 s"), "timing.wall_s must be float or null"),
    (lambda r: r["variant"].update(techniques={}), "variant.techniques must be list"),
    (lambda r: r.update(status="fine"), "bad status"),
])
def test_a_record_off_the_schema_is_refused_naming_the_key(change, says, tmp_path):
    _, record = _record()
    check_record(record)
    broken = copy.deepcopy(record)
    change(broken)
    with pytest.raises(RecordError, match=says.replace(".", r"\.").replace("(", r"\(")):
        write_record(tmp_path / "r.json", Record.of(broken))
    assert not (tmp_path / "r.json").exists()


def test_a_memory_part_is_built_from_its_fields_and_keeps_a_probe_s_extras():
    _, record = _record()
    memory = Memory.of({**record["memory"], "a_probe_figure": 12})
    # The simulated card is the simulation probe's own extra.
    assert memory.extras == {"a_probe_figure": 12,
                             "simulated_gpu": record["memory"]["simulated_gpu"]}
    assert memory.breakdown_bytes == record["memory"]["breakdown_bytes"]
    with pytest.raises(RecordError, match="phases"):
        Memory.of({k: v for k, v in record["memory"].items() if k != "phases"})


def test_device_extras_are_allowed_in_memory_and_type_checked_where_known():
    _, record = _record()
    record["memory"]["a_probe_figure"] = 12
    check_record(record)
    record["memory"]["device_total_bytes"] = "141 GB"
    with pytest.raises(RecordError, match="memory.device_total_bytes must be int"):
        check_record(record)


def test_records_whose_cublas_workspaces_differ_are_incomparable():
    """Simulated for CUDA, the cuBLAS workspaces follow CUBLAS_WORKSPACE_CONFIG (64 MiB apart
    between sm90's default and the older one): two such runs must not compare as alike."""
    _, base = _record()
    new = copy.deepcopy(base)
    assert compare_records({"v": base}, {"v": new}, "peak_allocated_bytes", Threshold.parse("0"))[0].mark == "~"
    new["env"]["cublas_workspace_config"] = ":4096:2:16:8"
    row = compare_records({"v": base}, {"v": new}, "peak_allocated_bytes", Threshold.parse("0"))[0]
    assert row.mark == "x" and "CUBLAS_WORKSPACE_CONFIG None vs :4096:2:16:8" in row.note
    new = copy.deepcopy(base)
    new["env"]["pytorch_cuda_alloc_conf"] = "expandable_segments:True"
    row = compare_records({"v": base}, {"v": new}, "peak_allocated_bytes", Threshold.parse("0"))[0]
    assert row.mark == "x" and "PYTORCH_CUDA_ALLOC_CONF" in row.note
