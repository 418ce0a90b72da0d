"""sv.Engine: Workers and children kept across runs, one bound shared, usable after faults."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

import stepvisor as sv
from stepvisor.testing import FakeBackend, ok
from tests.conftest import wait_for


def report_pid(ctx: sv.StepContext) -> dict[str, int]:
    return {f"pid_{ctx.step_id}": os.getpid()}


def die(ctx: sv.StepContext) -> None:
    os._exit(3)


def ignore_stop(ctx: sv.StepContext) -> None:
    # Ignores its deadline until told to end (by the test, through params).
    event = ctx.params["release"]
    event.wait(30)


def pids_of(result: sv.RunResult) -> set[int]:
    return {v for k, v in result.artifacts.items() if k.startswith("pid_")}


def process_workflow(name: str, n: int = 2) -> sv.Workflow:
    steps = [sv.Step(f"p{i}", report_pid, executor="process") for i in range(n)]
    return sv.Workflow(name, steps)


def test_process_children_are_kept_across_runs_on_one_engine(chdir_tmp: Path) -> None:
    with sv.Engine(max_parallel=2) as engine:
        first = engine.run(process_workflow("one"))
        second = sv.run(process_workflow("two"), engine=engine)
    assert first.ok
    assert second.ok
    assert pids_of(second) <= pids_of(first)  # the same children ran the second run
    assert os.getpid() not in pids_of(first)


def test_runs_without_an_engine_start_their_own_children(chdir_tmp: Path) -> None:
    first = sv.run(process_workflow("one", 1))
    second = sv.run(process_workflow("two", 1))
    assert pids_of(first).isdisjoint(pids_of(second))


@pytest.mark.realtime
def test_concurrent_runs_share_the_engines_bound(chdir_tmp: Path) -> None:
    lock = threading.Lock()
    running: list[str] = []
    peak = [0]
    go = threading.Event()
    third = threading.Event()

    def hold(ctx: sv.StepContext) -> None:
        with lock:
            running.append(ctx.step_id)
            peak[0] = max(peak[0], len(running))
            if len(running) > 2:
                third.set()
        go.wait(10)
        with lock:
            running.remove(ctx.step_id)

    def workflow(name: str) -> sv.Workflow:
        return sv.Workflow(name, [sv.Step(f"{name}{i}", hold) for i in range(3)])

    with sv.Engine(max_parallel=2) as engine:
        a = engine.start(workflow("a"), max_parallel=3)
        b = engine.start(workflow("b"), max_parallel=3)
        wait_for(lambda: len(running) == 2, timeout=10, what="two steps running")
        # A third would start at once if the bound did not hold across runs.
        assert not third.wait(0.3)
        go.set()
        results = [a.wait(10), b.wait(10)]
    assert all(r.ok for r in results)
    assert peak[0] == 2


def test_the_engine_is_usable_after_a_crashed_child(chdir_tmp: Path) -> None:
    with sv.Engine(max_parallel=2) as engine:
        crashed = engine.run(sv.Workflow("crash", [sv.Step("x", die, executor="process")]))
        after = engine.run(process_workflow("after"))
    assert crashed.steps["x"].status is sv.StepStatus.FAILED
    assert isinstance(crashed.errors["x"], sv.WorkerCrashedError)
    assert after.ok


def test_the_engine_is_usable_after_an_abandoned_thread_and_a_cancel(chdir_tmp: Path) -> None:
    release = threading.Event()
    stuck = sv.Step("stuck", ignore_stop, timeout=0.1, params={"release": release})
    try:
        with sv.Engine(max_parallel=1) as engine:
            timed_out = engine.run(sv.Workflow("stuck", [stuck]), kill_grace=0.1)
            assert timed_out.steps["stuck"].attempts[-1].note == "abandoned"
            # The abandoned Worker no longer counts: a fresh one runs the next run.
            assert engine.run(process_workflow("next", 1)).ok
            handle = engine.start(
                sv.Workflow("cancel", [sv.Step("wait", ignore_stop, params={"release": release})])
            )
            wait_for(
                lambda: handle.done() or _running(handle), timeout=10, what="the step to start"
            )
            handle.cancel()
            release.set()
            assert handle.wait(10).status is sv.RunStatus.CANCELLED
            assert engine.run(process_workflow("last", 1)).ok
    finally:
        release.set()


def _running(handle: sv.RunHandle) -> bool:
    return handle._supervisor is not None and handle._supervisor.is_alive()


def test_closing_the_engine_stops_its_children(chdir_tmp: Path) -> None:
    engine = sv.Engine(max_parallel=2)
    pids = pids_of(engine.run(process_workflow("one")))
    engine.close()
    for pid in pids:
        wait_for(lambda pid=pid: _gone(pid), timeout=10, what=f"child {pid} to end")
    assert engine.closed


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_closed_engine_refuses_new_runs_and_backends_go_to_the_engine(
    chdir_tmp: Path,
) -> None:
    engine = sv.Engine(max_parallel=1)
    engine.close()
    wf = sv.Workflow("x", [sv.Step("a", report_pid)])
    with pytest.raises(sv.InvalidSettingError, match="closed"):
        engine.run(wf)
    with sv.Engine() as open_engine, pytest.raises(sv.InvalidSettingError, match="Engine"):
        sv.run(wf, engine=open_engine, backends={"thread": FakeBackend(lambda spec: ok())})


def test_engine_checks_its_bound() -> None:
    with pytest.raises(sv.InvalidMaxParallelError):
        sv.Engine(max_parallel=0)
