"""Deadlines and cancellation on the thread and async backends.

Policy (when a deadline fires, when a thread is abandoned) runs on a
``FakeClock``: the test moves time forward and observes what the run does.
Steps block on events or on their context, never on real time.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path

import pytest

import stepvisor as sv
from stepvisor.actors.supervisor import HEARTBEAT_INTERVAL
from tests.conftest import pump_until, wait_for

#: Set by ``cooperative`` once it runs: a test moves time past a deadline only then.
COOPERATIVE_RUNNING = threading.Event()


def cooperative(ctx: sv.StepContext) -> None:
    COOPERATIVE_RUNNING.set()
    ctx.wait_cancelled(30)
    ctx.raise_if_cancelled()


def timers_beyond_heartbeat(clock: sv.FakeClock, n: int) -> bool:
    # The Supervisor always has a heartbeat timer pending; wait for ``n`` more.
    return clock.pending() >= n + 1


def test_thread_step_is_told_to_stop_at_its_deadline(chdir_tmp: Path) -> None:
    clock = sv.FakeClock()
    wf = sv.Workflow("t", steps=[sv.Step("slow", cooperative, timeout=5.0)])
    COOPERATIVE_RUNNING.clear()
    handle = sv.start(wf, clock=clock)
    wait_for(lambda: timers_beyond_heartbeat(clock, 1), what="deadline timer")
    assert COOPERATIVE_RUNNING.wait(10)  # its deadline passes while it runs
    clock.advance(4.9)
    assert not handle.done()
    clock.advance(0.2)
    result = handle.wait(10)
    record = result.steps["slow"]
    assert record.status is sv.StepStatus.TIMED_OUT
    assert isinstance(result.error, sv.StepTimeoutError)
    assert str(result.error) == (
        "step 'slow' exceeded its 5 s timeout on attempt 1 of 1; "
        "it stopped when told to through its context"
    )


def test_ignoring_thread_is_abandoned_and_replaced_so_eight_still_run(chdir_tmp: Path) -> None:
    clock = sv.FakeClock()
    stubborn_release = threading.Event()
    gate = threading.Event()
    lock = threading.Lock()
    running: list[str] = []
    peak = [0]

    def stubborn(ctx: sv.StepContext) -> None:
        assert stubborn_release.wait(30)

    def gated(ctx: sv.StepContext) -> None:
        with lock:
            running.append(ctx.step_id)
            peak[0] = max(peak[0], len(running))
        try:
            assert gate.wait(30)
        finally:
            with lock:
                running.remove(ctx.step_id)

    steps = [sv.Step("stubborn", stubborn, timeout=1.0, metadata={"cost": 100})]
    steps += [sv.Step(f"g{i}", gated) for i in range(8)]
    wf = sv.Workflow(
        "ab",
        steps=steps,
        settings=sv.Settings(max_parallel=8, kill_grace=1.0, on_failure="continue"),
    )
    handle = sv.start(wf, clock=clock)
    try:
        wait_for(lambda: len(running) == 7, what="7 gated steps beside the stubborn one")
        clock.advance(1.0)  # deadline: the stubborn step is told to stop, and ignores it
        clock.advance(1.0)  # grace over: it is abandoned and its Worker replaced
        pump_until(clock, lambda: len(running) == 8, what="the 8th gated step on the new Worker")
        assert peak[0] == 8
    finally:
        gate.set()
    result = handle.wait(10)
    record = result.steps["stubborn"]
    assert record.status is sv.StepStatus.TIMED_OUT
    last = record.attempts[-1]
    assert last.note == "abandoned"
    assert "abandoned" in (last.error_message or "")
    assert all(result.steps[f"g{i}"].status is sv.StepStatus.SUCCEEDED for i in range(8))
    stubborn_release.set()  # let the abandoned daemon thread end (leak check)


def test_late_outcome_of_abandoned_attempt_is_discarded(
    chdir_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="stepvisor")
    clock = sv.FakeClock()
    release_stubborn = threading.Event()
    release_holder = threading.Event()
    running = threading.Event()

    def stubborn(ctx: sv.StepContext) -> dict[str, str]:
        running.set()
        assert release_stubborn.wait(30)
        return {"late": "should never be committed"}

    def holder(ctx: sv.StepContext) -> None:
        assert release_holder.wait(30)

    wf = sv.Workflow(
        "late",
        steps=[sv.Step("stubborn", stubborn, timeout=1.0), sv.Step("holder", holder)],
        settings=sv.Settings(on_failure="continue"),
    )
    handle = sv.start(wf, clock=clock)
    try:
        wait_for(lambda: timers_beyond_heartbeat(clock, 1), what="deadline timer")
        assert running.wait(10)  # past its deadline while it runs, not before it starts
        clock.advance(1.0)
        clock.advance(1.0)
        pump_until(clock, lambda: "abandoned" in caplog.text, what="abandonment")
        release_stubborn.set()
        wait_for(lambda: "discarded a late outcome" in caplog.text, what="the discard")
    finally:
        release_stubborn.set()
        release_holder.set()
    result = handle.wait(10)
    assert result.discarded_outcomes == 1
    assert result.steps["stubborn"].status is sv.StepStatus.TIMED_OUT
    assert result.steps["stubborn"].attempt_count == 1
    assert "late" not in result.artifacts


def test_async_step_is_cancelled_at_its_deadline(chdir_tmp: Path) -> None:
    clock = sv.FakeClock()
    cancelled = threading.Event()

    async def sleeper(ctx: sv.StepContext) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    wf = sv.Workflow("as", steps=[sv.Step("sleeper", sleeper, timeout=2.0)])
    handle = sv.start(wf, clock=clock)
    wait_for(lambda: timers_beyond_heartbeat(clock, 1), what="deadline timer")
    clock.advance(2.0)
    result = handle.wait(10)
    assert cancelled.is_set()
    assert result.steps["sleeper"].status is sv.StepStatus.TIMED_OUT
    assert str(result.error).endswith("its task was cancelled")


def test_run_deadline_cuts_a_chain_short(chdir_tmp: Path) -> None:
    clock = sv.FakeClock()
    wf = sv.Workflow(
        "chain",
        steps=[
            sv.Step("a", lambda ctx: {"x": 1}),
            sv.Step("b", cooperative, needs=["a"]),
            sv.Step("c", lambda ctx: None, needs=["b"]),
        ],
        settings=sv.Settings(deadline=5.0),
    )
    events: list[sv.Event] = []
    handle = sv.start(wf, clock=clock, on_event=events.append)
    wait_for(
        lambda: any(isinstance(e, sv.StepDispatched) and e.step_id == "b" for e in events),
        what="b dispatched",
    )
    clock.advance(5.0)
    result = handle.wait(10)
    assert result.status is sv.RunStatus.FAILED
    assert result.statuses() == {
        "a": sv.StepStatus.SUCCEEDED,
        "b": sv.StepStatus.TIMED_OUT,
        "c": sv.StepStatus.CANCELLED,
    }
    assert "the run's 5 s deadline" in str(result.errors["b"])


def test_effective_deadline_is_the_earlier_of_step_and_run(chdir_tmp: Path) -> None:
    clock = sv.FakeClock()
    wf = sv.Workflow(
        "d",
        steps=[sv.Step("a", cooperative, timeout=100.0)],
        settings=sv.Settings(deadline=3.0),
    )
    handle = sv.start(wf, clock=clock)
    wait_for(lambda: timers_beyond_heartbeat(clock, 2), what="timers")
    clock.advance(3.0)
    result = handle.wait(10)
    assert result.steps["a"].status is sv.StepStatus.TIMED_OUT


@pytest.mark.parametrize("backend", ["thread", "async"])
@pytest.mark.realtime
def test_cancel_with_eight_in_flight_stops_all_within_two_seconds(
    backend: str, chdir_tmp: Path
) -> None:
    started = threading.Semaphore(0)

    def thread_step(ctx: sv.StepContext) -> None:
        started.release()
        cooperative(ctx)

    async def async_step(ctx: sv.StepContext) -> None:
        started.release()
        await asyncio.sleep(30)

    fn = thread_step if backend == "thread" else async_step
    steps = [sv.Step(f"s{i}", fn) for i in range(12)]
    handle = sv.start(sv.Workflow("c8", steps=steps))
    for _ in range(8):
        assert started.acquire(timeout=10)
    t0 = time.monotonic()
    handle.cancel()
    result = handle.wait(10)
    elapsed = time.monotonic() - t0
    assert elapsed < 2.0
    assert result.status is sv.RunStatus.CANCELLED
    statuses = result.statuses()
    assert all(s is sv.StepStatus.CANCELLED for s in statuses.values())
    assert sum(1 for r in result.steps.values() if r.attempt_count) == 8


def test_cancel_waits_at_most_the_grace_then_abandons(chdir_tmp: Path) -> None:
    clock = sv.FakeClock()
    release = threading.Event()
    entered = threading.Event()

    def ignores(ctx: sv.StepContext) -> None:
        entered.set()
        assert release.wait(30)

    handle = sv.start(
        sv.Workflow("g", steps=[sv.Step("x", ignores)], settings=sv.Settings(kill_grace=2.0)),
        clock=clock,
    )
    try:
        assert entered.wait(10)
        handle.cancel()
        wait_for(lambda: timers_beyond_heartbeat(clock, 1), what="grace timer")
        assert not handle.done()
        clock.advance(2.0)
        result = handle.wait(10)
    finally:
        release.set()
    assert result.status is sv.RunStatus.CANCELLED
    assert result.steps["x"].status is sv.StepStatus.CANCELLED
    assert result.steps["x"].attempts[-1].note == "abandoned"


def test_heartbeat_interval_is_short_enough_for_cli_cancel() -> None:
    assert HEARTBEAT_INTERVAL <= 0.5
