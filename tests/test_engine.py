"""The engine end to end on the thread backend: bound, eagerness, failure policy."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import stepvisor as sv
from tests.conftest import cancel_midway, wait_for


class Gate:
    """Holds steps inside their function until released; records concurrency."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.running = 0
        self.max_running = 0
        self.entered: list[str] = []

    def step(self, ctx: sv.StepContext) -> None:
        with self.lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
            self.entered.append(ctx.step_id)
        try:
            assert self.release.wait(30), "gate never released"
        finally:
            with self.lock:
                self.running -= 1

    def count(self) -> int:
        with self.lock:
            return self.running


def gated_workflow(gate: Gate, n: int = 20, settings: sv.Settings | None = None) -> sv.Workflow:
    return sv.Workflow(
        "gated",
        steps=[sv.Step(f"s{i:02d}", gate.step) for i in range(n)],
        settings=settings or sv.Settings(),
    )


def run_gated(
    wf: sv.Workflow, gate: Gate, expected: int, **kwargs: Any
) -> tuple[sv.RunResult, list[sv.Event]]:
    events: list[sv.Event] = []
    handle = sv.start(wf, on_event=events.append, **kwargs)
    try:
        wait_for(lambda: gate.count() == expected, what=f"{expected} steps running")
        # The initial fill is one Supervisor message: once `expected` steps are
        # inside the gate, every dispatch decision of that fill has been made.
        dispatched = [e for e in events if isinstance(e, sv.StepDispatched)]
        assert len(dispatched) == expected
        assert gate.count() == expected
    finally:
        gate.release.set()
    result = handle.wait(timeout=30)
    return result, events


def test_default_bound_runs_exactly_eight_of_twenty(chdir_tmp: Path) -> None:
    gate = Gate()
    result, _ = run_gated(gated_workflow(gate), gate, 8)
    assert result.status is sv.RunStatus.SUCCEEDED
    assert gate.max_running == 8


