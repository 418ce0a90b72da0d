"""The Ray backend: the behaviour every backend shares, on a real local Ray instance.

One Ray instance (2 CPUs, dashboard off) serves the whole module: starting one
takes seconds on a small machine.  It is started by the module-scoped fixture
``ray_session``, which pytest sets up before the function-scoped autouse leak
check of the first test that asks for it (higher scopes are set up first), and
shut down after the module, when it checks that none of Ray's processes is
left.  Ray's own processes (GCS, raylet, its worker pool) are started without
the suite's session marker, under a marker of their own: Ray replaces the
worker processes that a timeout or a crash kills, and those replacements
belong to Ray's pool, not to the test that caused them.  Each test still checks
that the worker process running its step is gone when it should be.

Steps tell the test what they are doing through files they write (their pid),
and the test waits for those files with a bounded poll.  The step functions
are built inside :func:`_make_steps` so that cloudpickle sends them by value:
Ray workers need not import this module (and pytest with it).

Tests that check what happens *without* a usable Ray (not installed, address
unreachable, not imported at all) run in a fresh interpreter.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import stepvisor as sv
from stepvisor.backends.base import AttemptSpec
from stepvisor.backends.ray import (
    RayBackend,
    RayTransfers,
    check_reachable,
    task_options,
)
from stepvisor.context import AttemptControl
from stepvisor.core.model import Executor
from stepvisor.errors import (
    BackendUnavailableError,
    RemoteStepError,
    StepCancelledError,
    StepTimeoutError,
    WorkerCrashedError,
)
from tests.conftest import NO_RAY, pid_gone, wait_for

pytestmark = pytest.mark.ray

#: The environment variable that marks the processes of this module's Ray instance.
RAY_MARK_VAR = "STEPVISOR_RAY_TEST_MARK"
#: Bound on waiting for a step to report (a replaced Ray worker takes ~1-2 s to start).
REPORT_TIMEOUT = 30.0
SRC = str(Path(sv.__file__).resolve().parent.parent)


# -- the Ray instance ---------------------------------------------------------------------


def marked_processes(mark: str) -> set[int]:
    """Live processes whose environment carries ``RAY_MARK_VAR=mark``."""
    needle = f"{RAY_MARK_VAR}={mark}".encode()
    found: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError), open(f"/proc/{entry}/environ", "rb") as fh:
            if needle in fh.read() and not pid_gone(int(entry)):
                found.add(int(entry))
    return found


@contextlib.contextmanager
def ray_environment(mark: str) -> Iterator[None]:
    """Start Ray's processes under ``mark`` instead of the suite's session marker.

    Ray keeps its session files in ``$TMPDIR/ray``, inside the suite's private
    temporary directory, which the suite removes at the end.
    """
    saved = {key: os.environ.get(key) for key in ("STEPVISOR_TEST_SESSION", RAY_MARK_VAR)}
    os.environ.pop("STEPVISOR_TEST_SESSION", None)
    os.environ[RAY_MARK_VAR] = mark
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def wait_all_gone(mark: str, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while left := marked_processes(mark):
        if time.monotonic() > deadline:
            pytest.fail(f"{what} left processes {sorted(left)} running")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def ray_session() -> Iterator[Any]:
    """One local Ray instance for the module; none of its processes is left afterwards."""
    ray = pytest.importorskip("ray", reason=NO_RAY)
    assert not ray.is_initialized(), "another test left Ray initialized"
    mark = uuid.uuid4().hex
    with ray_environment(mark):
        ray.init(
            num_cpus=2,
            resources={"stepvisor_test": 1},
            include_dashboard=False,
            logging_level="warning",
            log_to_driver=False,
        )
    try:
        yield ray
    finally:
        ray.shutdown()
        wait_all_gone(mark, timeout=20.0, what="ray.shutdown()")


# -- step functions (sent by value) -------------------------------------------------------


def _make_steps() -> SimpleNamespace:
    def publish(ctx: Any, name: str, value: object) -> None:
        """Write ``value`` to ``<dir>/<name>`` atomically, so a reader never sees half."""
        folder = ctx.params["dir"]
        tmp = os.path.join(folder, f".{name}.tmp")
        with open(tmp, "w") as fh:
            fh.write(str(value))
        os.replace(tmp, os.path.join(folder, name))

    def whoami(ctx: Any) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "who": (ctx.run_id, ctx.step_id, ctx.attempt, ctx.max_attempts),
            "params": dict(ctx.params),
            "remaining": ctx.remaining(),
            "rows": [1, 2, 3],
        }

    async def add_async(ctx: Any) -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"total": sum(ctx.inputs["rows"]), "seen_pid": ctx.inputs["pid"]}

    def spin(ctx: Any) -> None:
        publish(ctx, ctx.step_id, os.getpid())
        while True:
            pass

    def sleep_long(ctx: Any) -> None:
        publish(ctx, ctx.step_id, os.getpid())
        time.sleep(120)

    def exit_first(ctx: Any) -> dict[str, Any]:
        if ctx.attempt == 1:
            os._exit(3)
        return {"survived_on": ctx.attempt}

    def flaky(ctx: Any) -> dict[str, Any]:
        if ctx.attempt < 3:
            raise ValueError(f"flaky failed on attempt {ctx.attempt}")
        return {"flaky": ctx.attempt}

    class QuotaError(Exception):
        """A user exception class that exists only by value."""

    def over_quota(ctx: Any) -> None:
        raise QuotaError(f"over quota on attempt {ctx.attempt}")

    class StubbornError(Exception):
        def __init__(self, code: int, why: str) -> None:
            super().__init__(f"{code}: {why}")  # drops the arguments: cannot be rebuilt

    def stubborn(ctx: Any) -> None:
        raise StubbornError(7, "no")

    def returns_lock(ctx: Any) -> dict[str, Any]:
        return {"lock": threading.Lock()}

    def assigned(ctx: Any) -> dict[str, Any]:
        ray = importlib.import_module("ray")
        return {"assigned": dict(ray.get_runtime_context().get_assigned_resources())}

    def blob(ctx: Any) -> dict[str, Any]:
        return {"blob": bytes(ctx.params.get("size", 1 << 20))}

    def measure(ctx: Any) -> dict[str, Any]:
        return {f"len_{ctx.step_id}": len(ctx.inputs["blob"])}

    # A small DAG with an artifact created twice ("x"): canonical order decides.
    def make_a(ctx: Any) -> dict[str, Any]:
        return {"x": "from a", "a_only": 1}

    def make_b(ctx: Any) -> dict[str, Any]:
        return {"x": "from b", "rows": list(range(30_000))}  # > 100 KiB pickled

    def combine(ctx: Any) -> dict[str, Any]:
        return {"seen_x": ctx.inputs["x"], "n_rows": len(ctx.inputs["rows"]), "x": "from c"}

    def finish(ctx: Any) -> dict[str, Any]:
        return {"final": f"{ctx.inputs['x']}|{ctx.inputs['seen_x']}|{ctx.inputs['a_only']}"}

    def lone(ctx: Any) -> dict[str, Any]:
        return {"lone": sorted(ctx.inputs)}

    def measure_item(ctx: Any) -> dict[str, Any]:
        return {"len": len(ctx.item), "index": ctx.index, "inputs": sorted(ctx.inputs)}

    return SimpleNamespace(**{k: v for k, v in locals().items() if not k.startswith("_")})


S = _make_steps()


def read_pid(folder: Path, name: str) -> int:
    path = folder / name
    wait_for(path.exists, timeout=REPORT_TIMEOUT, what=f"step {name!r} to write its pid")
    return int(path.read_text())


def attempts_of(result: sv.RunResult, sid: str) -> list[tuple[str | None, str | None]]:
    return [(a.outcome, a.error_type) for a in result.steps[sid].attempts]


NO_WAIT = sv.Backoff.none()


# -- without Ray, or before it ---------------------------------------------------------------


def run_python(code: str, *, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def test_importing_stepvisor_or_running_other_steps_never_imports_ray(tmp_path: Path) -> None:
    done = run_python(
        f"""
        import sys
        import stepvisor as sv
        assert "ray" not in sys.modules, "import stepvisor imported ray"
        result = sv.run(sv.Workflow("w", [sv.Step("t", lambda ctx: {{"v": 1}})]),
                        store={str(tmp_path / "runs.db")!r})
        assert result.status is sv.RunStatus.SUCCEEDED, result
        assert "ray" not in sys.modules, "a run without Ray steps imported ray"
        print("ok")
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_ray_step_without_ray_installed_fails_before_any_step_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    done = run_python(
        f"""
        import pathlib, sys
        sys.modules["ray"] = None  # what an environment without Ray looks like to import
        import stepvisor as sv

        def first(ctx):
            pathlib.Path({str(marker)!r}).write_text("ran")

        wf = sv.Workflow("w", [sv.Step("first", first),
                               sv.Step("remote", lambda ctx: None, executor="ray")])
        try:
            sv.run(wf)
        except sv.BackendUnavailableError as exc:
            print(exc)
        else:
            raise SystemExit("no error")
        """
    )
    assert done.returncode == 0, done.stderr
    assert "pip install 'stepvisor[ray]'" in done.stdout
    assert "executor='ray'" in done.stdout
    assert not marker.exists(), "a step ran although the run could not start"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # closed again: nothing listens there now


