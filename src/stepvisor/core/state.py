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
from collections.abc import Iterator, Mapping
from itertools import islice
from typing import Any, Final, NamedTuple

from pyrsistent import pmap, pvector
from pyrsistent.typing import PMap, PVector

__all__ = [
    "TERMINAL",
    "AttemptRecord",
    "RunState",
    "RunStatus",
    "StepRecord",
    "StepStatus",
]


_EMPTY_MAP: PMap[str, Any] = pmap()

#: ``new(Record, values)`` is what a NamedTuple's generated ``__new__`` does
#: without its argument handling, at half the cost: for the few records built
#: once or twice per step on the Supervisor's hot path (every field given, in order).
new: Final = tuple.__new__

#: Per-step values are kept in leaves of 2**_LEAF_BITS entries, and the leaves
#: in blocks of 2**_BLOCK_BITS leaves (see ``Table``).
_LEAF_BITS: Final = 9
_LEAF: Final = 1 << _LEAF_BITS
_LEAF_MASK: Final = _LEAF - 1
_BLOCK_BITS: Final = 6
_BLOCK: Final = 1 << _BLOCK_BITS
_BLOCK_MASK: Final = _BLOCK - 1
_BLOCK_SHIFT: Final = _LEAF_BITS + _BLOCK_BITS

#: One value per step, by canonical rank, as ``table[block][leaf][entry]``: a
#: tuple of blocks, each a tuple of up to ``_BLOCK`` pyrsistent vectors of
#: ``_LEAF`` entries, rather than one vector (or one tuple of leaves) for the
#: whole run.
#:
#: Every transition builds a new path to the value it sets, and new objects
#: are young: the cyclic GC's frequent young-generation passes traverse them,
#: visiting every reference they hold (a pyrsistent vector's traversal visits
#: every element).  One vector per run made that O(steps) work per pass, and a
#: run's cost grew with the square of its size; one tuple of leaves still held
#: steps/512 references, copied at every transition and traversed at every
#: pass (at 1,000,000 steps, ~2,000 of each, and scattered over a gigabyte, so
#: each a cache miss).  With blocks, a transition copies and the GC visits at
#: most ``_LEAF`` + ``_BLOCK`` + steps/``2**_BLOCK_SHIFT`` references: the
#: last term stays below ``_LEAF`` up to 16 million steps.
Table = tuple[tuple[PVector[Any], ...], ...]


def _table_of(values: list[Any]) -> Table:
    leaves = [pvector(values[i : i + _LEAF]) for i in range(0, len(values), _LEAF)]
    return tuple(tuple(leaves[i : i + _BLOCK]) for i in range(0, len(leaves), _BLOCK))


def _table_set(table: Table, index: int, value: Any) -> Table:
    b = index >> _BLOCK_SHIFT
    block = table[b]
    k = (index >> _LEAF_BITS) & _BLOCK_MASK
    block = (*block[:k], block[k].set(index & _LEAF_MASK, value), *block[k + 1 :])
    return (*table[:b], block, *table[b + 1 :])


def _table_get(table: Table, index: int) -> Any:
    return table[index >> _BLOCK_SHIFT][(index >> _LEAF_BITS) & _BLOCK_MASK][index & _LEAF_MASK]


def _table_values(table: Table) -> Iterator[Any]:
    for block in table:
        for leaf in block:
            yield from leaf


