"""The caching-allocator replay reproduces the allocator's documented behaviour on hand-made
traces: rounding, segment sizes per pool, best-fit reuse, splitting, merging, fragmentation."""

from __future__ import annotations

import pytest

from harness.probes.allocator import CachingAllocator, replay

KiB, MiB = 1 << 10, 1 << 20


def test_requests_round_to_512_bytes_and_small_ones_share_a_2_mib_segment():
    a = CachingAllocator()
    first = a.malloc(1)
    assert first.size == 512 and a.reserved == 2 * MiB
    for _ in range(100):
        a.malloc(10 * KiB)  # 100 × 10 KiB still fit the one small segment
    assert a.reserved == 2 * MiB and a.allocated == 512 + 100 * 10 * KiB


@pytest.mark.parametrize("request_bytes, segment", [
    (1 * MiB, 2 * MiB),  # the largest small request
    (1 * MiB + 1, 20 * MiB),  # large pool, under 10 MiB: a 20 MiB segment
    (9 * MiB, 20 * MiB),
    (10 * MiB, 10 * MiB),  # from 10 MiB: the request rounded up to 2 MiB
    (11 * MiB, 12 * MiB),
])
def test_a_new_segment_has_the_size_its_pool_asks_for(request_bytes, segment):
    a = CachingAllocator()
    a.malloc(request_bytes)
    assert a.reserved == segment


def test_a_freed_block_is_reused_and_split_without_reserving_more():
    a = CachingAllocator()
    block = a.malloc(12 * MiB)
    a.free(block)
    a.malloc(4 * MiB)  # fits in the cached 12 MiB block: split, remainder 8 MiB cached
    a.malloc(8 * MiB)  # takes exactly the remainder
    assert a.reserved == 12 * MiB and a.allocated == 12 * MiB


def test_best_fit_takes_the_smallest_cached_block_that_fits():
    a = CachingAllocator()
    big, small = a.malloc(30 * MiB), a.malloc(12 * MiB)
    a.free(big)
    a.free(small)
    got = a.malloc(11 * MiB)  # the 12 MiB block, not the 30 MiB one
    assert got.addr == small.addr and a.reserved == 42 * MiB


def test_large_blocks_are_not_split_for_a_remainder_of_1_mib_or_less():
    a = CachingAllocator()
    a.free(a.malloc(12 * MiB))
    block = a.malloc(11 * MiB)  # 1 MiB would remain: the whole block is handed out
    assert block.size == 12 * MiB and a.allocated == 12 * MiB


def test_freed_neighbours_merge_but_fragmentation_forces_a_new_segment():
    a = CachingAllocator()
    x, y, z = a.malloc(6 * MiB), a.malloc(6 * MiB), a.malloc(6 * MiB)  # one 20 MiB segment
    assert a.reserved == 20 * MiB
    a.free(x)
    a.free(z)  # free: 6 MiB at the start, 6 + 2 MiB at the end — no 12 MiB run
    a.malloc(12 * MiB)
    assert a.reserved == 32 * MiB
    a.free(y)  # now x, y and the tail merge into one 20 MiB free block
    a.malloc(20 * MiB)
    assert a.reserved == 32 * MiB


def test_replay_gives_the_reserved_level_after_each_event():
    trace = [(1, 1, 4 * MiB), (2, 2, 4 * MiB), (3, 1, -4 * MiB), (4, 3, 24 * MiB),
             (5, 2, -4 * MiB), (6, 99, -512)]
    assert [r for _, r in replay(trace)] == [20 * MiB, 20 * MiB, 20 * MiB, 44 * MiB, 44 * MiB,
                                             44 * MiB]


# expandable_segments:True — one growing segment per pool, pages mapped at its end


def test_expandable_segments_map_20_mib_pages_at_the_end_of_one_segment():
    a = CachingAllocator(expandable=True)
    a.malloc(3 * MiB)
    assert a.reserved == 20 * MiB  # one large-pool page, not a 20 MiB segment per request
    a.malloc(30 * MiB)  # 17 MiB free at the end: 13 MiB missing → one more page... and a half
    assert a.reserved == 40 * MiB
    a.malloc(100 * KiB)  # small requests: the small pool's own segment, 2 MiB pages
    assert a.reserved == 42 * MiB


def test_expandable_segments_grow_a_freed_end_block_where_segments_would_fragment():
    """A freed 100 MiB block at the end is grown to hold 150 MiB: 160 MiB mapped in all.
    The default allocator keeps the 100 MiB segment cached and reserves 150 MiB more."""
    default, expandable = CachingAllocator(), CachingAllocator(expandable=True)
    for a in (default, expandable):
        a.free(a.malloc(100 * MiB))
        a.malloc(150 * MiB)
    assert default.reserved == 250 * MiB
    assert expandable.reserved == 160 * MiB


def test_expandable_segments_prefer_a_fitting_block_to_the_growable_end():
    a = CachingAllocator(expandable=True)
    middle = a.malloc(40 * MiB)
    a.malloc(40 * MiB)  # keeps `middle` away from the end
    end = a.malloc(60 * MiB)
    a.free(middle)
    a.free(end)  # free at the end: 60 MiB, and it could grow
    reserved = a.reserved
    block = a.malloc(30 * MiB)
    assert block.addr == middle.addr  # the 40 MiB block fits: the end stays whole
    assert a.reserved == reserved


def test_expandable_segments_split_large_blocks_down_to_512_bytes():
    """Without expandable segments a large block is split only when more than 1 MiB remains."""
    for expandable, kept in ((False, 22 * MiB), (True, 21 * MiB + 512 * KiB)):
        a = CachingAllocator(expandable=expandable)
        a.free(a.malloc(22 * MiB))
        taken = a.malloc(21 * MiB + 512 * KiB)  # 512 KiB would remain
        assert taken.size == kept, expandable


def test_replay_with_expandable_segments_is_what_the_simulation_reads(monkeypatch):
    from harness.probes.simulate import _reserved_levels

    trace = [(1, 1, 100 * MiB), (2, 1, -100 * MiB), (3, 2, 150 * MiB)]
    for conf, reserved, model in (
            ("", 250 * MiB, "default configuration"),
            ("expandable_segments:True", 160 * MiB, "expandable_segments"),
            ("expandable_segments:True,max_split_size_mb:128", None, None)):
        monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", conf)
        levels, name = _reserved_levels(trace)
        assert (max(levels[1]) if levels else None) == reserved
        assert (model in name) if model else name is None
