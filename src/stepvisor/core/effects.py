"""What the run machine decides: effects, as values the actor shell carries out.

The machine never starts a thread, reads a clock, sets a timer or writes to a
store; it returns these, in the order they must happen, and the shell does
them (tenacity's ``Retrying.iter()`` returning ``DoAttempt``/``DoSleep`` is the
pattern).  A test can therefore drive a whole run by feeding messages and
reading effects, with no threads and no real time.

Slots are the machine's view of Workers: it decides how many there are, which
one runs what, and when one stuck with an abandoned attempt is replaced.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from stepvisor.core.attempt import AttemptSpec
from stepvisor.core.events import Event
from stepvisor.core.messages import Message
from stepvisor.core.result import RunResult
from stepvisor.core.state import RunStatus, StepRecord

__all__ = [
    "AbandonSlot",
    "AddSlot",
    "AttemptOrder",
    "BeginRun",
    "CancelTimer",
    "Dispatch",
    "Effect",
    "Emit",
    "Finish",
    "FinishRun",
    "LookUpCache",
    "PutInCache",
    "Reclaim",
    "ReleaseSlot",
    "RetireSlot",
    "SaveOutputs",
    "SaveStep",
    "SaveSteps",
    "SetTimer",
    "StopAttempt",
    "TimerKey",
]

#: ``("deadline" | "grace", step_id, attempt)``, ``("retry", step_id, attempt)`` or ``("run",)``.
TimerKey = tuple[Any, ...]


class AttemptOrder(NamedTuple):
    """One attempt to start: its spec, backend and time budget.

    ``budget`` is the seconds it may run from now (``None``: no deadline); the
    shell turns it into ``spec.deadline`` on the real monotonic clock, the one
    the step's own ``ctx.remaining()`` reads.
    """

    spec: AttemptSpec
    executor: str
    budget: float | None
    #: Nothing waits for this attempt's success (the step has no dependants): a
    #: Worker running it in a batch may hold its outcome briefly to report it
    #: with the next ones (``stepvisor.actors.worker.REPORT_WITHIN``).
    may_hold: bool = False


class AddSlot(NamedTuple):
    """Find a Worker for a new slot named ``slot``; say ``SlotReady`` once there is one."""

    slot: str


class ReleaseSlot(NamedTuple):
    """Give back the free slot ``slot``: the run has nothing ready to run on it."""

    slot: str


class AbandonSlot(NamedTuple):
    """Slot ``slot``'s attempt ignored its stop: stop counting its Worker (it runs on)."""

    slot: str


class RetireSlot(NamedTuple):
    """The abandoned slot ``slot`` has returned: its Worker may be stopped."""

    slot: str


class Dispatch(NamedTuple):
    """Hand these attempts to ``slot``, to run one after the other."""

    slot: str
    orders: tuple[AttemptOrder, ...]


class StopAttempt(NamedTuple):
    """Ask the backend to stop an attempt; ``reason`` is ``timeout`` or ``cancel``."""

    step_id: str
    attempt: int
    reason: str


class Reclaim(NamedTuple):
    """Take back up to ``wanted`` attempts queued on ``slot`` that have not started.

    A prefetched batch (see ``RunMachine._fill``) waits behind its running
    attempt; when another slot has nothing to do, the machine asks for the tail
    of that queue back so that one slow attempt holds back nothing behind it.
    The shell answers at once with ``Reclaimed``, naming the attempts it took
    (fewer, or none, when the Worker has started them or its backend holds them).
    """

    slot: str
    wanted: int


class SetTimer(NamedTuple):
    """Deliver ``message`` back to the machine ``delay`` seconds after it decided so.

    ``due`` is that moment on the machine's clock (the ``now`` it was given
    plus ``delay``): the shell sets the timer for what is left of it when it
    gets to the effect, so a busy shell, or a clock that moved meanwhile,
    never pushes a deadline or a grace period later.
    """

    key: TimerKey
    delay: float
    message: Message
    due: float


class CancelTimer(NamedTuple):
    """The timer set under ``key`` is no longer needed (it would be fenced anyway)."""

    key: TimerKey


class BeginRun(NamedTuple):
    """Record the run as running, with every step's record, in one transaction."""

    started: float
    records: tuple[StepRecord, ...]
    resumed: bool


class SaveStep(NamedTuple):
    """Write one step's record, with its outputs if it succeeded (one transaction)."""

    record: StepRecord
    outputs: Mapping[str, Any] | None = None


class SaveOutputs(NamedTuple):
    """Write a succeeded step's record with its outputs, then report ``OutputsSaved``."""

    record: StepRecord
    outputs: Mapping[str, Any]
    attempt: int


class SaveSteps(NamedTuple):
    """Write several records in one transaction (skips, leftovers at the end)."""

    records: tuple[StepRecord, ...]


class LookUpCache(NamedTuple):
    """Look the cached step ``step_id`` up in the store's cache; say ``CacheAnswer``.

    ``inputs`` is what the step would see (artifact name -> (rank of its
    maker, value)): the key covers their content.  The step holds no slot meanwhile.
    """

    step_id: str
    rank: int
    inputs: Mapping[str, tuple[int, Any]]
    #: For an instance of a mapped step: its index and its item (part of its key).
    at: int = -1
    item: Any = None


class PutInCache(NamedTuple):
    """The cached step ``step_id`` was computed and its outputs stored: keep them in the cache."""

    step_id: str
    rank: int
    outputs: Mapping[str, Any]


class FinishRun(NamedTuple):
    """Record the run's final status."""

    status: RunStatus
    ended: float
    error: str | None


class Emit(NamedTuple):
    """Give ``event`` to the caller's ``on_event`` hook."""

    event: Event


class Finish(NamedTuple):
    """The run is over: stop every Worker and hand ``result`` to the caller."""

    result: RunResult


Effect = (
    AbandonSlot
    | AddSlot
    | ReleaseSlot
    | RetireSlot
    | Dispatch
    | StopAttempt
    | Reclaim
    | SetTimer
    | CancelTimer
    | BeginRun
    | SaveStep
    | SaveOutputs
    | SaveSteps
    | FinishRun
    | LookUpCache
    | PutInCache
    | Emit
    | Finish
)