def _terminal_prefix(records: Table, start: int, n: int) -> tuple[int, list[str]]:
    """How far from ``start`` the records are terminal, and the ids of those steps."""
    i = start
    done: list[str] = []
    while i < n:
        record = _table_get(records, i)
        if record.status not in TERMINAL:
            break
        done.append(record.step_id)
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
            records=_table_of([StepRecord(sid) for sid in order]),
            outputs=_table_of([None] * len(order)),
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
        return self._evolve(records=_table_set(self.records, self.rank[record.step_id], record))

    def start_attempt_at(self, rank: int, wall: float, slot: str) -> tuple[RunState, StepRecord]:
        """The step at ``rank`` starts its next attempt on ``slot`` at ``wall``.

        Returns the new state and the step's record (its last attempt is the new
        one).  :meth:`record_at`, :meth:`StepRecord.with_attempt_started` and
        :meth:`set_step_at` in one call, reading the record once: this is once
        per attempt on the hot path.
        """
        old: StepRecord = _table_get(self.records, rank)
        attempt = new(
            AttemptRecord,
            (len(old.attempts) + 1, wall, None, None, None, None, None, None, None, slot, None),
        )
        record = old.with_attempt_started(attempt)
        return self._evolve(records=_table_set(self.records, rank, record)), record

    def set_step_at(self, rank: int, record: StepRecord) -> RunState:
        """:meth:`set_step` for a caller that knows the step's rank (no lookup by id)."""
        return self._evolve(records=_table_set(self.records, rank, record))

    def set_steps(self, records: list[StepRecord]) -> RunState:
        blocks = [list(block) for block in self.records]
        evolvers: dict[tuple[int, int], Any] = {}
        for record in records:
            index = self.rank[record.step_id]
            at = (index >> _BLOCK_SHIFT, (index >> _LEAF_BITS) & _BLOCK_MASK)
            if at not in evolvers:
                evolvers[at] = blocks[at[0]][at[1]].evolver()
            evolvers[at][index & _LEAF_MASK] = record
        for (b, k), ev in evolvers.items():
            blocks[b][k] = ev.persistent()
        return self._evolve(records=tuple(map(tuple, blocks)))

    def set_outputs(self, step_id: str, outputs: Mapping[str, Any]) -> RunState:
        """Record what ``step_id`` created.

        No outputs are kept as ``None``, like a step that has not succeeded:
        most steps of a big run create nothing, and an empty map per step is
        memory (and a transition) for nothing.
        """
        index = self.rank[step_id]
        if not outputs:
            if _table_get(self.outputs, index) is None:
                return self
            return self._evolve(outputs=_table_set(self.outputs, index, None))
        return self._evolve(outputs=_table_set(self.outputs, index, pmap(outputs)))

    def succeed_at(
        self, rank: int, record: StepRecord, outputs: Mapping[str, Any]
    ) -> tuple[RunState, list[str]]:
        """Record a success at ``rank`` (with its outputs) and commit what it frees.

        :meth:`set_step_at`, :meth:`set_outputs` and :meth:`commit_ready` in
        one transition: this is once per succeeded step on the hot path.
        """
        records = _table_set(self.records, rank, record)
        outputs_table = self.outputs
        if outputs:
            outputs_table = _table_set(outputs_table, rank, pmap(outputs))
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
        record: StepRecord = _table_get(self.records, self.rank[step_id])
        return record

    def record_at(self, rank: int) -> StepRecord:
        """The record of the step of canonical rank ``rank``.

        The machine knows the rank of every step it handles: at a million
        steps a lookup by id is a cache miss in a dict of a million entries.
        """
        record: StepRecord = _table_get(self.records, rank)
        return record

    def output(self, step_id: str) -> PMap[str, Any]:
        """The artifacts one step created (empty unless it succeeded)."""
        produced: PMap[str, Any] | None = _table_get(self.outputs, self.rank[step_id])
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
        pairs = zip(_table_values(self.outputs), _table_values(self.records), strict=True)
        for produced, record in islice(pairs, self.committed):
            if produced and record.status is StepStatus.SUCCEEDED:
                merged.update(produced)
        return pmap(merged)

    @property
    def commits(self) -> tuple[str, ...]:
        """The steps folded so far, in the order they were folded."""
        return self.order[: self.committed]

    def count_status(self, status: StepStatus) -> int:
        return sum(1 for r in self.all_records() if r.status is status)

    @property
    def all_terminal(self) -> bool:
        return all(r.terminal for r in self.all_records())

    def all_records(self) -> Iterator[StepRecord]:
        """Every step's record, in canonical order."""
        return _table_values(self.records)
