"""Process steps through the whole engine: deadlines that kill, crashes, cancel, poison.

These use real child processes and real time, kept short.  Steps write their
pids to files so the test can check that what it killed is really gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import stepvisor as sv
from stepvisor.core import machine as machine_module
from tests.conftest import cancel_midway, pid_gone, wait_for

pytestmark = pytest.mark.realtime


def write_atomically(path: Path, text: str) -> None:
    """Write then rename, so a test that sees the file also sees its content."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def busy_with_grandchild(ctx: sv.StepContext) -> None:
    """Spawn a grandchild, record both pids, then spin until killed."""
    out = Path(ctx.params["dir"])
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    write_atomically(out / f"{ctx.step_id}.pids", f"{os.getpid()} {child.pid}")
    while True:
        pass


def report_pid(ctx: sv.StepContext) -> dict[str, int]:
    return {f"pid_{ctx.step_id}": os.getpid()}


def busy(ctx: sv.StepContext) -> None:
    write_atomically(Path(ctx.params["dir"]) / f"{ctx.step_id}.pid", str(os.getpid()))
    while True:
        pass


def kill_self(ctx: sv.StepContext) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def exit_3(ctx: sv.StepContext) -> None:
    os._exit(3)


class UnpicklableError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


def raise_unpicklable(ctx: sv.StepContext) -> None:
    raise UnpicklableError("holds a lock")


def return_unpicklable(ctx: sv.StepContext) -> dict[str, Any]:
    return {"lock": threading.Lock()}


def make_lock(ctx: sv.StepContext) -> dict[str, Any]:
    return {"lock": threading.Lock()}


def uses_input(ctx: sv.StepContext) -> None:
    return None


def crash_until(ctx: sv.StepContext) -> dict[str, int]:
    if ctx.attempt < int(ctx.params["ok_at"]):
        os._exit(9)
    return {"attempt": ctx.attempt}


def read_pids(path: Path) -> list[int]:
    return [int(p) for p in path.read_text().split()]


def test_timed_out_process_step_leaves_no_child_running(tmp_path: Path, chdir_tmp: Path) -> None:
    wf = sv.Workflow(
        "kill",
        steps=[
            # Runs first on the one Worker, so the timed step starts in a warm child
            # and its 0.5 s are spent spinning, not booting an interpreter.
            sv.Step("warm", report_pid, executor="process", metadata={"cost": 20}),
            sv.Step(
                "spin",
                busy_with_grandchild,
                executor="process",
                timeout=0.5,
                params={"dir": str(tmp_path)},
                metadata={"cost": 10},  # runs first, so "after" follows on the same Worker
            ),
            sv.Step("after", report_pid, executor="process"),
        ],
        settings=sv.Settings(max_parallel=1, on_failure="continue"),
    )
    result = sv.run(wf)
    record = result.steps["spin"]
    assert record.status is sv.StepStatus.TIMED_OUT
    assert "exceeded its 0.5 s timeout on attempt 1 of 1" in (
        record.attempts[0].error_message or ""
    )
    assert "process group was killed" in (record.attempts[0].error_message or "")
    child, grandchild = read_pids(tmp_path / "spin.pids")
    assert pid_gone(child)
    wait_for(lambda: pid_gone(grandchild), timeout=5, what="the grandchild to be gone")
    assert result.steps["after"].status is sv.StepStatus.SUCCEEDED
    assert result.artifacts["pid_warm"] == child
    assert result.artifacts["pid_after"] != child


def test_next_step_on_the_same_worker_reuses_a_healthy_child(chdir_tmp: Path) -> None:
    wf = sv.Workflow(
        "reuse",
        steps=[
            sv.Step("a", report_pid, executor="process"),
            sv.Step("b", report_pid, executor="process", needs=["a"]),
        ],
        settings=sv.Settings(max_parallel=1),
    )
    result = sv.run(wf)
    assert result.ok
    assert result.artifacts["pid_a"] == result.artifacts["pid_b"]


@pytest.mark.parametrize(
    ("fn", "expected"),
    [
        (kill_self, "SIGKILL"),
        (exit_3, "code 3"),
    ],
)
def test_worker_crash_gives_a_clear_error_and_the_run_goes_on(
    fn: Any, expected: str, chdir_tmp: Path
) -> None:
    wf = sv.Workflow(
        "crash",
        steps=[
            sv.Step("bad", fn, executor="process"),
            sv.Step("good", report_pid, executor="process"),
        ],
        settings=sv.Settings(on_failure="continue", max_parallel=1),
    )
    result = sv.run(wf)
    error = result.errors["bad"]
    assert isinstance(error, sv.WorkerCrashedError)
    assert expected in str(error)
    assert result.steps["bad"].attempts[0].outcome == "crashed"
    assert result.steps["good"].status is sv.StepStatus.SUCCEEDED


def test_exception_that_cannot_be_pickled_comes_back_readable(chdir_tmp: Path) -> None:
    wf = sv.Workflow("unp", steps=[sv.Step("bad", raise_unpicklable, executor="process")])
    result = sv.run(wf)
    error = result.error
    assert error is not None
    assert "holds a lock" in str(error)
    traceback_text = result.steps["bad"].attempts[0].error_traceback or ""
    assert "raise_unpicklable" in traceback_text


