"""What every backend receives and returns for one attempt.

A backend turns an :class:`AttemptSpec` into an :class:`AttemptResult`, never
raising: whatever the step does (return, raise, hang, crash its process) comes
back as a value, so a step can never take down the Worker that ran it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from stepvisor.core.model import StepFn
from stepvisor.errors import StepCancelledError, StepError, StepTimeoutError

__all__ = ["AttemptResult", "AttemptSpec", "ResultKind", "stop_error"]

#: ``ok``: returned; ``error``: raised; ``crash``: its process died;
#: ``cancelled``: stopped by its backend on request; ``unsendable``: could not be
#: sent to or from a process.
ResultKind = Literal["ok", "error", "crash", "cancelled", "unsendable"]


class AttemptSpec(NamedTuple):
    """One attempt to run: the function, its inputs and its limits."""

    run_id: str
    step_id: str
    attempt: int
    max_attempts: int
    fn: StepFn
    is_async: bool
    inputs: Mapping[str, Any]
    params: Mapping[str, Any]
    #: ``time.monotonic()`` at which the attempt is stopped, or ``None``.
    deadline: float | None
    #: Seconds between SIGTERM and SIGKILL for process steps.
    kill_grace: float = 1.0
    #: Pre-pickled ``fn`` (process and Ray backends), made once per step.
    fn_payload: bytes | None = None
    resources: Mapping[str, float] | None = None


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """How an attempt ended, as a value."""

    kind: ResultKind
    outputs: Mapping[str, Any] | None = None
    error: BaseException | None = None
    traceback: str | None = None
    note: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


def stop_error(spec: AttemptSpec, reason: str | None, how: str) -> StepError:
    """The error of an attempt its backend stopped: ``how`` says by what means.

    ``reason`` is the :class:`~stepvisor.context.AttemptControl` reason:
    ``"timeout"`` gives a :class:`StepTimeoutError`, anything else a
    :class:`StepCancelledError`.  Shared by the process and Ray backends.
    """
    if reason == "timeout":
        return StepTimeoutError(
            f"step {spec.step_id!r} passed its deadline on attempt {spec.attempt}: {how}; "
            "raise its timeout, or make it finish sooner",
            step_id=spec.step_id,
            attempt=spec.attempt,
        )
    return StepCancelledError(
        f"step {spec.step_id!r} was cancelled on attempt {spec.attempt}: {how}",
        step_id=spec.step_id,
        attempt=spec.attempt,
    )
