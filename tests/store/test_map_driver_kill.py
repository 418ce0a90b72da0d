"""A run's program is SIGKILLed in the middle of a map, then the run is resumed.

Instances count their runs in files outside the program.  The kill comes once
three instances are stored as succeeded and a later one is running (instances
from 3 on wait for a file that appears only after the kill), so it lands
mid-map every time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import stepvisor as sv
from stepvisor.errors import RunNotFoundError
from stepvisor.store.sqlite import SQLiteStore
from tests.conftest import wait_for
from tests.resumption import MinuteAhead, driver, run_counts

WF_MODULE = textwrap.dedent(
    '''
    """A split, a map over its list, a map chained to it, a step that needs it all."""
    import os
    import time
    from pathlib import Path

    import stepvisor as sv

    ROOT = Path(os.environ["MAP_KILL_ROOT"])


    def _ran(ctx):
        with open(ROOT / f"ran-{ctx.step_id}", "a") as fh:
            fh.write("x\\n")


    def split(ctx):
        _ran(ctx)
        return {"items": list(range(8))}


    def score(ctx):
        _ran(ctx)
        if ctx.index >= 3:
            deadline = time.monotonic() + 60
            while not (ROOT / "go").exists():
                if time.monotonic() > deadline:
                    raise TimeoutError("the test never said go")
                time.sleep(0.01)
        return {"scores": ctx.item * 10 + 1}


    def double(ctx):
        _ran(ctx)
        return {"doubled": ctx.item * 2}


    def total(ctx):
        _ran(ctx)
        return {"total": sum(ctx.inputs["doubled"])}


    def build():
        return sv.Workflow(
            "map-kill",
            [
                sv.Step("split", split, creates=["items"]),
                sv.Step("score", score, map_over="items", creates=["scores"]),
                sv.Step("double", double, map_over="scores", creates=["doubled"]),
                sv.Step("total", total, requires=["doubled"]),
            ],
            settings=sv.Settings(max_parallel=2),
        )
    '''
)

DRIVER = driver("mapkillwf")


def _stored_succeeded(db: Path) -> set[str]:
    if not db.exists():
        return set()
    try:
        with SQLiteStore(db, create=False) as store:
            stored = store.load("r1")
    except RunNotFoundError:
        return set()
    return {sid for sid, rec in stored.steps.items() if rec.status is sv.StepStatus.SUCCEEDED}


@pytest.fixture
def wf_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "mapkillwf.py").write_text(WF_MODULE)
    (tmp_path / "driver.py").write_text(DRIVER)
    root = tmp_path / "effects"
    root.mkdir()
    monkeypatch.setenv("MAP_KILL_ROOT", str(root))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("mapkillwf", None)
    return tmp_path


@pytest.mark.realtime
def test_a_run_killed_mid_map_resumes_without_running_a_succeeded_instance_again(
    wf_root: Path,
) -> None:
    import mapkillwf  # type: ignore[import-not-found]  # noqa: PLC0415 - written by the fixture

    root, db = wf_root / "effects", wf_root / "runs.db"
    proc = subprocess.Popen(
        [sys.executable, str(wf_root / "driver.py"), str(db), "r1"],
        cwd=wf_root,
        env={**os.environ, "PYTHONPATH": str(wf_root)},
    )
    first_three = {"score[0]", "score[1]", "score[2]"}
    try:

        def mid_map() -> bool:
            waiting = [
                s for s in run_counts(root) if s.startswith("score[") and s not in first_three
            ]
            return bool(waiting) and first_three <= _stored_succeeded(db)

        wait_for(mid_map, timeout=60, what="three instances stored and a later one waiting")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    done_before = _stored_succeeded(db)
    before = run_counts(root)
    with SQLiteStore(db, create=False, clock=MinuteAhead()) as store:
        stored = store.load("r1")
    assert stored.steps["score"].status is sv.StepStatus.RUNNING  # killed mid-map
    (root / "go").touch()

    with SQLiteStore(db, clock=MinuteAhead()) as store:
        result = sv.resume("r1", mapkillwf.build(), store=store)
    assert result.ok, result.error_message
    after = run_counts(root)
    assert after["split"] == 1  # the list was kept, not made again
    for sid in done_before:
        assert after.get(sid, 0) == before.get(sid, 0), f"{sid} was stored succeeded, ran again"
        assert result.steps[sid].restored
    instances = [f"{m}[{i}]" for m in ("score", "double") for i in range(8)]
    for sid in instances:  # each ran to its end exactly once (a killed run is not an end)
        assert after[sid] - before.get(sid, 0) == (0 if sid in done_before else 1), sid
    assert result.artifacts["scores"] == [i * 10 + 1 for i in range(8)]
    assert result.artifacts["doubled"] == [(i * 10 + 1) * 2 for i in range(8)]
    assert result.artifacts["total"] == sum((i * 10 + 1) * 2 for i in range(8))
    with SQLiteStore(db, create=False) as store:
        final = store.load("r1")
    stored_instances = sorted(sid for sid in final.steps if "[" in sid)
    assert stored_instances == sorted(instances)
    assert all(final.steps[sid].status is sv.StepStatus.SUCCEEDED for sid in final.steps)
    assert {sid for sid in final.steps if final.steps[sid].restored} == done_before
