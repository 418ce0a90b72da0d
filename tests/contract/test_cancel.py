"""Cancel: ``handle.cancel()`` stops the step in flight and everything not yet started."""

from __future__ import annotations

import time

import pytest

import stepvisor as sv
from tests.contract import steps
from tests.contract.conftest import Backend, attempts_of, finish

pytestmark = pytest.mark.realtime


def test_cancel_ends_the_running_step_and_the_steps_not_started_cancelled(
    backend: Backend,
) -> None:
    wf = sv.Workflow(
        "cancel",
        [
            backend.step("running", steps.block_until_stopped),
            backend.step("waiting", steps.return_mapping, needs=["running"]),
        ],
    )
    handle = sv.start(wf)
    pid = backend.started("running")
    asked = time.monotonic()
    handle.cancel()
    result = finish(handle)
    assert time.monotonic() - asked < 1.0 + 3.0  # the kill grace and a margin
    assert result.status is sv.RunStatus.CANCELLED
    assert result.statuses() == {
        "running": sv.StepStatus.CANCELLED,
        "waiting": sv.StepStatus.CANCELLED,
    }
    assert attempts_of(result, "running") == [("cancelled", "stepvisor.errors.StepCancelledError")]
    assert isinstance(result.errors["running"], sv.StepCancelledError)
    assert result.steps["waiting"].attempts == (), "a step not started must not start"
    assert backend.calls("waiting") == []
    backend.assert_stopped(pid)
    assert not backend.did("running", "late")
    assert dict(result.artifacts) == {}
