"""Deadlines: a step past its ``timeout`` ends ``timed_out`` and its work really stops.

"Stops" is checked by what the step would do after the deadline: it would
write a ``late`` file, and that file never appears.  A thread step stops
through its context (``ctx.wait_cancelled`` then ``raise_if_cancelled``); an
async step's task is cancelled; a process or Ray step is killed, and the test
waits until its process is gone before it looks for the file, so the absence
is certain rather than hoped for.
"""

from __future__ import annotations

import time

import pytest

import stepvisor as sv
from tests.contract import steps
from tests.contract.conftest import Backend, attempts_of

pytestmark = pytest.mark.realtime

TIMEOUT = 0.5
#: A stopped step must be over within its timeout plus the kill grace (1 s by
#: default) plus this margin, far less than the STOP_BOUND it would otherwise wait.
MARGIN = 3.0


def test_step_past_its_timeout_is_timed_out_and_stops(backend: Backend) -> None:
    wf = sv.Workflow("deadline", [backend.step("slow", steps.block_until_stopped, timeout=TIMEOUT)])
    began = time.monotonic()
    result = backend.run(wf)
    elapsed = time.monotonic() - began
    pid = backend.started("slow")
    assert result.status is sv.RunStatus.FAILED
    assert result.steps["slow"].status is sv.StepStatus.TIMED_OUT
    assert attempts_of(result, "slow") == [("timed_out", "stepvisor.errors.StepTimeoutError")]
    error = result.errors["slow"]
    assert isinstance(error, sv.StepTimeoutError)
    assert f"exceeded its {TIMEOUT:g} s timeout" in str(error)
    assert elapsed < TIMEOUT + 1.0 + MARGIN
    backend.assert_stopped(pid)
    assert not backend.did("slow", "late"), "the step's work went on after its deadline"
    assert "late" not in result.artifacts
