"""The ``backend`` fixture: every contract test runs once per executor.

As pykka's ``tests/conftest.py`` runs each test per runtime, ``backend_name``
is a package-scoped fixture parametrized over :data:`BACKENDS`, so pytest
groups the tests by backend and sets each one up once: the Ray instance is
started for the first Ray test and shut down after the last one (with none of
its processes left), and it exists before the function-scoped leak check of
any Ray test takes its snapshot.  Its processes run under a marker of their
own (``ray_environment`` from ``test_ray_backend.py``): Ray replaces the
workers a kill takes, and those belong to Ray's pool, not to the test.

What a backend cannot do is a row in a capability table below; a test that
meets a ``False`` asserts what that backend does instead, or skips naming the
table.  Tests drive the engine through the public API only.
"""

from __future__ import annotations

import contextlib
import gc
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest

import stepvisor as sv
from tests.backends.test_ray_backend import ray_environment, wait_all_gone
from tests.conftest import NO_RAY, pid_gone, wait_for
from tests.contract import steps

__all__ = ["BACKENDS", "CAN_CRASH", "REMOTE", "SEES_CANCELLED", "Backend"]

Executor = Literal["thread", "async", "process", "ray"]
BACKENDS: tuple[Executor, ...] = ("thread", "async", "process", "ray")

#: Whether a step can crash the worker that runs it (``os._exit``, SIGKILL).  A
#: thread or async step runs in the engine's own process: exiting it would end
#: the test session, not a worker.  For those the suite checks the in-process
#: analogue instead: ``sys.exit()`` raises ``SystemExit``, which fails the step
#: as an error while its Worker lives on.
CAN_CRASH = {"thread": False, "async": False, "process": True, "ray": True}

#: Whether a running step sees ``ctx.cancelled`` turn true, and so can stop (or
#: return) on its own when asked.  A process step is stopped by SIGTERM to its
#: child's process group and a Ray task is force-cancelled (its worker process
#: killed): neither sees the ask.  For those the suite asserts the kill instead:
#: the process that ran the step is gone, and the outcome is the same.
SEES_CANCELLED = {"thread": True, "async": True, "process": False, "ray": False}

#: Whether the step runs in another process, so what it raises is pickled back
#: to the engine.  An exception that cannot be pickled then comes back as a
#: ``RemoteStepError`` naming the original type; a local one stays itself.
REMOTE = {"thread": False, "async": False, "process": True, "ray": True}

#: Bound on a whole run, and on a step reporting that it started (a Ray worker
#: that replaces a killed one takes a second or two to start).
RUN_BOUND = 15.0
REPORT_BOUND = 30.0
NO_WAIT = sv.Backoff.none()
ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Backend:
    """One backend under test, and the directory its steps report to."""

    name: Executor
    signals: Path

    @property
    def can_crash(self) -> bool:
        return CAN_CRASH[self.name]

    @property
    def sees_cancelled(self) -> bool:
        return SEES_CANCELLED[self.name]

    @property
    def remote(self) -> bool:
        return REMOTE[self.name]

    def step(self, step_id: str, fn: steps.SyncStep, **options: Any) -> sv.Step:
        """``sv.Step(step_id, fn, executor=<this backend>)``, ``fn``'s async version for async.

        The step's params get ``dir``, where it reports what it does.
        """
        params = {"dir": str(self.signals), **options.pop("params", {})}
        chosen: Any = fn
        if self.name == "async":
            if fn not in steps.ASYNC:
                raise LookupError(f"{fn.__name__} has no async version in steps.ASYNC")
            chosen = steps.ASYNC[fn]
        return sv.Step(step_id, chosen, executor=self.name, params=params, **options)

    def run(self, wf: sv.Workflow, **overrides: Any) -> sv.RunResult:
        return finish(sv.start(wf, **overrides))

    def started(self, step_id: str, attempt: int = 1) -> int:
        """Wait (bounded) until the attempt has started; return the pid that runs it."""
        path = self.signals / f"{step_id}.{attempt}.started"
        wait_for(path.exists, timeout=REPORT_BOUND, what=f"{step_id!r} attempt {attempt} to start")
        return int(path.read_text())

    def did(self, step_id: str, what: str, attempt: int = 1) -> bool:
        """Whether the attempt published ``what`` (``late``, ``returned``)."""
        return (self.signals / f"{step_id}.{attempt}.{what}").exists()

    def calls(self, step_id: str) -> list[tuple[int, int]]:
        """``(attempt, pid)`` of every call of the step, in order, from its log."""
        log = self.signals / "attempts.log"
        lines = log.read_text().splitlines() if log.exists() else []
        return [
            (int(a), int(p)) for sid, a, p in (line.split() for line in lines) if sid == step_id
        ]

    def assert_stopped(self, pid: int) -> None:
        """For a remote backend: the process that ran a stopped step is gone."""
        if self.remote:
            wait_for(lambda: pid_gone(pid), timeout=10.0, what=f"process {pid} to be killed")


