"""How a run ends: its status, its error, and the result handed to the caller.

A cancelled run is ``cancelled`` whatever else happened; otherwise a failed or
timed-out step, or the run's own deadline, makes it ``failed``; else it
``succeeded``.  The error is the first failed step's (in canonical order).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from stepvisor.core._outcomes import type_name
from stepvisor.core.effects import Effect, Emit, Finish, FinishRun
from stepvisor.core.events import RunFinished
from stepvisor.core.result import RunResult
from stepvisor.core.state import RunState, RunStatus, StepRecord, StepStatus
from stepvisor.errors import StepTimeoutError

__all__ = ["finish_effects", "supervisor_failed_result"]

_FAILED = (StepStatus.FAILED, StepStatus.TIMED_OUT)


def finish_effects(
    state: RunState,
    *,
    stop: RunStatus | None,
    stop_note: str,
    deadline_passed: bool,
    errors: Mapping[str, list[BaseException]],
    started: float,
    ended: float,
    discarded: int,
    emit_events: bool,
    seed: int,
    settings: Mapping[str, object],
) -> tuple[RunState, list[Effect]]:
    """The run's final state and the effects that record and report it."""
    # A view, not a dict of every record: see StepsView.
    steps = state.steps_view()
    failed_step = state.first_with(_FAILED)
    if stop is RunStatus.CANCELLED:
        status = RunStatus.CANCELLED
    elif failed_step is not None or deadline_passed:
        status = RunStatus.FAILED
    else:
        status = RunStatus.SUCCEEDED
    error: BaseException | None = None
    if failed_step is not None and errors.get(failed_step):
        error = errors[failed_step][-1]
    elif status is RunStatus.FAILED:
        error = StepTimeoutError(stop_note or "the run failed")
    error_text = None
    if failed_step is not None and error is not None:
        error_text = f"step {failed_step!r} failed: {type_name(error)}: {error}"
    elif error is not None:
        error_text = str(error)
    elif status is RunStatus.CANCELLED:
        error_text = stop_note or "cancelled"
    state = state.finish(status, error_text)
    result = dataclasses.replace(
        _result(state, status, error, steps, seed=seed, started=started, ended=ended),
        failed_step=failed_step,
        errors={
            sid: errs[-1]
            for sid, errs in errors.items()
            if steps[sid].status is not StepStatus.SUCCEEDED
        },
        settings=settings,
        discarded_outcomes=discarded,
    )
    effects: list[Effect] = [FinishRun(status, ended, error_text)]
    if emit_events:
        effects.append(
            Emit(
                RunFinished(run_id=state.run_id, status=status.value, error=error_text, time=ended)
            )
        )
    effects.append(Finish(result))
    return state, effects


def supervisor_failed_result(
    state: RunState, error: BaseException, *, seed: int, started: float, ended: float
) -> RunResult:
    """A failed result for a run whose shell broke (a stepvisor bug), from what is known."""
    return _result(
        state, RunStatus.FAILED, error, state.steps, seed=seed, started=started, ended=ended
    )


def _result(
    state: RunState,
    status: RunStatus,
    error: BaseException | None,
    steps: Mapping[str, StepRecord],
    *,
    seed: int,
    started: float,
    ended: float,
) -> RunResult:
    return RunResult(
        run_id=state.run_id,
        workflow_id=state.workflow_id,
        status=status,
        steps=steps,
        artifacts=state.artifacts,
        seed=seed,
        commits=tuple(state.commits),
        started=started,
        ended=ended,
        error=error,
    )
