"""sv.Executor behaves as the standard library's executors do, and stops what it times out.

The first part follows CPython's own suite (``Lib/test/test_concurrent_futures``:
executor.py, test_wait.py, test_as_completed.py, test_shutdown.py), run on
thread and process calls; the second checks what stepvisor adds (timeouts that
stop the call, retries, crashes that fail one call, shutdown that stops
running calls).  Calls signal through files (tests/futures_calls.py), so no
test sleeps hoping something happened.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
import weakref
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import pytest

import stepvisor as sv
from stepvisor._calls import Calls, Settled, checked
from stepvisor._invoke import RESULT, Invoke
from stepvisor.actors._call import CARRIED_OUT, NO_TIMERS
from stepvisor.actors._hub import CallHub
from stepvisor.actors._mailbox import Mailbox
from stepvisor.backends.base import AttemptResult, AttemptSpec
from stepvisor.config import resolve
from stepvisor.core.effects import Dispatch, Finish, SetTimer
from stepvisor.core.messages import AttemptDone, SlotReady, Start
from stepvisor.core.state import RunStatus
from tests import futures_calls as calls
from tests.conftest import wait_for
from tests.procfs import pid_gone

KINDS = ["thread", "process"]


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def ex(kind: str) -> Iterator[sv.Executor]:
    with sv.Executor(max_workers=2, executor=kind, kill_grace=0.5) as executor:
        yield executor


def _go(tmp: Path, name: str) -> None:
    (tmp / f"{name}.go").write_text("")


def _started(tmp: Path, name: str) -> int:
    path = tmp / f"{name}.started"
    wait_for(path.exists, what=f"{name} started")
    return int(path.read_text())


def _finished(state: str) -> futures.Future[None]:
    f: futures.Future[None] = futures.Future()
    if state == "cancelled":
        f.cancel()
        f.set_running_or_notify_cancel()
    elif state == "exception":
        f.set_exception(OSError("made up"))
    else:
        f.set_result(None)
    return f


# -- executor.py ----------------------------------------------------------------------------


def test_submit(ex: sv.Executor) -> None:
    assert ex.submit(pow, 2, 8).result(timeout=30) == 256


def test_submit_keyword(ex: sv.Executor) -> None:
    assert ex.submit(calls.mul, 2, y=8).result(timeout=30) == 16
    got = ex.submit(calls.capture, 1, self=2, fn=3).result(timeout=30)
    assert got == ((1,), {"self": 2, "fn": 3})
    with pytest.raises(TypeError):
        ex.submit(fn=calls.capture, arg=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        ex.submit(arg=1)  # type: ignore[call-arg]


def test_map(ex: sv.Executor) -> None:
    expected = list(map(pow, range(10), range(10)))
    assert list(ex.map(pow, range(10), range(10))) == expected
    assert list(ex.map(pow, range(10), range(10), chunksize=3)) == expected


def test_map_exception(ex: sv.Executor) -> None:
    results = ex.map(divmod, [1, 1, 1, 1], [2, 3, 0, 5])
    assert next(results) == (0, 1)
    assert next(results) == (0, 1)
    with pytest.raises(ZeroDivisionError):
        next(results)


@pytest.mark.realtime
def test_map_timeout_stops_the_waiting(ex: sv.Executor, tmp_path: Path) -> None:
    _go(tmp_path, "a")
    _go(tmp_path, "b")
    results = ex.map(calls.block, [str(tmp_path)] * 3, ["a", "b", "c"], timeout=2.0)
    assert [next(results), next(results)] == ["a", "b"]
    with pytest.raises(TimeoutError):
        next(results)
    _go(tmp_path, "c")


def test_max_workers_must_be_positive() -> None:
    for number in (0, -1):
        with pytest.raises(ValueError, match="max_workers must be greater than 0"):
            sv.Executor(max_workers=number)


def test_a_non_callable_is_a_type_error(ex: sv.Executor) -> None:
    with pytest.raises(TypeError, match="needs a callable"):
        ex.submit(42)  # type: ignore[arg-type]


def test_no_stale_references(ex: sv.Executor) -> None:
    class Thing:
        def method(self) -> None:
            pass

    thing = Thing()
    collected = weakref.ref(thing)
    ex.submit(thing.method).result(timeout=30)
    del thing
    # As CPython's test: the executor lets go of it soon after the call (not
    # necessarily before result() returns).
    wait_for(lambda: gc.collect() >= 0 and collected() is None, what="the object collected")


# -- test_wait.py ------------------------------------------------------------------------------


def test_wait_first_completed(ex: sv.Executor, tmp_path: Path) -> None:
    cancelled = _finished("cancelled")
    quick = ex.submit(calls.mul, 21, 2)
    slow = ex.submit(calls.block, str(tmp_path), "slow")
    done, not_done = futures.wait([cancelled, quick, slow], return_when=futures.FIRST_COMPLETED)
    if quick not in done:  # the cancelled one is done from the start: wait for the quick one too
        done, not_done = futures.wait([quick, slow], return_when=futures.FIRST_COMPLETED)
        done |= {cancelled}
    assert done == {cancelled, quick}
    assert not_done == {slow}
    _go(tmp_path, "slow")
    assert slow.result(timeout=30) == "slow"


def test_wait_first_exception(ex: sv.Executor, tmp_path: Path) -> None:
    quick = ex.submit(calls.mul, 2, 21)
    assert quick.result(timeout=30) == 42  # done before the exception, whatever the order
    failing = ex.submit(calls.fail, "bad")
    slow = ex.submit(calls.block, str(tmp_path), "slow")
    done, not_done = futures.wait([quick, failing, slow], return_when=futures.FIRST_EXCEPTION)
    assert done == {quick, failing}
    assert not_done == {slow}
    _go(tmp_path, "slow")
    futures.wait([slow], timeout=30)


def test_wait_all_completed_and_a_duplicate_counted_once(ex: sv.Executor) -> None:
    fs = [ex.submit(calls.mul, i, 2) for i in range(4)]
    done, not_done = futures.wait([*fs, fs[0]], return_when=futures.ALL_COMPLETED)
    assert done == set(fs)
    assert not not_done


@pytest.mark.realtime
def test_wait_timeout(ex: sv.Executor, tmp_path: Path) -> None:
    # Warm first: a process child's start under load could outlast the wait below on its own.
    assert ex.submit(calls.mul, 1, 1).result(timeout=30) == 1
    quick = ex.submit(calls.mul, 6, 7)
    slow = ex.submit(calls.block, str(tmp_path), "slow")
    done, not_done = futures.wait([quick, slow], timeout=1.0, return_when=futures.ALL_COMPLETED)
    assert done == {quick}
    assert not_done == {slow}
    _go(tmp_path, "slow")


# -- test_as_completed.py --------------------------------------------------------------------


def test_as_completed_yields_each_future_once(ex: sv.Executor) -> None:
    ready = [_finished("cancelled"), _finished("exception"), _finished("result")]
    mine = [ex.submit(calls.mul, 2, 21), ex.submit(calls.mul, 7, 6)]
    seen = list(futures.as_completed([*ready, *mine, mine[0]], timeout=30))
    assert sorted(map(id, seen)) == sorted(map(id, ready + mine))
    assert [f.result() for f in mine] == [42, 42]


def test_as_completed_times_out_on_a_running_call(ex: sv.Executor, tmp_path: Path) -> None:
    slow = ex.submit(calls.block, str(tmp_path), "slow")
    with pytest.raises(TimeoutError):
        list(futures.as_completed([slow], timeout=0))
    _go(tmp_path, "slow")


def test_done_callbacks_are_called_with_the_future(ex: sv.Executor) -> None:
    seen: list[futures.Future[int]] = []
    fut = ex.submit(calls.mul, 3, 3)
    fut.add_done_callback(seen.append)
    assert fut.result(timeout=30) == 9
    wait_for(lambda: seen == [fut], what="the callback")


# -- cancel and shutdown (test_shutdown.py) ------------------------------------------------


def test_run_after_shutdown(kind: str) -> None:
    executor = sv.Executor(1, executor=kind)
    executor.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.submit(pow, 2, 5)
    with pytest.raises(sv.ExecutorShutdownError):
        executor.submit(pow, 2, 5)


def test_shutdown_waits_for_every_call(kind: str) -> None:
    executor = sv.Executor(2, executor=kind)
    fs = [executor.submit(calls.mul, i, 2) for i in range(20)]
    executor.shutdown()
    assert [f.result(timeout=0) for f in fs] == [i * 2 for i in range(20)]


def test_shutdown_without_waiting_still_ends_every_call(kind: str) -> None:
    executor = sv.Executor(2, executor=kind)
    results = executor.map(abs, range(-5, 5))
    executor.shutdown(wait=False)
    assert list(results) == [5, 4, 3, 2, 1, 0, 1, 2, 3, 4]
    executor.shutdown(wait=True)  # a second shutdown waits for the first


def test_a_cancelled_queued_call_never_runs_and_wait_sees_it(tmp_path: Path, kind: str) -> None:
    with sv.Executor(1, executor=kind) as executor:
        first = executor.submit(calls.block, str(tmp_path), "first")
        _started(tmp_path, "first")
        queued = executor.submit(calls.block, str(tmp_path), "queued")
        assert queued.cancel()
        done, _ = futures.wait([queued], timeout=30)
        assert done == {queued}
        assert queued.cancelled()
        _go(tmp_path, "first")
        assert first.result(timeout=30) == "first"
    assert not (tmp_path / "queued.started").exists()


def test_shutdown_after_a_quick_cancel_does_not_hang(kind: str) -> None:
    executor = sv.Executor(1, executor=kind)
    executor.submit(int).result(timeout=30)
    executor.submit(int).cancel()
    executor.shutdown(wait=True)


def test_cancel_futures_cancels_the_queued_and_lets_the_running_finish(
    tmp_path: Path, kind: str
) -> None:
    executor = sv.Executor(1, executor=kind)
    running = executor.submit(calls.block, str(tmp_path), "running")
    _started(tmp_path, "running")
    queued = [executor.submit(calls.mul, i, 2) for i in range(10)]
    executor.shutdown(wait=False, cancel_futures=True)
    futures.wait(queued, timeout=30)
    assert all(f.cancelled() for f in queued)
    assert not running.done()
    _go(tmp_path, "running")
    executor.shutdown(wait=True)
    assert running.result(timeout=0) == "running"


def test_stop_running_stops_the_running_and_leaves_the_queued_to_run(tmp_path: Path) -> None:
    executor = sv.Executor(1, executor="process", kill_grace=0.5)
    running = executor.submit(calls.run_away, str(tmp_path), "running")
    pid = _started(tmp_path, "running")
    queued = [executor.submit(calls.mul, i, 2) for i in range(10)]
    executor.shutdown(wait=True, stop_running=True)
    with pytest.raises(sv.StepCancelledError, match="stop_running"):
        running.result(timeout=0)
    assert pid_gone(pid)
    assert [f.result(timeout=0) for f in queued] == [i * 2 for i in range(10)]


def test_stop_running_and_cancel_futures_end_everything(tmp_path: Path) -> None:
    executor = sv.Executor(1, executor="process", kill_grace=0.5)
    running = executor.submit(calls.run_away, str(tmp_path), "running")
    pid = _started(tmp_path, "running")
    queued = [executor.submit(calls.mul, i, 2) for i in range(10)]
    executor.shutdown(wait=True, cancel_futures=True, stop_running=True)
    assert all(f.cancelled() for f in queued)
    with pytest.raises(sv.StepCancelledError):
        running.result(timeout=0)
    assert pid_gone(pid)


def test_stop_running_tells_a_thread_call_through_its_context(tmp_path: Path) -> None:
    executor = sv.Executor(1, executor="thread")
    running = executor.submit(calls.until_stopped, str(tmp_path), "running")
    _started(tmp_path, "running")
    queued = executor.submit(calls.mul, 1, 2)
    executor.shutdown(wait=True, cancel_futures=True, stop_running=True)
    assert queued.cancelled()
    with pytest.raises(sv.StepCancelledError):
        running.result(timeout=0)


def test_map_checks_chunksize_as_the_standard_library_does(kind: str) -> None:
    with sv.Executor(1, executor=kind) as executor:
        if kind == "process":  # ProcessPoolExecutor.map: ValueError, at the call
            with pytest.raises(ValueError, match="chunksize must be >= 1"):
                executor.map(abs, [1], chunksize=0)
            with pytest.raises(ValueError, match="chunksize must be >= 1"):
                executor.options(timeout=5).map(abs, [1], chunksize=-1)
        else:  # ThreadPoolExecutor.map ignores it
            assert list(executor.map(abs, [-1], chunksize=0)) == [1]
        assert list(executor.map(abs, [-1, -2], chunksize=5)) == [1, 2]


_AT_EXIT = """
import sys, pathlib, stepvisor as sv
sys.path.insert(0, {root!r})
from tests import futures_calls as calls
folder = {folder!r}
ex = sv.Executor(1, executor={kind!r})
first = ex.submit(calls.block, folder, "first")
queued = [ex.submit(calls.mul, i, 2) for i in range(5)]
queued[-1].add_done_callback(lambda f: print("last", f.result(), flush=True))
def late():
    try:
        ex.submit(calls.mul, 1, 1)
    except RuntimeError as exc:
        print("late:", type(exc).__name__, exc, flush=True)
