"""Messages between the Supervisor and its Workers: immutable values.

They are NamedTuples (immutable, and several times cheaper to build than frozen
dataclasses): a few are built for every step.

The Supervisor never waits on a Worker: it *tells* it to run an attempt, and
the Worker tells the outcome back.  Timers (deadlines, grace periods, backoff
delays, heartbeats) also arrive as messages, so all state changes happen on
the Supervisor's one thread, in the order the messages arrive.  What the run
machine is told is defined with it, in :mod:`stepvisor.core.messages`.
"""

from __future__ import annotations

import collections
from typing import Any, NamedTuple, Protocol

from stepvisor.backends.base import AttemptSpec
from stepvisor.context import AttemptControl
from stepvisor.core.messages import (
    AttemptDone,
    CancelRun,
    DeadlineReached,
    GraceExpired,
    RetryDue,
    RunDeadline,
    Start,
)

__all__ = [
    "AttemptDone",
    "CancelRun",
    "DeadlineReached",
    "GraceExpired",
    "Heartbeat",
    "ReplyTo",
    "RetryDue",
    "RunAttempt",
    "RunBatch",
    "RunDeadline",
    "SlotGranted",
    "Start",
    "Warm",
]


class ReplyTo(Protocol):
    """Where a run's attempt outcomes are sent: the Supervisor actor, or a loop host.

    ``tell`` may raise ``pykka.ActorDeadError`` once the receiver is gone; what
    it returns is ignored.
    """

    def tell(self, message: Any) -> object: ...


class RunAttempt(NamedTuple):
    """Supervisor -> Worker: run this attempt with this backend, in this slot of a run.

    ``reply_to`` is the run's Supervisor: the outcome goes there, as an
    :class:`AttemptDone` naming ``slot`` (the run's name for the Worker).
    """

    spec: AttemptSpec
    control: AttemptControl
    executor: str
    slot: str
    reply_to: ReplyTo
    #: A success may be held briefly and reported with the next outcomes of its
    #: batch (``AttemptOrder.may_hold``); anything else is reported at once.
    may_hold: bool = False


class SlotGranted(NamedTuple):
    """Pool -> a run's shell: the lease for a slot, which had to wait its turn."""

    slot: str
    lease: Any  # stepvisor.actors._pool.Lease (not imported: it imports the Worker)


class Warm(NamedTuple):
    """Supervisor -> Worker: open what you own for these executors (boot a process child)."""

    executors: tuple[str, ...]


class RunBatch(NamedTuple):
    """Supervisor -> Worker: run these attempts one after the other (tiny steps).

    A run's shell sends a deque it keeps too: it may take attempts back from
    its right end while the Worker takes them from its left (``Reclaim``).
    """

    attempts: tuple[RunAttempt, ...] | collections.deque[RunAttempt]


class Heartbeat(NamedTuple):
    """Periodic, shell-only: tell the store we are alive and look for cancel requests."""
