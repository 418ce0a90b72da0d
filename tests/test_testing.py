"""stepvisor.testing: a run driven by a FakeBackend whose answers the test scripts."""

from __future__ import annotations

from pathlib import Path

import pytest

import stepvisor as sv
from stepvisor import testing
from stepvisor.testing import AttemptResult, AttemptSpec, FakeBackend, crash, error, ok

NO_WAIT = sv.Backoff.none()


def _never_called(ctx: sv.StepContext) -> None:
    raise AssertionError("a FakeBackend step must not run the real function")


def _wf(*steps: sv.Step, **settings: object) -> sv.Workflow:
    return sv.Workflow("fake", list(steps), settings=sv.Settings(**settings))  # type: ignore[arg-type]


def test_testing_exports_the_fake_clock_and_backend() -> None:
    assert testing.FakeClock is sv.FakeClock
    assert set(testing.__all__) >= {"FakeBackend", "FakeClock"}


def test_scripted_success_error_and_crash_follow_the_engine_rules(chdir_tmp: Path) -> None:
    def answer(spec: AttemptSpec) -> AttemptResult:
        if spec.step_id == "good":
            return ok({"rows": [1, 2, 3]})
        if spec.step_id == "flaky" and spec.attempt == 1:
            return error(ValueError("first try fails"))
        if spec.step_id == "flaky":
            return ok({"flaky": spec.attempt})
        return crash(spec)

    fake = FakeBackend(answer)
    retry = sv.RetryPolicy(max_attempts=2, backoff=NO_WAIT)
    wf = _wf(
        sv.Step("good", _never_called),
        sv.Step("flaky", _never_called, needs=["good"], retry=retry),
        sv.Step("doomed", _never_called, retry=sv.RetryPolicy(max_attempts=1)),
        on_failure="continue",
    )
    result = sv.run(wf, backends={"thread": fake})

    assert result.statuses() == {
        "good": sv.StepStatus.SUCCEEDED,
        "flaky": sv.StepStatus.SUCCEEDED,
        "doomed": sv.StepStatus.FAILED,
    }
    assert result.artifacts["rows"] == [1, 2, 3]
    assert result.artifacts["flaky"] == 2
    assert [a.outcome for a in result.steps["flaky"].attempts] == ["failed", "succeeded"]
    assert result.steps["flaky"].attempts[0].error_type == "ValueError"
    assert [a.outcome for a in result.steps["doomed"].attempts] == ["crashed"]
    # "flaky" needs "good": its attempts came after, and saw its artifacts.
    calls = [(spec.step_id, spec.attempt) for spec in fake.calls]
    assert sorted(calls) == [("doomed", 1), ("flaky", 1), ("flaky", 2), ("good", 1)]
    assert calls.index(("good", 1)) < calls.index(("flaky", 1)) < calls.index(("flaky", 2))
    assert dict(fake.calls[calls.index(("flaky", 1))].inputs) == {"rows": [1, 2, 3]}
    assert not fake.closed  # the caller's backend: the run does not close it


def test_a_held_attempt_is_cancelled_with_the_run(chdir_tmp: Path) -> None:
    fake = FakeBackend(hold={"slow"})
    wf = _wf(sv.Step("slow", _never_called), sv.Step("after", _never_called, needs=["slow"]))
    handle = sv.start(wf, backends={"thread": fake})
    assert fake.wait_started("slow", timeout=10), "the held attempt never reached the backend"
    handle.cancel()
    result = handle.wait(10)

    assert result.status is sv.RunStatus.CANCELLED
    assert result.statuses() == {
        "slow": sv.StepStatus.CANCELLED,
        "after": sv.StepStatus.CANCELLED,
    }
    assert [spec.step_id for spec in fake.calls] == ["slow"]


def test_a_released_attempt_gets_the_scripted_answer(chdir_tmp: Path) -> None:
    fake = FakeBackend(lambda spec: ok({spec.step_id: True}), hold={"gate"})
    handle = sv.start(_wf(sv.Step("gate", _never_called)), backends={"thread": fake})
    assert fake.wait_started("gate", timeout=10)
    assert not handle.done()
    fake.release("gate")
    result = handle.wait(10)
    assert result.status is sv.RunStatus.SUCCEEDED
    assert result.artifacts["gate"] is True


def test_a_handler_that_raises_is_reported_as_a_backend_bug(chdir_tmp: Path) -> None:
    def broken(spec: AttemptSpec) -> AttemptResult:
        raise KeyError("the handler itself is broken")

    result = sv.run(_wf(sv.Step("a", _never_called)), backends={"thread": FakeBackend(broken)})
    attempt = result.steps["a"].attempts[0]
    assert attempt.outcome == "failed"
    assert "stepvisor bug" in (attempt.error_message or "")
    assert isinstance(result.errors["a"].__cause__, KeyError)


def test_backends_must_name_executors_and_be_backends(chdir_tmp: Path) -> None:
    wf = _wf(sv.Step("a", _never_called))
    with pytest.raises(sv.InvalidSettingError, match="names no executor"):
        sv.run(wf, backends={"gpu": FakeBackend()})
    with pytest.raises(sv.InvalidSettingError, match="not a Backend"):
        sv.run(wf, backends={"thread": object()})
