"""Which cache entries a prune removes: a decision over the listing, made without the store.

``stepvisor cache prune --older-than 7d --max-size 2G`` removes the entries
not used for longer than 7 days, then the least recently used ones until
what is left takes at most 2 GiB.  Sizes and durations are read here too, so
that the command line and tests agree on what ``7d`` and ``2G`` mean.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

from stepvisor.cache._entry import EntryInfo
from stepvisor.errors import InvalidCacheError

__all__ = ["parse_age", "parse_size", "to_prune"]

_AGE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_AGE_UNITS: Final = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_SIZE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_SIZE_UNITS: Final = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_age(text: str) -> float:
    """``7d`` -> seconds (s, m, h, d, w; a bare number is seconds)."""
    found = _AGE.match(text)
    if found is None:
        raise InvalidCacheError(f"--older-than takes an age such as 7d, 12h or 30m, got {text!r}")
    return float(found.group(1)) * _AGE_UNITS[found.group(2)]


def parse_size(text: str) -> int:
    """``2G`` -> bytes (K, M, G, T are powers of 1024; a bare number is bytes)."""
    found = _SIZE.match(text)
    if found is None:
        raise InvalidCacheError(f"--max-size takes a size such as 2G, 500M or 100K, got {text!r}")
    return int(float(found.group(1)) * _SIZE_UNITS[found.group(2).lower()])


def to_prune(
    entries: Sequence[EntryInfo],
    *,
    now: float,
    older_than: float | None = None,
    max_size: int | None = None,
) -> list[str]:
    """The keys to remove: unused for longer than ``older_than``, then the least
    recently used until the rest takes at most ``max_size`` bytes."""
    gone: list[str] = []
    kept: list[EntryInfo] = []
    for entry in entries:
        if older_than is not None and now - entry.last_used > older_than:
            gone.append(entry.key)
        else:
            kept.append(entry)
    if max_size is not None:
        total = sum(e.size for e in kept)
        for entry in sorted(kept, key=lambda e: (e.last_used, e.created)):
            if total <= max_size:
                break
            gone.append(entry.key)
            total -= entry.size
    return gone
