"""Running ``execute_fn(step)`` on the caller's event loop from a Worker thread.

Why: ``execute_fn`` was written for the caller's loop: it may use what
belongs to that loop (an ``aiohttp`` session, an ``asyncio.Lock``, a queue)
and reads the caller's context variables.  So each step's Worker thread
schedules the call as a task on that loop and waits for it; on a deadline
or a cancel it cancels the task and waits until the task has really ended,
so a retry never overlaps it.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, ClassVar, Final

import stepvisor as sv
from stepvisor.backends._wire import check_outputs
from stepvisor.backends.base import AttemptResult, AttemptSpec, format_error, stop_error
from stepvisor.backends.thread import call_step
from stepvisor.compat._tracker import Slot
from stepvisor.context import AttemptControl

#: How often a Worker thread waiting for ``execute_fn`` checks that the caller's
#: loop is still open (cancellation itself arrives through ``ctx.on_cancel``).
_POLL_SECONDS: Final = 0.02


class _LoopCall:
    """One call of ``execute_fn`` as a task on an event loop; ``on_end(call)`` once it ended.

    Started and cancelled from the loop's own thread (the run hosted there)
    it acts at once; from another thread (a Worker waiting for it) it goes
    through ``call_soon_threadsafe``.
    """

    __slots__ = ("_ended", "_error", "_loop", "_on_end", "_task", "_value")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, *, on_end: Callable[[_LoopCall], None]
    ) -> None:
        self._loop = loop
        self._on_end = on_end
        self._task: asyncio.Task[Any] | None = None
        self._value: Any = None
        self._error: BaseException | None = None
        self._ended = False

    def start(self, make: Callable[[], object], context: contextvars.Context) -> None:
        if asyncio._get_running_loop() is self._loop:
            self._start(make, context)
            return
        try:
            self._loop.call_soon_threadsafe(self._start, make, context)
        except RuntimeError as exc:
            raise RuntimeError(
                "the event loop that called execute_parallel is closed, so execute_fn cannot "
                "run; await execute_parallel until it returns instead of leaving it behind"
            ) from exc

    def cancel(self) -> None:
        """Cancel the task (it runs its cleanup on the caller's loop)."""
        if asyncio._get_running_loop() is self._loop:
            self._cancel()
            return
        try:
            self._loop.call_soon_threadsafe(self._cancel)
        except RuntimeError:  # the loop is closed: the task cannot run any more
            self._end()

    def outcome(self) -> Any:
        """The task's value, or raise its exception."""
        if self._error is not None:
            raise self._error
        return self._value

    # -- on the caller's loop ----------------------------------------------------------

    def _start(self, make: Callable[[], object], context: contextvars.Context) -> None:
        own = context.copy()  # like create_task from the caller: a copy per step
        try:
            coro = _as_coroutine(own.run(make))
            self._task = self._loop.create_task(coro, context=own)
        except BaseException as exc:
            self._error = exc
            self._end()
            return
        self._task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            self._error = asyncio.CancelledError(
                "execute_fn's task was cancelled by something other than stepvisor"
            )
        else:
            self._error = task.exception()
            if self._error is None:
                self._value = task.result()
        self._end()

    def _end(self) -> None:
        if not self._ended:  # once: a cancel on a closed loop may follow the real end
            self._ended = True
            self._on_end(self)

    def _cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()


class _Waited:
    """What a Worker thread waits on for a :class:`_LoopCall` to end."""

    __slots__ = ("done", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.done = threading.Event()

    def ended(self, _call: _LoopCall) -> None:
        self.done.set()

    def wait(self) -> None:
        """Wait for the task to end, or for its loop to close under it."""
        while not self.done.wait(_POLL_SECONDS):
            if self.loop.is_closed():
                return


def _as_coroutine(value: object) -> Coroutine[Any, Any, Any]:
    """What ``execute_fn(step)`` returned, as a coroutine a task can run."""
    if asyncio.iscoroutine(value):
        return value
    if isinstance(value, Awaitable):
        return _await(value)
    raise TypeError(
        f"execute_fn returned {type(value).__name__}, not an awaitable; "
        "execute_fn must be an async function (async def) returning the artifacts"
    )


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


class OnCallerLoop:
    """A thread step function that runs ``execute_fn(step)`` on the caller's loop.

    It waits on its Worker thread; on a deadline or a cancel it cancels the
    task, waits until the task has really ended (so a retry never overlaps
    it), then raises the engine's timeout or cancel error.
    """

    def __init__(
        self,
        slot: Slot,
        execute_fn: Callable[[Any], object],
        *,
        loop: asyncio.AbstractEventLoop,
        context: contextvars.Context,
    ) -> None:
        self._slot = slot
        self._execute_fn = execute_fn
        self._loop = loop
        self._context = context

    def submit(
        self, spec: AttemptSpec, control: AttemptControl, done: Callable[[AttemptResult], None]
    ) -> None:
        """Start ``execute_fn(step)`` as a task on the caller's loop; ``done(result)`` at its end.

        Called on the engine's Supervisor thread; ``done`` is called on the
        caller's loop once the task has really ended (a cancel or deadline
        cancels it first), exactly once.
        """
        step, loop, slot = self._slot.step, self._loop, self._slot

        def finished(call: _LoopCall) -> None:
            if control.is_cancelled and call._error is not None:
                error = stop_error(spec, control.reason, "execute_fn's task was cancelled")
                error.__cause__ = call._error
                done(AttemptResult(kind="cancelled", error=error))
                return
            if call._error is not None:
                exc = call._error
                done(AttemptResult(kind="error", error=exc, traceback=format_error(exc)))
                return
            try:
                outputs = check_outputs(spec.step_id, call._value)
            except TypeError as exc:
                done(AttemptResult(kind="error", error=exc, traceback=format_error(exc)))
                return
            if outputs is not None:
                slot.artifacts = dict(outputs)
            done(AttemptResult(kind="ok", outputs=outputs))

        call = _LoopCall(loop, on_end=finished)
        try:
            call.start(lambda: self._execute_fn(step), self._context)
        except RuntimeError as exc:  # the caller's loop is closed
            done(AttemptResult(kind="error", error=exc, traceback=format_error(exc)))
            return
        control.on_cancel(call.cancel)

    def __call__(self, ctx: sv.StepContext) -> Any:
        step = self._slot.step
        waited = _Waited(self._loop)
        call = _LoopCall(self._loop, on_end=waited.ended)
        call.start(lambda: self._execute_fn(step), self._context)
        # A deadline or cancel cancels the task on the caller's loop at once; the
        # step then waits until the task has really ended, so a retry never overlaps it.
        ctx.on_cancel(call.cancel)
        waited.wait()
        if ctx.cancelled and call._error is not None:
            ctx.raise_if_cancelled()  # the task was stopped: say why, not CancelledError
        value = call.outcome()
        if isinstance(value, Mapping):
            self._slot.artifacts = dict(value)
        return value


class CallerLoopBackend:
    """The facade's thread backend: it starts ``execute_fn``'s task on the caller's loop.

    A :class:`~stepvisor.backends.base.Backend` that also takes an attempt
    without a thread waiting for it (``submit``): the engine's Supervisor
    schedules the task straight onto the caller's loop and is told when it
    ends, so a call of ``execute_parallel`` costs no Worker thread hand-offs.
    ``run`` (one blocking attempt) remains for callers that have a thread.
    """

    sends_ahead: ClassVar[bool] = False

    def run(
        self, spec: AttemptSpec, control: AttemptControl, ahead: object = None
    ) -> AttemptResult:
        return call_step(spec, control)

    def submit(
        self, spec: AttemptSpec, control: AttemptControl, done: Callable[[AttemptResult], None]
    ) -> None:
        fn = spec.fn
        if not isinstance(fn, OnCallerLoop):  # not a facade step: run it here
            done(call_step(spec, control))
            return
        fn.submit(spec, control, done)

    def close(self) -> None:
        """Nothing to release: the caller owns its loop."""
