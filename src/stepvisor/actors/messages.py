"""Messages between the Supervisor and its Workers: immutable values.

The Supervisor never waits on a Worker: it *tells* it to run an attempt, and
the Worker tells the outcome back.  Timers (deadlines, grace periods, backoff
delays, heartbeats) also arrive as messages, so all state changes happen on
the Supervisor's one thread, in the order the messages arrive.
"""

from __future__ import annotations

from dataclasses import dataclass

from stepvisor.backends.base import AttemptResult, AttemptSpec
from stepvisor.context import AttemptControl

__all__ = [
    "AttemptDone",
    "CancelRun",
    "DeadlineReached",
    "GraceExpired",
    "Heartbeat",
    "RetryDue",
    "RunAttempt",
    "RunBatch",
    "RunDeadline",
    "Start",
]


@dataclass(frozen=True, slots=True)
class Start:
    """Begin the run."""


@dataclass(frozen=True, slots=True)
class RunAttempt:
    """Supervisor -> Worker: run this attempt with this backend."""

    spec: AttemptSpec
    control: AttemptControl
    executor: str


@dataclass(frozen=True, slots=True)
class RunBatch:
    """Supervisor -> Worker: run these attempts one after the other (tiny steps)."""

    attempts: tuple[RunAttempt, ...]


@dataclass(frozen=True, slots=True)
class AttemptDone:
    """Worker -> Supervisor: how an attempt ended, fenced by ``(step_id, attempt)``."""

    step_id: str
    attempt: int
    worker: str
    result: AttemptResult
    started_wall: float
    ended_wall: float
    duration: float


@dataclass(frozen=True, slots=True)
class DeadlineReached:
    step_id: str
    attempt: int


@dataclass(frozen=True, slots=True)
class GraceExpired:
    """The grace period after a cancel request ran out; abandon if still running."""

    step_id: str
    attempt: int


@dataclass(frozen=True, slots=True)
class RetryDue:
    step_id: str
    attempt: int


@dataclass(frozen=True, slots=True)
class RunDeadline:
    """The run's own deadline passed."""


@dataclass(frozen=True, slots=True)
class CancelRun:
    reason: str


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Periodic: tell the store we are alive and look for cancel requests."""
