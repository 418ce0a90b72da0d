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
from dataclasses import dataclass, field, replace
from typing import Any, Final

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


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One attempt of one step: when, how it ended, and what came next.

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


@dataclass(frozen=True, slots=True)
class StepRecord:
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

    # Explicit constructors rather than dataclasses.replace: these run twice per
    # step on the Supervisor's hot path, and replace() costs several times more.
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


@dataclass(frozen=True, slots=True)
class RunState:
    """The whole state of one run, as an immutable value."""

    run_id: str
    workflow_id: str
    order: tuple[str, ...]
    status: RunStatus = RunStatus.RUNNING
    steps: PMap[str, StepRecord] = field(default_factory=pmap)
    outputs: PMap[str, PMap[str, Any]] = field(default_factory=pmap)
    committed: int = 0
    artifacts: PMap[str, Any] = field(default_factory=pmap)
    commits: PVector[str] = field(default_factory=pvector)
    error: str | None = None

    @classmethod
    def initial(cls, run_id: str, workflow_id: str, order: tuple[str, ...]) -> RunState:
        steps = pmap({sid: StepRecord(sid) for sid in order})
        return cls(run_id=run_id, workflow_id=workflow_id, order=order, steps=steps)

    # -- transitions (pure) ------------------------------------------------------

    def _evolve(
        self,
        *,
        steps: PMap[str, StepRecord] | None = None,
        outputs: PMap[str, PMap[str, Any]] | None = None,
    ) -> RunState:
        # A hand-written replace() for the two fields that change per step.
        return RunState(
            self.run_id,
            self.workflow_id,
            self.order,
            self.status,
            self.steps if steps is None else steps,
            self.outputs if outputs is None else outputs,
            self.committed,
            self.artifacts,
            self.commits,
            self.error,
        )

    def set_step(self, record: StepRecord) -> RunState:
        return self._evolve(steps=self.steps.set(record.step_id, record))

    def set_steps(self, records: list[StepRecord]) -> RunState:
        ev = self.steps.evolver()
        for record in records:
            ev[record.step_id] = record
        return self._evolve(steps=ev.persistent())

    def set_outputs(self, step_id: str, outputs: Mapping[str, Any]) -> RunState:
        return self._evolve(outputs=self.outputs.set(step_id, pmap(outputs)))

    def commit_ready(self) -> tuple[RunState, list[str]]:
        """Fold every terminal step at the head of the canonical order.

        Returns the new state and the ids committed, in order.  A succeeded
        step's outputs are merged over the artifacts so far: where two steps
        create the same artifact, the later in canonical order wins.
        """
        i = self.committed
        n = len(self.order)
        if i >= n or not self.steps[self.order[i]].terminal:
            return self, []
        done: list[str] = []
        if i + 1 < n and not self.steps[self.order[i + 1]].terminal:
            # The common case on a busy run: exactly one step becomes committable.
            sid = self.order[i]
            record = self.steps[sid]
            artifacts_map = self.artifacts
            if record.status is StepStatus.SUCCEEDED:
                produced = self.outputs.get(sid)
                if produced:
                    artifacts_map = artifacts_map.update(produced)
            return (
                RunState(
                    self.run_id,
                    self.workflow_id,
                    self.order,
                    self.status,
                    self.steps,
                    self.outputs,
                    i + 1,
                    artifacts_map,
                    self.commits.append(sid),
                    self.error,
                ),
                [sid],
            )
        artifacts = self.artifacts.evolver()
        commits = self.commits.evolver()
        steps = self.steps
        outputs = self.outputs
        while i < n:
            sid = self.order[i]
            record = steps[sid]
            if not record.terminal:
                break
            if record.status is StepStatus.SUCCEEDED:
                for name, value in outputs.get(sid, pmap()).items():
                    artifacts[name] = value
            commits.append(sid)
            done.append(sid)
            i += 1
        new = replace(
            self,
            committed=i,
            artifacts=artifacts.persistent(),
            commits=commits.persistent(),
        )
        return new, done

    def finish(self, status: RunStatus, error: str | None = None) -> RunState:
        return replace(self, status=status, error=error)

    # -- queries -------------------------------------------------------------------

    def count(self, status: StepStatus) -> int:
        return sum(1 for r in self.steps.values() if r.status is status)

    @property
    def all_terminal(self) -> bool:
        return all(r.terminal for r in self.steps.values())
