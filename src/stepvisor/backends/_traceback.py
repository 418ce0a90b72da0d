"""A failed attempt's traceback text, written without letting go of the GIL.

The text is the standard one (``traceback.format_exception``) less the caret
lines (``^^^^``) Python 3.11+ draws under a line: file, line, function and
source of every frame, the chained causes and contexts, the notes, and
recursion folded as ``[Previous line repeated N more times]``.

Why not ``traceback.TracebackException``: to build its stack it calls
``linecache.checkcache`` for every file in it, an ``os.stat`` each, and a
system call lets go of the GIL.  On a busy engine every let-go is a wait to
get it back behind the Supervisor and the other Workers: measured on two
cores, 8 thread steps failing in turn spent 60 µs of CPU formatting each
failure instead of 15, and a retry storm of 1,000 failing steps turned that
into a convoy that held the Supervisor back by tens of milliseconds.  Source
lines here come from ``linecache.getline``, which reads a file once and then
answers from memory.  The one difference: a source file edited while the
process runs shows its old line, where the standard text would show the new.

That is the text of an exception that is not chained (the common failure,
and every failure of a retry storm).  A chained one, or an exception group,
gets the standard module's text with the carets taken out the same way: the
standard exception-only text of a chained exception builds the stacks of the
whole chain first, so there is nothing to save by building part of it here.
"""

from __future__ import annotations

import linecache
import sys
import traceback
from types import TracebackType
from typing import Final

__all__ = ["format_error"]

_HEADER: Final = "Traceback (most recent call last):\n"


def format_error(exc: BaseException) -> str:
    """The traceback text of ``exc``, as a result's ``traceback`` holds it."""
    chained = exc.__cause__ is not None or (
        exc.__context__ is not None and not exc.__suppress_context__
    )
    if chained or isinstance(exc, BaseExceptionGroup) or hasattr(sys, "tracebacklimit"):
        return _standard(exc)  # (a tracebacklimit the standard module honours)
    # Not chained, so the standard exception-only text builds no other stack.
    only = "".join(traceback.format_exception_only(type(exc), exc))
    if exc.__traceback__ is None:
        return only
    return _HEADER + "".join(_stack(exc.__traceback__).format()) + only


def _stack(tb: TracebackType | None) -> traceback.StackSummary:
    frames: list[traceback.FrameSummary] = []
    while tb is not None:
        frame = tb.tb_frame
        code = frame.f_code
        lineno = tb.tb_lineno
        line = linecache.getline(code.co_filename, lineno, frame.f_globals)
        frames.append(
            traceback.FrameSummary(
                code.co_filename, lineno, code.co_name, lookup_line=False, line=line
            )
        )
        tb = tb.tb_next
    return traceback.StackSummary.from_list(frames)


def _standard(exc: BaseException) -> str:
    """The standard module's text, carets taken out (the columns are what draws them)."""
    report = traceback.TracebackException(type(exc), exc, exc.__traceback__, compact=True)
    seen: set[int] = set()
    todo = [report]
    while todo:
        part = todo.pop()
        if id(part) in seen:
            continue
        seen.add(id(part))
        for frame in part.stack:
            frame.colno = None  # no column: no carets
        todo += [link for link in (part.__cause__, part.__context__) if link is not None]
        todo += getattr(part, "exceptions", None) or []
    return "".join(report.format())
