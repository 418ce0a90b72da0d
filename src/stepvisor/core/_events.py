"""The events a run tells its caller's ``on_event`` hook, built only when there is one.

Events are values (:mod:`stepvisor.core.events`); building one for every
dispatch, end and commit is measurable on tiny steps, so without a hook the
:class:`Emitter` builds nothing.
"""

from __future__ import annotations

from typing import Any

from stepvisor.core.effects import Effect, Emit
from stepvisor.core.events import (
    RunStarted,
    StepCommitted,
    StepDispatched,
    StepExpanded,
    StepFinished,
    StepRetrying,
)
from stepvisor.core.state import RunState, StepRecord

__all__ = ["Emitter"]


class Emitter:
    """Appends ``Emit`` effects for one run, if the run has a hook."""

    __slots__ = ("on", "run_id")

    def __init__(self, run_id: str, *, on: bool) -> None:
        self.run_id = run_id
        self.on = on

    def started(
        self,
        fx: list[Effect],
        *,
        workflow_id: str,
        seed: int,
        settings: Any,
        resumed: bool,
        wall: float,
    ) -> None:
        if self.on:
            fx.append(
                Emit(
                    RunStarted(
                        run_id=self.run_id,
                        workflow_id=workflow_id,
                        seed=seed,
                        settings=settings,
                        resumed=resumed,
                        time=wall,
                    )
                )
            )

    def dispatched(self, fx: list[Effect], sid: str, attempt: int, slot: str, wall: float) -> None:
        if self.on:
            fx.append(
                Emit(
                    StepDispatched(
                        run_id=self.run_id, step_id=sid, attempt=attempt, worker=slot, time=wall
                    )
                )
            )

    def expanded(self, fx: list[Effect], sid: str, size: int, kept: int, wall: float) -> None:
        if self.on:
            fx.append(
                Emit(StepExpanded(run_id=self.run_id, step_id=sid, size=size, kept=kept, time=wall))
            )

    def retrying(
        self,
        fx: list[Effect],
        sid: str,
        attempt: int,
        /,
        *,
        delay: float,
        error: tuple[str, str],
        wall: float,
    ) -> None:
        if self.on:
            fx.append(
                Emit(
                    StepRetrying(
                        run_id=self.run_id,
                        step_id=sid,
                        attempt=attempt,
                        delay=delay,
                        error_type=error[0],
                        error_message=error[1],
                        time=wall,
                    )
                )
            )

    def finished(self, fx: list[Effect], record: StepRecord, wall: float) -> None:
        if not self.on:
            return
        last = record.last_attempt
        fx.append(
            Emit(
                StepFinished(
                    run_id=self.run_id,
                    step_id=record.step_id,
                    status=record.status.value,
                    attempts=record.attempt_count,
                    error_type=last.error_type if last else None,
                    error_message=last.error_message if last else None,
                    time=wall,
                    reused_from=record.reused_from,
                )
            )
        )

    def committed(self, fx: list[Effect], state: RunState, done: list[str]) -> None:
        if not self.on or not done:
            return
        start = state.committed - len(done)
        for i, sid in enumerate(done):
            record = state.record(sid)
            fx.append(
                Emit(
                    StepCommitted(
                        run_id=self.run_id,
                        step_id=sid,
                        index=start + i,
                        status=record.status.value,
                        attempts=record.attempt_count,
                        created=tuple(sorted(state.output(sid).keys())),
                    )
                )
            )
