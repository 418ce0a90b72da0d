"""Step functions that travel by value keep their file name, lines and source.

cloudpickle sends a function defined in ``__main__`` (or a notebook) by value
and names its code ``<dynamic-code>``, so a traceback from a process child or
a Ray worker said ``File "<dynamic-code>", line 10`` with no source line.
:func:`located` wraps such a function: unpickled anywhere, it gets its
code's file name back (its nested code and the by-value functions it calls
too).  A file on disk is read where the traceback is made; the lines of one
that exists only in the sending program (a notebook's cell) travel with the
function and are put in ``linecache`` there.
"""

from __future__ import annotations

import linecache
import os
import types
from collections.abc import Callable, Sequence
from typing import Any, Final

__all__ = ["DYNAMIC", "located", "relocate"]

#: The file name cloudpickle gives the code it sends by value.
DYNAMIC: Final = "<dynamic-code>"


class _Located:
    """Pickles as ``relocate(fn, filename, lines)``."""

    def __init__(self, fn: Callable[..., Any], filename: str, lines: Sequence[str]) -> None:
        self.fn = fn
        self.filename = filename
        self.lines = list(lines)

    def __reduce__(self) -> tuple[Any, ...]:
        return relocate, (self.fn, self.filename, self.lines)


def located(fn: Callable[..., Any]) -> _Located | None:
    """``fn`` wrapped with where it came from, or ``None`` if its file is unknown."""
    code = getattr(fn, "__code__", None)
    if not isinstance(code, types.CodeType):
        return None
    filename = code.co_filename
    if not filename or filename == DYNAMIC:
        return None
    # A file on disk is read where the traceback is made (the same host for a process
    # step); only source that exists nowhere else (a notebook's cell) travels along.
    lines = () if os.path.exists(filename) else linecache.getlines(filename)
    return _Located(fn, filename, lines)


def _fixed(code: types.CodeType, filename: str) -> types.CodeType:
    consts = tuple(
        _fixed(const, filename) if isinstance(const, types.CodeType) else const
        for const in code.co_consts
    )
    if code.co_filename != DYNAMIC and consts == code.co_consts:
        return code
    return code.replace(co_filename=filename, co_consts=consts)


def relocate(fn: Callable[..., Any], filename: str, lines: list[str]) -> Callable[..., Any]:
    """Give ``fn`` (and the by-value functions in its globals) their file name back."""
    if lines:
        linecache.cache[filename] = (sum(map(len, lines)), None, lines, filename)
    seen: set[int] = set()
    todo: list[Any] = [fn]
    while todo:
        item = todo.pop()
        if id(item) in seen or not isinstance(item, types.FunctionType):
            continue
        seen.add(id(item))
        if item.__code__.co_filename == DYNAMIC:
            item.__code__ = _fixed(item.__code__, filename)
            todo.extend(v for v in item.__globals__.values() if isinstance(v, types.FunctionType))
    return fn
