"""Crashes: a step that kills the process running it fails with ``WorkerCrashedError``.

Only where a step runs in a worker process of its own (``CAN_CRASH``).  A
thread or async step shares the engine's process; for those the suite checks
the in-process analogue of exiting: ``sys.exit()`` raises ``SystemExit``, which
fails the step as an ordinary error (outcome ``failed``, not ``crashed``) and
leaves its Worker to run the next step.
"""

from __future__ import annotations

import pytest

import stepvisor as sv
from tests.contract import steps
from tests.contract.conftest import Backend, attempts_of

pytestmark = pytest.mark.realtime


@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_step_that_kills_its_worker_fails_with_worker_crashed_error(
    backend: Backend, how: str
) -> None:
    if not backend.can_crash:
        if how == "sigkill":
            pytest.skip(
                f"CAN_CRASH[{backend.name!r}] is False: there is no worker process to "
                "SIGKILL but the test session's; [exit] checks the in-process analogue"
            )
        _exit_is_an_error_where_nothing_can_crash(backend)
        return
    wf = sv.Workflow(
        "crash",
        [
            backend.step("crash", steps.crash, params={"how": how}, metadata={"cost": 10}),
            backend.step("next", steps.emit, params={"out": {}}),
        ],
        settings=sv.Settings(max_parallel=1, on_failure="continue"),
    )
    result = backend.run(wf)
    assert result.status is sv.RunStatus.FAILED
    assert result.statuses() == {"crash": sv.StepStatus.FAILED, "next": sv.StepStatus.SUCCEEDED}
    assert attempts_of(result, "crash") == [("crashed", "stepvisor.errors.WorkerCrashedError")]
    assert isinstance(result.errors["crash"], sv.WorkerCrashedError)
    [(_, crashed)] = backend.calls("crash")
    [(_, after)] = backend.calls("next")
    backend.assert_stopped(crashed)
    assert after != crashed, "the next step ran in the dead worker's process"


def _exit_is_an_error_where_nothing_can_crash(backend: Backend) -> None:
    wf = sv.Workflow(
        "crash",
        [
            backend.step("exit", steps.raise_base, params={"kind": "SystemExit"}),
            backend.step("next", steps.emit, params={"out": {}}),
        ],
        settings=sv.Settings(max_parallel=1, on_failure="continue"),
    )
    result = backend.run(wf)
    assert result.statuses() == {"exit": sv.StepStatus.FAILED, "next": sv.StepStatus.SUCCEEDED}
    assert attempts_of(result, "exit") == [("failed", "SystemExit")]
    workers = {result.steps[sid].attempts[0].worker for sid in ("exit", "next")}
    assert len(workers) == 1, f"the Worker was replaced: {workers}"
