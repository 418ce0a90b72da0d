"""The records a run state is made of: statuses, attempts, steps, and a map's instances.

These are the values a run's state holds per step (and per instance of a
mapped step), kept apart from :mod:`stepvisor.core.state`, which holds them
together and evolves them.  ``stepvisor.core.state`` re-exports the public ones.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from typing import Any, Final, NamedTuple

from pyrsistent import pmap
from pyrsistent.typing import PMap

from stepvisor.core._table import Table, table_get, table_of, table_set, table_values

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
    "new_map",
    "parse_instance_id",
]

_EMPTY_MAP: PMap[str, Any] = pmap()

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
            (self.step_id, StepStatus.RUNNING, (*self.attempts, attempt), self.note, self.restored),
        )

    def with_last_attempt(self, attempt: AttemptRecord, status: StepStatus) -> StepRecord:
        return new(
            StepRecord,
            (self.step_id, status, (*self.attempts[:-1], attempt), self.note, self.restored),
        )

    def with_status(self, status: StepStatus, note: str | None) -> StepRecord:
        return StepRecord(self.step_id, status, self.attempts, note, self.restored)


#: A finished step's record with its one attempt, as the run state keeps it:
#: ``(step_id, status, note, restored, *attempt)``, a plain tuple whose status
#: is the status's text.  One object where a :class:`StepRecord` is three (the
#: record, its attempts tuple, the attempt), and one the cyclic GC lets go of:
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


def _kept(record: StepRecord) -> Any:
    """``record`` as the table keeps it: a settled plain tuple when that is possible."""
    attempts = record[2]
    if record[1] in TERMINAL and len(attempts) == 1:
        return (record[0], record[1].value, record[3], record[4], *attempts[0])
    return record


def _unkept(value: Any) -> StepRecord:
    """The :class:`StepRecord` the table keeps as ``value``."""
    if type(value) is not tuple:
        record: StepRecord = value
        return record
    attempt = new(AttemptRecord, value[4:])
    return new(StepRecord, (value[0], _STATUS[value[1]], (attempt,), value[2], value[3]))


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
    """The instances of one mapped step: a record and outputs per index.

    A mapped step stays one node of the graph; its instances are entries of
    these two tables, not steps.  An instance not yet dispatched is ``None`` in
    ``records`` (a pending record is made when read), so a map of a million
    items costs a million pointers until its instances run.
    """

    step_id: str
    records: Table
    outputs: Table  # PMap of an instance's non-empty outputs, else None
    size: int

    def record(self, index: int) -> StepRecord:
        kept = table_get(self.records, index)
        if kept is None:
            return StepRecord(instance_id(self.step_id, index))
        return _unkept(kept)

    def kept(self, index: int) -> Any:
        """The value the table keeps for ``index``: ``None`` while it was never dispatched."""
        return table_get(self.records, index)

    def records_in_order(self) -> Iterator[StepRecord]:
        sid = self.step_id
        for i, kept in enumerate(table_values(self.records)):
            yield StepRecord(instance_id(sid, i)) if kept is None else _unkept(kept)

    def output(self, index: int) -> PMap[str, Any]:
        produced: PMap[str, Any] | None = table_get(self.outputs, index)
        return produced or _EMPTY_MAP

    # Built with new() rather than _replace(): twice per instance on the hot path.
    def with_record(self, index: int, record: StepRecord) -> MapVec:
        records = table_set(self.records, index, _kept(record))
        return new(MapVec, (self.step_id, records, self.outputs, self.size))

    def with_success(self, index: int, record: StepRecord, outputs: Mapping[str, Any]) -> MapVec:
        records = table_set(self.records, index, _kept(record))
        produced = table_set(self.outputs, index, pmap(outputs)) if outputs else self.outputs
        return new(MapVec, (self.step_id, records, produced, self.size))


class MapTable(Mapping[int, MapVec]):
    """The instances of a run's mapped steps, by rank: a small immutable mapping.

    Two tuples rather than a persistent map: a run has a few mapped steps, and
    every transition of an instance replaces its step's vector, so this is
    on the hot path of a map, where ``PMap.set`` (Python code, an evolver per
    call) cost more than the rest of the transition.
    """

    __slots__ = ("_ranks", "_vecs")

    def __init__(self, ranks: tuple[int, ...] = (), vecs: tuple[MapVec, ...] = ()) -> None:
        self._ranks = ranks  # sorted
        self._vecs = vecs

    def __getitem__(self, rank: int) -> MapVec:
        try:
            return self._vecs[self._ranks.index(rank)]
        except ValueError:
            raise KeyError(rank) from None

    def get(self, rank: int, default: Any = None) -> Any:
        ranks = self._ranks
        return self._vecs[ranks.index(rank)] if rank in ranks else default

    def __contains__(self, rank: object) -> bool:
        return rank in self._ranks

    def __iter__(self) -> Iterator[int]:
        return iter(self._ranks)

    def __len__(self) -> int:
        return len(self._ranks)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, MapTable):
            return self._ranks == other._ranks and self._vecs == other._vecs
        return super().__eq__(other)

    def __hash__(self) -> int:
        return hash((self._ranks, self._vecs))

    def __repr__(self) -> str:
        return f"MapTable({dict(zip(self._ranks, self._vecs, strict=True))!r})"

    def set(self, rank: int, vec: MapVec) -> MapTable:
        """This table with ``vec`` as the instances of the step at ``rank``."""
        ranks, vecs = self._ranks, self._vecs
        if rank in ranks:
            k = ranks.index(rank)
            return MapTable(ranks, (*vecs[:k], vec, *vecs[k + 1 :]))
        k = sum(1 for r in ranks if r < rank)
        return MapTable((*ranks[:k], rank, *ranks[k:]), (*vecs[:k], vec, *vecs[k:]))


NO_MAPS: Final = MapTable()


def new_map(step_id: str, size: int) -> MapVec:
    """The instances of a map of ``size`` items, all pending."""
    return MapVec(step_id, table_of([None] * size), table_of([None] * size), size)