@pytest.mark.parametrize(
    "source", ["argument", "environment", "workflow", "pyproject", "setup.cfg"]
)
def test_bound_from_each_source(
    source: str, chdir_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = Gate()
    settings = sv.Settings()
    kwargs: dict[str, Any] = {}
    if source == "argument":
        kwargs["max_parallel"] = 3
        monkeypatch.setenv("STEPVISOR_MAX_PARALLEL", "5")
    elif source == "environment":
        monkeypatch.setenv("STEPVISOR_MAX_PARALLEL", "3")
        settings = sv.Settings(max_parallel=6)
    elif source == "workflow":
        settings = sv.Settings(max_parallel=3)
        (chdir_tmp / "pyproject.toml").write_text("[tool.stepvisor]\nmax_parallel = 7\n")
    elif source == "pyproject":
        (chdir_tmp / "pyproject.toml").write_text("[tool.stepvisor]\nmax_parallel = 3\n")
    else:
        (chdir_tmp / "setup.cfg").write_text("[stepvisor]\nmax_parallel = 3\n")
    result, _ = run_gated(gated_workflow(gate, 12, settings), gate, 3, **kwargs)
    assert result.ok
    assert gate.max_running == 3


def test_pool_caps_its_steps_inside_the_global_bound(chdir_tmp: Path) -> None:
    gate = Gate()
    steps = [sv.Step(f"db{i}", gate.step, pool="db") for i in range(6)]
    steps += [sv.Step(f"io{i}", gate.step) for i in range(6)]
    wf = sv.Workflow("pools", steps=steps, settings=sv.Settings(pools={"db": 2}, max_parallel=5))
    result, _ = run_gated(wf, gate, 5)
    assert result.ok
    first_five = gate.entered[:5]
    assert sum(1 for s in first_five if s.startswith("db")) == 2
    assert gate.max_running == 5


def test_step_in_unknown_pool_is_rejected(chdir_tmp: Path) -> None:
    wf = sv.Workflow("p", steps=[sv.Step("a", lambda ctx: None, pool="gpu")])
    with pytest.raises(sv.InvalidSettingError, match="pool 'gpu'"):
        sv.run(wf)


def test_eager_dispatch_long_step_does_not_hold_back_others(chdir_tmp: Path) -> None:
    release_a = threading.Event()
    c_started = threading.Event()
    order: list[str] = []

    def a(ctx: sv.StepContext) -> None:
        assert release_a.wait(30)
        order.append("a")

    def b(ctx: sv.StepContext) -> None:
        order.append("b")

    def c(ctx: sv.StepContext) -> None:
        order.append("c")
        c_started.set()

    wf = sv.Workflow(
        "eager", steps=[sv.Step("a", a), sv.Step("b", b), sv.Step("c", c, needs=["b"])]
    )
    handle = sv.start(wf)
    try:
        assert c_started.wait(10), "c did not start while a was still running"
    finally:
        release_a.set()
    result = handle.wait(30)
    assert result.ok
    assert order == ["b", "c", "a"]


def test_inputs_are_ancestors_artifacts_later_in_canonical_order_wins(chdir_tmp: Path) -> None:
    seen: dict[str, dict[str, Any]] = {}

    def make(name: str, out: dict[str, Any]) -> Callable[[sv.StepContext], dict[str, Any]]:
        def fn(ctx: sv.StepContext) -> dict[str, Any]:
            seen[name] = dict(ctx.inputs)
            return out

        return fn

    wf = sv.Workflow(
        "arts",
        steps=[
            sv.Step("a", make("a", {"x": "from a", "only_a": 1})),
            sv.Step("b", make("b", {"x": "from b"})),
            sv.Step("c", make("c", {}), needs=["a", "b"]),
            sv.Step("d", make("d", {"y": 2})),
        ],
    )
    result = sv.run(wf, max_parallel=2)
    assert seen["c"] == {"x": "from b", "only_a": 1}
    assert seen["a"] == {}
    assert dict(result.artifacts) == {"x": "from b", "only_a": 1, "y": 2}


def test_fail_fast_cancels_in_flight_and_pending(chdir_tmp: Path) -> None:
    slow_started = threading.Event()

    def slow(ctx: sv.StepContext) -> None:
        slow_started.set()
        assert ctx.wait_cancelled(30), "slow was never told to cancel"
        ctx.raise_if_cancelled()

    def boom(ctx: sv.StepContext) -> None:
        assert slow_started.wait(30)
        raise ValueError("boom")

    wf = sv.Workflow(
        "ff",
        steps=[
            sv.Step("slow", slow),
            sv.Step("boom", boom),
            sv.Step("after", lambda ctx: None, needs=["boom"]),
            sv.Step("later", lambda ctx: None, needs=["slow"]),
        ],
    )
    result = sv.run(wf, max_parallel=2)
    assert result.status is sv.RunStatus.FAILED
    assert result.statuses() == {
        "boom": sv.StepStatus.FAILED,
        "slow": sv.StepStatus.CANCELLED,
        "after": sv.StepStatus.CANCELLED,
        "later": sv.StepStatus.CANCELLED,
    }
    assert result.failed_step == "boom"
    assert isinstance(result.error, ValueError)
    assert result.error_message == "step 'boom' failed: ValueError: boom"


def test_continue_skips_dependents_and_runs_independent_branches(chdir_tmp: Path) -> None:
    def boom(ctx: sv.StepContext) -> None:
        raise RuntimeError("nope")

    wf = sv.Workflow(
        "cont",
        steps=[
            sv.Step("bad", boom),
            sv.Step("child", lambda ctx: None, needs=["bad"]),
            sv.Step("grandchild", lambda ctx: None, needs=["child"]),
            sv.Step("other", lambda ctx: {"o": 1}),
            sv.Step("other2", lambda ctx: None, needs=["other"]),
        ],
        settings=sv.Settings(on_failure="continue"),
    )
    result = sv.run(wf)
    assert result.status is sv.RunStatus.FAILED
    assert result.statuses() == {
        "bad": sv.StepStatus.FAILED,
        "child": sv.StepStatus.SKIPPED,
        "grandchild": sv.StepStatus.SKIPPED,
        "other": sv.StepStatus.SUCCEEDED,
        "other2": sv.StepStatus.SUCCEEDED,
    }
    assert result.steps["child"].note == "skipped: it depends on 'bad', which failed"
    assert result.artifacts["o"] == 1


@pytest.mark.parametrize("exc", [SystemExit(3), KeyboardInterrupt(), GeneratorExit()])
def test_base_exceptions_in_steps_fail_the_step_not_the_run_machinery(
    exc: BaseException, chdir_tmp: Path
) -> None:
    def bad(ctx: sv.StepContext) -> None:
        raise exc

    wf = sv.Workflow("base", steps=[sv.Step("bad", bad), sv.Step("ok", lambda ctx: None)])
    result = sv.run(wf, on_failure="continue")
    assert result.steps["bad"].status is sv.StepStatus.FAILED
    assert result.steps["ok"].status is sv.StepStatus.SUCCEEDED
    assert type(result.errors["bad"]) is type(exc)


def test_events_arrive_in_order_and_commits_follow_canonical_order(chdir_tmp: Path) -> None:
    events: list[sv.Event] = []
    wf = sv.Workflow(
        "ev",
        steps=[sv.Step("b", lambda ctx: {"v": 1}), sv.Step("a", lambda ctx: None, needs=["b"])],
    )
    result = sv.run(wf, on_event=events.append)
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "RunStarted"
    assert kinds[-1] == "RunFinished"
    commits = [e for e in events if isinstance(e, sv.StepCommitted)]
    assert [(c.step_id, c.index, c.created) for c in commits] == [("b", 0, ("v",)), ("a", 1, ())]
    assert result.commits == ("b", "a")


def test_a_failing_event_hook_is_ignored(chdir_tmp: Path) -> None:
    def hook(event: sv.Event) -> None:
        raise RuntimeError("hook bug")

    result = sv.run(sv.Workflow("h", steps=[sv.Step("a", lambda ctx: None)]), on_event=hook)
    assert result.ok


def test_bad_return_value_fails_the_step_with_a_clear_error(chdir_tmp: Path) -> None:
    wf = sv.Workflow("r", steps=[sv.Step("a", lambda ctx: [1, 2])])
    result = sv.run(wf)
    assert result.status is sv.RunStatus.FAILED
    assert "must return a mapping" in str(result.error)


def test_handle_done_wait_and_cancel(chdir_tmp: Path) -> None:
    started = threading.Event()

    def waits(ctx: sv.StepContext) -> None:
        started.set()
        ctx.wait_cancelled(30)
        ctx.raise_if_cancelled()

    wf = sv.Workflow("c", steps=[sv.Step("w", waits), sv.Step("n", lambda ctx: None, needs=["w"])])
    handle = sv.start(wf)
    assert started.wait(10)
    assert not handle.done()
    with pytest.raises(TimeoutError):
        handle.wait(timeout=0.01)
    handle.cancel()
    result = handle.wait(timeout=30)
    assert handle.done()
    assert result.status is sv.RunStatus.CANCELLED
    assert result.statuses() == {"w": sv.StepStatus.CANCELLED, "n": sv.StepStatus.CANCELLED}


def test_async_steps_run_on_the_runtime_loop(chdir_tmp: Path) -> None:
    async def a(ctx: sv.StepContext) -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"loop": id(asyncio.get_running_loop())}

    result = sv.run(sv.Workflow("as", steps=[sv.Step("a", a)]))
    assert result.ok
    assert isinstance(result.artifacts["loop"], int)


