"""What a step says about caching: :class:`Cache`, and how ``cache=`` values are read.

Kept free of the rest of the cache package (it imports only the errors), so
that the model (:mod:`stepvisor.core.model`) can check a step's ``cache=``
when the step is made, without pulling in the store or the hashing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from stepvisor.errors import InvalidCacheError

__all__ = ["CACHE_FORMAT", "Cache", "cache_option"]

#: The format of the cache's entries and keys: part of every key, so a
#: stepvisor that changes how it keys or packs entries never reads old ones.
CACHE_FORMAT: Final = 1

_FIX: Final = 'write cache=True, cache=False or cache=stepvisor.Cache(version="2")'


@dataclass(frozen=True, slots=True)
class Cache:
    """Reuse a step's result when its code, parameters and inputs have not changed.

    ``version`` is part of the key: change it to recompute by hand what the
    key cannot see (a library's code, a file the step reads).  ``expire`` is
    how many seconds an entry may be reused after it was made (``None``: no limit).
    """

    version: str | None = None
    expire: float | None = None

    def __post_init__(self) -> None:
        if self.version is not None and (not isinstance(self.version, str) or not self.version):
            raise InvalidCacheError(
                f"Cache(version=...) must be a non-empty string such as '2', got "
                f"{self.version!r} ({type(self.version).__name__})"
            )
        expire = self.expire
        if expire is not None:
            if (
                isinstance(expire, bool)
                or not isinstance(expire, int | float)
                or not math.isfinite(expire)
                or expire <= 0
            ):
                raise InvalidCacheError(
                    f"Cache(expire=...) must be a positive number of seconds or None, got "
                    f"{expire!r}; write e.g. expire=86400 for a day"
                )
            object.__setattr__(self, "expire", float(expire))


def cache_option(value: object, *, where: str) -> Cache | bool | None:
    """A ``cache=`` value checked: ``None`` (the run decides), ``False`` (never), or a ``Cache``.

    ``True`` reads as ``Cache()``.  A mapping (a workflow file's
    ``cache: {version: "2"}``) reads as ``Cache(**mapping)``.
    """
    if value is None or value is False:
        return value
    if value is True:
        return Cache()
    if isinstance(value, Cache):
        return value
    if isinstance(value, Mapping):
        unknown = sorted(str(k) for k in value if k not in ("version", "expire"))
        if unknown:
            raise InvalidCacheError(
                f"{where}: cache takes 'version' and 'expire', got {', '.join(unknown)}; {_FIX}"
            )
        version: Any = value.get("version")
        if isinstance(version, int | float) and not isinstance(version, bool):
            version = str(version)  # a file's `version: 2` means "2"
        try:
            return Cache(version=version, expire=value.get("expire"))
        except InvalidCacheError as exc:
            raise InvalidCacheError(f"{where}: {exc}") from exc
    raise InvalidCacheError(f"{where}: cache must be true, false or a Cache, got {value!r}; {_FIX}")
