"""Small pure pieces the run machine is built from: records, errors, merged inputs.

Kept apart from :mod:`stepvisor.core.machine` so that module reads as the
decisions alone.  Nothing here has state.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Mapping
from typing import Any

from stepvisor.core.state import AttemptRecord
from stepvisor.errors import StepCancelledError, StepTimeoutError

__all__ = [
    "DISCARDED_AFTER_STOP",
    "NOT_RETRIED_STOPPING",
    "STOP_WORDS",
    "abandoned_what",
    "add_note",
    "cancelled_error",
    "closed",
    "stop_outcome",
    "timeout_error",
    "traceback_text",
    "type_name",
]

#: The note on an attempt whose failure the policy might have retried, had the
#: run not been stopping (fail-fast, cancel or run deadline) when it ended.
NOT_RETRIED_STOPPING = "not retried: the run is stopping"
#: The note on an attempt that returned normally after it was asked to stop:
#: it ends as the stop says and what it returned is thrown away, so a resumed
#: run runs the step again rather than trust work that may be unfinished.
DISCARDED_AFTER_STOP = "discarded: it returned after it was asked to stop"

#: How each backend stops an attempt, for error messages.
STOP_WORDS = {
    "thread": "it stopped when told to through its context",
    "async": "its task was cancelled",
    "process": "its process group was killed",
    "ray": "its Ray task was force-cancelled",
}


def closed(
    attempt: AttemptRecord,
    *,
    started: float | None = None,
    ended: float,
    duration: float,
    outcome: str,
    error_type: str | None = None,
    error_message: str | None = None,
    error_traceback: str | None = None,
    delay_after: float | None = None,
    note: str | None = None,
) -> AttemptRecord:
    """The attempt, ended.  (A direct constructor: this is on the hot path.)"""
    return AttemptRecord(
        attempt.number,
        attempt.started if started is None else started,
        ended,
        duration,
        outcome,
        error_type,
        error_message,
        error_traceback,
        delay_after,
        attempt.worker,
        note,
    )


def type_name(exc: BaseException) -> str:
    """The name a record gives an error's type: qualified unless builtin or local."""
    cls = type(exc)
    if cls.__module__ in ("builtins", "__main__"):
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def traceback_text(exc: BaseException) -> str | None:
    """The remote traceback a backend attached, else this process's, else None."""
    remote = getattr(exc, "remote_traceback", None)
    if isinstance(remote, str) and remote:
        return remote
    if exc.__traceback__ is None:
        return None
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def add_note(exc: BaseException, note: str) -> None:
    """Add ``note`` to ``exc`` once (errors are shared between attempts' records)."""
    notes = getattr(exc, "__notes__", None)
    if notes is not None and note in notes:
        return
    with contextlib.suppress(AttributeError, TypeError):
        exc.add_note(note)


def timeout_error(
    step_id: str,
    attempt: int,
    max_attempts: int,
    *,
    limit: float | None,
    run_deadline: bool,
    what: str,
) -> StepTimeoutError:
    """The error of an attempt stopped by its deadline: which limit, and how it ended."""
    shown = f"{limit:g}" if limit is not None else "?"
    which = f"the run's {shown} s deadline" if run_deadline else f"its {shown} s timeout"
    return StepTimeoutError(
        f"step {step_id!r} exceeded {which} on attempt {attempt} of {max_attempts}; {what}",
        step_id=step_id,
        attempt=attempt,
    )


def cancelled_error(
    step_id: str, attempt: int, what: str, *, why: str | None = None
) -> StepCancelledError:
    """The error of an attempt stopped by a cancel or a fail-fast stop (``why``)."""
    because = f" ({why})" if why else ""
    return StepCancelledError(
        f"step {step_id!r} was cancelled on attempt {attempt}{because}; {what}",
        step_id=step_id,
        attempt=attempt,
    )


def stop_outcome(
    reason: str,
    executor: str,
    note: str | None,
    outputs: Mapping[str, Any] | None,
    discarded: bool,
) -> str:
    """How an attempt asked to stop ended, in words, for its error message."""
    if not discarded:
        return note or STOP_WORDS.get(executor, "it was stopped")
    count = len(outputs or {})
    after = "its deadline" if reason == "timeout" else "it was asked to stop"
    return f"it returned after {after}; the result was discarded ({count} artifacts)"


def abandoned_what(executor: str, grace: float) -> str:
    """Why an attempt was abandoned, for its error message."""
    if executor == "thread":
        return (
            f"its thread did not stop within the {grace:g} s grace period and was abandoned "
            "(it runs on as a daemon thread; not retried, so it cannot overlap a retry)"
        )
    return f"its {executor} worker did not stop within {grace:g} s and was abandoned"