def finish(handle: sv.RunHandle, *, within: float = RUN_BOUND) -> sv.RunResult:
    """Wait for the run, bounded: a run that hangs is cancelled and fails the test."""
    try:
        return handle.wait(within)
    except TimeoutError:
        handle.cancel()
        with contextlib.suppress(TimeoutError):
            handle.wait(5.0)
        pytest.fail(f"run {handle.run_id} did not end within {within} s")


def attempts_of(result: sv.RunResult, step_id: str) -> list[tuple[str | None, str | None]]:
    return [(a.outcome, a.error_type) for a in result.steps[step_id].attempts]


@contextlib.contextmanager
def _local_ray() -> Iterator[None]:
    """A local Ray instance (2 CPUs) for the package; none of its processes is left after."""
    ray = pytest.importorskip("ray", reason=NO_RAY)
    assert not ray.is_initialized(), "another test left Ray initialized"
    mark = uuid.uuid4().hex
    # Ray adds the driver's working directory to its workers' sys.path: start it
    # from the repository, so they import tests.contract.steps by reference.
    with ray_environment(mark), contextlib.chdir(ROOT):
        ray.init(num_cpus=2, include_dashboard=False, logging_level="warning", log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
        wait_all_gone(mark, timeout=20.0, what="ray.shutdown()")


@pytest.fixture(
    scope="package",
    params=[
        pytest.param(name, marks=[pytest.mark.ray] if name == "ray" else []) for name in BACKENDS
    ],
)
def backend_name(request: pytest.FixtureRequest) -> Iterator[Executor]:
    name: Executor = request.param
    with _local_ray() if name == "ray" else contextlib.nullcontext():
        yield name


@pytest.fixture
def backend(backend_name: Executor, chdir_tmp: Path) -> Iterator[Backend]:
    """The backend under test; the test runs in an empty directory (no project config).

    After the test, a garbage collection makes what the test left unraisable
    (a coroutine never awaited, an exception in ``__del__``) fail *this* test
    rather than whichever later test the collector happens to run in.
    """
    signals = chdir_tmp / "signals"
    signals.mkdir()
    if backend_name == "ray":
        _warm_ray(Backend(backend_name, chdir_tmp / "warm-up"))
    yield Backend(backend_name, signals)
    gc.collect()


def _warm_ray(warm: Backend) -> None:
    """Return once both of Ray's workers are up and have imported the steps.

    Ray replaces a worker that a test killed in the background, which takes a
    second or two; a later test's 0.5 s timeout must not be spent waiting for
    it.  Two tasks that each wait for the other to start can only finish when
    two workers run them at the same time.
    """
    warm.signals.mkdir()
    wf = sv.Workflow(
        "warm-up",
        [
            warm.step(a, steps.emit, params={"out": {}, "wait_for": [f"{b}.1.started"]})
            for a, b in (("w1", "w2"), ("w2", "w1"))
        ],
        settings=sv.Settings(max_parallel=2),
    )
    result = warm.run(wf)
    assert result.status is sv.RunStatus.SUCCEEDED, f"Ray did not warm up: {result.error}"


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Path | None:
    """The store of a run: ``None`` (the in-memory default) or an SQLite file."""
    return tmp_path / "runs.db" if request.param == "sqlite" else None
