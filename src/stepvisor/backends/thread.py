"""Calling a step function and turning whatever happens into an AttemptResult.

Shared by every backend: the thread backend calls :func:`call_step` on the
Worker's thread, the process backend's child calls it in the child, the Ray
backend in a Ray worker.  It catches ``BaseException`` on purpose: a step that
raises ``SystemExit`` or ``KeyboardInterrupt`` must fail *the step*, never the
Worker or the Supervisor.
"""

from __future__ import annotations

import traceback
from collections.abc import Mapping
from typing import Any

from stepvisor.backends.base import AttemptResult, AttemptSpec
from stepvisor.context import AttemptControl, StepContext
from stepvisor.errors import StepCancelledError, StepTimeoutError

__all__ = ["call_step", "check_outputs", "format_error", "make_context"]


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


def check_outputs(step_id: str, value: object) -> Mapping[str, Any]:
    """A step returns a mapping of artifact name to value, or ``None``."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(
            f"step {step_id!r} returned {type(value).__name__}; a step must return a "
            "mapping of artifact name to value (a dict), or None"
        )
    for key in value:
        if not isinstance(key, str):
            raise TypeError(
                f"step {step_id!r} returned an artifact name {key!r} that is not a string"
            )
    return dict(value)


def format_error(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def call_step(spec: AttemptSpec, control: AttemptControl | None) -> AttemptResult:
    """Run a plain (non-async) step function here, on this thread."""
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
    return AttemptResult(kind="ok", outputs=outputs)
