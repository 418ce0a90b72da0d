"""A cache entry: a succeeded step's outputs, packed with a checksum, as stores keep it.

The payload is the outputs pickled (protocol 5).  The checksum covers the
key, the payload and the outputs' digests, so an entry whose bytes were
damaged, truncated or moved under another key never unpacks: it reads as
unreadable and the step is computed again (``computed: stored entry unreadable``).
Reading it unpickles, so a cache is trusted like a store with the pickle codec.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = ["CacheEntry", "EntryInfo", "UnreadableEntryError", "checksum_of", "pack", "unpack"]


class UnreadableEntryError(Exception):
    """An entry that fails its checksum or cannot be unpickled (internal: noted, never raised)."""


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """One stored result: where it came from, what it was keyed on, and its outputs packed."""

    key: str
    workflow_id: str
    step_id: str
    #: The key's parts by name (see :mod:`stepvisor.cache._key`).
    parts: Mapping[str, str]
    #: The run whose attempt made it.
    run_id: str
    payload: bytes
    checksum: str
    #: The content digest of each output, so that steps below need not hash them again.
    digests: Mapping[str, str]
    created: float
    last_used: float

    @property
    def size(self) -> int:
        return len(self.payload)


class EntryInfo(NamedTuple):
    """An entry as ``stepvisor cache`` lists it (no payload read)."""

    key: str
    workflow_id: str
    step_id: str
    run_id: str
    size: int
    created: float
    last_used: float


def checksum_of(key: str, payload: bytes, digests: Mapping[str, str]) -> str:
    h = hashlib.blake2b(digest_size=20)
    h.update(key.encode())
    h.update(b"\x1f")
    h.update(json.dumps(dict(digests), sort_keys=True).encode())
    h.update(b"\x1f")
    h.update(payload)
    return h.hexdigest()


def pack(
    key: str,
    *,
    workflow_id: str,
    step_id: str,
    parts: Mapping[str, str],
    run_id: str,
    outputs: Mapping[str, Any],
    digests: Mapping[str, str],
    now: float,
) -> CacheEntry:
    """The entry for ``outputs``; ``pickle.PicklingError`` and the like if they do not pickle."""
    payload = pickle.dumps(dict(outputs), protocol=5)
    return CacheEntry(
        key, workflow_id, step_id, dict(parts), run_id, payload,
        checksum_of(key, payload, digests), dict(digests), now, now,
    )  # fmt: skip


def unpack(entry: CacheEntry) -> dict[str, Any]:
    """The outputs ``entry`` holds; :class:`UnreadableEntryError` if it is damaged."""
    if checksum_of(entry.key, entry.payload, entry.digests) != entry.checksum:
        raise UnreadableEntryError(
            f"entry {entry.key[:12]} of step {entry.step_id!r} fails its checksum"
        )
    try:
        outputs = pickle.loads(entry.payload)  # noqa: S301 - the user's own store, checksummed
    except Exception as exc:
        raise UnreadableEntryError(
            f"entry {entry.key[:12]} of step {entry.step_id!r} cannot be unpickled "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(outputs, dict) or set(outputs) != set(entry.digests):
        raise UnreadableEntryError(f"entry {entry.key[:12]} of step {entry.step_id!r} is malformed")
    return outputs