def test_result_that_cannot_be_pickled_fails_the_step_once(chdir_tmp: Path) -> None:
    policy = sv.RetryPolicy(max_attempts=3, backoff=sv.Backoff.none())
    wf = sv.Workflow(
        "res", steps=[sv.Step("bad", return_unpicklable, executor="process", retry=policy)]
    )
    result = sv.run(wf)
    assert isinstance(result.error, sv.StepNotSerializableError)
    assert "lock" in str(result.error)
    assert result.steps["bad"].attempt_count == 1


def test_input_that_cannot_be_sent_fails_the_consumer_with_its_name(chdir_tmp: Path) -> None:
    wf = sv.Workflow(
        "inp",
        steps=[
            sv.Step("make", make_lock, creates=["lock"]),
            sv.Step("use", uses_input, requires=["lock"], executor="process"),
        ],
    )
    result = sv.run(wf)
    assert result.failed_step == "use"
    assert isinstance(result.error, sv.StepNotSerializableError)
    assert "lock" in str(result.error)


def test_function_that_cannot_be_sent_is_refused_before_anything_runs(chdir_tmp: Path) -> None:
    lock = threading.Lock()
    wf = sv.Workflow("fn", steps=[sv.Step("bad", lambda ctx: lock.locked(), executor="process")])
    with pytest.raises(sv.StepNotSerializableError, match="'bad'"):
        sv.run(wf)


def test_step_that_keeps_crashing_is_poisonous(chdir_tmp: Path) -> None:
    policy = sv.RetryPolicy(max_attempts=10, backoff=sv.Backoff.none())
    wf = sv.Workflow(
        "poison",
        steps=[sv.Step("bad", crash_until, executor="process", retry=policy, params={"ok_at": 99})],
        settings=sv.Settings(max_worker_crashes=3),
    )
    result = sv.run(wf)
    assert result.steps["bad"].attempt_count == 3
    assert any("poisonous" in note for note in result.error.__notes__)  # type: ignore[union-attr]


@pytest.mark.parametrize("retry_crashes", [True, False])
def test_crashes_follow_retry_crashes(retry_crashes: bool, chdir_tmp: Path) -> None:
    policy = sv.RetryPolicy(max_attempts=3, backoff=sv.Backoff.none(), retry_crashes=retry_crashes)
    wf = sv.Workflow(
        "rc",
        steps=[sv.Step("s", crash_until, executor="process", retry=policy, params={"ok_at": 2})],
    )
    result = sv.run(wf)
    if retry_crashes:
        assert result.ok
        assert result.artifacts["attempt"] == 2
    else:
        assert result.steps["s"].attempt_count == 1
        assert isinstance(result.error, sv.WorkerCrashedError)


def test_timeouts_follow_retry_timeouts_on_processes(tmp_path: Path, chdir_tmp: Path) -> None:
    policy = sv.RetryPolicy(max_attempts=2, backoff=sv.Backoff.none(), retry_timeouts=False)
    wf = sv.Workflow(
        "rt",
        steps=[
            sv.Step(
                "s",
                busy,
                executor="process",
                timeout=0.3,
                retry=policy,
                params={"dir": str(tmp_path)},
            )
        ],
    )
    result = sv.run(wf)
    assert result.steps["s"].attempt_count == 1
    assert result.steps["s"].status is sv.StepStatus.TIMED_OUT


def test_cancel_with_eight_process_steps_in_flight(tmp_path: Path, chdir_tmp: Path) -> None:
    steps = [
        sv.Step(f"s{i}", busy, executor="process", params={"dir": str(tmp_path)}) for i in range(10)
    ]
    handle = sv.start(sv.Workflow("c8", steps=steps), max_parallel=8)
    wait_for(lambda: len(list(tmp_path.glob("*.pid"))) == 8, timeout=30, what="8 busy steps")
    pids = [int(p.read_text()) for p in tmp_path.glob("*.pid")]
    t0 = time.monotonic()
    handle.cancel()
    result = handle.wait(30)
    assert time.monotonic() - t0 < 2.0
    assert all(pid_gone(pid) for pid in pids)
    assert result.status is sv.RunStatus.CANCELLED
    assert all(r.status is sv.StepStatus.CANCELLED for r in result.steps.values())


def test_process_is_the_run_default_when_settings_say_so(chdir_tmp: Path) -> None:
    wf = sv.Workflow(
        "dflt", steps=[sv.Step("a", report_pid)], settings=sv.Settings(executor="process")
    )
    result = sv.run(wf)
    assert result.ok
    assert result.artifacts["pid_a"] != os.getpid()


