"""Immutable events a run emits, in the order things happen.

``sv.run(wf, on_event=callback)`` receives them on the Supervisor's thread, so
a callback must be quick and must not block; an exception it raises is logged
and ignored.  ``StepCommitted`` events come in canonical order whatever order
steps finished in: their sequence is the run's deterministic history.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Event",
    "RunFinished",
    "RunStarted",
    "StepCommitted",
    "StepDispatched",
    "StepExpanded",
    "StepFinished",
    "StepRetrying",
]


@dataclass(frozen=True, slots=True)
class RunStarted:
    run_id: str
    workflow_id: str
    seed: int
    settings: Mapping[str, Any]
    resumed: bool
    time: float


@dataclass(frozen=True, slots=True)
class StepDispatched:
    run_id: str
    step_id: str
    attempt: int
    worker: str
    time: float


@dataclass(frozen=True, slots=True)
class StepExpanded:
    """A mapped step's list is known: it runs ``size`` instances, ``score[0]`` on.

    ``kept`` of them succeeded in an earlier session of a resumed run and do not
    run again (they send no other event).  Its instances then send the events of
    steps, under their own ids; the mapped step itself sends only its
    ``StepFinished`` and ``StepCommitted``, once every instance has ended.
    """

    run_id: str
    step_id: str
    size: int
    kept: int
    time: float


@dataclass(frozen=True, slots=True)
class StepRetrying:
    """An attempt failed and another will run after ``delay`` seconds."""

    run_id: str
    step_id: str
    attempt: int
    delay: float
    error_type: str
    error_message: str
    time: float


@dataclass(frozen=True, slots=True)
class StepFinished:
    """A step reached its terminal status (in completion order)."""

    run_id: str
    step_id: str
    status: str
    attempts: int
    error_type: str | None
    error_message: str | None
    time: float
    #: The run whose cached result the step reused (it made no attempt), or None.
    reused_from: str | None = None


@dataclass(frozen=True, slots=True)
class StepCommitted:
    """A terminal step folded into the run state, in canonical order."""

    run_id: str
    step_id: str
    index: int
    status: str
    attempts: int
    created: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RunFinished:
    run_id: str
    status: str
    error: str | None
    time: float


Event = (
    RunStarted
    | StepDispatched
    | StepExpanded
    | StepRetrying
    | StepFinished
    | StepCommitted
    | RunFinished
)
