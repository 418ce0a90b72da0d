"""The records a run state is made of: statuses, attempts, steps, and a map's instances.

These are the values a run's state holds per step (and per instance of a
mapped step), kept apart from :mod:`stepvisor.core.state`, which holds them
together and evolves them.  ``stepvisor.core.state`` re-exports the public ones.
"""

from __future__ import annotations

import enum
from typing import Any, Final, NamedTuple, NoReturn

__all__ = [
    "NO_MAPS",
    "TERMINAL",
    "AttemptRecord",
    "MapTable",
    "MapVec",
    "RunStatus",
    "StepRecord",
    "StepStatus",
    "instance_id",
    "new",
    "parse_instance_id",
    "pending_instance",
]


#: ``new(Record, values)`` is what a NamedTuple's generated ``__new__`` does
#: without its argument handling, at half the cost: for the few records built
#: once or twice per step on the Supervisor's hot path (every field given, in order).
new: Final = tuple.__new__


class StepStatus(enum.StrEnum):
    """Where a step is.  It ends in exactly one terminal status."""

    PENDING = "pending"
    RUNNING = "running"
    WAITING_RETRY = "waiting_retry"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"


TERMINAL: Final = frozenset(
    {
        StepStatus.SUCCEEDED,
        StepStatus.FAILED,
        StepStatus.TIMED_OUT,
        StepStatus.CANCELLED,
        StepStatus.SKIPPED,
    }
)


