"""Byte sizes: parse what users type (``24GiB``, ``512 MB``) and format what tables show, and
the categories a memory breakdown splits them into.

Records always store whole bytes; GiB appears only in human-facing tables.
"""

from __future__ import annotations

import re

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")

GIB = 2**30

# What a breakdown's bytes are (a record's `breakdown_bytes` keys, besides "unattributed"): here,
# beside the sizes, so that reading records never imports the probes (and torch with them).
# kv_cache: generation's key/value cache (0 where nothing generates); vision_activations: what
# a vision-language model's image encoder made in forward and keeps for backward (0 where no
# encoder runs; `activations` is the rest).
CATEGORIES = ("params", "grads", "optimizer", "activations", "vision_activations", "kv_cache",
              "other")


def parse_size(text: str | int) -> int:
    """``"24GiB"`` → 25769803776. Raises ValueError with the accepted units on bad input."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise ValueError(f"size must be positive, got {text}")
        return text
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"cannot read size {text!r}: use bytes or a number with B, KiB, MiB, GiB, KB, MB, GB"
        )
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return value


def unit_for(largest_bytes) -> tuple[str, int]:
    """How a table or plot shows sizes: GiB for real models; MiB when the largest figure is
    under 1 GiB (tiny models), so that small terms do not all print as 0.000."""
    return ("GiB", GIB) if largest_bytes is not None and largest_bytes >= GIB else ("MiB", 2**20)


def gib(n_bytes: int | None) -> float | None:
    return None if n_bytes is None else n_bytes / GIB