def test_check_reachable_names_the_address_and_the_fix() -> None:
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(BackendUnavailableError) as info:
        check_reachable(address, timeout=2.0)
    assert time.monotonic() - started < 2.5
    message = str(info.value)
    assert address in message
    assert "ray_address" in message
    assert "STEPVISOR_RAY_ADDRESS" in message
    for address in (f"ray://127.0.0.1:{free_port()}", f"[::1]:{free_port()}"):
        with pytest.raises(BackendUnavailableError):
            check_reachable(address, timeout=2.0)
    check_reachable("auto")  # left to Ray: no host and port to try


def test_unreachable_ray_address_fails_before_any_step_runs(tmp_path: Path) -> None:
    pytest.importorskip("ray", reason=NO_RAY)
    marker = tmp_path / "ran"
    address = f"127.0.0.1:{free_port()}"
    done = run_python(
        f"""
        import pathlib, sys, time
        import stepvisor as sv

        def first(ctx):
            pathlib.Path({str(marker)!r}).write_text("ran")

        wf = sv.Workflow("w", [sv.Step("first", first),
                               sv.Step("remote", lambda ctx: None, executor="ray")])
        started = time.monotonic()
        try:
            sv.run(wf, ray_address={address!r})
        except sv.BackendUnavailableError as exc:
            print(f"{{time.monotonic() - started:.3f}}")
            print(exc)
        else:
            raise SystemExit("no error")
        """
    )
    assert done.returncode == 0, done.stderr
    seconds, message = done.stdout.split("\n", 1)
    assert float(seconds) < 10.0
    assert f"cannot reach the Ray cluster at {address!r}" in message
    assert not marker.exists(), "a step ran although the run could not start"


