"""The run store port: what the Supervisor needs from wherever state is kept.

Every method that changes the store is one transaction: a step transition is
written whole or not at all, so a crash leaves a state the program could have
been in.  The Supervisor calls the store from its own thread only; a store may
also be read from other threads or programs (``stepvisor status``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from stepvisor.core.state import RunStatus, StepRecord

__all__ = ["RunInfo", "RunStore", "StoredRun"]


@dataclass(frozen=True, slots=True)
class RunInfo:
    """A run's header: identity, configuration used, status and times."""

    run_id: str
    workflow_id: str
    fingerprint: str
    settings: Mapping[str, Any]
    seed: int
    status: RunStatus
    started: float
    ended: float | None = None
    heartbeat: float | None = None
    error: str | None = None
    #: Where the workflow came from (a file path), when known; used by ``resume``.
    source: str | None = None


@dataclass(frozen=True, slots=True)
class StoredRun:
    """Everything a store holds about one run."""

    info: RunInfo
    steps: Mapping[str, StepRecord]
    #: step id -> the artifacts that step created (only for succeeded steps).
    outputs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


class RunStore(Protocol):
    """Where run state is kept.  Implementations: memory and SQLite."""

    def begin_run(self, info: RunInfo, steps: Sequence[StepRecord]) -> None:
        """Create the run and its step rows, or mark a resumed run running again."""
        ...

    def save_step(
        self, run_id: str, record: StepRecord, outputs: Mapping[str, Any] | None = None
    ) -> None:
        """Write one step transition; ``outputs`` go with a ``succeeded`` record."""
        ...

    def save_steps(self, run_id: str, records: Sequence[StepRecord]) -> None:
        """Write several step transitions in one transaction (e.g. cancel all)."""
        ...

    def finish_run(
        self, run_id: str, status: RunStatus, *, ended: float, error: str | None = None
    ) -> None:
        """Record the run's final status."""
        ...

    def heartbeat(self, run_id: str, now: float) -> None:
        """Say the program running ``run_id`` is alive."""
        ...

    def cancel_requested(self, run_id: str) -> bool:
        """Whether someone asked (e.g. ``stepvisor cancel``) for the run to stop."""
        ...

    def request_cancel(self, run_id: str) -> None:
        """Ask the program running ``run_id`` to cancel it."""
        ...

    def exists(self, run_id: str) -> bool:
        """Whether the store holds a run with this id (reads none of its data)."""
        ...

    def load(self, run_id: str) -> StoredRun:
        """Everything about one run; ``RunNotFoundError`` if there is none."""
        ...

    def list_runs(self) -> list[RunInfo]:
        """Every run, newest first."""
        ...

    def close(self) -> None:
        """Release what the store holds open."""
        ...
