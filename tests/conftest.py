"""Suite-wide fixtures: every test must leave no thread, process, shared-memory segment
or temp file behind, and none reads the repository's own project settings (setup.cfg).

Children are found by a marker in their environment rather than by parent
pid: a grandchild whose parent was killed is re-parented to init, and only the
inherited environment still ties it to this test session.
"""

from __future__ import annotations

import gc
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from stepvisor import config
from stepvisor._runtime import RunHandle
from stepvisor.clock import FakeClock
from stepvisor.core.model import Settings
from stepvisor.core.state import RunStatus, StepStatus
from tests.procfs import pid_gone, processes_with_env
from tests.shmprobe import dev_shm_entries, segment_fds

__all__ = ["pid_gone", "pump_until", "session_processes", "wait_for"]

# setdefault: a child process that imports this module (to unpickle a test's
# step function) must keep the session's marker and temporary directory.
SESSION_MARK = os.environ.setdefault("STEPVISOR_TEST_SESSION", f"stepvisor-test-{uuid.uuid4().hex}")

# A private temporary directory for the whole session (and its subprocesses),
# so the leak check sees only what this suite creates, not other programs' files.
_OWNS_TMP = "STEPVISOR_TEST_TMP" not in os.environ
_PRIVATE_TMP = os.environ.setdefault(
    "STEPVISOR_TEST_TMP", tempfile.mkdtemp(prefix="stepvisor-tests-") if _OWNS_TMP else ""
)
os.environ["TMPDIR"] = _PRIVATE_TMP
tempfile.tempdir = _PRIVATE_TMP


def pytest_unconfigure(config: pytest.Config) -> None:
    if _OWNS_TMP:
        shutil.rmtree(_PRIVATE_TMP, ignore_errors=True)


_LEAK_WAIT = 5.0
#: The repository: its setup.cfg holds the demo's and the benchmarks' settings, not a test's.
REPO_ROOT = Path(__file__).resolve().parent.parent
#: Why a Ray test skips: Ray is an extra. `make test` installs it (EXTRAS=test,ray,...) in
#: .venv only; the suites on the other Python versions (make versions) run without it.
NO_RAY = (
    "Ray is not installed in this interpreter: pip install 'stepvisor[ray]' (make versions "
    "runs Python 3.12 and 3.13 with VERSIONS_EXTRAS=test: Ray is tested on .venv's Python)"
)


@pytest.fixture(autouse=True)
def no_repository_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Project discovery never finds the repository's own setup.cfg or pyproject.toml.

    Tests run from the repository root, so without this a test would run with
    whatever ``make demo`` is set to run with.  A test that wants a project
    file writes one into its own directory (``chdir_tmp``); discovery from
    there is untouched.  (Only this process: a test that starts Python in the
    repository root must give it a ``cwd`` if settings matter to it.)
    """
    find = config.find_project_settings

    def outside_the_repository(start: Path | None = None) -> tuple[Settings, str | None]:
        settings, source = find(start)
        if source is not None and Path(source).parent == REPO_ROOT:
            return Settings(), None
        return settings, source

    monkeypatch.setattr(config, "find_project_settings", outside_the_repository)


@pytest.fixture(autouse=True)
def close_compat_engines(no_leaks: None) -> Iterator[None]:
    """Close the warm engines of the compat executors a test made, before the leak check.

    A ``ParallelStepExecutor`` keeps an engine (Worker threads) between calls
    and closes it when collected; a test must not rely on when that happens.
    """
    yield
    compat = sys.modules.get("stepvisor.compat._executor")
    if compat is not None:
        compat.close_all()
    engines = sys.modules.get("stepvisor.joblib._engines")  # the joblib backend's warm engines
    if engines is not None:
        engines.ENGINES.close_all()


def session_processes() -> set[int]:
    """Pids of live processes (not zombies) that inherited this session's marker."""
    return processes_with_env("STEPVISOR_TEST_SESSION", SESSION_MARK)


def _temp_entries() -> set[str]:
    return {name for name in os.listdir(tempfile.gettempdir()) if not name.startswith("pytest-")}


def _segments_left(fds_before: set[int], shm_before: set[str]) -> str:
    """What a test left of shared memory: descriptors here, names in /dev/shm."""
    fds = set(segment_fds()) - fds_before
    if fds:
        gc.collect()  # a value in a reference cycle may still hold its mapping's descriptor
        fds = set(segment_fds()) - fds_before
    names = dev_shm_entries() - shm_before
    if not fds and not names:
        return ""
    return f"shared-memory segments: descriptors {sorted(fds)}, /dev/shm names {sorted(names)}"


def _cmdline(pid: int) -> str:
    """A process's command line, to say what was left (empty once it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()[:200]
    except OSError:
        return ""


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test if it leaves threads, processes, segments or temp files behind."""
    threads_before = set(threading.enumerate())
    procs_before = session_processes()
    temps_before = _temp_entries()
    fds_before, shm_before = set(segment_fds()), dev_shm_entries()
    yield
    deadline = time.monotonic() + _LEAK_WAIT
    while True:
        threads = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
        procs = session_processes() - procs_before
        if not threads and not procs:
            break
        if time.monotonic() > deadline:
            pytest.fail(
                f"{request.node.nodeid} left behind threads {[t.name for t in threads]} "
                f"and processes {[(pid, _cmdline(pid)) for pid in sorted(procs)]}"
            )
        time.sleep(0.01)
    segments = _segments_left(fds_before, shm_before)
    if segments:
        pytest.fail(f"{request.node.nodeid} left {segments} behind")
    new_temps = _temp_entries() - temps_before
    if new_temps:
        pytest.fail(f"{request.node.nodeid} left temporary files behind: {sorted(new_temps)}")


def wait_for(predicate: object, *, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate()`` until true; fail after ``timeout`` seconds (never hangs)."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


@pytest.fixture
def chdir_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the test from an empty directory, so no project file is picked up."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def pump_until(
    clock: FakeClock, predicate: object, *, timeout: float = 10.0, what: str = "condition"
) -> None:
    """Like :func:`wait_for`, firing any fake-clock timer already due on each poll.

    A timer that the Supervisor registers for a moment the fake clock has already
    reached (because the test advanced it first) fires here, without moving time.
    """
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while True:
        clock.advance(0.0)
        if predicate():
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


def cancel_midway(handle: RunHandle, finished: threading.Semaphore, after: int) -> None:
    """Cancel once ``after`` steps have finished; check the run ended cancelled midway.

    ``finished`` is released once per finished step (by the steps or an event hook).
    """
    for _ in range(after):
        assert finished.acquire(timeout=30)
    handle.cancel()
    result = handle.wait(60)
    assert result.status is RunStatus.CANCELLED
    statuses = set(result.statuses().values())
    assert statuses <= {StepStatus.SUCCEEDED, StepStatus.CANCELLED}
    assert StepStatus.CANCELLED in statuses
