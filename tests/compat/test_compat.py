"""The asyncio-executor facade, used as an existing call site would use it.

Steps are a plain dataclass (duck-typed), ``execute_fn`` is an ``async def``
and ``state`` any object with a ``step_executions`` list.  Concurrency is
checked with asyncio events and conditions on the caller's loop, every wait
bounded by ``asyncio.timeout``.  The last tests check ``sv.run_async``'s own
cancellation semantics where tests/test_engine.py does not.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest

import stepvisor as sv
from stepvisor.compat import (
    ParallelStepExecutor,
    RetryConfig,
    StepExecution,
    StepExecutionResult,
    find_ready_steps,
)

T = TypeVar("T")
Artifacts = dict[str, Any]

BOUND = 10.0  # seconds: every wait in these tests fails after this, never hangs


@dataclass
class Spec:
    """A step as the calling code defines it: not a stepvisor class."""

    id: str
    requires: list[str] = field(default_factory=list)
    creates: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class WorkflowState:
    step_executions: list[StepExecution] = field(default_factory=list)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def execute(
    steps: list[Spec],
    fn: Callable[[Spec], Awaitable[Artifacts | None]],
    *,
    state: WorkflowState | None = None,
    timeout_seconds: float | None = None,
    **options: Any,
) -> list[StepExecutionResult[Spec]]:
    executor = ParallelStepExecutor(**options)
    async with asyncio.timeout(BOUND):
        return await executor.execute_parallel(
            steps, fn, state=state or WorkflowState(), timeout_seconds=timeout_seconds
        )


def by_id(results: list[StepExecutionResult[Spec]]) -> dict[str, StepExecutionResult[Spec]]:
    return {r.step.id: r for r in results}


async def forever() -> None:
    await asyncio.Event().wait()


# -- parallelism and the bound -------------------------------------------------------------


def test_independent_steps_run_at_the_same_time(chdir_tmp: Path) -> None:
    async def main() -> list[StepExecutionResult[Spec]]:
        entered: list[str] = []
        both_in = asyncio.Event()

        async def fn(step: Spec) -> Artifacts:
            entered.append(step.id)
            if len(entered) == 2:
                both_in.set()
            await both_in.wait()  # one at a time, the first would wait until its timeout
            return {step.id: True}

        return await execute([Spec("a"), Spec("b")], fn, timeout_seconds=BOUND)

    results = run(main())
    assert [r.step_execution.status for r in results] == ["completed", "completed"]
    assert [r.artifacts for r in results] == [{"a": True}, {"b": True}]


@pytest.mark.realtime
def test_two_tenth_second_steps_finish_in_well_under_two_tenths(chdir_tmp: Path) -> None:
    async def fn(step: Spec) -> Artifacts:
        await asyncio.sleep(0.1)
        return {}

    async def main() -> tuple[float, float]:
        state = WorkflowState()
        start = time.monotonic()
        results = await execute([Spec("a"), Spec("b")], fn, state=state)
        call = time.monotonic() - start
        assert all(r.step_execution.status == "completed" for r in results)
        first = min(r.started_at for r in state.step_executions if r.started_at)
        last = max(r.completed_at for r in state.step_executions if r.completed_at)
        return (last - first).total_seconds(), call

    # One after the other, the steps would span 0.2 s or more.  The whole call
    # also pays for starting and joining the run's threads, which a loaded
    # machine slows down, so it gets a looser bound.
    span, call = run(main())
    assert span < 0.18
    assert call < 0.5


def test_max_parallel_two_never_runs_more_than_two_of_five(chdir_tmp: Path) -> None:
    async def main() -> tuple[list[str], int, list[StepExecutionResult[Spec]]]:
        running = 0
        peak = 0
        entered: list[str] = []
        changed = asyncio.Condition()
        release = {f"s{i}": asyncio.Event() for i in range(5)}

        async def fn(step: Spec) -> Artifacts:
            nonlocal running, peak
            async with changed:
                running += 1
                peak = max(peak, running)
                entered.append(step.id)
                changed.notify_all()
            await release[step.id].wait()
            async with changed:
                running -= 1
                changed.notify_all()
            return {}

        async def driver() -> None:
            for done in range(5):
                want = min(2, 5 - done)
                async with changed:
                    await changed.wait_for(
                        lambda: running == want and len(entered) == done + want  # noqa: B023
                    )
                release[entered[done]].set()  # finish the oldest; the next may start

        steps = [Spec(f"s{i}") for i in range(5)]
        results, _ = await asyncio.gather(execute(steps, fn, max_parallel=2), driver())
        return entered, peak, results

    entered, peak, results = run(main())
    assert peak == 2
    # s0 and s1 are dispatched together (their Worker threads race to the loop),
    # then one step per freed slot, in id order.
    assert sorted(entered[:2]) == ["s0", "s1"]
    assert entered[2:] == ["s2", "s3", "s4"]
    assert all(r.step_execution.status == "completed" for r in results)


def test_a_step_waits_for_the_step_that_creates_what_it_requires(chdir_tmp: Path) -> None:
    order: list[str] = []

    async def fn(step: Spec) -> Artifacts:
        order.append(f"start {step.id}")
        await asyncio.sleep(0)
        order.append(f"end {step.id}")
        return dict.fromkeys(step.creates, step.id)

    steps = [
        Spec("load", requires=["rows"], creates=["table"]),
        Spec("extract", requires=["config"], creates=["rows"]),  # nobody creates config
    ]
    results = by_id(run(execute(steps, fn)))
    assert order == ["start extract", "end extract", "start load", "end load"]
    assert results["load"].artifacts == {"table": "load"}
    assert list(by_id(run(execute(steps, fn)))) == ["extract", "load"]  # sorted by id


# -- records -------------------------------------------------------------------------------


def test_records_go_pending_running_then_terminal_in_state(chdir_tmp: Path) -> None:
    state = WorkflowState()
    seen: dict[str, dict[str, str]] = {}

    async def fn(step: Spec) -> Artifacts:
        seen[step.id] = {r.step_id: r.status for r in state.step_executions}
        own = next(r for r in state.step_executions if r.step_id == step.id)
        assert own.started_at is not None
        assert own.completed_at is None
        return {}

    results = run(execute([Spec("b"), Spec("a")], fn, state=state, max_parallel=1, tz=UTC))
    assert seen == {
        "a": {"a": "running", "b": "pending"},
        "b": {"a": "completed", "b": "running"},
    }
    assert [r.step_id for r in state.step_executions] == ["a", "b"]
    assert [r.step_execution for r in results] == state.step_executions
    for record in state.step_executions:
        assert record.started_at is not None
        assert record.completed_at is not None
        assert record.started_at.tzinfo is not None
        assert record.started_at.utcoffset() is not None
        assert record.started_at.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
        assert record.error is None


def test_records_are_naive_local_times_by_default_as_the_asyncio_executor_wrote(
    chdir_tmp: Path,
) -> None:
    @dataclass
    class AgentStep(Spec):
        agent: str = ""
        action: str = ""

    async def fn(step: Spec) -> Artifacts:
        return {}

    before = datetime.now()
    state = WorkflowState()
    run(execute([AgentStep("a", agent="reviewer", action="review_code")], fn, state=state))
    after = datetime.now()
    (record,) = state.step_executions
    assert (record.agent, record.action) == ("reviewer", "review_code")
    assert record.started_at.tzinfo is None
    assert record.completed_at is not None
    assert record.completed_at.tzinfo is None
    # Naive *local*: comparable with the caller's own datetime.now() values.
    assert before <= record.started_at <= record.completed_at <= after
    assert record.duration_seconds is not None
    assert record.duration_seconds >= 0


def test_a_record_type_of_the_callers_own_is_built_and_updated(chdir_tmp: Path) -> None:
    @dataclass
    class TheirRecord:  # the shape of a client's own record class, all required
        step_id: str
        agent: str
        action: str
        started_at: datetime
        completed_at: datetime | None = None
        duration_seconds: float | None = None
        status: str = "running"
        error: str | None = None

    async def fn(step: Spec) -> Artifacts:
        if step.id == "bad":
            raise ValueError("no")
        return {}

    state = WorkflowState()
    results = run(execute([Spec("ok"), Spec("bad")], fn, state=state, record_type=TheirRecord))
    records: list[Any] = list(state.step_executions)
    assert all(type(r) is TheirRecord for r in records)
    assert [r.step_execution for r in results] == state.step_executions
    assert {r.step_id: (r.status, r.error) for r in state.step_executions} == {
        "bad": ("failed", "no"),
        "ok": ("completed", None),
    }
    assert all(r.completed_at is not None for r in state.step_executions)


@pytest.mark.realtime
def test_duration_counts_time_running_not_time_queued(chdir_tmp: Path) -> None:
    async def fn(step: Spec) -> Artifacts:
        if step.id == "a":
            await asyncio.sleep(0.15)
        return {}

    results = by_id(run(execute([Spec("a"), Spec("b")], fn, max_parallel=1)))
    first, queued = results["a"].step_execution, results["b"].step_execution
    assert first.duration_seconds is not None
    assert queued.duration_seconds is not None
    assert queued.started_at is not None
    assert first.completed_at is not None
    assert first.duration_seconds >= 0.15
    assert queued.started_at >= first.completed_at  # it was queued behind a...
    assert queued.duration_seconds < 0.1  # ...and that wait is not counted


# -- failures --------------------------------------------------------------------------------


def test_a_raising_step_keeps_its_exception_and_the_others_go_on(chdir_tmp: Path) -> None:
    boom = ValueError("bad input in row 3")

    async def fn(step: Spec) -> Artifacts:
        if step.id == "parse":
            raise boom
        return {"ok": step.id}

    steps = [
        Spec("parse", creates=["parsed"]),
        Spec("report", requires=["parsed"]),
        Spec("other"),
    ]
    results = by_id(run(execute(steps, fn)))
    failed = results["parse"]
    assert failed.error is boom
    assert failed.step_execution.status == "failed"
    assert failed.step_execution.error == "bad input in row 3"
    assert failed.artifacts == {}
    assert failed.attempts == 1
    assert results["other"].step_execution.status == "completed"
    assert results["other"].error is None
    skipped = results["report"]
    assert skipped.step_execution.status == "cancelled"
    # Never None (callers format it unguarded): a step that never started
    # keeps the time it was queued, and no running time.
    assert skipped.step_execution.started_at <= results["parse"].step_execution.started_at
    assert skipped.step_execution.duration_seconds is None
    assert skipped.attempts == 0
    assert isinstance(skipped.error, sv.StepCancelledError)
    assert skipped.step_execution.error == (
        "step 'report' was not run: it depends on 'parse', which did not complete"
    )


def test_a_timed_out_step_fails_with_a_timeout_error_after_its_task_ended(
    chdir_tmp: Path,
) -> None:
    cleaned_up: list[str] = []

    async def fn(step: Spec) -> Artifacts:
        if step.id == "slow":
            try:
                await forever()
            finally:
                cleaned_up.append(step.id)
        return {}

    steps = [Spec("slow", metadata={"timeout_seconds": 0.05}), Spec("quick")]
    results = by_id(run(execute(steps, fn)))
    slow = results["slow"]
    assert slow.step_execution.status == "failed"
    assert isinstance(slow.error, TimeoutError)
    assert isinstance(slow.error, sv.StepTimeoutError)
    assert slow.step_execution.error is not None
    assert "timed out" in slow.step_execution.error
    assert "0.05 s" in slow.step_execution.error
    assert cleaned_up == ["slow"]  # the task was cancelled and ran its cleanup
    assert results["quick"].step_execution.status == "completed"


@pytest.mark.parametrize(
    ("argument", "in_metadata", "default"),
    [(0.05, 30.0, 30.0), (None, 0.05, 30.0), (None, None, 0.05)],
    ids=["argument-wins", "metadata-over-default", "default"],
)
def test_timeout_comes_from_argument_then_metadata_then_default(
    chdir_tmp: Path, argument: float | None, in_metadata: float | None, default: float
) -> None:
    async def fn(step: Spec) -> Artifacts:
        await forever()
        return {}

    metadata = {} if in_metadata is None else {"timeout_seconds": in_metadata}
    results = run(
        execute(
            [Spec("a", metadata=metadata)],
            fn,
            timeout_seconds=argument,
            default_timeout_seconds=default,
        )
    )
    assert isinstance(results[0].error, TimeoutError)
    assert "its 0.05 s timeout" in (results[0].step_execution.error or "")


def test_an_execute_fn_that_is_not_async_fails_its_step_with_a_clear_error(
    chdir_tmp: Path,
) -> None:
    def not_async(step: Spec) -> Artifacts:
        return {}

    results = run(execute([Spec("a")], not_async))  # type: ignore[arg-type]
    assert isinstance(results[0].error, TypeError)
    assert "async def" in str(results[0].error)


# -- retries ---------------------------------------------------------------------------------


def no_wait(**fields: Any) -> dict[str, Any]:
    return {"initial_backoff_seconds": 0.0, "max_backoff_seconds": 0.0, **fields}


def test_retry_config_in_metadata_retries_until_success(chdir_tmp: Path) -> None:
    calls: list[str] = []

    async def fn(step: Spec) -> Artifacts:
        calls.append(step.id)
        if len(calls) < 3:
            raise ConnectionError(f"flaky {len(calls)}")
        return {"rows": 3}

    step = Spec("fetch", metadata={"retry": no_wait(max_attempts=3)})
    result = run(execute([step], fn))[0]
    assert result.step_execution.status == "completed"
    assert result.attempts == 3
    assert result.artifacts == {"rows": 3}
    assert result.error is None


def test_non_retryable_error_is_not_retried(chdir_tmp: Path) -> None:
    calls: list[str] = []

    async def fn(step: Spec) -> Artifacts:
        calls.append(step.id)
        raise PermissionError("denied")

    retry = no_wait(max_attempts=3, non_retryable_errors=(PermissionError,))
    result = run(execute([Spec("a", metadata={"retry": retry})], fn))[0]
    assert calls == ["a"]
    assert result.attempts == 1
    assert isinstance(result.error, PermissionError)


def test_the_executors_default_retry_config_applies_without_metadata(chdir_tmp: Path) -> None:
    calls: list[str] = []

    async def fn(step: Spec) -> Artifacts:
        calls.append(step.id)
        raise ConnectionError("down")

    config = RetryConfig(max_attempts=2, initial_backoff_seconds=0.0, max_backoff_seconds=0.0)
    result = run(execute([Spec("a")], fn, default_retry_config=config))[0]
    assert calls == ["a", "a"]
    assert result.attempts == 2
    assert result.step_execution.status == "failed"
    assert result.step_execution.error == "down"


def test_a_timeout_is_retried_only_after_the_timed_out_task_ended(chdir_tmp: Path) -> None:
    history: list[str] = []

    async def fn(step: Spec) -> Artifacts:
        attempt = sum(1 for h in history if h.startswith("start")) + 1
        history.append(f"start {attempt}")
        try:
            if attempt == 1:
                await forever()
        finally:
            history.append(f"end {attempt}")
        return {"attempt": attempt}

    step = Spec("a", metadata={"timeout_seconds": 0.05, "retry": no_wait(max_attempts=2)})
    result = run(execute([step], fn))[0]
    assert history == ["start 1", "end 1", "start 2", "end 2"]
    assert result.attempts == 2
    assert result.artifacts == {"attempt": 2}


def test_timeouts_listed_as_non_retryable_are_not_retried(chdir_tmp: Path) -> None:
    async def fn(step: Spec) -> Artifacts:
        await forever()
        return {}

    retry = no_wait(max_attempts=3, non_retryable_errors=(TimeoutError,))
    step = Spec("a", metadata={"timeout_seconds": 0.05, "retry": retry})
    result = run(execute([step], fn))[0]
    assert result.attempts == 1
    assert isinstance(result.error, TimeoutError)


def test_backoff_between_attempts_does_not_hold_a_slot(chdir_tmp: Path) -> None:
    order: list[str] = []

    async def fn(step: Spec) -> Artifacts:
        order.append(step.id)
        if order == ["a"]:
            raise ConnectionError("first attempt fails")
        return {}

    retry = {"max_attempts": 2, "initial_backoff_seconds": 0.05, "max_backoff_seconds": 0.05}
    steps = [Spec("a", metadata={"retry": retry}), Spec("b")]
    results = run(execute(steps, fn, max_parallel=1))
    assert order == ["a", "b", "a"]  # b ran in the slot a left while it waited
    assert [r.step_execution.status for r in results] == ["completed", "completed"]


def test_a_retry_dict_with_a_wrong_value_is_refused_before_anything_runs(
    chdir_tmp: Path,
) -> None:
    state = WorkflowState()

    async def fn(step: Spec) -> Artifacts:
        raise AssertionError("must not run")

    step = Spec("a", metadata={"retry": {"enabled": True, "max_attempts": "3"}})
    with pytest.raises(
        sv.InvalidRetryPolicyError, match=r"step 'a'.*max_attempts must be an integer >= 1"
    ):
        run(execute([step], fn, state=state))
    assert state.step_executions == []


def test_unknown_keys_in_a_retry_dict_are_ignored_with_a_debug_log(
    chdir_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[str] = []

    async def fn(step: Spec) -> Artifacts:
        calls.append(step.id)
        if len(calls) == 1:
            raise ConnectionError("flaky")
        return {}

    # "enabled" lives beside the retry fields in callers' metadata; "max_attempt"
    # is a typo, ignored as the asyncio executor ignored it (so: 2 attempts).
    retry = no_wait(enabled=True, max_attempt=5, max_attempts=2)
    with caplog.at_level(logging.DEBUG, logger="stepvisor.compat"):
        result = run(execute([Spec("a", metadata={"retry": retry})], fn))[0]
    assert result.attempts == 2
    assert result.step_execution.status == "completed"
    (message,) = [r.getMessage() for r in caplog.records if r.name == "stepvisor.compat"]
    assert "ignoring enabled, max_attempt" in message
    assert "the fields are max_attempts" in message


def test_an_empty_retry_dict_means_the_executors_default(chdir_tmp: Path) -> None:
    calls: list[str] = []

    async def fn(step: Spec) -> Artifacts:
        calls.append(step.id)
        raise ConnectionError("down")

    config = RetryConfig(max_attempts=2, initial_backoff_seconds=0.0, max_backoff_seconds=0.0)
    result = run(execute([Spec("a", metadata={"retry": {}})], fn, default_retry_config=config))[0]
    assert result.attempts == 2


def test_retry_config_errors_name_the_field_and_the_fix() -> None:
    with pytest.raises(sv.InvalidRetryPolicyError, match="raise max_backoff_seconds"):
        RetryConfig(initial_backoff_seconds=5.0, max_backoff_seconds=1.0)
    with pytest.raises(sv.InvalidRetryPolicyError, match="max_attempts must be an integer >= 1"):
        RetryConfig(max_attempts=0)
    with pytest.raises(sv.InvalidRetryPolicyError, match="retryable_errors must be a tuple"):
        RetryConfig(retryable_errors=("ValueError",))  # type: ignore[arg-type]


def test_retry_config_methods_answer_as_the_asyncio_executors_did() -> None:
    config = RetryConfig(
        max_attempts=3,
        initial_backoff_seconds=1.0,
        max_backoff_seconds=3.0,
        non_retryable_errors=(PermissionError,),
    )
    assert config.should_retry(1, ConnectionError())
    assert config.should_retry(2, TimeoutError())
    assert not config.should_retry(3, ConnectionError())  # the last attempt
    assert not config.should_retry(1, PermissionError())
    assert not RetryConfig(max_attempts=2, retryable_errors=(OSError,)).should_retry(
        1, ValueError()
    )
    assert RetryConfig(max_attempts=2, retryable_errors=()).should_retry(1, ValueError())
    assert [config.get_backoff_seconds(n) for n in (1, 2, 3)] == [1.0, 2.0, 3.0]


def test_step_execution_result_has_the_asyncio_executors_defaults() -> None:
    record = StepExecution("a")
    result = StepExecutionResult(step=Spec("a"), step_execution=record)
    assert (result.artifacts, result.error, result.attempts) == ({}, None, 1)
    assert record.status == "pending"
    assert record.started_at.tzinfo is None


def test_retry_config_maps_onto_a_stepvisor_retry_policy() -> None:
    config = RetryConfig(
        max_attempts=4,
        initial_backoff_seconds=0.5,
        max_backoff_seconds=8.0,
        backoff_multiplier=3.0,
        retryable_errors=(ConnectionError,),
        non_retryable_errors=(ConnectionRefusedError,),
    )
    policy = config.to_policy()
    assert policy.max_attempts == 4
    assert policy.backoff == sv.Backoff.exponential(
        initial=0.5, multiplier=3.0, cap=8.0, jitter="full"
    )
    assert policy.retry_on == (ConnectionError,)
    assert policy.give_up_on == (ConnectionRefusedError,)
    assert not policy.retry_timeouts  # a TimeoutError is not a ConnectionError


# -- readiness ---------------------------------------------------------------------------------


def test_find_ready_steps_skips_done_running_and_unsatisfied_steps() -> None:
    steps = [
        Spec("done", creates=["a"]),
        Spec("busy", requires=["a"]),
        Spec("ready", requires=["a", "b"]),
        Spec("blocked", requires=["c"]),
        Spec("free"),
    ]
    ready = find_ready_steps(steps, {"done"}, {"busy"}, {"a", "b"})
    assert [s.id for s in ready] == ["ready", "free"]
    assert find_ready_steps(steps, set(), set(), set()) == [steps[0], steps[4]]
    assert find_ready_steps(steps, set(), set()) == [steps[0], steps[4]]  # artifacts optional


@dataclass
class Chained(Spec):
    next: str | None = None


def ids(ready: list[Chained]) -> list[str]:
    return [s.id for s in ready]


def test_a_step_named_by_next_waits_for_the_step_that_names_it() -> None:
    steps = [
        Chained("enhance", next="plan"),
        Chained("plan", next="finish"),
        Chained("finish"),  # requires nothing, yet must not run right after enhance
        Chained("lint"),  # named by no next: independent
        Chained("docs", requires=["plan.md"]),  # named by no next, waits for its artifact
    ]
    assert ids(find_ready_steps(steps, set(), set(), set())) == ["enhance", "lint"]
    assert ids(find_ready_steps(steps, {"enhance", "lint"}, set(), set())) == ["plan"]
    assert ids(find_ready_steps(steps, {"enhance", "lint"}, {"plan"}, set())) == []
    done = {"enhance", "lint", "plan"}
    assert ids(find_ready_steps(steps, done, set(), {"plan.md"})) == ["finish", "docs"]
    # The method is the same rule.
    assert ParallelStepExecutor().find_ready_steps(steps, done, set(), {"plan.md"}) == [
        steps[2],
        steps[4],
    ]


def test_the_first_step_starts_even_when_a_later_next_loops_back_to_it() -> None:
    steps = [Chained("fix", next="review"), Chained("review", next="fix")]
    assert find_ready_steps(steps, set(), set(), set()) == [steps[0]]
    assert find_ready_steps(steps, {"fix"}, set(), set()) == [steps[1]]


# -- the caller's loop -------------------------------------------------------------------------

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("REQUEST_ID", default="unset")


def test_execute_fn_runs_on_the_callers_loop_with_its_context(chdir_tmp: Path) -> None:
    async def main() -> tuple[list[StepExecutionResult[Spec]], asyncio.AbstractEventLoop]:
        REQUEST_ID.set("req-7")
        caller = asyncio.get_running_loop()
        session_ready: asyncio.Future[str] = caller.create_future()  # bound to this loop

        async def fn(step: Spec) -> Artifacts:
            token = await session_ready
            return {"loop": asyncio.get_running_loop(), "request": REQUEST_ID.get(), "t": token}

        async def open_session() -> None:
            await asyncio.sleep(0)
            session_ready.set_result("token")

        results, _ = await asyncio.gather(execute([Spec("a")], fn), open_session())
        return results, caller

    results, caller = run(main())
    assert results[0].artifacts == {"loop": caller, "request": "req-7", "t": "token"}


def test_the_callers_loop_keeps_ticking_while_the_steps_run(chdir_tmp: Path) -> None:
    async def main() -> tuple[int, int]:
        ticks = 0
        ten_more = asyncio.Event()
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                await asyncio.sleep(0)
                ticks += 1
                if ticks == 10:
                    ten_more.set()

        async def fn(step: Spec) -> Artifacts:
            await ten_more.wait()  # only a turning loop gets the ticker there
            return {}

        tick_task = asyncio.create_task(ticker())
        before = ticks
        results = await execute([Spec("a"), Spec("b")], fn)
        during = ticks - before
        stop.set()
        await tick_task
        assert all(r.step_execution.status == "completed" for r in results)
        return before, during

    before, during = run(main())
    assert before == 0
    assert during >= 10


# -- cancellation ------------------------------------------------------------------------------


def test_cancelling_the_awaiting_task_ends_every_record_cancelled(chdir_tmp: Path) -> None:
    async def main() -> tuple[WorkflowState, list[str], list[str]]:
        state = WorkflowState()
        entered: list[str] = []
        cleaned_up: list[str] = []
        both_in = asyncio.Event()

        async def fn(step: Spec) -> Artifacts:
            entered.append(step.id)
            if len(entered) == 2:
                both_in.set()
            try:
                await forever()
            finally:
                cleaned_up.append(step.id)
            return {}

        executor = ParallelStepExecutor(max_parallel=2)
        steps = [Spec("a"), Spec("b"), Spec("c")]
        task = asyncio.create_task(executor.execute_parallel(steps, fn, state=state))
        async with asyncio.timeout(BOUND):
            await both_in.wait()
        before: list[str] = [r.status for r in state.step_executions]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            async with asyncio.timeout(BOUND):
                await task
        return state, before, sorted(cleaned_up)

    state, before, cleaned_up = run(main())
    assert before == ["running", "running", "pending"]
    assert [r.status for r in state.step_executions] == ["cancelled"] * 3
    assert cleaned_up == ["a", "b"]
    ran, _, never = state.step_executions
    assert ran.started_at is not None
    assert ran.completed_at is not None
    assert ran.error == "step 'a' was cancelled while it ran: execute_parallel was cancelled"
    assert never.started_at <= ran.started_at  # the time it was queued: never None
    assert never.duration_seconds is None
    assert never.completed_at is not None
    assert never.error == (
        "step 'c' was cancelled before it started: execute_parallel was cancelled"
    )


@pytest.mark.realtime
def test_a_second_cancel_does_not_freeze_the_callers_loop(chdir_tmp: Path) -> None:
    async def main() -> tuple[float, WorkflowState]:
        state = WorkflowState()
        entered = asyncio.Event()

        async def fn(step: Spec) -> Artifacts:
            entered.set()
            await forever()
            return {}

        executor = ParallelStepExecutor()
        task = asyncio.create_task(executor.execute_parallel([Spec("a")], fn, state=state))
        async with asyncio.timeout(BOUND):
            await entered.wait()
        start = time.monotonic()
        task.cancel()  # say, a TaskGroup aborting...
        await asyncio.sleep(0)
        task.cancel()  # ...then an outer timeout, while the run is stopping
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - start, state

    elapsed, state = run(main())
    assert elapsed < 2.0
    assert [r.status for r in state.step_executions] == ["cancelled"]


def test_a_failing_sibling_in_a_task_group_cancels_the_steps(chdir_tmp: Path) -> None:
    state = WorkflowState()
    cleaned_up: list[str] = []

    async def main() -> None:
        started = asyncio.Event()

        async def fn(step: Spec) -> Artifacts:
            started.set()
            try:
                await forever()
            finally:
                cleaned_up.append(step.id)
            return {}

        async def sibling() -> None:
            await started.wait()
            raise RuntimeError("sibling failed")

        executor = ParallelStepExecutor()
        async with asyncio.timeout(BOUND), asyncio.TaskGroup() as group:
            group.create_task(executor.execute_parallel([Spec("a")], fn, state=state))
            group.create_task(sibling())

    with pytest.raises(ExceptionGroup) as info:
        run(main())
    assert [str(e) for e in info.value.exceptions] == ["sibling failed"]
    assert cleaned_up == ["a"]
    assert [r.status for r in state.step_executions] == ["cancelled"]


# -- sv.run_async itself (beyond tests/test_engine.py) -----------------------------------------


def run_threads() -> list[str]:
    """The threads a run owns (the shared timer thread ends lazily on its own)."""
    return [
        t.name
        for t in threading.enumerate()
        if t.name.startswith(("stepvisor-worker-", "Supervisor-")) and t.is_alive()
    ]


def test_run_async_cancellation_arrives_only_after_the_run_has_stopped(chdir_tmp: Path) -> None:
    started = threading.Event()
    returned = threading.Event()
    events: list[sv.Event] = []

    def slow_to_stop(ctx: sv.StepContext) -> None:
        started.set()
        try:
            ctx.wait_cancelled(BOUND)
            ctx.raise_if_cancelled()
        finally:
            time.sleep(0.05)  # a step that takes a moment to clean up
            returned.set()

    async def main() -> None:
        wf = sv.Workflow("stop", steps=[sv.Step("s", slow_to_stop)])
        task = asyncio.create_task(sv.run_async(wf, on_event=events.append))
        assert await asyncio.to_thread(started.wait, BOUND)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # By the time the awaiter sees the cancellation, the run is over:
        assert returned.is_set()
        assert isinstance(events[-1], sv.RunFinished)
        assert events[-1].status == "cancelled"
        assert run_threads() == []  # its Supervisor and Workers are joined

    run(main())
    finished = [e for e in events if isinstance(e, sv.StepFinished)]
    assert [(e.step_id, e.status) for e in finished] == [("s", "cancelled")]


def test_run_async_in_a_task_group_is_cancelled_when_a_sibling_fails(chdir_tmp: Path) -> None:
    started = threading.Event()
    finished: list[tuple[str, str]] = []

    def waits(ctx: sv.StepContext) -> None:
        started.set()
        ctx.wait_cancelled(BOUND)
        ctx.raise_if_cancelled()

    def hook(event: sv.Event) -> None:
        if isinstance(event, sv.StepFinished | sv.RunFinished):
            finished.append((type(event).__name__, event.status))

    async def sibling() -> None:
        assert await asyncio.to_thread(started.wait, BOUND)
        raise RuntimeError("sibling failed")

    async def main() -> None:
        wf = sv.Workflow("tg", steps=[sv.Step("w", waits), sv.Step("n", waits, needs=["w"])])
        async with asyncio.TaskGroup() as group:
            group.create_task(sv.run_async(wf, on_event=hook))
            group.create_task(sibling())

    with pytest.raises(ExceptionGroup):
        run(main())
    assert ("StepFinished", "cancelled") in finished
    assert finished[-1] == ("RunFinished", "cancelled")


def test_max_parallel_can_be_given_positionally_as_existing_call_sites_do() -> None:
    from stepvisor.compat import ParallelStepExecutor  # noqa: PLC0415

    assert ParallelStepExecutor(3).max_parallel == 3