import atexit
atexit.register(late)
pathlib.Path(folder, "first.go").write_text("")
"""


def test_calls_submitted_before_exit_finish_and_a_submit_during_exit_is_refused(
    tmp_path: Path, kind: str
) -> None:
    root = str(Path(__file__).resolve().parents[1])
    script = _AT_EXIT.format(root=root, folder=str(tmp_path), kind=kind)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "last 8",
        "late: RuntimeError cannot schedule new futures after interpreter shutdown",
    ]
    assert (tmp_path / "first.started").exists()


# -- what stepvisor adds --------------------------------------------------------------------


@pytest.mark.realtime
def test_a_timed_out_process_call_is_killed_and_says_so(tmp_path: Path) -> None:
    with sv.Executor(1, executor="process", kill_grace=0.5) as executor:
        fut = executor.options(timeout=0.3).submit(calls.run_away, str(tmp_path), "late")
        pid = _started(tmp_path, "late")
        with pytest.raises(TimeoutError, match="timeout") as caught:
            fut.result(timeout=30)
        assert isinstance(caught.value, sv.StepTimeoutError)
        assert "killed" in str(caught.value)
        assert pid_gone(pid)
        assert executor.submit(calls.mul, 2, 3).result(timeout=30) == 6


@pytest.mark.realtime
def test_a_timed_out_thread_call_is_told_and_ends(tmp_path: Path) -> None:
    with sv.Executor(1, executor="thread", timeout=0.2) as executor:
        fut = executor.submit(calls.until_stopped, str(tmp_path), "told")
        with pytest.raises(sv.StepTimeoutError):
            fut.result(timeout=30)
        assert executor.submit(calls.mul, 2, 3).result(timeout=30) == 6


@pytest.mark.realtime
def test_a_thread_call_that_ignores_its_timeout_is_abandoned(tmp_path: Path) -> None:
    with sv.Executor(1, executor="thread", kill_grace=0.2) as executor:
        stuck = executor.options(timeout=0.2).submit(calls.block, str(tmp_path), "stuck")
        with pytest.raises(sv.StepTimeoutError, match="abandon"):
            stuck.result(timeout=30)
        # Its Worker is replaced: the bound of 1 still runs the next call.
        assert executor.submit(calls.mul, 4, 5).result(timeout=30) == 20
        _go(tmp_path, "stuck")


def test_a_crashed_process_call_fails_alone(tmp_path: Path) -> None:
    with sv.Executor(2, executor="process") as executor:
        other = executor.submit(calls.block, str(tmp_path), "other")
        _started(tmp_path, "other")
        crashed = executor.submit(calls.die, 7)
        with pytest.raises(sv.WorkerCrashedError) as caught:
            crashed.result(timeout=30)
        assert caught.value.exitcode == 7
        _go(tmp_path, "other")
        assert other.result(timeout=30) == "other"
        assert list(executor.map(calls.mul, range(3), range(3))) == [0, 1, 4]


def test_retries_follow_the_policy(tmp_path: Path, kind: str) -> None:
    retry = sv.RetryPolicy(max_attempts=3, backoff=sv.Backoff.none())
    with sv.Executor(1, executor=kind, retry=retry) as executor:
        assert executor.submit(calls.flaky, str(tmp_path), 2).result(timeout=30) == 3
        (tmp_path / "flaky.log").unlink()
        no_retry = executor.options(retry=None).submit(calls.flaky, str(tmp_path), 1)
        with pytest.raises(ConnectionError):
            no_retry.result(timeout=30)


def test_an_async_call_runs_on_the_loop() -> None:
    with sv.Executor(1) as executor:
        assert executor.submit(calls.add_async, 2, 3).result(timeout=30) == 5
        assert executor.options(executor="async").submit(calls.add_async, 1, 1).result(30) == 2


def test_options_do_not_mix_with_the_functions_keywords(ex: sv.Executor) -> None:
    got = ex.options(timeout=30).submit(calls.capture, timeout=1, retry=2, executor=3)
    assert got.result(timeout=30) == ((), {"timeout": 1, "retry": 2, "executor": 3})
    assert list(ex.options(timeout=30).map(calls.mul, [1, 2], [3, 4])) == [3, 8]
    chained = ex.options(timeout=30).options(retry=None)
    assert chained.submit(calls.mul, 5, 5).result(timeout=30) == 25
    with pytest.raises(TypeError, match="unexpected keyword"):
        chained.options(deadline=3)


def test_bad_options_are_refused_naming_the_fix(ex: sv.Executor) -> None:
    with pytest.raises(sv.InvalidTimeoutError):
        ex.options(timeout=-1)
    with pytest.raises(sv.InvalidSettingError, match="RetryPolicy"):
        ex.options(retry=3)  # type: ignore[arg-type]
    with pytest.raises(sv.InvalidSettingError, match="executor must be one of"):
        ex.options(executor="fork")


def test_an_unpicklable_process_call_fails_in_its_future() -> None:
    import threading  # noqa: PLC0415

    lock = threading.Lock()
    with sv.Executor(1, executor="process") as executor:
        fut = executor.submit(lambda: lock)
        with pytest.raises(sv.StepNotSerializableError):
            fut.result(timeout=30)


def test_context_outside_a_call_is_a_lookup_error() -> None:
    with pytest.raises(LookupError, match="only available inside a call"):
        sv.Executor.context()


# -- the hub: no thread of its own, the first attempt without a machine ----------------------


def test_a_call_is_settled_on_the_thread_of_the_worker_that_ran_it() -> None:
    # The hub has no thread: the Worker that ran the call handles its outcome
    # and settles the future, as ThreadPoolExecutor's worker does.
    release = threading.Event()
    seen: list[str] = []
    with sv.Executor(max_workers=1) as executor:
        fut = executor.submit(release.wait, 30)
        fut.add_done_callback(lambda _: seen.append(threading.current_thread().name))
        release.set()
        assert fut.result(timeout=30) is True
        wait_for(lambda: len(seen) == 1, what="the callback")
        assert seen[0].startswith("stepvisor-worker-")
        assert not [t for t in threading.enumerate() if "hub" in t.name]


def test_a_done_callback_may_submit_another_call() -> None:
    # The callback runs on the Worker that ran the call, once the hub is free
    # again: its submit goes to that same Worker, which runs it after.
    release = threading.Event()
    chained: list[futures.Future[int]] = []
    with sv.Executor(max_workers=1) as executor:
        gate = executor.submit(release.wait, 30)
        gate.add_done_callback(lambda _: chained.append(executor.submit(calls.mul, 2, 21)))
        release.set()
        assert gate.result(timeout=30) is True
        wait_for(lambda: len(chained) == 1, what="the callback's submit")
        assert chained[0].result(timeout=30) == 42


def test_many_submitters_at_once_each_get_their_own_results(kind: str) -> None:
    threads, per_thread = 6, (150 if kind == "thread" else 40)
    barrier = threading.Barrier(threads)
    got: dict[int, list[int]] = {}

    def submitter(executor: sv.Executor, n: int) -> None:
        barrier.wait(timeout=30)
        fs = [executor.submit(calls.mul, n * 1000 + i, 2) for i in range(per_thread)]
        got[n] = [f.result(timeout=60) for f in fs]

    # Two workers for six submitters: most calls wait for a lease, which the
    # Worker that ends a call passes on while it handles that call's outcome.
    with sv.Executor(max_workers=2, executor=kind) as executor:
        pool = [threading.Thread(target=submitter, args=(executor, n)) for n in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join(timeout=120)
    assert got == {n: [(n * 1000 + i) * 2 for i in range(per_thread)] for n in range(threads)}


def test_a_first_attempt_carried_out_without_the_machine_is_what_the_machine_does() -> None:
    retry = sv.RetryPolicy(max_attempts=3)
    cfg = Settled.of(resolve(None, {"max_parallel": 2}))
    for opts in (checked(None, None, "thread"), checked(2.5, retry, "process")):
        plan = Calls(Invoke(calls.mul), opts, cfg)
        first = plan.first
        assert first is not None
        machine = plan.machine("7", 1)
        assert machine.handle(Start(), now=5.0, wall=9.0)[-1] == first.add_slot
        ready = machine.handle(SlotReady(first.add_slot.slot), now=5.0, wall=9.0)
        dispatch = next(e for e in ready if isinstance(e, Dispatch))
        (order,) = dispatch.orders
        assert order.budget == first.order.budget == opts.timeout
        assert order.spec._replace(run_id="plan") == first.order.spec
        timers = [e.message for e in ready if isinstance(e, SetTimer)]
        assert timers == ([] if first.timer is None else [first.timer])
        # An ok outcome with nothing else asked: the machine's result is the
        # call's value, as the hub settles it without the machine.
        ok = AttemptResult(kind="ok", outputs={RESULT: 42})
        done = AttemptDone(order.spec.step_id, 1, dispatch.slot, ok, 9.0, 9.1, 0.1, "7")
        finish = machine.handle(done, now=5.1, wall=9.1)[-1]
        assert isinstance(finish, Finish)
        assert finish.result.status is RunStatus.SUCCEEDED
        assert dict(finish.result.artifacts) == {RESULT: 42}


def test_a_plan_whose_machine_does_more_first_runs_every_call_on_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STEPVISOR_DEADLINE", "60")  # a run deadline: a timer at Start
    with sv.Executor(max_workers=1) as executor:
        assert executor.submit(calls.mul, 3, 4).result(timeout=30) == 12
        assert executor.submit(calls.fail, "no").exception(timeout=30) is not None
        assert [plan.first for plan in executor._plans.values()] == [None, None]


def test_a_retried_call_with_a_timeout_gets_its_machine_midway(tmp_path: Path, kind: str) -> None:
    # Attempt 1 ran without the machine (with its deadline timer); its failure
    # makes the machine, which must take over that timer and retry.
    retry = sv.RetryPolicy(max_attempts=2, backoff=sv.Backoff.none())
    with sv.Executor(1, executor=kind, timeout=30, retry=retry) as executor:
        assert executor.submit(calls.flaky, str(tmp_path), 1).result(timeout=30) == 2
        assert executor.submit(calls.mul, 6, 7).result(timeout=30) == 42


def test_a_bug_in_the_hub_fails_the_calls_it_holds_and_the_executor_goes_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = CallHub._first
    broken = [True]

    def first(hub: CallHub, *args: Any) -> None:
        if broken.pop() if broken else False:
            raise KeyError("made up")
        real(hub, *args)

    monkeypatch.setattr(CallHub, "_first", first)
    with sv.Executor(max_workers=1) as executor:
        fut = executor.submit(calls.mul, 1, 1)
        with pytest.raises(RuntimeError, match="executor hub failed") as caught:
            fut.result(timeout=30)
        assert isinstance(caught.value.__cause__, KeyError)
        assert executor.submit(calls.mul, 2, 3).result(timeout=30) == 6
    assert "executor hub failed" in caplog.text


def test_the_hub_carries_out_every_effect_it_says_it_does() -> None:
    with sv.Executor(max_workers=1) as executor:
        assert set(executor._hub._carry_out) == CARRIED_OUT


# -- the mailbox: one message at a time, on the thread that delivers ----------------------


def test_a_mailbox_handles_one_message_at_a_time_in_the_order_each_sender_sent() -> None:
    inside = []
    seen: list[tuple[int, int]] = []

    def handle(message: tuple[int, int]) -> None:
        inside.append(1)
        assert len(inside) == 1, "two threads handled messages at once"
        seen.append(message)
        inside.pop()

    box = Mailbox(handle)
    senders, each = 6, 500
    barrier = threading.Barrier(senders)

    def send(n: int) -> None:
        barrier.wait(timeout=30)
        for i in range(each):
            box.tell((n, i))

    pool = [threading.Thread(target=send, args=(n,)) for n in range(senders)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(timeout=30)
    assert len(seen) == senders * each
    for n in range(senders):
        assert [i for m, i in seen if m == n] == list(range(each))


def test_a_message_told_while_handling_waits_its_turn_on_the_same_thread() -> None:
    order: list[str] = []
    threads: set[str] = set()

    def handle(message: str) -> None:
        threads.add(threading.current_thread().name)
        order.append(f"{message} begins")
        if message == "a":
            box.tell("b")  # from within: queued, not handled inside "a"
            box.after(lambda: order.append("after a's drain"))
        order.append(f"{message} ends")

    box = Mailbox(handle)
    box.tell("a")
    assert order == ["a begins", "a ends", "b begins", "b ends", "after a's drain"]
    assert threads == {threading.current_thread().name}


def test_actions_after_a_drain_run_with_the_mailbox_free() -> None:
    order: list[str] = []

    def handle(message: str) -> None:
        order.append(message)
        if message == "first":
            box.after(lambda: box.tell("told by an after-action"))

    box = Mailbox(handle)
    box.tell("first")
    assert order == ["first", "told by an after-action"]


def test_a_mailbox_handler_that_raises_is_logged_and_the_next_message_handled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[str] = []

    def handle(message: str) -> None:
        if message == "bad":
            box.tell("next")
            raise ValueError("made up")
        seen.append(message)

    box = Mailbox(handle)
    box.tell("bad")
    assert seen == ["next"]
    assert "mailbox handler failed" in caplog.text


def test_max_tasks_per_child_replaces_a_process_child_after_that_many_calls() -> None:
    with sv.Executor(1, executor="process", max_tasks_per_child=2) as executor:
        pids = [executor.submit(os.getpid).result(timeout=30) for _ in range(5)]
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4]
    assert all(pid_gone(pid) for pid in set(pids))


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2"])
def test_max_tasks_per_child_must_be_a_positive_integer(bad: object) -> None:
    with pytest.raises(sv.InvalidSettingError, match="max_tasks_per_child"):
        sv.Executor(1, executor="process", max_tasks_per_child=bad)  # type: ignore[arg-type]


def test_the_hub_builds_a_calls_spec_in_the_order_of_its_fields() -> None:
    # actors/_hub.py builds AttemptSpec with tuple.__new__, by position.
    assert AttemptSpec._fields == (
        "run_id",
        "step_id",
        "attempt",
        "max_attempts",
        "fn",
        "is_async",
        "inputs",
        "params",
        "deadline",
        "kill_grace",
        "fn_payload",
        "resources",
        "trace",
        "child_calls",
    )


def test_calls_queued_behind_a_full_executor_start_in_the_order_submitted(tmp_path: Path) -> None:
    order: list[int] = []
    with sv.Executor(1) as executor:
        first = executor.submit(calls.block, str(tmp_path), "first")
        _started(tmp_path, "first")
        queued = [executor.submit(order.append, i) for i in range(50)]
        queued[10].cancel()
        _go(tmp_path, "first")
        futures.wait([first, *queued], timeout=30)
    assert order == [i for i in range(50) if i != 10]
    assert queued[10].cancelled()


def test_calls_with_timeouts_leave_the_shared_empty_timers_empty(tmp_path: Path) -> None:
    with sv.Executor(2) as executor:
        timed = [executor.options(timeout=30).submit(calls.mul, i, 2) for i in range(5)]
        plain = [executor.submit(calls.mul, i, 3) for i in range(5)]
        futures.wait([*timed, *plain], timeout=30)
    assert [f.result() for f in timed] == [i * 2 for i in range(5)]
    assert NO_TIMERS == {}


@pytest.mark.parametrize("kind", KINDS)
def test_queued_process_calls_go_to_a_worker_a_few_at_a_time_thread_calls_one_by_one(
    tmp_path: Path, kind: str
) -> None:
    with sv.Executor(1, executor=kind) as executor:
        first = executor.submit(calls.block, str(tmp_path), "a")
        _started(tmp_path, "a")
        second = executor.submit(calls.block, str(tmp_path), "b")
        rest = [executor.submit(calls.mul, i, 2) for i in range(5)]
        _go(tmp_path, "a")
        _started(tmp_path, "b")
        # Process calls: the three behind "b" went with it, to be sent ahead into
        # the child's pipe (running, as in ProcessPoolExecutor's call queue).
        with_it = 3 if kind == "process" else 0
        assert [f.running() for f in rest] == [True] * with_it + [False] * (5 - with_it)
        assert [f.cancel() for f in rest] == [False] * with_it + [True] * (5 - with_it)
        _go(tmp_path, "b")
        assert first.result(timeout=30) == "a"
        assert second.result(timeout=30) == "b"
        assert [f.result(timeout=30) for f in rest[:with_it]] == [0, 2, 4][:with_it]


_DROPPED = """
import gc, sys
sys.path.insert(0, {root!r})
import stepvisor as sv
from tests import futures_calls as calls

def work():
    ex = sv.Executor(1, executor={kind!r})
    for i in range(6):
        ex.submit(calls.started, {folder!r}, f"call{{i}}")

work()  # the executor is dropped with its calls queued
gc.collect()
"""


def test_an_executor_dropped_with_calls_queued_still_finishes_them_at_exit(
    tmp_path: Path, kind: str
) -> None:
    root = str(Path(__file__).resolve().parents[1])
    script = _DROPPED.format(root=root, folder=str(tmp_path), kind=kind)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert not done.stderr
    assert sorted(p.name for p in tmp_path.glob("*.started")) == [
        f"call{i}.started" for i in range(6)
    ]
