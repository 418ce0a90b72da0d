"""Run state as immutable values, and the pure reducer that evolves it.

``RunState`` is a pyrsistent structure: every transition returns a new state
and leaves the old one intact, so the Supervisor can hand snapshots to the
store, to event hooks and to tests without copying or locking.

Two views live side by side:

* ``steps`` - each step's record, updated the moment something happens to the
  step (dispatch, attempt end, terminal status).  This is what the store
  persists, one transaction per transition, so nothing finished is lost.
* the *committed* view - ``committed`` (how many steps, in canonical order,
  have been folded) and ``artifacts`` (their merged outputs, computed on
  demand).  A terminal step is folded only once every step before it in
  canonical order is folded, so the sequence of commits and the merged
  artifacts are the same whatever order the steps finished in.
"""

from __future__ import annotations

import enum
from collections.abc import ItemsView, Iterator, Mapping, ValuesView
from itertools import islice
from typing import Any, Final, NamedTuple

from pyrsistent import pmap
from pyrsistent.typing import PMap

from stepvisor.core._table import (
    Table,
    table_get,
    table_of,
    table_set,
    table_set_many,
    table_values,
)

__all__ = [
    "TERMINAL",
    "AttemptRecord",
    "RunState",
    "RunStatus",
    "StepRecord",
    "StepStatus",
    "StepsView",
]


_EMPTY_MAP: PMap[str, Any] = pmap()

#: ``new(Record, values)`` is what a NamedTuple's generated ``__new__`` does
#: without its argument handling, at half the cost: for the few records built
#: once or twice per step on the Supervisor's hot path (every field given, in order).
new: Final = tuple.__new__


def _terminal_prefix(records: Table, start: int, n: int) -> tuple[int, list[str]]:
    """How far from ``start`` the records are terminal, and the ids of those steps."""
    i = start
    done: list[str] = []
    while i < n:
        record = table_get(records, i)  # kept or not, [0] is the id and [1] the status
        if record[1] not in TERMINAL:
            break
        done.append(record[0])
        i += 1
    return i, done


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


class _Settled(tuple[Any, ...]):
    """A finished step's record with its one attempt, as the run state keeps it.

    ``(step_id, status, note, restored, *attempt)``: one object where a
    :class:`StepRecord` is three (the record, its attempts tuple, the attempt).
    Finished records are what a big run's heap is made of, and the cyclic GC
    counts the objects it tracks: a young pass runs when the allocated ones
    outnumber the freed ones by 700, and a full pass over the whole heap each
    time the old generation grows by a quarter.  A finished record that
    replaces its pending one one for one adds nothing, so a run of a million
    steps that made eight full passes (a fifth of its time, and growing faster
    than it: each visits every object) now makes none while its steps run.
    A subclass so that a read tells it from a :class:`StepRecord` by its type;
    it never leaves this module: reads rebuild the record (:func:`_unkept`).
    """

    __slots__ = ()


def _kept(record: StepRecord) -> Any:
    """``record`` as the table keeps it: :class:`_Settled` when that is possible."""
    attempts = record[2]
    if record[1] in TERMINAL and len(attempts) == 1:
        return new(_Settled, (record[0], record[1], record[3], record[4], *attempts[0]))
    return record


def _unkept(value: Any) -> StepRecord:
    """The :class:`StepRecord` the table keeps as ``value``."""
    if type(value) is not _Settled:
        record: StepRecord = value
        return record
    attempt = new(AttemptRecord, value[4:])
    return new(StepRecord, (value[0], value[1], (attempt,), value[2], value[3]))