def test_run_async_does_not_block_the_callers_loop(chdir_tmp: Path) -> None:
    release = threading.Event()

    def held(ctx: sv.StepContext) -> None:
        assert release.wait(30)

    async def main() -> sv.RunResult:
        task = asyncio.ensure_future(sv.run_async(sv.Workflow("ra", steps=[sv.Step("h", held)])))
        ticks = 0
        while ticks < 20:  # the loop keeps turning while the workflow runs
            await asyncio.sleep(0)
            ticks += 1
        assert not task.done()
        release.set()
        return await asyncio.wait_for(task, 30)

    assert asyncio.run(main()).ok


def test_cancelling_the_awaiting_task_cancels_the_run(chdir_tmp: Path) -> None:
    started = threading.Event()
    statuses: list[str] = []

    def waits(ctx: sv.StepContext) -> None:
        started.set()
        ctx.wait_cancelled(30)
        ctx.raise_if_cancelled()

    def hook(event: sv.Event) -> None:
        if isinstance(event, sv.RunFinished):
            statuses.append(event.status)

    async def main() -> None:
        task = asyncio.ensure_future(
            sv.run_async(sv.Workflow("rc", steps=[sv.Step("w", waits)]), on_event=hook)
        )
        while not started.is_set():
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert statuses == ["cancelled"]


