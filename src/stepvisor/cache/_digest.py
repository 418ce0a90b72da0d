"""The digest of a value (a minimal stand-in; the ``cachekey`` work replaces it).

Interface: ``value_digest(value) -> str`` (hex); ``UnhashableValue`` when a value
cannot be hashed, its text naming the value and its type.
"""

from __future__ import annotations

import hashlib
import pickle

__all__ = ["UnhashableValue", "value_digest"]


class UnhashableValue(Exception):  # noqa: N818 - the name is the cachekey interface
    """A value that cannot be hashed (an open file, a lock): ``str`` names it and its type."""


def value_digest(value: object) -> str:
    """blake2b of ``value`` pickled (protocol 5)."""
    try:
        data = pickle.dumps(value, protocol=5)
    except Exception as exc:
        raise UnhashableValue(
            f"{type(value).__name__} value {value!r:.80} cannot be hashed ({exc})"
        ) from exc
    return hashlib.blake2b(data, digest_size=16).hexdigest()
