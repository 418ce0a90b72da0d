"""The store's own faults, made real: full disk, read-only, locked, file gone, torn log.

For each: the run stops (the Supervisor ends it as failed) or, for a lock held
briefly, the write waits and goes through; the error names the store path and
the fault; what was committed before is whole (``check_store``); and a resume
once the fault is fixed completes the run without re-running a step the store
holds as succeeded.  Side effects are counted in files outside the store.

How each fault is real (see tests/store_faults.py): a tmpfs of 512 KiB filled
until ENOSPC; the same tmpfs remounted read-only (root ignores chmod); a second
connection holding ``BEGIN EXCLUSIVE``; ``unlink``/``os.replace`` of the file
under the open store; a WAL truncated mid-frame after its program was killed.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import stepvisor as sv
from stepvisor.errors import StoreError, StoreFaultError
from stepvisor.store.sqlite import SQLiteStore
from tests.store_faults import (
    check_store,
    delete_store,
    fill,
    mounting_works,
    read_only,
    replace_store,
    small_disk,
    tear_wal,
    wal_frames,
    write_lock,
)

WAIT = 30.0
STEPS = ("s1", "s2", "s3", "s4")


class Recording:
    """A store that records the errors its calls raise (the Supervisor's view)."""

    def __init__(self, inner: SQLiteStore) -> None:
        self.inner = inner
        self.errors: list[BaseException] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return attr(*args, **kwargs)
            except Exception as exc:
                self.errors.append(exc)
                raise

        return call


def make_wf(effects: Path, fault: Callable[[], None], *, at: str = "s3") -> sv.Workflow:
    """s1 -> s2 -> s3 -> s4, one at a time; ``fault()`` runs inside step ``at`` once."""
    fired: list[bool] = []

    def work(ctx: sv.StepContext) -> dict[str, Any]:
        with open(effects / f"ran-{ctx.step_id}", "a") as fh:
            fh.write("x\n")
        if ctx.step_id == at and not fired:
            fired.append(True)
            fault()
        return {f"n_{ctx.step_id}": 1}

    steps = [sv.Step("s1", work)]
    steps += [sv.Step(sid, work, needs=[prev]) for prev, sid in itertools.pairwise(STEPS)]
    return sv.Workflow("faulty", steps=steps, settings=sv.Settings(max_parallel=1))


def counts(effects: Path) -> dict[str, int]:
    return {p.name[4:]: len(p.read_text().splitlines()) for p in effects.glob("ran-*")}


@pytest.fixture
def effects(tmp_path: Path) -> Path:
    out = tmp_path / "effects"
    out.mkdir()
    return out


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    reason = mounting_works(tmp_path)
    if reason is not None:
        pytest.skip(f"needs a tmpfs for a real full / read-only disk: {reason}")
    with small_disk(tmp_path / "disk", size_kib=512) as mounted:
        yield mounted


def run_faulted(db: Path, wf: sv.Workflow, **options: Any) -> tuple[sv.RunResult, StoreFaultError]:
    """Run until the fault stops it; the first error the store raised."""
    store = Recording(SQLiteStore(db, **options))
    try:
        result = sv.run(wf, store=store, run_id="r")
    finally:
        store.close()
    assert result.status is sv.RunStatus.FAILED, result.error_message
    assert store.errors, "the run failed, but not because of the store"
    error = store.errors[0]
    assert isinstance(error, StoreFaultError), repr(error)
    return result, error


def resume_completes(db: Path, wf: sv.Workflow, effects: Path, kept: set[str]) -> None:
    """Resume the run; the steps in ``kept`` (stored succeeded) must not run again."""
    before = counts(effects)
    result = sv.resume("r", wf, store=str(db))
    assert result.ok, result.error_message
    after = counts(effects)
    for sid in kept:
        assert after[sid] == before[sid] == 1, f"{sid} had succeeded but ran again"
    assert {sid for sid in STEPS if result.steps[sid].restored} == kept
    assert check_store(db).problems == []
    assert check_store(db).succeeded("r") == set(STEPS)


def assert_committed_whole(db: Path, *, succeeded: set[str]) -> None:
    found = check_store(db)
    assert found.problems == []
    assert set(found.steps["r"]) == set(STEPS)  # one status row per step, no more
    assert found.succeeded("r") == succeeded


# -- full disk -------------------------------------------------------------------------------


def test_a_full_disk_stops_the_run_and_a_resume_after_freeing_space_completes(
    disk: Path, effects: Path
) -> None:
    db = disk / "runs.db"
    fillers: list[Path] = []
    wf = make_wf(effects, lambda: fillers.append(fill(disk)))
    _, error = run_faulted(db, wf)
    assert error.fault == "disk full"
    assert str(db) in str(error)
    assert "free some space" in str(error)
    assert_committed_whole(db, succeeded={"s1", "s2"})
    fillers[0].unlink()
    resume_completes(db, wf, effects, kept={"s1", "s2"})
    assert counts(effects)["s3"] == 2  # its success could not be stored: it ran again


def test_the_result_of_a_run_stopped_by_a_store_fault_carries_the_fault(
    disk: Path, effects: Path
) -> None:
    db = disk / "runs.db"
    fillers: list[Path] = []
    wf = make_wf(effects, lambda: fillers.append(fill(disk)))
    try:
        result, _ = run_faulted(db, wf)
    finally:
        for filler in fillers:
            filler.unlink()
    assert isinstance(result.error, StoreFaultError)
    assert str(db) in str(result.error)


# -- read-only ---------------------------------------------------------------------------------


def test_a_read_only_store_refuses_the_resume_unchanged_and_resumes_once_writable(
    disk: Path, effects: Path
) -> None:
    db = disk / "runs.db"

    def step_fails() -> None:
        raise RuntimeError("s3 fails the first time")

    wf = make_wf(effects, step_fails)
    first = sv.run(wf, store=str(db), run_id="r")
    assert first.status is sv.RunStatus.FAILED
    digest = hashlib.sha256(db.read_bytes()).hexdigest()
    with read_only(disk):
        with pytest.raises(StoreFaultError) as info:
            sv.resume("r", wf, store=str(db))
        assert info.value.fault == "read-only"
        assert str(db) in str(info.value)
        with pytest.raises(StoreError, match=r"cannot create a run store at .*new\.db.*Read-only"):
            sv.run(wf, store=str(disk / "new.db"))
    assert hashlib.sha256(db.read_bytes()).hexdigest() == digest  # not one byte changed
    assert_committed_whole(db, succeeded={"s1", "s2"})
    resume_completes(db, wf, effects, kept={"s1", "s2"})


# -- locked by another writer ----------------------------------------------------------------


def test_a_write_lock_held_briefly_is_waited_for_and_the_write_goes_through(
    tmp_path: Path,
) -> None:
    db = tmp_path / "runs.db"
    wf = make_wf(tmp_path, lambda: None)
    with SQLiteStore(db, busy_timeout=WAIT) as store:
        store.begin_run(_info(), [sv.StepRecord("s1")])
        order: list[str] = []
        trying = threading.Event()
        conn = store._conn
        assert conn is not None
        conn.set_trace_callback(lambda sql: trying.set() if "BEGIN IMMEDIATE" in sql else None)

        def write() -> None:
            store.save_step("r", sv.StepRecord("s1", sv.StepStatus.RUNNING))
            order.append("written")

        with write_lock(db) as other:
            writer = threading.Thread(target=write)
            writer.start()
            assert trying.wait(WAIT)  # the write has begun while the lock is held
            order.append("released")
            other.execute("ROLLBACK")
        writer.join(WAIT)
        conn.set_trace_callback(None)
        assert order == ["released", "written"]
        assert store.load("r").steps["s1"].status is sv.StepStatus.RUNNING
    assert wf.id == "faulty"


@pytest.mark.realtime
def test_a_write_lock_held_past_busy_timeout_stops_the_run_naming_the_lock(
    tmp_path: Path, effects: Path
) -> None:
    db = tmp_path / "runs.db"
    held: list[Any] = []

    def lock_the_store() -> None:
        lock = write_lock(db)
        lock.__enter__()
        held.append(lock)

    wf = make_wf(effects, lock_the_store)
    try:
        _, error = run_faulted(db, wf, busy_timeout=0.2)
    finally:
        for lock in held:
            lock.__exit__(None, None, None)
    assert error.fault == "locked"
    assert str(db) in str(error)
    assert "locked for over 0.2 s" in str(error)
    assert_committed_whole(db, succeeded={"s1", "s2"})
    resume_completes(db, wf, effects, kept={"s1", "s2"})


# -- the file deleted or replaced under the program -----------------------------------------


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_store_deleted_or_replaced_under_the_run_stops_it_and_saves_what_it_held(
    tmp_path: Path, effects: Path, how: str
) -> None:
    db = tmp_path / "runs.db"
    other = tmp_path / "other.db"
    SQLiteStore(other).close()
    other_digest = hashlib.sha256(other.read_bytes()).hexdigest()

    def fault() -> None:
        if how == "deleted":
            delete_store(db)
        else:
            replace_store(db, other)

    wf = make_wf(effects, fault)
    _, error = run_faulted(db, wf)
    assert error.fault == f"file {how}"
    assert str(db) in str(error)
    saved = sorted(tmp_path.glob("runs.db.recovered-*"))
    assert len(saved) == 1
    assert str(saved[0]) in str(error)
    assert not Path(f"{db}-wal").exists()  # our log can never be read as the new file's
    if how == "replaced":
        assert hashlib.sha256(db.read_bytes()).hexdigest() == other_digest  # left alone
    found = check_store(saved[0])
    assert found.problems == []
    assert found.succeeded("r") == {"s1", "s2"}
    os.replace(saved[0], db)  # the fix: put the saved store back
    resume_completes(db, wf, effects, kept={"s1", "s2"})


# -- a torn write-ahead log ------------------------------------------------------------------

WF_MODULE = textwrap.dedent(
    """
    import os
    from pathlib import Path

    import stepvisor as sv

    EFFECTS = Path(os.environ["FAULT_TEST_EFFECTS"])


    def work(ctx):
        with open(EFFECTS / f"ran-{ctx.step_id}", "a") as fh:
            fh.write("x\\n")
        return {f"n_{ctx.step_id}": 1}


    def build():
        steps = [sv.Step("s1", work)]
        for prev, sid in zip(["s1", "s2", "s3"], ["s2", "s3", "s4"]):
            steps.append(sv.Step(sid, work, needs=[prev]))
        return sv.Workflow("faulty", steps=steps, settings=sv.Settings(max_parallel=1))
    """
)
# Runs the workflow and dies without closing the store: its WAL stays, unfolded.
DRIVER = textwrap.dedent(
    """
    import os, sys
    import stepvisor as sv
    from stepvisor.store.sqlite import SQLiteStore
    import faultwf
    result = sv.run(faultwf.build(), store=SQLiteStore(sys.argv[1]), run_id="r")
    assert result.ok
    os._exit(0)
    """
)


def test_a_torn_wal_opens_with_the_whole_transactions_and_the_run_resumes(
    tmp_path: Path, effects: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "faultwf.py").write_text(WF_MODULE)
    monkeypatch.setenv("FAULT_TEST_EFFECTS", str(effects))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("faultwf", None)
    db = tmp_path / "runs.db"
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, str(db)],
        env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.getcwd()}"},
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    frames = wal_frames(db)
    assert frames > 4, "the run's transitions should still be in the WAL"
    tear_wal(db, keep_frames=frames // 2)  # cut in the middle of a frame
    found = check_store(db)
    assert found.problems == []
    kept = found.succeeded("r")
    assert kept < set(STEPS)  # the torn transitions are gone, the whole ones are there
    import faultwf  # type: ignore[import-not-found]  # noqa: PLC0415 - written above

    with SQLiteStore(db) as store:
        assert store.load("r").info.status is sv.RunStatus.INTERRUPTED  # its owner is dead
    resume_completes(db, faultwf.build(), effects, kept=kept)


def _info() -> Any:
    from stepvisor.store.base import RunInfo  # noqa: PLC0415

    return RunInfo("r", "faulty", "fp", {}, 1, sv.RunStatus.RUNNING, 1.0, heartbeat=1.0)
