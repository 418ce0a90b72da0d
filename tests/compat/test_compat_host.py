"""A call's run hosted on the caller's loop (stepvisor.compat._host).

What the host promises beyond what tests/compat/test_compat.py checks: nothing of a
call runs on another thread (no thread is even started), several loops may
share one executor's bound (a lease given back on one loop's thread reaches
a run on another), ``close()`` cancels the calls still going, and the blocking
path (a Worker thread waiting for ``execute_fn``'s task) still works for a
thread backend that runs steps itself.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import stepvisor as sv
from stepvisor.compat import ParallelStepExecutor, StepExecution, StepExecutionResult
from stepvisor.compat._loop import OnCallerLoop
from stepvisor.compat._tracker import Slot
from tests.compat.test_compat import Spec

BOUND = 10.0  # seconds: every wait here fails after this, never hangs


@dataclass
class State:
    step_executions: list[Any] = field(default_factory=list)


def wait_for(predicate: Callable[[], bool], *, what: str) -> None:
    """Block until ``predicate()`` holds (checked every millisecond), at most BOUND seconds."""
    end = time.monotonic() + BOUND
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.001)


def test_a_call_runs_wholly_on_the_callers_thread_and_starts_no_thread(chdir_tmp: Path) -> None:
    seen: list[tuple[str, int]] = []

    class Record(StepExecution):
        """The caller's record type: it notes the thread each status is written on."""

        def __setattr__(self, name: str, value: Any) -> None:
            if name == "status":
                seen.append((value, threading.get_ident()))
            super().__setattr__(name, value)

    async def main() -> tuple[set[threading.Thread], set[threading.Thread], int]:
        executor = ParallelStepExecutor(max_parallel=2, record_type=Record)
        during: set[threading.Thread] = set()

        async def fn(step: Spec) -> dict[str, Any]:
            seen.append(("ran " + step.id, threading.get_ident()))
            during.update(threading.enumerate())
            return {}

        # A first call makes the executor's engine; the second is the steady state.
        await executor.execute_parallel([Spec("w")], fn, state=State())
        before = set(threading.enumerate())
        during.clear()
        seen.clear()
        async with asyncio.timeout(BOUND):
            results = await executor.execute_parallel(
                [Spec("a"), Spec("b", requires=["x"]), Spec("c", creates=["x"])], fn, state=State()
            )
        assert [r.step_execution.status for r in results] == ["completed"] * 3
        return before, during, executor.engine.pool.taken

    before, during, taken = run(main())
    caller = threading.get_ident()
    assert {ident for _, ident in seen} == {caller}
    assert [what for what, _ in seen if what.startswith("ran")] != []
    assert during <= before  # not one thread more while the steps ran
    assert not [t.name for t in before if t.name.startswith("stepvisor")]
    assert taken == 0  # every lease given back


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_two_loops_share_one_executors_bound_and_hand_the_slot_over(chdir_tmp: Path) -> None:
    """max_parallel=1 across two loops: the second call's step waits for the first's to end."""
    executor = ParallelStepExecutor(max_parallel=1)
    order: list[str] = []
    a_in, release_a = threading.Event(), threading.Event()
    results: dict[str, list[StepExecutionResult[Spec]]] = {}
    errors: list[BaseException] = []

    async def fn(step: Spec) -> dict[str, Any]:
        order.append(f"{step.id} start")
        if step.id == "a":
            a_in.set()
            while not release_a.is_set():  # the other loop's thread sets it
                await asyncio.sleep(0.001)
        order.append(f"{step.id} end")
        return {step.id: True}

    def call(step_id: str) -> None:
        async def main() -> None:
            async with asyncio.timeout(BOUND):
                results[step_id] = await executor.execute_parallel(
                    [Spec(step_id)], fn, state=State()
                )

        try:
            asyncio.run(main())
        except BaseException as exc:  # reported below, on the test's thread
            errors.append(exc)

    first = threading.Thread(target=call, args=("a",))
    first.start()
    assert a_in.wait(BOUND)
    second = threading.Thread(target=call, args=("b",))
    second.start()
    pool = executor.engine.pool
    # b's run has asked for the one slot and waits for it (queued in the pool).
    wait_for(lambda: len(pool._waiting) == 1, what="b's run to wait for a slot")
    assert order == ["a start"]
    release_a.set()
    first.join(BOUND)
    second.join(BOUND)
    assert not first.is_alive()
    assert not second.is_alive()
    assert errors == []
    assert order == ["a start", "a end", "b start", "b end"]
    assert [r.artifacts for r in results["a"] + results["b"]] == [{"a": True}, {"b": True}]
    assert pool.taken == 0


