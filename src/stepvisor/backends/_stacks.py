"""The stack of an attempt stopped at its deadline, as pytest-timeout prints it.

Taken at the moment the deadline is reached, from outside the step: a thread
step's frame from ``sys._current_frames()``, an async step's from its task
(``Task.get_stack``), a process child's every thread by the child itself when
its SIGTERM arrives (:mod:`stepvisor.backends._child_output`).  The text goes
into the attempt's log and under its error text.
"""

from __future__ import annotations

import sys
import traceback
from types import FrameType
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    import asyncio

    from stepvisor.context import AttemptControl

__all__ = ["HEADER", "task_stack", "thread_stack", "with_stack"]

HEADER: Final = "Stack at the deadline (most recent call last):\n"


def thread_stack(ident: int) -> str | None:
    """The stack of the thread ``ident`` now, or ``None`` if it has ended."""
    frame = sys._current_frames().get(ident)
    if frame is None:
        return None
    return _format(frame)


def _format(frame: FrameType) -> str:
    return "".join(traceback.format_stack(frame))


def task_stack(task: asyncio.Task[Any]) -> str | None:
    """Where an asyncio task is suspended: its await chain, outermost first.

    (``Task.get_stack`` gives only the task's own coroutine frame; the chain
    of coroutines it awaits is followed here, through ``cr_await``.)
    """
    walk: list[tuple[FrameType, int]] = []
    awaited: Any = task.get_coro()
    while awaited is not None:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
        if frame is None:
            break
        walk.append((frame, frame.f_lineno))
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
    if not walk:
        return None
    return "".join(traceback.StackSummary.extract(iter(walk)).format())


def grab_thread_stack(control: AttemptControl, ident: int, reason: str) -> None:
    """``before_stop``: on a timeout, keep where thread ``ident`` is in ``control.stack``."""
    if reason == "timeout" and control.stack is None:
        control.stack = thread_stack(ident)


def with_stack(text: str | None, stack: str | None) -> str | None:
    """An error text with the deadline's stack under it (when there is one)."""
    if not stack:
        return text
    block = HEADER + stack
    return block if not text else f"{text.rstrip()}\n\n{block}"
