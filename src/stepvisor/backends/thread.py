"""The thread backend: a step runs on the thread of the Worker that runs it.

:func:`call_step` calls a plain (non-async) step function and turns whatever
happens into an :class:`AttemptResult`.  It catches ``BaseException`` on
purpose: a step that raises ``SystemExit`` or ``KeyboardInterrupt`` must fail
*the step*, never the Worker or the Supervisor.  A Ray task calls it too.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from typing import ClassVar, Final

from stepvisor.backends._capture import CURRENT
from stepvisor.backends._stacks import HEADER, grab_thread_stack, with_stack
from stepvisor.backends._wire import check_outputs, trace_context
from stepvisor.backends.base import Following, format_error
from stepvisor.context import AttemptControl, StepContext
from stepvisor.core.attempt import AttemptResult, AttemptSpec
from stepvisor.errors import StepCancelledError, StepTimeoutError

__all__ = ["ThreadBackend", "call_step", "check_outputs", "format_error", "make_context"]


def make_context(spec: AttemptSpec, control: AttemptControl | None) -> StepContext:
    return StepContext(
        run_id=spec.run_id,
        step_id=spec.step_id,
        attempt=spec.attempt,
        max_attempts=spec.max_attempts,
        inputs=spec.inputs,
        params=spec.params,
        deadline=spec.deadline,
        control=control,
    )


def call_step(spec: AttemptSpec, control: AttemptControl | None) -> AttemptResult:
    """Run a plain (non-async) step function here, on this thread.

    A traced attempt runs with its span's context attached, so that spans the
    step creates nest under it.  With a deadline, a canceller keeps the
    thread's stack if the deadline stops it; with capture, what the step
    writes goes to ``control.log`` (by context: see ``_capture``).
    """
    if control is None or (control.capture is None and spec.deadline is None):
        if spec.trace is None:
            return _call_step(spec, control)
        with trace_context(spec.trace):
            return _call_step(spec, control)
    return _call_watched(spec, control)


def _call_watched(spec: AttemptSpec, control: AttemptControl) -> AttemptResult:
    if spec.deadline is not None:
        control.before_stop = functools.partial(grab_thread_stack, control, threading.get_ident())
    token = None
    if control.capture is not None:
        token = CURRENT.set((control, spec.step_id, spec.attempt))
    try:
        if spec.trace is None:
            result = _call_step(spec, control)
        else:
            with trace_context(spec.trace):
                result = _call_step(spec, control)
    finally:
        if token is not None:
            CURRENT.reset(token)
    if control.log is None and control.stack is None:
        return result  # wrote nothing, not stopped at its deadline: nothing to add
    return ended_with_stack(result, control)


def ended_with_stack(result: AttemptResult, control: AttemptControl) -> AttemptResult:
    """Close the attempt's log; a stack taken at the deadline joins it and the error text."""
    stack = control.stack
    log = control.log
    if log is not None:
        if stack:
            log.note(HEADER + stack)
        log.finish()
    if not stack:
        return result
    return dataclasses.replace(result, traceback=with_stack(result.traceback, stack))


def _call_step(spec: AttemptSpec, control: AttemptControl | None) -> AttemptResult:
    ctx = make_context(spec, control)
    try:
        outputs = check_outputs(spec.step_id, spec.fn(ctx))
    except (StepCancelledError, StepTimeoutError) as exc:
        if control is not None and control.is_cancelled:
            return AttemptResult(
                kind="cancelled",
                error=exc,
                traceback=format_error(exc),
                note="it stopped when told to through its context",
            )
        return AttemptResult(kind="error", error=exc, traceback=format_error(exc))
    except BaseException as exc:  # the step must never take down its Worker
        return AttemptResult(kind="error", error=exc, traceback=format_error(exc))
    if outputs is None:
        return RETURNED_NOTHING
    return AttemptResult(kind="ok", outputs=outputs)


#: The result of every step that returned nothing: one frozen value, not one per
#: attempt (a frozen dataclass costs about 0.7 µs to build on the Worker's thread).
RETURNED_NOTHING: Final = AttemptResult(kind="ok")


class ThreadBackend:
    """Runs each attempt on the calling Worker's thread; holds nothing, shared by a run.

    A deadline or cancel reaches the step only through its context: Python
    cannot stop a thread from outside, so the engine abandons (and replaces) a
    Worker whose step ignores it.
    """

    sends_ahead: ClassVar[bool] = False

    def run(
        self, spec: AttemptSpec, control: AttemptControl, ahead: Following | None = None
    ) -> AttemptResult:
        del ahead
        return call_step(spec, control)

    def close(self) -> None:
        """Nothing to release."""
