"""The digest of a step function's code (a minimal stand-in; the ``cachekey`` work replaces it).

Interface: ``code_digest(fn) -> str`` (hex), memoized per function, never raises.
"""

from __future__ import annotations

import contextlib
import hashlib
import marshal
import pickle
import weakref
from collections.abc import Callable
from typing import Any

__all__ = ["code_digest"]

_MEMO: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def code_digest(fn: Callable[..., object]) -> str:
    """blake2b of ``fn``'s code object and its default values; never raises."""
    try:
        cached = _MEMO.get(fn)
    except TypeError:  # not weakly referenceable
        cached = None
    if cached is not None:
        return cached
    h = hashlib.blake2b(digest_size=16)
    code = getattr(fn, "__code__", None)
    try:
        if code is not None:
            h.update(marshal.dumps(code))
            defaults = (getattr(fn, "__defaults__", None), getattr(fn, "__kwdefaults__", None))
            h.update(pickle.dumps(defaults, protocol=5))
        else:
            h.update(pickle.dumps(fn, protocol=5))
    except Exception:
        h.update(
            f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}".encode()
        )
    digest = h.hexdigest()
    with contextlib.suppress(TypeError):  # not weakly referenceable: not memoized
        _MEMO[fn] = digest
    return digest
