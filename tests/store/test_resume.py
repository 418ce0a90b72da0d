"""Crash and resume, for real: a run's program is SIGKILLed mid-run, then resumed.

Side effects are counted in files outside the program, so "ran exactly once"
is observed, not assumed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

import stepvisor as sv
from stepvisor.errors import RunOwnedError
from stepvisor.store.sqlite import SQLiteStore
from tests.conftest import wait_for
from tests.resumption import MinuteAhead, driver, run_counts

WF_MODULE = textwrap.dedent(
    '''
    """A workflow whose steps count their runs in files under ROOT."""
    import os
    import time
    from pathlib import Path

    import stepvisor as sv

    ROOT = Path(os.environ["RESUME_TEST_ROOT"])


    def work(ctx):
        with open(ROOT / f"ran-{ctx.step_id}", "a") as fh:
            fh.write("x\\n")
        if (ROOT / "slow").exists():
            time.sleep(0.05)
        total = sum(v for k, v in ctx.inputs.items() if k.startswith("n_"))
        return {f"n_{ctx.step_id}": total + len(ctx.step_id), "last": ctx.step_id}


    def build():
        steps = []
        for i in range(4):
            steps.append(sv.Step(f"a{i}", work))
        steps.append(sv.Step("b", work, needs=["a0", "a1", "a2", "a3"]))
        for i in range(4):
            steps.append(sv.Step(f"c{i}", work, needs=["b"]))
        steps.append(sv.Step("d", work, needs=["c0", "c1", "c2", "c3"]))
        return sv.Workflow("resumable", steps=steps, settings=sv.Settings(max_parallel=2))
    '''
)

DRIVER = driver("wfmod")


@pytest.fixture
def wf_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "wfmod.py").write_text(WF_MODULE)
    (tmp_path / "driver.py").write_text(DRIVER)
    root = tmp_path / "effects"
    root.mkdir()
    monkeypatch.setenv("RESUME_TEST_ROOT", str(root))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("wfmod", None)
    return tmp_path


def uninterrupted_artifacts(tmp_path: Path) -> dict[str, Any]:
    import wfmod  # type: ignore[import-not-found]  # noqa: PLC0415 - written by the fixture

    result = sv.run(wfmod.build())
    assert result.ok
    return dict(result.artifacts)


@pytest.mark.realtime
@pytest.mark.parametrize("kill_after", [1, 4, 7])
def test_sigkilled_run_shows_interrupted_and_resumes_without_redoing_work(
    kill_after: int, wf_root: Path
) -> None:
    root = wf_root / "effects"
    (root / "slow").touch()
    db = wf_root / "runs.db"
    proc = subprocess.Popen(
        [sys.executable, str(wf_root / "driver.py"), str(db), "r1"],
        cwd=wf_root,
        env={**os.environ, "PYTHONPATH": str(wf_root)},
    )
    try:
        wait_for(lambda: len(run_counts(root)) >= kill_after, timeout=30, what="progress")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    (root / "slow").unlink()

    with SQLiteStore(db, clock=MinuteAhead()) as store:
        stored = store.load("r1")
        assert stored.info.status is sv.RunStatus.INTERRUPTED
        done_before = {
            sid for sid, rec in stored.steps.items() if rec.status is sv.StepStatus.SUCCEEDED
        }
        for sid in done_before:
            assert set(stored.outputs[sid]) == {f"n_{sid}", "last"}
        import wfmod  # noqa: PLC0415

        result = sv.resume("r1", wfmod.build(), store=store)
    assert result.ok, result.error_message
    ran = run_counts(root)
    for sid in done_before:
        assert ran[sid] == 1, f"{sid} had succeeded before the crash but ran again"
    assert set(ran) == set(result.steps)
    for sid in done_before:
        assert result.steps[sid].restored
    root_files = sorted(root.iterdir())
    for path in root_files:
        path.unlink()
    assert dict(result.artifacts) == uninterrupted_artifacts(wf_root)
    with SQLiteStore(db) as store:
        assert store.load("r1").info.status is sv.RunStatus.SUCCEEDED
        import sqlite3  # noqa: PLC0415

    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        conn.close()


def test_resume_of_a_cancelled_run_runs_only_what_is_left(wf_root: Path) -> None:
    import wfmod  # noqa: PLC0415

    db = wf_root / "runs.db"
    wf = wfmod.build()
    events: list[sv.Event] = []
    cancelled: list[bool] = []
    handle_box: list[sv.RunHandle] = []

    def hook(event: sv.Event) -> None:
        events.append(event)
        if isinstance(event, sv.StepFinished) and event.step_id == "b" and not cancelled:
            cancelled.append(True)
            handle_box[0].cancel()

    handle = sv.start(wf, store=str(db), on_event=hook, run_id="r2", max_parallel=1)
    handle_box.append(handle)
    first = handle.wait(30)
    assert first.status is sv.RunStatus.CANCELLED
    before = run_counts(wf_root / "effects")
    assert before["b"] == 1
    result = sv.resume("r2", wf, store=str(db))
    assert result.ok
    after = run_counts(wf_root / "effects")
    assert all(after[sid] == 1 for sid in after)
    assert set(after) == set(result.steps)


def test_resume_refuses_a_changed_workflow_unless_forced(wf_root: Path) -> None:
    import wfmod  # noqa: PLC0415

    db = wf_root / "runs.db"
    wf = wfmod.build()
    handle = sv.start(wf, store=str(db), run_id="r3", max_parallel=1)
    handle.cancel()
    handle.wait(30)
    changed = sv.Workflow("resumable", steps=[*wf.steps, sv.Step("extra", wfmod.work)])
    with pytest.raises(sv.FingerprintMismatchError, match="different workflow"):
        sv.resume("r3", changed, store=str(db))
    assert sv.resume("r3", changed, store=str(db), force=True).ok


def test_resume_of_unknown_run_names_it(wf_root: Path) -> None:
    import wfmod  # noqa: PLC0415

    db = wf_root / "runs.db"
    sv.run(sv.Workflow("x", steps=[sv.Step("a", lambda ctx: None)]), store=str(db))
    with pytest.raises(sv.RunNotFoundError, match="nope"):
        sv.resume("nope", wfmod.build(), store=str(db))


@pytest.mark.realtime
def test_resume_right_after_the_owner_is_sigkilled_needs_no_stale_heartbeat(
    wf_root: Path,
) -> None:
    root = wf_root / "effects"
    (root / "slow").touch()
    db = wf_root / "runs.db"
    proc = subprocess.Popen(
        [sys.executable, str(wf_root / "driver.py"), str(db), "r9"],
        cwd=wf_root,
        env={**os.environ, "PYTHONPATH": str(wf_root)},
    )
    try:
        wait_for(lambda: len(run_counts(root)) >= 3, timeout=30, what="progress")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    (root / "slow").unlink()
    # An hour of stale_after and the real clock: only the owner check can say it died.
    with SQLiteStore(db, stale_after=3600.0) as store:
        stored = store.load("r9")
        assert stored.info.status is sv.RunStatus.INTERRUPTED
        assert stored.info.owner is not None
        assert stored.info.owner.pid == proc.pid
        done_before = {
            sid for sid, rec in stored.steps.items() if rec.status is sv.StepStatus.SUCCEEDED
        }
        import wfmod  # noqa: PLC0415

        result = sv.resume("r9", wfmod.build(), store=store)
    assert result.ok, result.error_message
    ran = run_counts(root)
    for sid in done_before:
        assert ran[sid] == 1, f"{sid} had succeeded before the kill but ran again"
    assert set(ran) == set(result.steps)


def test_of_two_racing_resumes_one_runs_the_steps_and_the_other_is_refused(
    tmp_path: Path,
) -> None:
    db = tmp_path / "runs.db"
    ran: list[str] = []
    failed_once: list[bool] = []
    gate = threading.Event()

    def work(ctx: sv.StepContext) -> dict[str, int]:
        if ctx.step_id != "a":
            assert gate.wait(30), "the racing resumes never both tried"
        ran.append(ctx.step_id)
        if ctx.step_id == "b" and not failed_once:
            failed_once.append(True)
            raise RuntimeError("b fails the first time")
        return {f"n_{ctx.step_id}": 1}

    wf = sv.Workflow(
        "race",
        steps=[
            sv.Step("a", work),
            sv.Step("b", work, needs=["a"]),
            sv.Step("c", work, needs=["b"]),
        ],
        settings=sv.Settings(max_parallel=1),
    )
    gate.set()
    assert sv.run(wf, store=str(db), run_id="r").status is sv.RunStatus.FAILED
    gate.clear()
    assert ran == ["a", "b"]
    both_ready = threading.Barrier(2, timeout=30)
    both_tried = threading.Barrier(2, timeout=30, action=gate.set)
    handles: list[sv.RunHandle] = []
    refused: list[RunOwnedError] = []

    def resume() -> None:
        both_ready.wait()
        try:
            handles.append(sv.resume_start("r", wf, store=str(db)))
        except RunOwnedError as exc:
            refused.append(exc)
        both_tried.wait()  # the steps wait until both have tried

    threads = [threading.Thread(target=resume) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(handles) == 1
    assert len(refused) == 1
    assert f"pid {os.getpid()} on host" in str(refused[0])
    result = handles[0].wait(30)
    assert result.ok, result.error_message
    assert ran == ["a", "b", "b", "c"]  # a kept; b and c once each across both resumes