def test_step_resources_map_onto_ray_task_options() -> None:
    assert task_options(None) == {"num_cpus": 1, "max_retries": 0, "retry_exceptions": False}
    assert task_options({"CPU": 2, "GPU": 0, "custom": 1, "unused": 0, "memory": 1e9}) == {
        "num_cpus": 2,
        "num_gpus": 0,
        "memory": 1e9,
        "resources": {"custom": 1},
        "max_retries": 0,
        "retry_exceptions": False,
    }
    assert task_options({"GPU": 0.5})["num_cpus"] == 1


@pytest.mark.slow
def test_local_ray_is_started_only_for_a_ray_step_and_stopped_after(ray_session: Any) -> None:
    # ray_session is not used here, only its $TMPDIR/ray: this run starts a Ray of its own.
    done = run_python(
        """
        import os, sys
        import stepvisor as sv
        local = sv.Workflow("w", [sv.Step("t", lambda ctx: {"v": 1})])
        assert sv.run(local).status is sv.RunStatus.SUCCEEDED
        assert "ray" not in sys.modules, "Ray was imported for a run without Ray steps"
        remote = sv.Workflow("w", [sv.Step("r", lambda ctx: {"pid": os.getpid()})],
                             settings=sv.Settings(executor="ray"))
        result = sv.run(remote)
        assert result.status is sv.RunStatus.SUCCEEDED, result.error
        assert result.artifacts["pid"] != os.getpid()
        import ray
        assert not ray.is_initialized(), "the Ray instance stepvisor started is still up"
        assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0"
        print("ok")
        """,
        timeout=100.0,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")


# -- on Ray: behaviour shared with every backend -----------------------------------------------


def test_ray_step_runs_in_a_ray_worker_with_its_context(ray_session: Any, chdir_tmp: Path) -> None:
    wf = sv.Workflow(
        "ctx",
        [
            sv.Step("first", S.whoami, params={"k": 1}, timeout=60.0),
            sv.Step("second", S.add_async, needs=["first"]),
        ],
        settings=sv.Settings(executor="ray"),
    )
    result = sv.run(wf, run_id="run-ctx")
    assert result.status is sv.RunStatus.SUCCEEDED, result.error
    art = result.artifacts
    assert art["pid"] != os.getpid()
    assert art["who"] == ("run-ctx", "first", 1, 1)
    assert art["params"] == {"k": 1}
    assert 0 < art["remaining"] <= 60.0
    assert art["total"] == 6
    assert art["seen_pid"] == art["pid"]
    assert ray_session.is_initialized(), "stepvisor shut down a Ray it did not start"


def test_timed_out_ray_step_is_force_cancelled_and_its_worker_killed(
    ray_session: Any, chdir_tmp: Path
) -> None:
    wf = sv.Workflow(
        "timeout",
        [sv.Step("spin", S.spin, timeout=2.0, params={"dir": str(chdir_tmp)})],
        settings=sv.Settings(executor="ray"),
    )
    result = sv.run(wf)
    pid = read_pid(chdir_tmp, "spin")
    record = result.steps["spin"]
    assert record.status is sv.StepStatus.TIMED_OUT
    assert attempts_of(result, "spin") == [("timed_out", "stepvisor.errors.StepTimeoutError")]
    message = record.attempts[0].error_message or ""
    assert "exceeded its 2 s timeout" in message
    assert "force-cancelled (worker process killed)" in message
    assert isinstance(result.errors["spin"], StepTimeoutError)
    assert (record.attempts[0].duration or 0.0) < 2.0 + 2.0
    wait_for(lambda: pid_gone(pid), timeout=10.0, what=f"Ray worker {pid} to be killed")


def test_cancel_reaches_every_ray_task_in_flight(ray_session: Any, chdir_tmp: Path) -> None:
    params = {"dir": str(chdir_tmp)}
    wf = sv.Workflow(
        "cancel",
        [sv.Step("one", S.spin, params=params), sv.Step("two", S.sleep_long, params=params)],
        settings=sv.Settings(executor="ray", max_parallel=2),
    )
    handle = sv.start(wf)
    pids = [read_pid(chdir_tmp, "one"), read_pid(chdir_tmp, "two")]
    handle.cancel()
    result = handle.wait(timeout=30.0)
    assert result.status is sv.RunStatus.CANCELLED
    for sid in ("one", "two"):
        assert result.steps[sid].status is sv.StepStatus.CANCELLED
        assert attempts_of(result, sid) == [("cancelled", "stepvisor.errors.StepCancelledError")]
        assert isinstance(result.errors[sid], StepCancelledError)
    for pid in pids:
        wait_for(lambda pid=pid: pid_gone(pid), timeout=10.0, what=f"Ray worker {pid} killed")


def test_crashed_ray_worker_is_retried_when_retry_crashes_allows(
    ray_session: Any, chdir_tmp: Path
) -> None:
    policy = sv.RetryPolicy(max_attempts=2, backoff=NO_WAIT, retry_crashes=True)
    wf = sv.Workflow(
        "crash", [sv.Step("exit", S.exit_first, retry=policy)], settings=sv.Settings(executor="ray")
    )
    result = sv.run(wf)
    assert result.status is sv.RunStatus.SUCCEEDED, result.error
    assert attempts_of(result, "exit") == [
        ("crashed", "stepvisor.errors.WorkerCrashedError"),
        ("succeeded", None),
    ]
    assert "Ray worker" in (result.steps["exit"].attempts[0].error_message or "")
    assert result.artifacts["survived_on"] == 2


def test_sigkilled_ray_worker_fails_the_step_when_crashes_are_not_retried(
    ray_session: Any, chdir_tmp: Path
) -> None:
    policy = sv.RetryPolicy(max_attempts=3, backoff=NO_WAIT, retry_crashes=False)
    wf = sv.Workflow(
        "kill",
        [sv.Step("victim", S.sleep_long, retry=policy, params={"dir": str(chdir_tmp)})],
        settings=sv.Settings(executor="ray"),
    )
    handle = sv.start(wf)
    pid = read_pid(chdir_tmp, "victim")
    os.kill(pid, signal.SIGKILL)
    result = handle.wait(timeout=30.0)
    assert result.status is sv.RunStatus.FAILED
    assert attempts_of(result, "victim") == [("crashed", "stepvisor.errors.WorkerCrashedError")]
    error = result.errors["victim"]
    assert isinstance(error, WorkerCrashedError)
    assert isinstance(error.__cause__, ray_session.exceptions.RayError)


def test_user_exceptions_come_back_as_themselves_and_follow_the_policy(
    ray_session: Any, chdir_tmp: Path
) -> None:
    policy = sv.RetryPolicy(max_attempts=3, backoff=NO_WAIT)
    wf = sv.Workflow(
        "errors",
        [
            sv.Step("flaky", S.flaky, retry=policy),
            sv.Step("quota", S.over_quota, retry=sv.RetryPolicy(max_attempts=2, backoff=NO_WAIT)),
            sv.Step("stubborn", S.stubborn),
        ],
        settings=sv.Settings(executor="ray", on_failure="continue"),
    )
    result = sv.run(wf)
    assert attempts_of(result, "flaky") == [("failed", "ValueError")] * 2 + [("succeeded", None)]
    first = result.steps["flaky"].attempts[0]
    assert first.error_message == "flaky failed on attempt 1"
    assert "in flaky" in (first.error_traceback or "")
    assert "ValueError: flaky failed on attempt 1" in (first.error_traceback or "")
    assert result.artifacts["flaky"] == 3

    quota = result.errors["quota"]
    assert type(quota) is S.QuotaError, "the exception did not come back as itself"
    assert str(quota) == "over quota on attempt 2"
    assert any("Traceback in Ray worker" in note for note in quota.__notes__)
    assert len(result.steps["quota"].attempts) == 2

    stubborn = result.errors["stubborn"]
    assert isinstance(stubborn, RemoteStepError)
    assert stubborn.remote_type.endswith("StubbornError")
    assert "7: no" in str(stubborn)
    assert "in stubborn" in stubborn.remote_traceback


def test_unsendable_output_fails_the_step_without_retry(ray_session: Any, chdir_tmp: Path) -> None:
    wf = sv.Workflow(
        "unsendable",
        [sv.Step("locked", S.returns_lock, retry=sv.RetryPolicy(max_attempts=3, backoff=NO_WAIT))],
        settings=sv.Settings(executor="ray"),
    )
    result = sv.run(wf)
    assert attempts_of(result, "locked") == [
        ("failed", "stepvisor.errors.StepNotSerializableError")
    ]
    message = result.steps["locked"].attempts[0].error_message or ""
    assert "artifact 'lock'" in message
    assert "is a _thread.lock" in message


def test_step_resources_are_what_its_ray_task_gets(ray_session: Any, chdir_tmp: Path) -> None:
    wf = sv.Workflow(
        "resources",
        [
            sv.Step("big", S.assigned, resources={"CPU": 2, "GPU": 0, "stepvisor_test": 1}),
            sv.Step("default", S.assigned, needs=["big"]),
        ],
        settings=sv.Settings(executor="ray"),
    )
    result = sv.run(wf)
    assert result.status is sv.RunStatus.SUCCEEDED, result.error
    assert result.commits == ("big", "default")
    # Both steps write "assigned"; the later one in canonical order wins.
    assert result.artifacts["assigned"] == {"CPU": 1.0}
    first = sv.run(sv.Workflow("r1", [wf.step("big")], settings=wf.settings))
    assert first.artifacts["assigned"] == {"CPU": 2.0, "stepvisor_test": 1.0}


def test_step_asking_for_more_than_the_cluster_has_is_warned_and_stopped_while_queued(
    ray_session: Any, chdir_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    wf = sv.Workflow(
        "infeasible",
        [sv.Step("gpu", S.assigned, resources={"GPU": 1}, timeout=1.0)],
        settings=sv.Settings(executor="ray"),
    )
    with caplog.at_level("WARNING", logger="stepvisor"):
        result = sv.run(wf)
    assert "step 'gpu' asks Ray for {'GPU': 1}" in caplog.text
    assert attempts_of(result, "gpu") == [("timed_out", "stepvisor.errors.StepTimeoutError")]


def _dag(executor_of: Callable[[str], Executor]) -> sv.Workflow:
    steps = [
        sv.Step("a", S.make_a),
        sv.Step("b", S.make_b),
        sv.Step("c", S.combine, needs=["a", "b"]),
        sv.Step("d", S.finish, needs=["c"]),
        sv.Step("e", S.lone),
        sv.Step("f", S.lone, needs=["a"]),
    ]
    return sv.Workflow(
        "dag",
        [sv.Step(s.id, s.fn, needs=s.needs, executor=executor_of(s.id)) for s in steps],
        settings=sv.Settings(max_parallel=3, seed=7),
    )


def _shape(result: sv.RunResult) -> dict[str, Any]:
    return {
        "status": result.status,
        "steps": {sid: (r.status, attempts_of(result, sid)) for sid, r in result.steps.items()},
        "artifacts": dict(result.artifacts),
        "commits": result.commits,
        "seed": result.seed,
    }


@pytest.mark.parametrize(
    "executor_of",
    [lambda sid: "ray", lambda sid: "ray" if sid in "bdf" else "thread"],
    ids=["all-ray", "ray-and-threads"],
)
def test_a_workflow_gives_the_same_run_result_on_ray_as_on_threads(
    ray_session: Any, chdir_tmp: Path, executor_of: Callable[[str], Executor]
) -> None:
    on_threads = sv.run(_dag(lambda sid: "thread"))
    on_ray = sv.run(_dag(executor_of))
    assert on_threads.status is sv.RunStatus.SUCCEEDED, on_threads.error
    assert _shape(on_ray) == _shape(on_threads)
    # Canonical order decides the collision, not completion order.
    assert on_ray.artifacts["final"] == "from c|from b|1"


# -- data: artifacts travel by reference ---------------------------------------------------------


def _spec(step_id: str, fn: Callable[..., Any], **fields: Any) -> AttemptSpec:
    base: dict[str, Any] = {
        "run_id": "r",
        "step_id": step_id,
        "attempt": 1,
        "max_attempts": 1,
        "fn": fn,
        "is_async": False,
        "inputs": {},
        "params": {},
        "deadline": time.monotonic() + 60.0,
    }
    return AttemptSpec(**{**base, **fields})


def test_ray_steps_take_large_inputs_by_reference_one_copy_for_all(ray_session: Any) -> None:
    backend = RayBackend.connect(address=None)
    try:
        made = backend.run(_spec("make", S.blob), AttemptControl())
        assert made.kind == "ok", made
        assert made.outputs is not None
        value = made.outputs["blob"]
        for i in range(3):
            got = backend.run(_spec(f"use{i}", S.measure, inputs={"blob": value}), AttemptControl())
            assert got.outputs == {f"len_use{i}": 1 << 20}
        # The three consumers got a reference to the producer's result, no copy from here.
        assert backend.transfers == RayTransfers(refs_passed=3)

        local = bytes(2 << 20)  # made outside Ray: put into the object store once
        for i in range(3):
            got = backend.run(_spec(f"loc{i}", S.measure, inputs={"blob": local}), AttemptControl())
            assert got.outputs == {f"len_loc{i}": 2 << 20}
        assert backend.transfers == RayTransfers(refs_passed=3, values_put=1, values_reused=2)
    finally:
        backend.close()
    assert ray_session.is_initialized(), "closing the backend shut down a Ray it did not start"


def test_a_mapped_instance_takes_its_item_by_reference_like_an_input(ray_session: Any) -> None:
    """A chained instance's item is the output of a Ray step: it goes as a reference."""
    from stepvisor.core._mapping import INDEX_KEY, ITEM_KEY  # noqa: PLC0415

    backend = RayBackend.connect(address=None)
    try:
        made = backend.run(_spec("make[0]", S.blob), AttemptControl())
        assert made.kind == "ok", made
        assert made.outputs is not None
        inputs = {ITEM_KEY: made.outputs["blob"], INDEX_KEY: 0}
        got = backend.run(_spec("use[0]", S.measure_item, inputs=inputs), AttemptControl())
        assert got.outputs == {"len": 1 << 20, "index": 0, "inputs": []}
        assert backend.transfers == RayTransfers(refs_passed=1, values_inlined=1)  # the index
    finally:
        backend.close()
