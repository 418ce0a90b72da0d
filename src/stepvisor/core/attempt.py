"""The values the machine and the backends exchange: one attempt to run, and how it ended.

They belong to the core: the machine builds an :class:`AttemptSpec` when it
dispatches a step and takes an :class:`AttemptResult` in when the attempt ends;
a backend (:mod:`stepvisor.backends`) runs the one and returns the other.  So the
core imports nothing from the backends, and the backends import these from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

if TYPE_CHECKING:
    from stepvisor.core.model import StepFn

__all__ = ["AttemptResult", "AttemptSpec", "ResultKind"]

#: ``ok``: returned; ``error``: raised (or the backend failed: a stepvisor bug);
#: ``crash``: its process died; ``cancelled``: stopped on request, or by its
#: backend at its deadline (then ``error`` is a :class:`StepTimeoutError`);
#: ``unsendable``: could not be sent to or from a process.
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
    #: The W3C trace context of the attempt's span (``traceparent``, ...), when the
    #: run is traced: the backend attaches it around the step call.
    trace: Mapping[str, str] | None = None
    #: Process steps: the child that ran this many attempts is replaced after
    #: this one (``ProcessPoolExecutor``'s ``max_tasks_per_child``); ``None``: never.
    child_calls: int | None = None


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """How an attempt ended, as a value."""

    kind: ResultKind
    outputs: Mapping[str, Any] | None = None
    error: BaseException | None = None
    traceback: str | None = None
    note: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
