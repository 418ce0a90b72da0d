"""What a memoized code digest read, checked again before the digest is reused.

The code digest of a function depends on objects that can change after it was taken: a
global rebound, a cell assigned, a class given a new method, a source file edited.  The
walk records each read as a guard; :class:`Checks` holds them, grouped so that checking
all of them costs a few microseconds, and never holds the digested function itself (the
memo holds it weakly: a strong reference from here would keep it alive forever).
"""

from __future__ import annotations

import operator
import os
import types
from collections.abc import Callable, Iterable
from typing import Any, Final

from stepvisor.cache._digest import new_hasher, value_digest

__all__ = [
    "ATTR",
    "CELL",
    "CONTENT",
    "FILE",
    "ITEM",
    "KEYS",
    "MISSING",
    "Checks",
    "Guard",
    "cell_contents",
    "file_facts",
]

MISSING: Final = object()
_SELF: Final = object()  # in a memo's guards: the digested object itself

# A guard is one thing the digest read, checked again before a memoized digest is reused:
# (kind, holder, key, expected).  ATTR: getattr(holder, key) is expected.  ITEM:
# holder.get(key) is expected.  CELL: cell number key of the function holder holds expected
# (a function's __closure__ cannot be reassigned, its cells can).  CONTENT:
# value_digest(holder) == expected.  KEYS: tuple(holder) == expected.  FILE: the file
# named holder has the (mtime, size) expected.
ATTR, ITEM, CELL, CONTENT, KEYS, FILE = range(6)
Guard = tuple[Any, ...]


class Checks:
    """A memoized digest's guards, grouped so that checking them all costs little.

    The attribute reads of one object are one ``attrgetter`` call, the lookups in one
    namespace one loop; each compared by identity with what the digest read.  The digested
    object itself is never held (the memo holds it weakly; a strong reference from here
    would keep it alive forever): where a guard names it, ``_SELF`` stands in.
    """

    __slots__ = ("_attrs", "_items", "_rest")

    def __init__(self, guards: Iterable[Guard], top: object) -> None:
        def bare(value: object) -> object:
            return _SELF if value is top else value

        attrs: dict[int, tuple[object, list[str], list[object]]] = {}
        items: dict[int, tuple[Any, list[object], list[object]]] = {}
        rest: list[Guard] = []
        for kind, holder, key, expected in guards:
            if kind in (ATTR, ITEM):
                group = (attrs if kind == ATTR else items).setdefault(
                    id(holder), (bare(holder), [], [])
                )
                group[1].append(key)
                group[2].append(bare(expected))
            else:
                rest.append((kind, bare(holder), key, bare(expected)))
        self._attrs = tuple(
            (operator.attrgetter(*names), holder, tuple(expected), len(names) == 1)
            for holder, names, expected in attrs.values()
        )
        self._items = tuple(
            (m, tuple(keys), tuple(expected)) for m, keys, expected in items.values()
        )
        self._rest = tuple(rest)

    def hold(self, top: object) -> bool:
        """Whether everything the digest of ``top`` read is still what it was."""
        try:
            for getter, holder, expected, single in self._attrs:
                current = getter(top if holder is _SELF else holder)
                for now, then in zip((current,) if single else current, expected):  # noqa: B905
                    if now is not (top if then is _SELF else then):
                        return False
            for mapping, keys, expected in self._items:
                namespace: Any = top if mapping is _SELF else mapping
                get = namespace.get
                for key, then in zip(keys, expected):  # noqa: B905 - equal by construction
                    if get(key, MISSING) is not (top if then is _SELF else then):
                        return False
            for kind, holder, key, then in self._rest:
                if not _CHECKS[kind](
                    top if holder is _SELF else holder, key, top if then is _SELF else then
                ):
                    return False
        except Exception:
            return False
        return True


_CHECKS: Final[tuple[Callable[[Any, Any, Any], bool], ...]] = (
    lambda holder, key, expected: getattr(holder, key, MISSING) is expected,  # ATTR
    lambda holder, key, expected: holder.get(key, MISSING) is expected,  # ITEM
    lambda holder, key, expected: cell_contents(holder.__closure__[key]) is expected,  # CELL
    lambda holder, key, expected: value_digest(holder) == expected,  # CONTENT
    lambda holder, key, expected: tuple(holder) == expected,  # KEYS
    lambda holder, key, expected: _stamp(holder) == expected,  # FILE
)


def _stamp(filename: str) -> tuple[int, int]:
    status = os.stat(filename)
    return status.st_mtime_ns, status.st_size


_files: dict[tuple[str, tuple[int, int]], str] = {}


def file_facts(filename: str) -> tuple[tuple[int, int] | None, str]:
    """The stamp of a source file and the digest of its bytes (remembered per stamp)."""
    try:
        stamp = _stamp(filename)
        digest = _files.get((filename, stamp))
        if digest is None:
            hasher = new_hasher()
            with open(filename, "rb") as source:
                hasher.update(source.read())
            digest = _files[(filename, stamp)] = hasher.hexdigest()
    except OSError:
        return None, f"unreadable:{filename}"
    return stamp, digest


def cell_contents(cell: types.CellType) -> object:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell: the variable is not assigned yet
        return MISSING