def _record_batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Patch the Worker to record the size of every message it is handed."""
    from stepvisor.actors import worker as worker_module  # noqa: PLC0415
    from stepvisor.actors.messages import RunAttempt, RunBatch  # noqa: PLC0415

    sizes: list[int] = []
    original = worker_module.Worker.on_receive

    def recording(self: Any, message: Any) -> None:
        if isinstance(message, RunBatch):
            sizes.append(len(message.attempts))
        elif isinstance(message, RunAttempt):
            sizes.append(1)
        original(self, message)

    monkeypatch.setattr(worker_module.Worker, "on_receive", recording)
    return sizes


def test_tiny_process_steps_are_batched_on_the_same_children(
    monkeypatch: pytest.MonkeyPatch, chdir_tmp: Path
) -> None:
    sizes = _record_batches(monkeypatch)
    monkeypatch.setattr(machine_module, "PREFETCH_BELOW", 60.0)  # batched even under load
    wf = sv.Workflow(
        "tiny", [sv.Step(f"t{i:03d}", report_pid, executor="process") for i in range(200)]
    )
    result = sv.run(wf, max_parallel=2)
    assert result.ok
    assert result.commits == wf.step_ids
    assert max(sizes) > 1, sizes  # Workers were handed several attempts at once
    # An attempt is handed out again only when an idle slot took it back unstarted
    # (Reclaim): each step still ran exactly one attempt.
    assert sum(sizes) >= 200
    assert all(record.attempt_count == 1 for record in result.steps.values())
    assert len(set(result.artifacts.values())) <= 2  # still one child per Worker, no more


def test_process_steps_with_a_deadline_are_never_queued(
    monkeypatch: pytest.MonkeyPatch, chdir_tmp: Path
) -> None:
    sizes = _record_batches(monkeypatch)
    steps = [sv.Step(f"t{i:03d}", report_pid, executor="process") for i in range(100)]
    steps.append(sv.Step("timed", report_pid, executor="process", timeout=30.0))
    result = sv.run(sv.Workflow("timed", steps), max_parallel=2)
    assert result.ok
    assert sizes
    assert max(sizes) == 1, sizes


def test_cancel_reaches_process_attempts_queued_behind_others(chdir_tmp: Path) -> None:
    finished = threading.Semaphore(0)

    def hook(event: sv.Event) -> None:
        if isinstance(event, sv.StepFinished):
            finished.release()

    wf = sv.Workflow(
        "q", [sv.Step(f"t{i:04d}", report_pid, executor="process") for i in range(2000)]
    )
    cancel_midway(sv.start(wf, max_parallel=2, on_event=hook), finished, after=100)


def flaky_tiny(ctx: sv.StepContext) -> dict[str, int]:
    """Log the attempt, then crash or raise on attempt 1 as ``params`` say; else succeed."""
    with open(Path(ctx.params["dir"]) / ctx.step_id, "a") as fh:
        fh.write(f"{ctx.attempt}\n")
    if ctx.attempt == 1 and ctx.params["fault"] == "exit":
        os._exit(5)
    if ctx.attempt == 1 and ctx.params["fault"] == "raise":
        raise ValueError("first attempt fails")
    return {ctx.step_id: ctx.attempt}


def test_attempts_sent_ahead_survive_crashes_and_failures_around_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, chdir_tmp: Path
) -> None:
    """Tiny process steps run batched and sent ahead; crashes and failures in between
    must neither lose an attempt nor run one twice."""
    from stepvisor.backends import process as process_module  # noqa: PLC0415

    sent_ahead = [0]
    original = process_module.ProcessSlot._send_ahead

    def counting(self: Any, child: Any, following: Any) -> None:
        before = len(self._ahead) if self._ahead and self._ahead[0].child is child else 0
        original(self, child, following)
        sent_ahead[0] += max(0, len(self._ahead) - before)  # records it added

    monkeypatch.setattr(process_module.ProcessSlot, "_send_ahead", counting)
    # Batch however long attempts take: on a loaded machine these tiny steps can average
    # over PREFETCH_BELOW, and then nothing is batched or sent ahead (seen failing 4 in 6).
    monkeypatch.setattr(machine_module, "PREFETCH_BELOW", 60.0)

    def fault(i: int) -> str:
        return "exit" if i % 37 == 5 else "raise" if i % 41 == 7 else "none"

    steps = [
        sv.Step(
            f"t{i:03d}",
            flaky_tiny,
            executor="process",
            params={"dir": str(tmp_path), "fault": fault(i)},
            retry=sv.RetryPolicy(max_attempts=2, backoff=sv.Backoff.none()),
        )
        for i in range(300)
    ]
    result = sv.run(sv.Workflow("ahead", steps), max_parallel=2)
    assert result.ok, result.error
    assert sent_ahead[0] > 0  # the path under test was taken
    for i, step in enumerate(steps):
        record = result.steps[step.id]
        logged = (tmp_path / step.id).read_text().split()
        expected = ["1"] if fault(i) == "none" else ["1", "2"]
        assert logged == expected, (step.id, logged)  # every attempt ran exactly once
        assert len(record.attempts) == len(expected)
        assert result.artifacts[step.id] == len(expected)
    crashed = [s.id for i, s in enumerate(steps) if fault(i) == "exit"]
    assert all(result.steps[sid].attempts[0].outcome == "crashed" for sid in crashed)
