"""The async backend: the event loop that runs ``async def`` steps, shared by a run.

One loop thread per engine, started when a run with async steps starts;
:class:`LoopThread` is the backend.  A run's shell submits an attempt
(:meth:`LoopThread.submit`) and is told when it ends: no thread waits for an
async attempt, so thousands can be in flight on one loop.  A deadline or
cancel cancels the attempt's *task* (not just the wait for it), and the end is
reported only once the task has really finished, so a retry never overlaps
the attempt it replaces.  :meth:`LoopThread.run` is the blocking form, for a
caller that has a thread to spare (the Backend protocol).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import threading
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from stepvisor.backends._capture import CURRENT
from stepvisor.backends._stacks import task_stack
from stepvisor.backends._wire import check_outputs, trace_context
from stepvisor.backends.base import Following, backend_bug, format_error, stop_error
from stepvisor.backends.thread import ended_with_stack, make_context
from stepvisor.context import AttemptControl
from stepvisor.core.attempt import AttemptResult, AttemptSpec

__all__ = ["LOOP_THREAD_NAME", "LoopThread"]

LOOP_THREAD_NAME = "stepvisor-loop"
_CANCELLED_NOTE = "its task was cancelled"


class LoopThread:
    """An asyncio loop running forever on a daemon thread until :meth:`close`."""

    sends_ahead: ClassVar[bool] = False

    def __init__(self, *, on_thread: Callable[[threading.Thread], None] | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        #: Attempts submitted and not yet started on the loop (see :meth:`submit`).
        self._incoming: list[tuple[AttemptSpec, AttemptControl, Callable[[AttemptResult], None]]]
        self._incoming = []
        self._incoming_lock = threading.Lock()
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
        self, spec: AttemptSpec, control: AttemptControl, ahead: Following | None = None
    ) -> AttemptResult:
        """Run one async attempt; blocks the calling thread until it ends."""
        del ahead
        future: concurrent.futures.Future[AttemptResult] = concurrent.futures.Future()
        self.submit(spec, control, future.set_result)
        return future.result()

    def submit(
        self, spec: AttemptSpec, control: AttemptControl, done: Callable[[AttemptResult], None]
    ) -> None:
        """Start one async attempt and return at once; ``done(result)`` is called when it ends.

        This is how a run's shell runs async steps: no thread waits for them,
        so the attempts in flight are bounded by the run's slots, not by
        threads.  ``done`` is called on the loop's thread (or, if the loop is
        closed, on the caller's), exactly once.

        A burst of submissions wakes the loop once: the first one queues a
        drain, the rest join it (a wake-up is a write to the loop's self-pipe).
        """
        with self._incoming_lock:
            first = not self._incoming
            self._incoming.append((spec, control, done))
        if self.loop.is_closed():
            self._end_waiting(RuntimeError("the engine's event loop is closed"))
        elif first:
            try:
                self.loop.call_soon_threadsafe(self._drain)
            except RuntimeError as exc:  # it closed meanwhile
                self._end_waiting(exc)

    def _end_waiting(self, exc: BaseException) -> None:
        """The loop is closed: every attempt still waiting to start ends now, as a bug."""
        with self._incoming_lock:
            waiting, self._incoming = self._incoming, []
        for spec, _control, done in waiting:
            done(backend_bug(spec, exc))

    def _drain(self) -> None:
        with self._incoming_lock:
            waiting, self._incoming = self._incoming, []
        for spec, control, done in waiting:
            self._start(spec, control, done)

    def _start(
        self, spec: AttemptSpec, control: AttemptControl, done: Callable[[AttemptResult], None]
    ) -> None:
        """On the loop: the attempt as one task, whose end is turned into a result.

        One task and a done callback per attempt, rather than a coroutine
        awaiting the step's task inside a second task with a thread-safe
        future: with thousands in flight that was half the memory per attempt.
        """
        loop = self.loop
        try:
            ctx = make_context(spec, control)
            if spec.trace is None and control.capture is None:
                task = loop.create_task(_caught(spec.fn(ctx)))
            else:  # the task copies the context current here: the attempt's span
                with (
                    trace_context(spec.trace)
                    if spec.trace is not None
                    else contextlib.nullcontext()
                ):
                    context = contextvars.copy_context()
                    if control.capture is not None:  # the task's own copy: its output
                        context.run(CURRENT.set, (control, spec.step_id, spec.attempt))
                    task = loop.create_task(_caught(spec.fn(ctx)), context=context)
        except BaseException as exc:  # not a coroutine function, or a bug: the attempt ends
            done(backend_bug(spec, exc))
            return

        running = _Running(loop, task, spec, control, done)
        control.on_cancel(running.cancel)
        task.add_done_callback(running.ended)

    def close(self) -> None:
        """Stop the loop (cancelling what is left) and wait for its thread."""
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5.0)
        if not self.thread.is_alive():  # submitted, but the loop stopped before it started
            self._end_waiting(RuntimeError("the engine's event loop closed before it started"))


class _Running:
    """One attempt's task, how to cancel it from any thread, and what to do when it ends.

    An object with slots rather than two closures: thousands are alive at
    once, and a closure's cells cost more.
    """

    __slots__ = ("_control", "_done", "_loop", "_spec", "_task")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        task: asyncio.Task[tuple[Any, BaseException | None]],
        spec: AttemptSpec,
        control: AttemptControl,
        done: Callable[[AttemptResult], None],
    ) -> None:
        self._loop = loop
        self._task = task
        self._spec = spec
        self._control = control
        self._done = done

    def cancel(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: nothing to cancel
            self._loop.call_soon_threadsafe(self._cancel_on_loop)

    def _cancel_on_loop(self) -> None:
        control = self._control
        if control.reason == "timeout" and control.stack is None and not self._task.done():
            control.stack = task_stack(self._task)
        self._task.cancel()

    def ended(self, task: asyncio.Task[tuple[Any, BaseException | None]]) -> None:
        result = _result_of(self._spec, self._control, task)
        control = self._control
        if control.log is not None or control.stack is not None:
            result = ended_with_stack(result, control)
        self._done(result)


def _result_of(
    spec: AttemptSpec, control: AttemptControl, task: asyncio.Task[tuple[Any, BaseException | None]]
) -> AttemptResult:
    """How an attempt's ended task ended, as a value."""
    try:
        value, raised = task.result()
    except asyncio.CancelledError as exc:
        if control.is_cancelled:
            error = stop_error(spec, control.reason, _CANCELLED_NOTE)
            error.__cause__ = exc
            return AttemptResult(kind="cancelled", error=error, note=_CANCELLED_NOTE)
        return AttemptResult(kind="error", error=exc, traceback=format_error(exc))
    if raised is not None:
        return AttemptResult(kind="error", error=raised, traceback=format_error(raised))
    try:
        outputs = check_outputs(spec.step_id, value)
    except TypeError as exc:
        return AttemptResult(kind="error", error=exc, traceback=format_error(exc))
    return AttemptResult(kind="ok", outputs=outputs)


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
