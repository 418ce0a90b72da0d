"""The records the facade hands back, and what it needs of the caller's objects.

Why their shape: the callers of the asyncio executor read these records
with their own code (save state to JSON, draw a timeline, compute health),
so every field they read is present and set as the asyncio executor set it:
``agent`` and ``action`` come from the step, ``started_at`` is never
``None``, and times are naive local ``datetime`` values unless the caller
asks for aware ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableSequence
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from typing import Any, Generic, Literal, Protocol, TypeVar

Status = Literal["pending", "running", "completed", "failed", "cancelled"]
"""A record's ``status``, as the original executor wrote it: ``pending`` until the step
starts, ``running``, then one of the last three."""


class StepLike(Protocol):
    """What a step must have: any class with these attributes will do.

    ``next``, ``agent`` and ``action`` are read too when a step has them
    (``getattr`` with a default): ``next`` for readiness, the other two for
    the records.
    """

    @property
    def id(self) -> str: ...

    @property
    def requires(self) -> Iterable[str]: ...

    @property
    def creates(self) -> Iterable[str]: ...

    @property
    def metadata(self) -> Mapping[str, Any]: ...


class StateLike(Protocol):
    """What ``state`` must have: a list the records are appended to."""

    @property
    def step_executions(self) -> MutableSequence[Any]: ...


StepT = TypeVar("StepT", bound=StepLike)


def stamp(wall: float, tz: tzinfo | None) -> datetime:
    """A wall-clock time as the caller's convention wants it: naive local, or aware in ``tz``."""
    return datetime.fromtimestamp(wall, tz=tz)


@dataclass(slots=True)
class StepExecution:
    """The live record of one step, kept in ``state.step_executions``.

    The fields, in order, are those of the asyncio executor's record, so code
    that builds or reads one keeps working; ``agent`` and ``action`` are
    copied from the step.  Mutable on purpose: it is updated in place as the
    step runs.  ``status`` is ``pending``, then ``running`` from its first
    attempt until it ends (backoff waits between attempts included), then
    exactly one of ``completed``, ``failed`` (timeouts included) or
    ``cancelled``.  ``started_at`` is when its first attempt started; a step
    that never started keeps the time it was queued (the call's start), so
    it is never ``None``.  ``duration_seconds`` is time spent running
    attempts, not time queued or waiting to retry, and stays ``None`` for a
    step that never started.  ``error`` is a readable message.
    """

    step_id: str
    agent: str = ""
    action: str = ""
    started_at: datetime = field(default_factory=datetime.now)
    completed_at: datetime | None = None
    duration_seconds: float | None = None
    status: Status = "pending"
    error: str | None = None


@dataclass(frozen=True, slots=True)
class StepExecutionResult(Generic[StepT]):
    """How one step ended: its record, the artifacts it returned, the exception.

    ``artifacts`` is what ``execute_fn`` returned for a completed step (a
    mapping; empty for any other).  ``error`` is the exception object: the one
    ``execute_fn`` raised on its last attempt, a ``TimeoutError``
    (``StepTimeoutError``) for a timeout, or a ``StepCancelledError`` for a
    step that was not run to the end.  ``step_execution`` is the record in
    ``state.step_executions`` (of the caller's ``record_type`` if one was given).
    """

    step: StepT
    step_execution: Any
    artifacts: Mapping[str, Any] = field(default_factory=dict)
    error: BaseException | None = None
    attempts: int = 1
