"""Run state as an immutable value, and the pure reducer that evolves it.

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

from collections.abc import Iterator, Mapping
from itertools import islice
from typing import TYPE_CHECKING, Any, NamedTuple

from pyrsistent import pmap
from pyrsistent.typing import PMap

from stepvisor.core._table import (
    Table,
    table_get,
    table_grow,
    table_len,
    table_of,
    table_set,
    table_set_many,
    table_values,
)
from stepvisor.core.records import (
    NO_MAPS,
    TERMINAL,
    AttemptRecord,
    MapTable,
    MapVec,
    RunStatus,
    StepRecord,
    StepStatus,
    _kept,
    _unkept,
    instance_id,
    new,
    parse_instance_id,
    pending_instance,
)

if TYPE_CHECKING:
    from stepvisor.core._views import StepsView

# The record types live in records.py; they are re-exported here, where users
# (and ``stepvisor``'s lazy exports) have always found them.
__all__ = [
    "TERMINAL",
    "AttemptRecord",
    "MapVec",
    "RunState",
    "RunStatus",
    "StepRecord",
    "StepStatus",
    "instance_id",
    "new",
]


_EMPTY_MAP: PMap[str, Any] = pmap()


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
    #: The instances of each mapped step, by its rank, once its list is known.
    maps: MapTable = NO_MAPS

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
        maps: MapTable | None = None,
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
                self.maps if maps is None else maps,
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

    # -- instances of mapped steps ---------------------------------------------------

    def expand(self, rank: int, step_id: str, size: int) -> RunState:
        """The mapped step at ``rank`` has ``size`` instances: room for them, all pending.

        They are kept past everything the tables hold (the steps, and the
        instances of the maps expanded before), so an instance's transition is
        one write to one table, as a step's is.
        """
        base = table_len(self.records)
        return self._evolve(
            records=table_grow(self.records, size),
            outputs=table_grow(self.outputs, size),
            maps=self.maps.set(rank, MapVec(step_id, base, size)),
        )

    def instance_kept(self, rank: int, index: int) -> Any:
        """What the table keeps for the instance: ``None`` while it was never dispatched."""
        return table_get(self.records, self.maps[rank].base + index)

    def instance_record(self, rank: int, index: int) -> StepRecord:
        vec = self.maps[rank]
        kept = table_get(self.records, vec.base + index)
        return pending_instance(vec.step_id, index) if kept is None else _unkept(kept)

    def instance_records(self, rank: int) -> Iterator[StepRecord]:
        """The records of the instances of the mapped step at ``rank``, by index."""
        vec = self.maps[rank]
        kept = islice(table_values(self.records), vec.base, vec.base + vec.size)
        for i, value in enumerate(kept):
            yield pending_instance(vec.step_id, i) if value is None else _unkept(value)

    def instance_output(self, rank: int, index: int) -> PMap[str, Any]:
        produced: PMap[str, Any] | None = table_get(self.outputs, self.maps[rank].base + index)
        return produced or _EMPTY_MAP

    def instance_outputs(self, rank: int) -> list[PMap[str, Any]]:
        """What each instance of the mapped step at ``rank`` created, by index."""
        vec = self.maps[rank]
        kept = islice(table_values(self.outputs), vec.base, vec.base + vec.size)
        return [produced or _EMPTY_MAP for produced in kept]

    def set_instance(self, rank: int, index: int, record: StepRecord) -> RunState:
        at = self.maps[rank].base + index
        return self._evolve(records=table_set(self.records, at, _kept(record)))

    def start_instance_at(
        self, rank: int, index: int, wall: float, slot: str
    ) -> tuple[RunState, StepRecord]:
        """:meth:`start_attempt_at` for instance ``index`` of the mapped step at ``rank``."""
        vec = self.maps[rank]
        at = vec.base + index
        kept = table_get(self.records, at)
        old = pending_instance(vec.step_id, index) if kept is None else _unkept(kept)
        attempt = new(
            AttemptRecord,
            (len(old.attempts) + 1, wall, None, None, None, None, None, None, None, slot, None),
        )
        record = old.with_attempt_started(attempt)
        return self._evolve(records=table_set(self.records, at, record)), record

    def succeed_instance(
        self, rank: int, index: int, record: StepRecord, outputs: Mapping[str, Any]
    ) -> RunState:
        """Record instance ``index``'s success and what it created."""
        at = self.maps[rank].base + index
        records = table_set(self.records, at, _kept(record))
        if not outputs:
            return self._evolve(records=records)
        return self._evolve(records=records, outputs=table_set(self.outputs, at, pmap(outputs)))

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
        """The record of one step, or of one instance of a mapped step (``"score[7]"``)."""
        rank = self.rank.get(step_id)
        if rank is not None:
            return _unkept(table_get(self.records, rank))
        parsed = parse_instance_id(step_id) if self.maps else None
        node = None if parsed is None else self.rank.get(parsed[0])
        vec: MapVec | None = None if node is None else self.maps.get(node)
        if vec is None or node is None or parsed is None or parsed[1] >= vec.size:
            raise KeyError(step_id)
        return self.instance_record(node, parsed[1])

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
            if produced and record[1] == StepStatus.SUCCEEDED:  # kept (text) or not (enum)
                merged.update(produced)
        return pmap(merged)

    @property
    def commits(self) -> tuple[str, ...]:
        """The steps folded so far, in the order they were folded.

        A mapped step is folded once all its instances ended: its instances'
        ids come first, in index order, then its own.
        """
        if not self.maps:
            return self.order[: self.committed]
        out: list[str] = []
        for r, sid in enumerate(self.order[: self.committed]):
            vec = self.maps.get(r)
            if vec is not None:
                out.extend(instance_id(sid, i) for i in range(vec.size))
            out.append(sid)
        return tuple(out)

    def _steps_kept(self) -> Iterator[Any]:
        """What the records table keeps for the steps (the instances come after them)."""
        return islice(table_values(self.records), len(self.order))

    def count_status(self, status: StepStatus) -> int:
        return sum(1 for kept in self._steps_kept() if kept[1] == status)

    @property
    def all_terminal(self) -> bool:
        return all(kept[1] in TERMINAL for kept in self._steps_kept())  # kept or not

    def all_records(self) -> Iterator[StepRecord]:
        """Every step's record, in canonical order (a mapped step's, then its instances')."""
        if not self.maps:
            return map(_unkept, table_values(self.records))
        return self._with_instances()

    def _with_instances(self) -> Iterator[StepRecord]:
        maps = self.maps
        for r, kept in enumerate(self._steps_kept()):
            yield _unkept(kept)
            if r in maps:
                yield from self.instance_records(r)

    def unfinished(self) -> list[StepRecord]:
        """The records of the steps not in a terminal status, in canonical order.

        Read without rebuilding the finished ones: at the end of a run that is
        nearly all of them.
        """
        return [_unkept(kept) for kept in self._steps_kept() if kept[1] not in TERMINAL]

    def unfinished_instances(self) -> list[tuple[int, int, StepRecord]]:
        """(rank, index, record) of every instance not in a terminal status."""
        out: list[tuple[int, int, StepRecord]] = []
        for r, vec in sorted(self.maps.items()):
            kept = islice(table_values(self.records), vec.base, vec.base + vec.size)
            for i, value in enumerate(kept):
                if value is None or value[1] not in TERMINAL:
                    out.append((r, i, self.instance_record(r, i)))
        return out

    def first_with(self, statuses: frozenset[StepStatus] | tuple[StepStatus, ...]) -> str | None:
        """The id of the first step, in canonical order, whose status is one of ``statuses``.

        For a mapped step, that is its first instance with such a status, if any.
        """
        for r, kept in enumerate(self._steps_kept()):
            if kept[1] in statuses:
                if r in self.maps:
                    for record in self.instance_records(r):
                        if record.status in statuses:
                            return record.step_id
                return str(kept[0])
        return None

    def steps_view(self) -> StepsView:
        """Step id -> record, in canonical order, read from this state when asked."""
        from stepvisor.core._views import StepsView  # noqa: PLC0415 - it imports this module

        return StepsView(self)
