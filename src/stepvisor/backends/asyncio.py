"""The async backend: the event loop that runs ``async def`` steps, shared by a run.

One loop thread per run, started only when the workflow has async steps;
:class:`LoopThread` is the backend.  An
attempt is submitted from its Worker's thread; a deadline or cancel cancels
the attempt's *task* (not just the wait for it), and the Worker waits until
the task has really finished, so a retry never overlaps the attempt it
replaces.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from stepvisor.backends._wire import check_outputs, trace_context
from stepvisor.backends.base import Ahead, AttemptResult, AttemptSpec, format_error, stop_error
from stepvisor.backends.thread import make_context
from stepvisor.context import AttemptControl

__all__ = ["LOOP_THREAD_NAME", "LoopThread"]

LOOP_THREAD_NAME = "stepvisor-loop"
_CANCELLED_NOTE = "its task was cancelled"


class LoopThread:
    """An asyncio loop running forever on a daemon thread until :meth:`close`."""

    sends_ahead: ClassVar[bool] = False

    def __init__(self, *, on_thread: Callable[[threading.Thread], None] | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._main, name=LOOP_THREAD_NAME, daemon=True)
        if on_thread is not None:
            on_thread(self.thread)
        self.thread.start()
        self._ready.wait()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        try:
            self.loop.run_forever()
        finally:
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            if pending:
                self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def run(
        self, spec: AttemptSpec, control: AttemptControl, ahead: Ahead | None = None
    ) -> AttemptResult:
        """Run one async attempt; blocks the calling Worker thread until it ends."""
        del ahead
        ctx = make_context(spec, control)

        async def runner() -> tuple[Any, BaseException | None]:
            if spec.trace is None:
                task = asyncio.ensure_future(_caught(spec.fn(ctx)))
            else:  # the task copies the context current here: the attempt's span
                with trace_context(spec.trace):
                    task = asyncio.ensure_future(_caught(spec.fn(ctx)))

            def cancel_task() -> None:
                self.loop.call_soon_threadsafe(task.cancel)

            control.on_cancel(cancel_task)
            return await task

        future = asyncio.run_coroutine_threadsafe(runner(), self.loop)
        try:
            value, raised = future.result()
        except (asyncio.CancelledError, concurrent.futures.CancelledError) as exc:
            if control.is_cancelled:
                error = stop_error(spec, control.reason, _CANCELLED_NOTE)
                error.__cause__ = exc
                return AttemptResult(kind="cancelled", error=error, note=_CANCELLED_NOTE)
            return AttemptResult(kind="error", error=exc, traceback=format_error(exc))
        except BaseException as exc:  # the step must never take down its Worker
            return AttemptResult(kind="error", error=exc, traceback=format_error(exc))
        if raised is not None:
            return AttemptResult(kind="error", error=raised, traceback=format_error(raised))
        try:
            outputs = check_outputs(spec.step_id, value)
        except TypeError as exc:
            return AttemptResult(kind="error", error=exc, traceback=format_error(exc))
        return AttemptResult(kind="ok", outputs=outputs)

    def close(self) -> None:
        """Stop the loop (cancelling what is left) and wait for its thread."""
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5.0)


async def _caught(step: Awaitable[Any]) -> tuple[Any, BaseException | None]:
    """The step's value, or what it raised, as a value.

    asyncio re-raises ``SystemExit`` and ``KeyboardInterrupt`` out of the
    loop, which would end the loop thread of the whole run; caught here, they
    fail the step like any exception.  A cancel still cancels.
    """
    try:
        return await step, None
    except asyncio.CancelledError:
        raise
    except BaseException as exc:  # the step must never take down the loop
        return None, exc
