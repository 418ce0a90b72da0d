"""Retries inside a run: attempts, delays on the injected clock, slots, budget, records."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import stepvisor as sv
from tests.conftest import pump_until, wait_for


def flaky(failures: int, exc: type[BaseException] = ConnectionError) -> Callable[..., Any]:
    """A step that fails its first ``failures`` attempts, then returns its attempt number."""

    def fn(ctx: sv.StepContext) -> dict[str, int]:
        if ctx.attempt <= failures:
            raise exc(f"attempt {ctx.attempt} failed")
        return {ctx.step_id: ctx.attempt}

    return fn


def drive(handle: sv.RunHandle, clock: sv.FakeClock, *, step: float = 0.25) -> sv.RunResult:
    """Move fake time forward in small steps until the run ends (bounded in real time)."""

    def advanced_and_done() -> bool:
        clock.advance(step)
        return handle.done()

    pump_until(clock, advanced_and_done, what="the run to end")
    return handle.wait(10)


def fixed(delay: float, attempts: int) -> sv.RetryPolicy:
    return sv.RetryPolicy(max_attempts=attempts, backoff=sv.Backoff.fixed(delay))


def test_fails_twice_then_succeeds_with_three_attempts(chdir_tmp: Path) -> None:
    clock = sv.FakeClock()
    wf = sv.Workflow("r", steps=[sv.Step("s", flaky(2), retry=fixed(1.0, 3))])
    result = drive(sv.start(wf, clock=clock), clock)
    record = result.steps["s"]
    assert record.status is sv.StepStatus.SUCCEEDED
    assert [a.outcome for a in record.attempts] == ["failed", "failed", "succeeded"]
    assert [a.delay_after for a in record.attempts] == [1.0, 1.0, None]
    assert record.attempts[0].error_type == "ConnectionError"
    assert record.attempts[0].error_message == "attempt 1 failed"
    assert "ConnectionError: attempt 1 failed" in (record.attempts[0].error_traceback or "")
    assert result.artifacts["s"] == 3


def test_out_of_attempts_surfaces_the_original_exception_with_history(chdir_tmp: Path) -> None:
    clock = sv.FakeClock()
    wf = sv.Workflow("r", steps=[sv.Step("s", flaky(2), retry=fixed(1.0, 2))])
    result = drive(sv.start(wf, clock=clock), clock)
    record = result.steps["s"]
    assert record.status is sv.StepStatus.FAILED
    assert record.attempt_count == 2
    assert type(result.error) is ConnectionError
    assert str(result.error) == "attempt 2 failed"
    assert "attempt 1 failed: ConnectionError: attempt 1 failed" in result.error.__notes__


def test_retry_waits_for_its_delay_on_the_injected_clock(chdir_tmp: Path) -> None:
    clock = sv.FakeClock()
    dispatched_at: dict[int, float] = {}

    def hook(event: sv.Event) -> None:
        if isinstance(event, sv.StepDispatched):
            dispatched_at[event.attempt] = clock.monotonic()

    wf = sv.Workflow("r", steps=[sv.Step("s", flaky(1), retry=fixed(7.0, 2))])
    handle = sv.start(wf, clock=clock, on_event=hook)
    wait_for(lambda: handle.result is None and 1 in dispatched_at, what="first attempt")
    result = drive(handle, clock, step=0.5)
    assert result.ok
    assert dispatched_at[2] - dispatched_at[1] >= 7.0


def test_a_step_in_backoff_does_not_hold_its_slot(chdir_tmp: Path) -> None:
    clock = sv.FakeClock()
    order: list[str] = []

    def hook(event: sv.Event) -> None:
        if isinstance(event, sv.StepDispatched):
            order.append(f"start {event.step_id}#{event.attempt}")
        elif isinstance(event, sv.StepRetrying):
            order.append(f"wait {event.step_id}")
        elif isinstance(event, sv.StepFinished):
            order.append(f"end {event.step_id}")

    wf = sv.Workflow(
        "slot",
        steps=[
            sv.Step("flaky", flaky(1), retry=fixed(10.0, 2), metadata={"cost": 5}),
            sv.Step("other", lambda ctx: None),
        ],
        settings=sv.Settings(max_parallel=1),
    )
    handle = sv.start(wf, clock=clock, on_event=hook)
    wait_for(lambda: "end other" in order, what="other to run during the backoff")
    assert clock.monotonic() < 10.0
    result = drive(handle, clock)
    assert result.ok
    assert order == [
        "start flaky#1",
        "wait flaky",
        "start other#1",
        "end other",
        "start flaky#2",
        "end flaky",
    ]


def test_non_retryable_failure_makes_exactly_one_attempt(chdir_tmp: Path) -> None:
    policy = sv.RetryPolicy(max_attempts=5, retry_on=(ConnectionError,))
    wf = sv.Workflow("nr", steps=[sv.Step("s", flaky(3, ValueError), retry=policy)])
    result = sv.run(wf, clock=sv.FakeClock())
    assert result.steps["s"].attempt_count == 1
    assert result.steps["s"].attempts[0].delay_after is None
    assert type(result.error) is ValueError


def test_fatal_error_is_never_retried_and_retryable_error_always_is(chdir_tmp: Path) -> None:
    clock = sv.FakeClock()

    def fatal(ctx: sv.StepContext) -> None:
        raise sv.FatalError("bad config")

    def asks(ctx: sv.StepContext) -> None:
        if ctx.attempt == 1:
            raise sv.RetryableError("later please", after=3.0)

    policy = sv.RetryPolicy(max_attempts=4, retry_on=(ConnectionError,))
    wf = sv.Workflow(
        "fr",
        steps=[sv.Step("fatal", fatal, retry=policy), sv.Step("asks", asks, retry=policy)],
        settings=sv.Settings(on_failure="continue"),
    )
    result = drive(sv.start(wf, clock=clock), clock)
    assert result.steps["fatal"].attempt_count == 1
    assert result.steps["asks"].status is sv.StepStatus.SUCCEEDED
    assert result.steps["asks"].attempts[0].delay_after == 3.0


def test_retry_budget_bounds_retries_across_the_run(chdir_tmp: Path) -> None:
    clock = sv.FakeClock()
    policy = fixed(1.0, 3)
    wf = sv.Workflow(
        "budget",
        steps=[sv.Step(f"s{i}", flaky(1), retry=policy) for i in range(3)],
        settings=sv.Settings(max_retries_total=2, on_failure="continue", max_parallel=1),
    )
    result = drive(sv.start(wf, clock=clock), clock)
    statuses = result.statuses()
    assert list(statuses.values()).count(sv.StepStatus.SUCCEEDED) == 2
    failed = [sid for sid, st in statuses.items() if st is sv.StepStatus.FAILED]
    assert len(failed) == 1
    error = result.errors[failed[0]]
    assert any("retry budget (max_retries_total=2) is spent" in n for n in error.__notes__)


def test_jitter_delays_are_reproducible_from_the_seed(chdir_tmp: Path) -> None:
    def delays(seed: int) -> dict[str, list[float | None]]:
        clock = sv.FakeClock()
        policy = sv.RetryPolicy(max_attempts=3, backoff=sv.Backoff.exponential(jitter="full"))
        wf = sv.Workflow("j", steps=[sv.Step(f"s{i}", flaky(2), retry=policy) for i in range(2)])
        result = drive(sv.start(wf, clock=clock, seed=seed), clock, step=1.0)
        assert result.seed == seed
        return {sid: [a.delay_after for a in rec.attempts] for sid, rec in result.steps.items()}

    first = delays(1234)
    assert first == delays(1234)
    assert first["s0"] != first["s1"]
    assert first != delays(99)


def test_seed_is_random_when_not_given_and_recorded(chdir_tmp: Path) -> None:
    wf = sv.Workflow("s", steps=[sv.Step("a", lambda ctx: None)])
    seeds = {sv.run(wf).seed for _ in range(3)}
    assert len(seeds) > 1


@pytest.mark.parametrize("retry_timeouts", [True, False])
def test_timeouts_follow_retry_timeouts_on_threads(retry_timeouts: bool, chdir_tmp: Path) -> None:
    clock = sv.FakeClock()
    attempts: list[int] = []
    lock = threading.Lock()

    def slow_first(ctx: sv.StepContext) -> None:
        with lock:
            attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            ctx.wait_cancelled(30)
            ctx.raise_if_cancelled()

    policy = sv.RetryPolicy(
        max_attempts=2, backoff=sv.Backoff.none(), retry_timeouts=retry_timeouts
    )
    wf = sv.Workflow("t", steps=[sv.Step("s", slow_first, timeout=2.0, retry=policy)])
    result = drive(sv.start(wf, clock=clock), clock, step=0.5)
    if retry_timeouts:
        assert result.steps["s"].status is sv.StepStatus.SUCCEEDED
        assert [a.outcome for a in result.steps["s"].attempts] == ["timed_out", "succeeded"]
    else:
        assert result.steps["s"].status is sv.StepStatus.TIMED_OUT
        assert result.steps["s"].attempt_count == 1


def test_a_timeout_that_lands_while_the_run_stops_is_not_retried_and_says_why(
    chdir_tmp: Path,
) -> None:
    """Fail-fast: a deadline that fired just before the stop keeps its ``timed_out``.

    The order is forced with events: ``b_slow``'s deadline fires (fake clock),
    then ``a_boom`` fails and the run begins to stop, then ``b_slow`` returns.
    Its policy would retry a timeout, but the run is stopping, so no retry
    starts and the attempt records why.
    """
    started, saw_cancel, boom_recorded = threading.Event(), threading.Event(), threading.Event()

    def slow(ctx: sv.StepContext) -> None:
        started.set()
        ctx.wait_cancelled(30)
        saw_cancel.set()
        assert boom_recorded.wait(30)
        ctx.raise_if_cancelled()

    def boom(ctx: sv.StepContext) -> None:
        assert saw_cancel.wait(30)
        raise sv.FatalError("boom")

    def on_event(event: sv.Event) -> None:
        if isinstance(event, sv.StepFinished) and event.step_id == "a_boom":
            boom_recorded.set()

    wf = sv.Workflow(
        "r",
        steps=[
            sv.Step("a_boom", boom),
            sv.Step("b_slow", slow, timeout=5.0, retry=fixed(0.0, 3)),
        ],
    )
    clock = sv.FakeClock()
    handle = sv.start(wf, max_parallel=2, clock=clock, on_event=on_event)
    wait_for(started.is_set, what="b_slow to start")
    clock.advance(6.0)
    result = handle.wait(30)
    assert result.status is sv.RunStatus.FAILED
    assert result.failed_step == "a_boom"
    record = result.steps["b_slow"]
    assert record.status is sv.StepStatus.TIMED_OUT
    assert [a.outcome for a in record.attempts] == ["timed_out"]
    note = record.attempts[0].note or ""
    assert note.startswith("not retried: the run is stopping"), note
    assert "a_boom" in note, note