class RunStatus(enum.StrEnum):
    """Where a run is.  ``interrupted`` is only ever read from a store."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"


class AttemptRecord(NamedTuple):
    """One attempt of one step: when, how it ended, and what came next.

    (Records and the run state are NamedTuples rather than frozen dataclasses:
    equally immutable, and four times cheaper to build, which matters on the
    Supervisor's hot path where several are built per step.)

    ``outcome`` is ``None`` while the attempt runs, then one of
    ``succeeded``, ``failed``, ``timed_out``, ``cancelled``, ``crashed``.
    ``delay_after`` is the backoff chosen before the next attempt, if any.
    Times are wall-clock seconds (for people); ``duration`` is measured on the
    monotonic clock.
    """

    number: int
    started: float
    ended: float | None = None
    duration: float | None = None
    outcome: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    error_traceback: str | None = None
    delay_after: float | None = None
    worker: str | None = None
    note: str | None = None


class StepRecord(NamedTuple):
    """A step's status and every attempt it made."""

    step_id: str
    status: StepStatus = StepStatus.PENDING
    attempts: tuple[AttemptRecord, ...] = ()
    note: str | None = None
    #: True when the record was restored from a store on resume (not re-run).
    restored: bool = False
    #: The run whose stored result this step reused (its cache entry), or None.
    reused_from: str | None = None
    #: Why a cached step was reused or computed: ``reused from run 3f2a…``,
    #: ``computed: input rows changed``; None for a step that is not cached.
    cache_note: str | None = None

    @property
    def attempt_count(self) -> int:
        return len(self.attempts)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def last_attempt(self) -> AttemptRecord | None:
        return self.attempts[-1] if self.attempts else None

    # Built with new() rather than _replace(): these run once per step each on the
    # Supervisor's hot path.
    def with_attempt_started(self, attempt: AttemptRecord) -> StepRecord:
        return new(
            StepRecord,
            (
                self.step_id, StepStatus.RUNNING, (*self.attempts, attempt), self.note,
                self.restored, self.reused_from, self.cache_note,
            ),
        )  # fmt: skip

    def with_last_attempt(self, attempt: AttemptRecord, status: StepStatus) -> StepRecord:
        return new(
            StepRecord,
            (
                self.step_id, status, (*self.attempts[:-1], attempt), self.note, self.restored,
                self.reused_from, self.cache_note,
            ),
        )  # fmt: skip

    def with_status(self, status: StepStatus, note: str | None) -> StepRecord:
        return StepRecord(
            self.step_id, status, self.attempts, note, self.restored, self.reused_from,
            self.cache_note,
        )  # fmt: skip


#: A finished step's record with its one attempt, as the run state keeps it:
#: ``(step_id, status, note, restored, reused_from, cache_note, *attempt)``, a
#: plain tuple whose status is the status's text.  One object where a
#: :class:`StepRecord` is three (the record, its attempts tuple, the attempt),
#: and one the cyclic GC lets go of:
#: a tuple of exact type holding only strings, numbers and ``None`` is
#: untracked at the first collection it meets, so it never reaches the old
#: generation.  Finished records are what a big run's heap is made of, and the
#: GC runs a full pass over the whole heap each time the old generation grows
#: by a quarter: a run of a million steps made eight (a fifth of its time),
#: and a map, whose instances' pending records are empty slots, made them
#: again as its finished instances piled up.  A plain tuple (a ``StepRecord``
#: is a subclass) is how a read tells it from a record; it never leaves this
#: module: reads rebuild the record (:func:`_unkept`).
_STATUS: Final = {status.value: status for status in StepStatus}
#: A status's text by status: a dict lookup, where ``.value`` is a descriptor call.
_TEXT: Final = {status: status.value for status in StepStatus}
_PENDING: Final = StepStatus.PENDING


def _kept(record: StepRecord) -> Any:
    """``record`` as the table keeps it: a settled plain tuple when that is possible."""
    attempts = record[2]
    if record[1] in TERMINAL and len(attempts) == 1:
        return (
            record[0],
            _TEXT[record[1]],
            record[3],
            record[4],
            record[5],
            record[6],
            *attempts[0],
        )
    return record


def _unkept(value: Any) -> StepRecord:
    """The :class:`StepRecord` the table keeps as ``value``."""
    if type(value) is not tuple:
        record: StepRecord = value
        return record
    attempt = new(AttemptRecord, value[6:])
    return new(
        StepRecord,
        (value[0], _STATUS[value[1]], (attempt,), value[2], value[3], value[4], value[5]),
    )


def instance_id(step_id: str, index: int) -> str:
    """The id of instance ``index`` of the mapped step ``step_id``: ``"score[7]"``."""
    return f"{step_id}[{index}]"


def parse_instance_id(sid: str) -> tuple[str, int] | None:
    """``("score", 7)`` for ``"score[7]"``; ``None`` for an id of no instance's shape."""
    if not sid.endswith("]"):
        return None
    head, sep, tail = sid[:-1].rpartition("[")
    if not sep or not tail.isdigit() or (len(tail) > 1 and tail[0] == "0"):
        return None
    return head, int(tail)


class MapVec(NamedTuple):
    """Where the instances of one mapped step are kept: ``size`` entries from ``base``.

    A mapped step stays one node of the graph; its instances are entries of the
    run state's own tables of records and outputs, past the steps' (see
    :class:`~stepvisor.core.state.RunState`), so that an instance's transition
    writes one entry, as a step's does.  An instance not yet dispatched is
    ``None`` there (a pending record is made when read), so a map of a million
    items costs a million pointers until its instances run.
    """

    step_id: str
    base: int
    size: int


def pending_instance(step_id: str, index: int) -> StepRecord:
    """The record of an instance never dispatched (kept as ``None``)."""
    return new(StepRecord, (instance_id(step_id, index), _PENDING, (), None, False, None, None))


class MapTable(dict[int, MapVec]):
    """Where each expanded mapped step keeps its instances, by rank: an immutable mapping.

    A ``dict`` whose changing methods refuse, rather than a persistent map: a run
    has a few mapped steps and expands each once, while every transition of an
    instance looks its step up here, and a ``dict`` lookup is a C call (a
    ``PMap``'s, or a ``Mapping`` written in Python, cost a tenth of a dispatch).
    """

    __slots__ = ()

    def set(self, rank: int, vec: MapVec) -> MapTable:
        """This table with ``vec`` as the instances of the step at ``rank``."""
        return MapTable(sorted({**self, rank: vec}.items()))

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(self.items()))

    def _refuse(self, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError("a MapTable is immutable: use .set(rank, vec) for a new one")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _refuse
    __ior__ = _refuse


NO_MAPS: Final = MapTable()
