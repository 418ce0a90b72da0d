"""A retry after each kind of failure: an error, a timeout, a crash.

Each step counts its calls in a file (a process or Ray step shares no memory
with the test) and fails only on the first; the record keeps both attempts,
the first with its error.
"""

from __future__ import annotations

import pytest

import stepvisor as sv
from tests.contract import steps
from tests.contract.conftest import NO_WAIT, Backend, attempts_of

TWICE = sv.RetryPolicy(max_attempts=2, backoff=NO_WAIT)


def test_retry_after_an_error_succeeds_on_attempt_two(backend: Backend) -> None:
    wf = sv.Workflow("retry", [backend.step("flaky", steps.fail_first, retry=TWICE)])
    result = backend.run(wf)
    assert result.status is sv.RunStatus.SUCCEEDED, result.error
    assert attempts_of(result, "flaky") == [("failed", "ValueError"), ("succeeded", None)]
    assert result.steps["flaky"].attempts[0].error_message == "failed on call 1"
    assert [attempt for attempt, _ in backend.calls("flaky")] == [1, 2]
    assert result.artifacts["ok_on"] == 2


@pytest.mark.realtime
def test_retry_after_a_timeout_succeeds_on_attempt_two(backend: Backend) -> None:
    wf = sv.Workflow("retry", [backend.step("slow", steps.block_first, timeout=0.5, retry=TWICE)])
    result = backend.run(wf)
    assert result.status is sv.RunStatus.SUCCEEDED, result.error
    assert attempts_of(result, "slow") == [
        ("timed_out", "stepvisor.errors.StepTimeoutError"),
        ("succeeded", None),
    ]
    assert "exceeded its 0.5 s timeout on attempt 1 of 2" in (
        result.steps["slow"].attempts[0].error_message or ""
    )
    [(_, first), (_, second)] = backend.calls("slow")
    backend.assert_stopped(first)
    if backend.remote:
        assert second != first, "the retry ran in the killed worker's process"
    assert not backend.did("slow", "late"), "the timed-out attempt went on"
    assert result.artifacts["ok_on"] == 2


@pytest.mark.realtime
@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_retry_after_a_crash_runs_on_a_fresh_worker(backend: Backend, how: str) -> None:
    if not backend.can_crash:
        pytest.skip(
            f"CAN_CRASH[{backend.name!r}] is False: a step on this backend cannot crash a "
            "worker (test_crash.py checks that sys.exit() fails it as an error instead)"
        )
    policy = sv.RetryPolicy(max_attempts=2, backoff=NO_WAIT, retry_crashes=True)
    wf = sv.Workflow(
        "retry", [backend.step("crashy", steps.crash_first, params={"how": how}, retry=policy)]
    )
    result = backend.run(wf)
    assert result.status is sv.RunStatus.SUCCEEDED, result.error
    assert attempts_of(result, "crashy") == [
        ("crashed", "stepvisor.errors.WorkerCrashedError"),
        ("succeeded", None),
    ]
    [(_, crashed), (_, retried)] = backend.calls("crashy")
    assert retried != crashed, "the retry ran in the dead worker's process"
    assert result.artifacts["pid"] == retried
    backend.assert_stopped(crashed)
