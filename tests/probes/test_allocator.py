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
