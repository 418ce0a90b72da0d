"""What a step raises: the step fails with that error, and nothing else does.

A picklable exception comes back as itself (type and message).  One that
cannot be pickled still fails the step with a clear error: itself where the
step ran in the engine's process, a ``RemoteStepError`` naming it where it ran
in another (``REMOTE``).  A ``BaseException`` that is not an ``Exception``
(``SystemExit``, ``KeyboardInterrupt``, ``GeneratorExit``, a user subclass) fails the step, never
the Worker, the Supervisor or the run's other steps, and the run ends.
"""

from __future__ import annotations

import pytest

import stepvisor as sv
from tests.contract import steps
from tests.contract.conftest import Backend


def test_picklable_exception_keeps_its_type_and_message(backend: Backend) -> None:
    wf = sv.Workflow("exc", [backend.step("quota", steps.raise_picklable)])
    result = backend.run(wf)
    assert result.status is sv.RunStatus.FAILED
    assert result.steps["quota"].status is sv.StepStatus.FAILED
    error = result.errors["quota"]
    assert type(error) is steps.QuotaError
    assert str(error) == "over quota on attempt 1"
    assert result.steps["quota"].attempts[0].error_message == "over quota on attempt 1"


def test_unpicklable_exception_still_fails_the_step_clearly(backend: Backend) -> None:
    wf = sv.Workflow("exc", [backend.step("locked", steps.raise_unpicklable)])
    result = backend.run(wf)
    assert result.status is sv.RunStatus.FAILED
    assert result.steps["locked"].status is sv.StepStatus.FAILED
    error = result.errors["locked"]
    assert "holds a lock" in str(error)
    if backend.remote:
        assert isinstance(error, sv.RemoteStepError)
        assert error.remote_type.endswith("LockedError")
        assert "in raise_unpicklable" in error.remote_traceback
    else:  # REMOTE is False: the exception never has to travel
        assert type(error) is steps.LockedError
    assert "raise_unpicklable" in (result.steps["locked"].attempts[0].error_traceback or "")


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("SystemExit", SystemExit),
        ("KeyboardInterrupt", KeyboardInterrupt),
        ("GeneratorExit", GeneratorExit),
        ("Abort", steps.Abort),
    ],
)
def test_base_exception_fails_the_step_and_the_run_ends(
    backend: Backend, kind: str, expected: type[BaseException]
) -> None:
    wf = sv.Workflow(
        "base",
        [
            backend.step("bad", steps.raise_base, params={"kind": kind}),
            backend.step("fine", steps.return_mapping),
        ],
        settings=sv.Settings(on_failure="continue"),
    )
    result = backend.run(wf)
    assert result.status is sv.RunStatus.FAILED
    assert result.statuses() == {"bad": sv.StepStatus.FAILED, "fine": sv.StepStatus.SUCCEEDED}
    assert [a.outcome for a in result.steps["bad"].attempts] == ["failed"]
    assert type(result.errors["bad"]) is expected
    assert result.artifacts["made_by"] == "fine"
    # The engine is still whole: the next run on this backend works.
    again = backend.run(sv.Workflow("after", [backend.step("fine", steps.return_mapping)]))
    assert again.status is sv.RunStatus.SUCCEEDED, again.error