def test_close_cancels_a_call_that_is_still_going(chdir_tmp: Path) -> None:
    async def main() -> tuple[list[StepExecutionResult[Spec]], list[str], State]:
        executor = ParallelStepExecutor(max_parallel=2)
        state = State()
        entered = asyncio.Event()
        cleaned_up: list[str] = []

        async def fn(step: Spec) -> dict[str, Any]:
            entered.set()
            try:
                await asyncio.Event().wait()
            finally:
                cleaned_up.append(step.id)
            return {}

        call = asyncio.create_task(executor.execute_parallel([Spec("a")], fn, state=state))
        async with asyncio.timeout(BOUND):
            await entered.wait()
            executor.close()
            results = await call
        return results, cleaned_up, state

    results, cleaned_up, state = run(main())
    assert cleaned_up == ["a"]
    assert [r.status for r in state.step_executions] == ["cancelled"]
    assert results[0].error is not None
    assert state.step_executions[0].error == (
        "step 'a' was cancelled while it ran: execute_parallel was cancelled"
    )


def test_a_worker_thread_can_still_wait_for_execute_fn_on_the_callers_loop(
    chdir_tmp: Path,
) -> None:
    """The blocking path: a thread backend that runs the step itself (not the facade's)."""

    async def main() -> tuple[sv.RunResult, list[int]]:
        loop = asyncio.get_running_loop()
        threads: list[int] = []

        async def fn(step: Spec) -> dict[str, Any]:
            threads.append(threading.get_ident())
            if step.id == "slow":
                await asyncio.Event().wait()
            return {"out": step.id}

        def step(sid: str, timeout: float | None, creates: list[str]) -> sv.Step:
            slot = Slot(Spec(sid), StepExecution(sid, "", ""), timeout=timeout)
            call = OnCallerLoop(slot, fn, loop=loop, context=contextvars.copy_context())
            return sv.Step(sid, call, executor="thread", timeout=timeout, creates=creates)

        wf = sv.Workflow("blocking", [step("quick", None, ["out"]), step("slow", 0.2, [])])
        async with asyncio.timeout(BOUND):
            result = await asyncio.to_thread(sv.run, wf, on_failure="continue")
        return result, threads

    result, threads = run(main())
    assert result.steps["quick"].status is sv.StepStatus.SUCCEEDED
    assert result.artifacts["out"] == "quick"
    assert result.steps["slow"].status is sv.StepStatus.TIMED_OUT
    assert set(threads) == {threading.get_ident()}  # both ran on the caller's loop


@pytest.mark.realtime
def test_a_step_outlasting_the_heartbeat_still_completes(chdir_tmp: Path) -> None:
    """The run's heartbeat (every 0.5 s) is a loop timer: it fires and is stopped at the end."""

    async def main() -> list[StepExecutionResult[Spec]]:
        executor = ParallelStepExecutor()
        loop = asyncio.get_running_loop()

        async def fn(step: Spec) -> dict[str, Any]:
            await asyncio.sleep(0.6)
            return {}

        async with asyncio.timeout(BOUND):
            results = await executor.execute_parallel([Spec("a")], fn, state=State())
        # Nothing of the run is left scheduled on the loop (its heartbeat was cancelled).
        scheduled = [h for h in getattr(loop, "_scheduled", []) if not h.cancelled()]
        assert scheduled == []
        return results

    results = run(main())
    assert [r.step_execution.status for r in results] == ["completed"]