class RunState(NamedTuple):
    """The whole state of one run, as an immutable value.

    Step records and outputs are kept in pyrsistent vectors indexed by
    canonical rank (``rank`` maps an id to it), in blocks of leaves
    (``Table``): a vector update is a C call, several times cheaper than a
    persistent map's, and this is the Supervisor's hot path.  The commit
    sequence is not stored: it is always the first ``committed`` ids of the
    canonical order.
    """

    run_id: str
    workflow_id: str
    order: tuple[str, ...]
    rank: Mapping[str, int]
    records: Table  # StepRecord by rank
    outputs: Table  # PMap of a succeeded step's non-empty artifacts by rank, else None
    status: RunStatus = RunStatus.RUNNING
    committed: int = 0
    error: str | None = None

    @classmethod
    def initial(
        cls, run_id: str, workflow_id: str, order: tuple[str, ...], rank: Mapping[str, int]
    ) -> RunState:
        return cls(
            run_id=run_id,
            workflow_id=workflow_id,
            order=order,
            rank=rank,
            records=table_of([StepRecord(sid) for sid in order]),
            outputs=table_of([None] * len(order)),
        )

    # -- transitions (pure) ------------------------------------------------------

    def _evolve(
        self,
        *,
        records: Table | None = None,
        outputs: Table | None = None,
        committed: int | None = None,
    ) -> RunState:
        # Built with new() rather than _replace(): it runs twice per step.
        return new(
            RunState,
            (
                self.run_id,
                self.workflow_id,
                self.order,
                self.rank,
                self.records if records is None else records,
                self.outputs if outputs is None else outputs,
                self.status,
                self.committed if committed is None else committed,
                self.error,
            ),
        )

    def set_step(self, record: StepRecord) -> RunState:
        index = self.rank[record.step_id]
        return self._evolve(records=table_set(self.records, index, _kept(record)))

    def start_attempt_at(self, rank: int, wall: float, slot: str) -> tuple[RunState, StepRecord]:
        """The step at ``rank`` starts its next attempt on ``slot`` at ``wall``.

        Returns the new state and the step's record (its last attempt is the new
        one).  :meth:`record_at`, :meth:`StepRecord.with_attempt_started` and
        :meth:`set_step_at` in one call, reading the record once: this is once
        per attempt on the hot path.
        """
        old = _unkept(table_get(self.records, rank))
        attempt = new(
            AttemptRecord,
            (len(old.attempts) + 1, wall, None, None, None, None, None, None, None, slot, None),
        )
        record = old.with_attempt_started(attempt)
        return self._evolve(records=table_set(self.records, rank, record)), record

    def set_step_at(self, rank: int, record: StepRecord) -> RunState:
        """:meth:`set_step` for a caller that knows the step's rank (no lookup by id)."""
        return self._evolve(records=table_set(self.records, rank, _kept(record)))

    def set_steps(self, records: list[StepRecord]) -> RunState:
        rank = self.rank
        changes = [(rank[record.step_id], _kept(record)) for record in records]
        return self._evolve(records=table_set_many(self.records, changes))

    def set_outputs(self, step_id: str, outputs: Mapping[str, Any]) -> RunState:
        """Record what ``step_id`` created.

        No outputs are kept as ``None``, like a step that has not succeeded:
        most steps of a big run create nothing, and an empty map per step is
        memory (and a transition) for nothing.
        """
        index = self.rank[step_id]
        if not outputs:
            if table_get(self.outputs, index) is None:
                return self
            return self._evolve(outputs=table_set(self.outputs, index, None))
        return self._evolve(outputs=table_set(self.outputs, index, pmap(outputs)))

    def succeed_at(
        self, rank: int, record: StepRecord, outputs: Mapping[str, Any]
    ) -> tuple[RunState, list[str]]:
        """Record a success at ``rank`` (with its outputs) and commit what it frees.

        :meth:`set_step_at`, :meth:`set_outputs` and :meth:`commit_ready` in
        one transition: this is once per succeeded step on the hot path.
        """
        records = table_set(self.records, rank, _kept(record))
        outputs_table = self.outputs
        if outputs:
            outputs_table = table_set(outputs_table, rank, pmap(outputs))
        i, done = _terminal_prefix(records, self.committed, len(self.order))
        return self._evolve(records=records, outputs=outputs_table, committed=i), done

    def commit_ready(self) -> tuple[RunState, list[str]]:
        """Fold every terminal step at the head of the canonical order.

        Returns the new state and the ids committed, in order.  Folding only
        moves the committed prefix forward; :attr:`artifacts` merges that
        prefix's outputs when asked.
        """
        i, done = _terminal_prefix(self.records, self.committed, len(self.order))
        if not done:
            return self, done
        return self._evolve(committed=i), done

    def finish(self, status: RunStatus, error: str | None = None) -> RunState:
        return self._replace(status=status, error=error)

    # -- queries -------------------------------------------------------------------

    def record(self, step_id: str) -> StepRecord:
        """The record of one step."""
        return _unkept(table_get(self.records, self.rank[step_id]))

    def record_at(self, rank: int) -> StepRecord:
        """The record of the step of canonical rank ``rank``.

        The machine knows the rank of every step it handles: at a million
        steps a lookup by id is a cache miss in a dict of a million entries.
        """
        return _unkept(table_get(self.records, rank))

    def output(self, step_id: str) -> PMap[str, Any]:
        """The artifacts one step created (empty unless it succeeded)."""
        produced: PMap[str, Any] | None = table_get(self.outputs, self.rank[step_id])
        return produced or _EMPTY_MAP

    @property
    def steps(self) -> dict[str, StepRecord]:
        """Step id -> record, in canonical order (a fresh dict)."""
        return {record.step_id: record for record in self.all_records()}

    @property
    def artifacts(self) -> PMap[str, Any]:
        """The committed steps' outputs merged in canonical order (later steps win).

        Computed when asked (at the end of a run) rather than updated at each
        commit: a persistent map of every artifact rebuilt per commit made a
        new O(artifacts) object per step for the GC to traverse, so runs with
        many artifacts grew quadratically.
        """
        merged: dict[str, Any] = {}
        pairs = zip(table_values(self.outputs), table_values(self.records), strict=True)
        for produced, record in islice(pairs, self.committed):
            if produced and record[1] is StepStatus.SUCCEEDED:  # kept or not
                merged.update(produced)
        return pmap(merged)

    @property
    def commits(self) -> tuple[str, ...]:
        """The steps folded so far, in the order they were folded."""
        return self.order[: self.committed]

    def count_status(self, status: StepStatus) -> int:
        return sum(1 for kept in table_values(self.records) if kept[1] is status)

    @property
    def all_terminal(self) -> bool:
        return all(kept[1] in TERMINAL for kept in table_values(self.records))  # kept or not

    def all_records(self) -> Iterator[StepRecord]:
        """Every step's record, in canonical order."""
        return map(_unkept, table_values(self.records))

    def unfinished(self) -> list[StepRecord]:
        """The records of the steps not in a terminal status, in canonical order.

        Read without rebuilding the finished ones: at the end of a run that is
        nearly all of them.
        """
        return [_unkept(kept) for kept in table_values(self.records) if kept[1] not in TERMINAL]

    def first_with(self, statuses: frozenset[StepStatus] | tuple[StepStatus, ...]) -> str | None:
        """The id of the first step, in canonical order, whose status is one of ``statuses``."""
        return next((kept[0] for kept in table_values(self.records) if kept[1] in statuses), None)

    def steps_view(self) -> StepsView:
        """Step id -> record, in canonical order, read from this state when asked."""
        return StepsView(self)


