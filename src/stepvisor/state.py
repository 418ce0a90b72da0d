"""Run state as immutable values, and the pure reducer that evolves it.

``RunState`` is a pyrsistent structure: every transition returns a new state
and leaves the old one intact, so the Supervisor can hand snapshots to the
store, to event hooks and to tests without copying or locking.

Two views live side by side:

* ``steps`` - each step's record, updated the moment something happens to the
  step (dispatch, attempt end, terminal status).  This is what the store
  persists, one transaction per transition, so nothing finished is lost.
* the *committed* view - ``committed`` (how many steps, in canonical order,
  have been folded) and ``artifacts`` (their merged outputs).  A terminal step
  is folded only once every step before it in canonical order is folded, so the
  sequence of commits and the merged artifacts are the same whatever order the
  steps finished in.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
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

    # Positional constructors rather than _replace(): these run twice per step on
    # the Supervisor's hot path.
    def with_attempt_started(self, attempt: AttemptRecord) -> StepRecord:
        return StepRecord(
            self.step_id, StepStatus.RUNNING, (*self.attempts, attempt), self.note, self.restored
        )

    def with_last_attempt(self, attempt: AttemptRecord, status: StepStatus) -> StepRecord:
        return StepRecord(
            self.step_id, status, (*self.attempts[:-1], attempt), self.note, self.restored
        )

    def with_status(self, status: StepStatus, note: str | None) -> StepRecord:
        return StepRecord(self.step_id, status, self.attempts, note, self.restored)


class RunState(NamedTuple):
    """The whole state of one run, as an immutable value.

    Step records and outputs are kept in pyrsistent vectors indexed by
    canonical rank (``rank`` maps an id to it): a vector update is a C call,
    several times cheaper than a persistent map's, and this is the
    Supervisor's hot path.  The commit sequence is not stored: it is always the
    first ``committed`` ids of the canonical order.
    """

    run_id: str
    workflow_id: str
    order: tuple[str, ...]
    rank: Mapping[str, int]
    records: PVector[StepRecord]
    outputs: PVector[PMap[str, Any] | None]
    status: RunStatus = RunStatus.RUNNING
    committed: int = 0
    artifacts: PMap[str, Any] = _EMPTY_MAP
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
            records=pvector(StepRecord(sid) for sid in order),
            outputs=pvector([None] * len(order)),
        )

    # -- transitions (pure) ------------------------------------------------------

    def _evolve(
        self,
        *,
        records: PVector[StepRecord] | None = None,
        outputs: PVector[PMap[str, Any] | None] | None = None,
        committed: int | None = None,
        artifacts: PMap[str, Any] | None = None,
    ) -> RunState:
        # A positional constructor rather than _replace(): it runs several times per step.
        return RunState(
            self.run_id,
            self.workflow_id,
            self.order,
            self.rank,
            self.records if records is None else records,
            self.outputs if outputs is None else outputs,
            self.status,
            self.committed if committed is None else committed,
            self.artifacts if artifacts is None else artifacts,
            self.error,
        )

    def set_step(self, record: StepRecord) -> RunState:
        return self._evolve(records=self.records.set(self.rank[record.step_id], record))

    def set_steps(self, records: list[StepRecord]) -> RunState:
        ev = self.records.evolver()
        for record in records:
            ev[self.rank[record.step_id]] = record
        return self._evolve(records=ev.persistent())

    def set_outputs(self, step_id: str, outputs: Mapping[str, Any]) -> RunState:
        return self._evolve(outputs=self.outputs.set(self.rank[step_id], pmap(outputs)))

    def commit_ready(self) -> tuple[RunState, list[str]]:
        """Fold every terminal step at the head of the canonical order.

        Returns the new state and the ids committed, in order.  A succeeded
        step's outputs are merged over the artifacts so far: where two steps
        create the same artifact, the later in canonical order wins.
        """
        i = self.committed
        n = len(self.order)
        records = self.records
        outputs = self.outputs
        done: list[str] = []
        artifacts = self.artifacts
        while i < n:
            record = records[i]
            if record.status not in TERMINAL:
                break
            if record.status is StepStatus.SUCCEEDED:
                produced = outputs[i]
                if produced:
                    artifacts = artifacts.update(produced)
            done.append(record.step_id)
            i += 1
        if not done:
            return self, done
        return self._evolve(committed=i, artifacts=artifacts), done

    def finish(self, status: RunStatus, error: str | None = None) -> RunState:
        return self._replace(status=status, error=error)

    # -- queries -------------------------------------------------------------------

    def record(self, step_id: str) -> StepRecord:
        """The record of one step."""
        return self.records[self.rank[step_id]]

    def output(self, step_id: str) -> PMap[str, Any]:
        """The artifacts one step created (empty unless it succeeded)."""
        return self.outputs[self.rank[step_id]] or pmap()

    @property
    def steps(self) -> dict[str, StepRecord]:
        """Step id -> record, in canonical order (a fresh dict)."""
        return {record.step_id: record for record in self.records}

    @property
    def commits(self) -> tuple[str, ...]:
        """The steps folded so far, in the order they were folded."""
        return self.order[: self.committed]

    def count_status(self, status: StepStatus) -> int:
        return sum(1 for r in self.records if r.status is status)

    @property
    def all_terminal(self) -> bool:
        return all(r.terminal for r in self.records)
