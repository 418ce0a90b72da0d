"""The store of a run given none: it keeps nothing, because nobody could read it.

``sv.run(wf)`` without a store (or with ``store=":memory:"``) used to write
every transition into a fresh :class:`~stepvisor.store.memory.MemoryStore`
that only the run itself held, and that was dropped with it: the caller
gets the run's records from its result, and such a run cannot be resumed
(there is nothing to resume it from).  Those writes were a dictionary
update per transition on the Supervisor's thread, and at a million steps a
second dictionary of a million records.  So the run's state is its only
copy, as the result already says.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from stepvisor.core.state import RunStatus, StepRecord
from stepvisor.errors import RunNotFoundError
from stepvisor.store.base import RunInfo, StoredRun

__all__ = ["Unkept"]


class Unkept:
    """A :class:`~stepvisor.store.base.RunStore` that keeps nothing (one run's, private)."""

    def begin_run(self, info: RunInfo, steps: Sequence[StepRecord]) -> None:
        """Nothing kept: the run's state holds its records."""

    def save_step(
        self, run_id: str, record: StepRecord, outputs: Mapping[str, Any] | None = None
    ) -> None:
        """Nothing kept."""

    def save_step_batch(
        self, run_id: str, items: Sequence[tuple[StepRecord, Mapping[str, Any] | None]]
    ) -> None:
        """Nothing kept."""

    def save_steps(self, run_id: str, records: Sequence[StepRecord]) -> None:
        """Nothing kept."""

    def finish_run(
        self, run_id: str, status: RunStatus, *, ended: float, error: str | None = None
    ) -> None:
        """Nothing kept: the run's result says how it ended."""

    def heartbeat(self, run_id: str, now: float) -> None:
        """Nothing kept."""

    def cancel_requested(self, run_id: str) -> bool:
        """Nobody else can see this store, so nobody can ask through it."""
        return False

    def request_cancel(self, run_id: str) -> None:
        raise RunNotFoundError(
            f"run {run_id!r} was given no store, so it cannot be cancelled through one; "
            "cancel it with its RunHandle (sv.start(...).cancel())"
        )

    def exists(self, run_id: str) -> bool:
        return False

    def load(self, run_id: str) -> StoredRun:
        raise RunNotFoundError(
            f"run {run_id!r} was given no store, so nothing of it was kept to load; "
            "its records are in its result, and a run to resume needs store='runs.db'"
        )

    def list_runs(self) -> list[RunInfo]:
        return []

    def close(self) -> None:
        """Nothing to release."""