class _ItemsView(ItemsView[str, StepRecord]):
    _mapping: StepsView

    def __iter__(self) -> Iterator[tuple[str, StepRecord]]:
        view = self._mapping
        return zip(view._order, map(_unkept, table_values(view._table)), strict=True)


class _ValuesView(ValuesView[StepRecord]):
    _mapping: StepsView

    def __iter__(self) -> Iterator[StepRecord]:
        return map(_unkept, table_values(self._mapping._table))


class StepsView(Mapping[str, StepRecord]):
    """A run state's records as a read-only mapping of step id to record.

    A run's result hands back every step's record, and building a dict of
    them at the end of a big run made as many objects as the run kept (three
    per step, see :class:`_Settled`) in one burst, and the cyclic GC's full
    passes over a heap growing that fast were most of the run's last seconds.
    The view builds a record when it is read.  It is immutable like the state
    it reads; a pickled view comes back as a plain ``dict``.
    """

    __slots__ = ("_order", "_rank", "_table")

    def __init__(self, state: RunState) -> None:
        self._order = state.order
        self._rank = state.rank
        self._table = state.records

    def __getitem__(self, step_id: str) -> StepRecord:
        return _unkept(table_get(self._table, self._rank[step_id]))

    def __contains__(self, step_id: object) -> bool:
        return step_id in self._rank

    def __iter__(self) -> Iterator[str]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)

    def items(self) -> ItemsView[str, StepRecord]:
        return _ItemsView(self)

    def values(self) -> ValuesView[StepRecord]:
        return _ValuesView(self)

    def __repr__(self) -> str:
        return repr(dict(self.items()))

    def __reduce__(self) -> tuple[type[dict[str, StepRecord]], tuple[dict[str, StepRecord]]]:
        return dict, (dict(self.items()),)
