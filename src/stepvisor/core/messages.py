"""What the run machine is told: immutable values, one per thing that happened.

The actor shell turns everything that happens to a run into one of these and
hands it to :meth:`~stepvisor.core.machine.RunMachine.handle`, with the time:
an attempt's outcome from a Worker, a timer that fired, a cancel from the
caller or the store, the result of writing a step's outputs.  They are
NamedTuples (cheap to build: a few are built for every step).

Timer messages carry the ``(step_id, attempt)`` they were set for, so the
machine can *fence* them: a timer or outcome of an attempt that already ended
changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from stepvisor.core.attempt import AttemptResult
from stepvisor.errors import ArtifactCodecError

__all__ = [
    "AttemptDone",
    "AttemptsDone",
    "CacheAnswer",
    "CancelRun",
    "DeadlineReached",
    "GraceExpired",
    "Message",
    "OutputsSaved",
    "Reclaimed",
    "RetryDue",
    "RunDeadline",
    "SlotReady",
    "Start",
]


class Start(NamedTuple):
    """Begin the run."""


class AttemptDone(NamedTuple):
    """Worker -> Supervisor: how an attempt ended, fenced by ``(step_id, attempt)``."""

    step_id: str
    attempt: int
    worker: str
    result: AttemptResult
    started_wall: float
    ended_wall: float
    duration: float
    #: The run the attempt belongs to: one engine's Workers serve many runs.
    run_id: str = ""


class AttemptsDone(NamedTuple):
    """Worker -> Supervisor: the outcomes of several attempts of one run, in the order run.

    A Worker given a batch of tiny attempts (prefetch) reports them together
    rather than one message each: a message costs the Supervisor more than
    settling a no-op attempt.  It holds only successes of steps nothing depends
    on, and only until about ``REPORT_WITHIN`` has passed (see
    :mod:`stepvisor.actors.worker`), so no other step waits for them.  The
    machine settles each in turn, exactly as if they had come one by one; only
    the dispatch that follows is decided once.
    """

    outcomes: tuple[AttemptDone, ...]
    run_id: str = ""


class OutputsSaved(NamedTuple):
    """The shell wrote a succeeded step's outputs, or the store refused them.

    A store may be unable to encode a value (the JSON codec and an object it
    cannot represent): that is learnt only by writing, so a success becomes
    final only once the write is reported.
    """

    step_id: str
    attempt: int
    error: ArtifactCodecError | None = None


class CacheAnswer(NamedTuple):
    """What the cache holds for a step looked up (``LookUpCache``).

    ``outputs`` is the stored result to reuse, or ``None``: compute the step.
    ``note`` says which (``reused from run …``, ``computed: input rows changed``);
    ``storable``: a computed result may enter the cache (its key could be made).
    """

    step_id: str
    outputs: Mapping[str, Any] | None
    reused_from: str | None
    note: str
    storable: bool = True


class SlotReady(NamedTuple):
    """The shell has a Worker for a slot the machine asked for (``AddSlot``)."""

    slot: str


class Reclaimed(NamedTuple):
    """The shell's answer to ``Reclaim``: the attempts taken back from ``slot``, unstarted.

    Each is ``(step_id, attempt)``.  None of them ran or will run on that slot:
    the machine counts none of them as an attempt and queues them again.
    """

    slot: str
    attempts: tuple[tuple[str, int], ...]


class DeadlineReached(NamedTuple):
    """An attempt's deadline (its own timeout, or the run's deadline) is due."""

    step_id: str
    attempt: int


class GraceExpired(NamedTuple):
    """The grace period after a stop request ran out; abandon if still running."""

    step_id: str
    attempt: int
    #: Where the attempt was when its deadline stopped it, added by the shell (its
    #: backend took it): the abandoned attempt's error text shows it.
    stack: str | None = None


class RetryDue(NamedTuple):
    """The backoff before a step's next attempt is over."""

    step_id: str
    attempt: int


class RunDeadline(NamedTuple):
    """The run's own deadline passed."""


class CancelRun(NamedTuple):
    """Cancel the run: by its caller (``reason``), or through the store."""

    reason: str
    through_store: bool = False


Message = (
    Start
    | AttemptDone
    | AttemptsDone
    | OutputsSaved
    | CacheAnswer
    | SlotReady
    | Reclaimed
    | DeadlineReached
    | GraceExpired
    | RetryDue
    | RunDeadline
    | CancelRun
)
