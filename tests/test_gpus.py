"""GPU presets and the one rule that says "fits": what a card must hold against what a training
process can use of it, with a headroom — never a fit beyond the usable memory."""

from __future__ import annotations

import pytest

from harness import gpus
from harness.gpus import GIB, HEADROOM_BYTES, PRESETS, card, need_bytes, verdict
from harness.report import fits_on


def test_every_preset_is_usable_below_its_total_by_the_stated_reserve():
    assert {"rtx3090", "rtx4090", "rtx5090", "a10g", "l4", "l40s", "a100-40", "a100-80",
            "h100-80", "h200", "b200", "mi300x"} <= set(PRESETS)
    for gpu in PRESETS.values():
        assert gpu.source and gpu.total_bytes % 2**20 == 0 or gpu.name == "mi300x"
        reserve = gpu.total_bytes - gpu.usable_bytes("cuda")
        assert reserve == gpu.driver_reserve_bytes + gpus.CONTEXT_BYTES > 0, gpu.name
        assert 0 < gpu.driver_reserve_bytes < GIB, gpu.name
        assert gpu.usable_bytes("cpu") == gpu.total_bytes  # a CPU target: a plain budget
    # Where CUDA's own total was seen, it sets the driver's share: 24564 MiB vs 23.64 GiB.
    assert PRESETS["rtx4090"].driver_reserve_bytes == pytest.approx(0.35 * GIB, abs=0.01 * GIB)


def test_a_need_over_the_usable_memory_is_never_a_fit_and_under_the_headroom_is_tight():
    gpu = PRESETS["rtx4090"]
    usable = gpu.usable_bytes()
    assert verdict(usable + 1, gpu).verdict == "no" and not verdict(usable + 1, gpu).ok
    assert verdict(usable, gpu).verdict == "tight" and verdict(usable, gpu).left_bytes == 0
    assert verdict(usable - HEADROOM_BYTES + 1, gpu).verdict == "tight"
    assert verdict(usable - HEADROOM_BYTES, gpu).verdict == "fits"
    assert verdict(usable - 1, gpu, headroom=0).verdict == "fits"
    # The card's total is never what decides: 24 GiB of need does not fit a "24 GB" card.
    assert verdict(24 * GIB, PRESETS["rtx3090"]).verdict == "no"


def test_without_a_reserved_peak_the_allocated_one_carries_the_fragmentation_margin():
    assert need_bytes(10 * GIB, 11 * GIB) == 11 * GIB
    assert need_bytes(10 * GIB, None) == int(10 * GIB * (1 + gpus.FRAGMENTATION))
    assert need_bytes(10 * GIB, None, "cpu") == 10 * GIB  # no caching allocator to fragment
    assert need_bytes(None, None) is None


def test_the_table_names_the_smallest_preset_that_fits_with_the_headroom_left():
    a10g = PRESETS["a10g"]
    room = a10g.usable_bytes() - HEADROOM_BYTES
    assert fits_on(room) == ("a10g", HEADROOM_BYTES)
    name, left = fits_on(room + 1)  # tight on the A10G: the next card up
    assert name != "a10g" and left >= HEADROOM_BYTES
    assert PRESETS[name].usable_bytes() > a10g.usable_bytes()
    assert fits_on(300 * GIB) == (None, None)
    assert fits_on(None) == (None, None)


def test_a_card_is_a_preset_by_name_or_a_size():
    assert card("RTX4090") is PRESETS["rtx4090"] and card("a100_80") is PRESETS["a100-80"]
    assert card("A10080") is PRESETS["a100-80"]
    assert card("24GiB").total_bytes == 24 * GIB
    with pytest.raises(gpus.UnknownGpu, match="did you mean 'rtx4090'"):
        card("rtx4009")


def test_a_cuda_run_on_a_card_replaces_its_context_and_driver_share(tmp_path):
    """Once a record measured on CUDA exists for a card, its figures (CUDA's total, what the
    device held before the first tensor) replace the defaults; other cards keep them."""
    import json
    import shutil

    from tests.conftest import REPO

    run = next((REPO / "results" / "smoke_tiny").iterdir())
    shutil.copytree(run, tmp_path / "smoke_tiny" / run.name)
    path = tmp_path / "smoke_tiny" / run.name / "lora.json"
    record = json.loads(path.read_text())
    record["method"] = "measured-cuda"
    record["env"]["gpu_name"] = "NVIDIA GeForce RTX 4090"
    record["memory"].update(device_total_bytes=25_386_352_640,
                            device_used_at_start_bytes=600 * 2**20,
                            other_processes_bytes_at_start=100 * 2**20)
    path.write_text(json.dumps(record))
    measured = gpus.measured_presets(tmp_path)
    rtx = measured["rtx4090"]
    assert rtx.context_bytes == 500 * 2**20 and rtx.cuda_total_bytes == 25_386_352_640
    assert rtx.usable_bytes() == 25_386_352_640 - 500 * 2**20
    assert measured["a10g"] == PRESETS["a10g"]  # no run on it: the defaults
    assert gpus.measured_presets() == PRESETS  # none committed yet
