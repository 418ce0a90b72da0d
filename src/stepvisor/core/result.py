"""What a finished run gives back: ``RunResult``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from stepvisor.core.state import RunStatus, StepRecord, StepStatus

__all__ = ["RunResult"]


@dataclass(frozen=True, slots=True)
class RunResult:
    """The outcome of a run: statuses, attempts, merged artifacts, and the error.

    ``steps`` maps each step id (in canonical order) to its record: status and
    every attempt with its times, outcome and error.  ``artifacts`` is the
    immutable mapping of every succeeded step's outputs merged in canonical
    order.  For a failed run, ``failed_step`` is the first failed step in
    canonical order and ``error`` its exception (the original exception of its
    last attempt, with the earlier attempts' errors attached as notes).
    ``commits`` is the sequence of steps folded into the state, in order: it is
    the same whatever order the steps finished in.
    """

    run_id: str
    workflow_id: str
    status: RunStatus
    steps: Mapping[str, StepRecord]
    artifacts: Mapping[str, Any]
    seed: int
    commits: tuple[str, ...]
    started: float
    ended: float
    error: BaseException | None = None
    failed_step: str | None = None
    errors: Mapping[str, BaseException] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)
    discarded_outcomes: int = 0
    #: (step id, attempt) -> what the attempt wrote (``capture``); see :meth:`logs`.
    captured: Mapping[tuple[str, int], str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status is RunStatus.SUCCEEDED

    @property
    def duration(self) -> float:
        return self.ended - self.started

    def statuses(self) -> dict[str, StepStatus]:
        """Step id -> terminal status."""
        return {sid: rec.status for sid, rec in self.steps.items()}

    def attempts(self) -> dict[str, int]:
        """Step id -> number of attempts made in this run."""
        return {sid: rec.attempt_count for sid, rec in self.steps.items()}

    @property
    def error_message(self) -> str | None:
        """One line naming the failed step and its error, for people."""
        if self.failed_step is None:
            return None
        if self.error is None:
            return f"step {self.failed_step!r} failed"
        return f"step {self.failed_step!r} failed: {type(self.error).__name__}: {self.error}"

    def logs(self, step_id: str, attempt: int | None = None) -> str:
        """What ``step_id`` wrote (stdout, stderr, logging records) on one attempt.

        The last attempt's when ``attempt`` is ``None``; ``""`` when it wrote
        nothing or the run captured nothing (``capture="off"``).  A step that
        is not in the run raises ``KeyError``.
        """
        record = self.steps.get(step_id)
        if record is None:
            raise KeyError(
                f"no step {step_id!r} in run {self.run_id!r}; its steps are "
                f"{', '.join(sorted(self.steps)) or 'none'}"
            )
        if attempt is None:
            attempts = record.attempts
            if not attempts:
                return ""
            attempt = attempts[-1].number
        return self.captured.get((step_id, attempt), "")

    def raise_for_status(self) -> RunResult:
        """Raise the failed step's error (or a cancel error); return self if it succeeded."""
        if self.status is RunStatus.SUCCEEDED:
            return self
        if self.error is not None:
            raise self.error
        from stepvisor.errors import StepCancelledError  # noqa: PLC0415

        raise StepCancelledError(f"run {self.run_id!r} ended {self.status.value}")
