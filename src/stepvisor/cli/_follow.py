"""Following a run in the terminal until it ends, and stopping it on Ctrl-C or SIGTERM.

The main thread waits on the run in ``TICK`` slices and redraws the display
between them.  The first Ctrl-C (or SIGTERM) cancels the run and waits for it
to stop; a second one, or a run that will not stop, leaves at once: the store
keeps the run, whose heartbeat stops, so it can be resumed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Final, cast

from stepvisor._runtime import RunHandle
from stepvisor.cli._logs import LineQueue, failed_output_lines
from stepvisor.cli._output import EXIT_CANCELLED, say
from stepvisor.cli._progress import TICK, Inbox, LiveDisplay, Progress, end_lines, make_display
from stepvisor.core.result import RunResult
from stepvisor.core.state import RunStatus

#: Seconds to wait for a cancelled run to stop before giving up on it.
CANCEL_WAIT: Final = 60.0


class SigtermError(Exception):
    """SIGTERM, turned into the same path as Ctrl-C (cancel, then exit 130)."""


@contextlib.contextmanager
def sigterm_cancels() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C while a run goes (``docker stop``, ``kill``)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SigtermError

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _wait(handle: RunHandle, refresh: Callable[[], None]) -> RunResult:
    while True:
        try:
            return handle.wait(timeout=TICK)
        except TimeoutError:
            refresh()


def follow(
    handle: RunHandle, *, inbox: Inbox, progress: Progress, headline: str
) -> tuple[RunResult, bool]:
    """Show the run until it ends; Ctrl-C or SIGTERM cancels it.  -> (result, interrupted)."""
    display = make_display(sys.stdout, progress)
    began = time.monotonic()
    # On a live display the steps' lines are queued and put above its block.
    queue = LineQueue() if isinstance(display, LiveDisplay) else None

    def refresh() -> None:
        display.refresh(inbox.drain())
        if queue is not None:
            cast("LiveDisplay", display).above(queue.drain())

    interrupted = False
    try:
        display.begin(run_id=handle.run_id, headline=headline)
        with sigterm_cancels(), queue if queue is not None else contextlib.nullcontext():
            try:
                result = _wait(handle, refresh)
            except (KeyboardInterrupt, SigtermError):
                interrupted = True
                display.note("cancelling; press Ctrl-C again to quit at once")
                handle.cancel()
                result = _wait_after_cancel(handle, refresh)
        refresh()
        progress.settle(result)
    except BaseException:
        display.abort()
        raise
    finally:
        if not handle.done():  # an error of ours: never leave the run going
            handle.cancel()
            with contextlib.suppress(TimeoutError):
                handle.wait(timeout=CANCEL_WAIT)
    hints = failed_output_lines(result) if result.status is RunStatus.FAILED else []
    if result.status is not RunStatus.SUCCEEDED:
        hints.append(f"  resume with: stepvisor resume {result.run_id}")
    display.end(end_lines(result, progress, elapsed=time.monotonic() - began, hints=hints))
    return result, interrupted


def _wait_after_cancel(handle: RunHandle, refresh: Callable[[], None]) -> RunResult:
    try:
        deadline = time.monotonic() + CANCEL_WAIT
        while True:
            try:
                return handle.wait(timeout=TICK)
            except TimeoutError:
                refresh()
                if time.monotonic() > deadline:
                    raise
    except (KeyboardInterrupt, SigtermError, TimeoutError):
        # Asked twice (or the run will not stop): leave now.  The store keeps the
        # run; its heartbeat stops, so it reads "interrupted" and can be resumed.
        sys.stdout.write("\x1b[?25h\n" if sys.stdout.isatty() else "\n")
        say(f"stopped without waiting; resume with: stepvisor resume {handle.run_id}")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_CANCELLED)
