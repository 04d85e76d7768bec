"""A replay of PyTorch's CUDA caching allocator: what a simulated step would *reserve*.

`max_memory_allocated` counts live blocks; what `nvidia-smi` shows is what the caching allocator
took from the driver (`max_memory_reserved`): whole segments, kept and reused, never returned
during training. Given the simulation's allocation trace, this replays the allocator's
documented policy (c10/cuda/CUDACachingAllocator.cpp, default configuration, one stream):

* every request is rounded up to a multiple of 512 bytes (the trace already is);
* requests of at most 1 MiB come from the small pool, larger ones from the large pool;
* a request takes the smallest cached free block of its pool that fits (best fit, then lowest
  address); a small-pool block is split if at least 512 bytes remain, a large-pool block if
  more than 1 MiB remains;
* with no fitting block a new segment is reserved: 2 MiB for a small request, 20 MiB for a
  large one under 10 MiB, the request rounded up to 2 MiB otherwise;
* a freed block returns to its pool and merges with free neighbours of the same segment;
  segments are never released (no `empty_cache`, no OOM retry: the device is assumed large
  enough, which is the question being asked).

With `expandable_segments:True` (`CachingAllocator(expandable=True)`) each pool is one
virtual segment that grows at its end: physical pages are mapped as needed, 20 MiB at a time
for the large pool and 2 MiB for the small one; a request takes the best-fitting free block,
the free block at the segment's end (which could grow) only when no other fits, else the end
grows by what is missing (merged with a free end block); a block is split whenever 512 bytes
or more remain. Nothing is unmapped during training.

Not modelled: `max_split_size_mb`, `roundup_power2_divisions`, several streams, memory the CUDA
context and libraries take outside the allocator.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass

MIN_BLOCK = 512
SMALL_SIZE = 1 << 20  # largest request served by the small pool
SMALL_BUFFER = 2 << 20  # small-pool segment
LARGE_BUFFER = 20 << 20  # segment for large requests under MIN_LARGE_ALLOC
MIN_LARGE_ALLOC = 10 << 20
ROUND_LARGE = 2 << 20


def round_size(n_bytes: int) -> int:
    return MIN_BLOCK if n_bytes < MIN_BLOCK else -(-n_bytes // MIN_BLOCK) * MIN_BLOCK


def segment_size(size: int) -> int:
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


@dataclass(eq=False)
class _Block:
    addr: int
    size: int
    segment: int
    small: bool
    free: bool = True
    prev: _Block | None = None
    next: _Block | None = None


EXPANDABLE_BASE = {True: 0, False: 1 << 62}  # each pool's one virtual segment, far apart


class CachingAllocator:
    def __init__(self, expandable: bool = False) -> None:
        self.reserved = 0
        self.allocated = 0
        self.expandable = expandable
        # With `events` a list, each action is appended as PyTorch's allocator trace records it
        # (torch.cuda.memory._snapshot's device_traces), for memory_viz (snapshot.py).
        self.events: list[dict] | None = None
        self.now_us = 0
        # Per pool (small?): cached free blocks as sorted (size, address), and by address.
        self._pools: dict[bool, list[tuple[int, int]]] = {True: [], False: []}
        self._cached: dict[int, _Block] = {}
        self._top = 0  # next segment's address: segments never overlap
        self._segments = 0
        # Expandable: per pool, where its mapped pages end, and the block that ends there.
        self._mapped_end = dict(EXPANDABLE_BASE)
        self._last: dict[bool, _Block | None] = {True: None, False: None}

    def malloc(self, n_bytes: int) -> _Block:
        size = round_size(n_bytes)
        small = size <= SMALL_SIZE
        block = self._expandable_block(size, small) if self.expandable else \
            self._segment_block(size, small)
        remaining = block.size - size
        if remaining >= MIN_BLOCK if (small or self.expandable) else remaining > SMALL_SIZE:
            rest = _Block(block.addr + size, remaining, block.segment, small, True, block,
                          block.next)
            if block.next is not None:
                block.next.prev = rest
            block.next, block.size = rest, size
            self._cache(rest)
            if self._last[small] is block:
                self._last[small] = rest
        block.free = False
        self.allocated += block.size
        self._event("alloc", block.addr, block.size)
        return block

    def _event(self, action: str, addr: int, size: int) -> None:
        if self.events is not None:
            self.events.append({"action": action, "addr": addr, "size": size, "stream": 0,
                                "time_us": self.now_us, "frames": []})

    def _segment_block(self, size: int, small: bool) -> _Block:
        """Best fit among cached blocks, else a new segment (cudaMalloc)."""
        pool = self._pools[small]
        i = bisect.bisect_left(pool, (size, -1))
        if i < len(pool):
            return self._cached.pop(pool.pop(i)[1])
        seg = segment_size(size)
        self._segments += 1
        block = _Block(self._top, seg, self._segments, small)
        self._top += seg
        self.reserved += seg
        self._event("segment_alloc", block.addr, seg)
        return block

    def _expandable_block(self, size: int, small: bool) -> _Block:
        """Best fit among cached blocks but the one at the segment's end; that one if it fits;
        else map pages at the end for what is missing."""
        pool, last = self._pools[small], self._last[small]
        tail = last if last is not None and last.free else None
        i = bisect.bisect_left(pool, (size, -1))
        for j in range(i, len(pool)):
            if tail is None or pool[j][1] != tail.addr:
                return self._cached.pop(pool.pop(j)[1])
        if tail is not None and tail.size >= size:
            self._uncache(tail)
            return tail
        page = SMALL_BUFFER if small else LARGE_BUFFER
        grow = -(-(size - (tail.size if tail else 0)) // page) * page
        self.reserved += grow
        start = self._mapped_end[small]
        self._mapped_end[small] += grow
        self._event("segment_map", start, grow)
        if tail is not None:
            self._uncache(tail)
            tail.size += grow
            return tail
        block = _Block(start, grow, -1 if small else -2, small, True, last, None)
        if last is not None:
            last.next = block
        self._last[small] = block
        return block

    def free(self, block: _Block) -> None:
        self.allocated -= block.size
        self._event("free_requested", block.addr, block.size)
        self._event("free_completed", block.addr, block.size)
        block.free = True
        for neighbour in (block.prev, block.next):
            if neighbour is not None and neighbour.free and neighbour.segment == block.segment:
                self._uncache(neighbour)
                if neighbour is block.prev:
                    block.addr, block.prev = neighbour.addr, neighbour.prev
                    if neighbour.prev is not None:
                        neighbour.prev.next = block
                else:
                    block.next = neighbour.next
                    if neighbour.next is not None:
                        neighbour.next.prev = block
                    if self._last[block.small] is neighbour:
                        self._last[block.small] = block
                block.size += neighbour.size
        self._cache(block)

    def _cache(self, block: _Block) -> None:
        bisect.insort(self._pools[block.small], (block.size, block.addr))
        self._cached[block.addr] = block

    def _uncache(self, block: _Block) -> None:
        pool = self._pools[block.small]
        pool.pop(bisect.bisect_left(pool, (block.size, block.addr)))
        del self._cached[block.addr]


def replay(allocations: Iterable[tuple[int, int, int]],
           expandable: bool = False) -> list[tuple[int, int]]:
    """(t_ns, reserved bytes after the event) for each (t_ns, key, ±bytes) of the trace, in
    time order. A free of a key never allocated in the trace is ignored."""
    allocator = CachingAllocator(expandable)
    live: dict[int, _Block] = {}
    levels = []
    for t, key, delta in sorted(allocations, key=lambda a: (a[0], a[2] < 0)):
        if delta > 0:
            live[key] = allocator.malloc(delta)
        elif key in live:
            allocator.free(live.pop(key))
        levels.append((t, allocator.reserved))
    return levels
