"""Messages between the Supervisor and its Workers: immutable values.

They are NamedTuples (immutable, and several times cheaper to build than frozen
dataclasses): a few are built for every step.

The Supervisor never waits on a Worker: it *tells* it to run an attempt, and
the Worker tells the outcome back.  Timers (deadlines, grace periods, backoff
delays, heartbeats) also arrive as messages, so all state changes happen on
the Supervisor's one thread, in the order the messages arrive.
"""

from __future__ import annotations

from typing import NamedTuple

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


class Start(NamedTuple):
    """Begin the run."""


class RunAttempt(NamedTuple):
    """Supervisor -> Worker: run this attempt with this backend."""

    spec: AttemptSpec
    control: AttemptControl
    executor: str


class RunBatch(NamedTuple):
    """Supervisor -> Worker: run these attempts one after the other (tiny steps)."""

    attempts: tuple[RunAttempt, ...]


class AttemptDone(NamedTuple):
    """Worker -> Supervisor: how an attempt ended, fenced by ``(step_id, attempt)``."""

    step_id: str
    attempt: int
    worker: str
    result: AttemptResult
    started_wall: float
    ended_wall: float
    duration: float


class DeadlineReached(NamedTuple):
    step_id: str
    attempt: int


class GraceExpired(NamedTuple):
    """The grace period after a cancel request ran out; abandon if still running."""

    step_id: str
    attempt: int


class RetryDue(NamedTuple):
    step_id: str
    attempt: int


class RunDeadline(NamedTuple):
    """The run's own deadline passed."""


class CancelRun(NamedTuple):
    reason: str


class Heartbeat(NamedTuple):
    """Periodic: tell the store we are alive and look for cancel requests."""