def test_tiny_steps_are_batched_but_never_exceed_the_bound(chdir_tmp: Path) -> None:
    lock = threading.Lock()
    running = [0, 0]  # now, peak

    def tiny(ctx: sv.StepContext) -> None:
        with lock:
            running[0] += 1
            running[1] = max(running[1], running[0])
        with lock:
            running[0] -= 1

    wf = sv.Workflow("tiny", steps=[sv.Step(f"t{i:03d}", tiny) for i in range(600)])
    result = sv.run(wf, max_parallel=3)
    assert result.ok
    assert running[1] <= 3
    assert result.commits == wf.step_ids


def test_cancel_reaches_attempts_queued_behind_others(chdir_tmp: Path) -> None:
    done = threading.Semaphore(0)

    def tiny(ctx: sv.StepContext) -> None:
        done.release()

    wf = sv.Workflow("q", steps=[sv.Step(f"t{i:04d}", tiny) for i in range(3000)])
    cancel_midway(sv.start(wf, max_parallel=2), done, after=200)


def test_on_cancel_callback_runs_when_the_step_is_told_to_stop(chdir_tmp: Path) -> None:
    unblock = threading.Event()
    started = threading.Event()

    def blocked(ctx: sv.StepContext) -> None:
        ctx.on_cancel(unblock.set)  # e.g. close the socket a call is blocked on
        started.set()
        assert unblock.wait(30)
        ctx.raise_if_cancelled()

    handle = sv.start(sv.Workflow("oc", steps=[sv.Step("b", blocked)]))
    assert started.wait(10)
    handle.cancel()
    result = handle.wait(10)
    assert result.steps["b"].status is sv.StepStatus.CANCELLED


def test_every_terminal_step_gets_a_finished_event(chdir_tmp: Path) -> None:
    events: list[sv.Event] = []

    def boom(ctx: sv.StepContext) -> None:
        raise ValueError("x")

    wf = sv.Workflow(
        "fin",
        steps=[sv.Step("a", boom), sv.Step("b", lambda ctx: None, needs=["a"])],
    )
    sv.run(wf, on_event=events.append)
    finished = {e.step_id: e.status for e in events if isinstance(e, sv.StepFinished)}
    assert finished == {"a": "failed", "b": "cancelled"}


def test_second_cancel_of_run_async_does_not_freeze_the_loop(chdir_tmp: Path) -> None:
    started = threading.Event()
    release = threading.Event()

    def slow_to_stop(ctx: sv.StepContext) -> None:
        started.set()
        ctx.wait_cancelled(30)
        assert release.wait(30)  # keeps running for a while after being told

    async def main() -> float:
        task = asyncio.ensure_future(
            sv.run_async(sv.Workflow("c2", steps=[sv.Step("s", slow_to_stop)]), kill_grace=5.0)
        )
        while not started.is_set():
            await asyncio.sleep(0.001)
        task.cancel()
        await asyncio.sleep(0)
        task.cancel()
        ticks = 0
        while ticks < 50:  # the loop keeps turning while the run winds down
            await asyncio.sleep(0)
            ticks += 1
        assert not task.done()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 30)
        return ticks

    assert asyncio.run(main()) == 50
