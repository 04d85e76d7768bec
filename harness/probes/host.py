"""This process's resident host memory while a block runs: where a save gathers what it writes.

A thread reads the resident set size from /proc/self/statm every millisecond; `peak` is the
largest seen (the block's start and end included), `growth` the peak minus the size at the
start. Where /proc is missing (not Linux) both stay None.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

_STATM = Path("/proc/self/statm")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int | None:
    try:
        return int(_STATM.read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


class HostMemory:
    """`with HostMemory() as host: ...` then `host.peak`, `host.growth` (bytes, or None)."""

    def __init__(self, sample: bool = True, interval_s: float = 0.001):
        self.peak: int | None = None
        self.growth: int | None = None
        self._sample = sample and rss_bytes() is not None
        self._interval_s = interval_s
        self._done = threading.Event()
        self._start: int | None = None

    def _read(self) -> None:
        now = rss_bytes()
        if now is not None:
            self.peak = max(now, self.peak or 0)

    def _run(self) -> None:
        while not self._done.wait(self._interval_s):
            self._read()

    def __enter__(self) -> HostMemory:
        if self._sample:
            self._start = rss_bytes()
            self.peak = self._start
            self._thread = threading.Thread(target=self._run, name="host-rss", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._sample:
            self._done.set()
            self._thread.join()
            self._read()
            self.growth = self.peak - self._start
