"""One rule for a step that returns after it was asked to stop (issue 12, point 2).

The ask can come from the step's own deadline, the run's deadline, a
``handle.cancel()`` or a fail-fast stop caused by another step failing.  A step
that polls ``ctx.cancelled`` and then *returns normally*, with some artifacts,
has not done its work: the attempt ends as the stop says (``timed_out`` for a
deadline, ``cancelled`` for a cancel or fail-fast), its artifacts are
discarded (neither in the result nor in the store), its record says it
returned after the ask, and a resumed run runs it again.

Where a backend cannot see the ask (``SEES_CANCELLED``: a process child is
killed by SIGTERM, a Ray task force-cancelled), the step cannot return: the
suite asserts the kill, and the same outcome, store contents and resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

import stepvisor as sv
from tests.contract import steps
from tests.contract.conftest import RUN_BOUND, Backend, finish

pytestmark = pytest.mark.realtime


@dataclass(frozen=True)
class Stop:
    """A way to ask a running step to stop, and what the rule makes of it."""

    step_status: sv.StepStatus
    run_status: sv.RunStatus
    error: type[sv.StepError]


STOPS = {
    "step-deadline": Stop(sv.StepStatus.TIMED_OUT, sv.RunStatus.FAILED, sv.StepTimeoutError),
    "run-deadline": Stop(sv.StepStatus.TIMED_OUT, sv.RunStatus.FAILED, sv.StepTimeoutError),
    "cancel": Stop(sv.StepStatus.CANCELLED, sv.RunStatus.CANCELLED, sv.StepCancelledError),
    "fail-fast": Stop(sv.StepStatus.CANCELLED, sv.RunStatus.FAILED, sv.StepCancelledError),
}


def _workflow(backend: Backend, how: str, *, limit: float | None = None) -> sv.Workflow:
    """The run for ``how``; ``limit`` replaces its deadlines (for the resumed run).

    A resumed run may change timeouts (the fingerprint leaves them out): it gets
    generous ones, so that what it checks is that the step runs again, not how
    fast a fresh Ray worker starts.
    """
    if how == "step-deadline":
        polite = backend.step("polite", steps.stop_politely, timeout=limit or 0.5)
        return sv.Workflow("polite", [polite])
    if how == "run-deadline":
        return sv.Workflow(
            "polite",
            [backend.step("polite", steps.stop_politely)],
            settings=sv.Settings(deadline=limit or 0.8),
        )
    polite = backend.step("polite", steps.stop_politely)
    if how == "cancel":
        return sv.Workflow("polite", [polite])
    boom = backend.step("boom", steps.fail_once_started, params={"after": ["polite.1.started"]})
    return sv.Workflow("polite", [polite, boom], settings=sv.Settings(on_failure="fail_fast"))


@pytest.mark.parametrize("how", STOPS)
def test_step_that_returns_after_a_stop_ends_as_the_stop_says_and_runs_again(
    backend: Backend, tmp_path: Path, how: str
) -> None:
    stop = STOPS[how]
    db = tmp_path / "runs.db"
    wf = _workflow(backend, how)
    handle = sv.start(wf, store=db)
    pid = backend.started("polite")
    if how == "cancel":
        handle.cancel()
    result = finish(handle)

    assert result.status is stop.run_status
    record = result.steps["polite"]
    assert record.status is stop.step_status
    last = record.attempts[-1]
    assert last.outcome == stop.step_status.value
    assert isinstance(result.errors["polite"], stop.error)
    assert "polite_partial" not in result.artifacts, "the artifacts of a stopped step were kept"
    with sv.SQLiteStore(db) as kept:
        stored = kept.load(result.run_id)
    assert stored.steps["polite"].status is stop.step_status
    assert "polite_partial" not in stored.outputs.get("polite", {})
    if backend.sees_cancelled:
        assert backend.did("polite", "returned"), "the step did not return when asked"
        said = f"{last.error_message} {last.note}"
        assert "returned" in said, f"the record does not say the step returned: {said!r}"
    else:  # SEES_CANCELLED is False: the step is killed instead of told
        backend.assert_stopped(pid)
        assert not backend.did("polite", "returned")

    (backend.signals / "go").touch()
    again = _workflow(backend, how, limit=RUN_BOUND)
    resumed = finish(sv.resume_start(result.run_id, again, store=db))
    assert resumed.status is sv.RunStatus.SUCCEEDED, resumed.error
    assert resumed.steps["polite"].status is sv.StepStatus.SUCCEEDED
    assert not resumed.steps["polite"].restored, "resume kept the stopped step's result"
    assert len(backend.calls("polite")) == 2, "the resumed run did not run the step again"
    assert "polite_done" in resumed.artifacts
    assert "polite_partial" not in resumed.artifacts
