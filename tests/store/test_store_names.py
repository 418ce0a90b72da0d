"""Store names mean what SQLite users expect: ':memory:' is in memory, never a file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import stepvisor as sv
from stepvisor.cli.main import main
from stepvisor.errors import InvalidSettingError, StoreError
from stepvisor.store.sqlite import SQLiteStore

WF_FILE = """
id: tiny
steps:
  - id: one
    run: tinysteps:one
"""


def one(ctx: sv.StepContext) -> dict[str, int]:
    return {"x": 1}


def test_store_memory_runs_in_memory_and_makes_no_file(chdir_tmp: Path) -> None:
    result = sv.run(sv.Workflow("tiny", steps=[sv.Step("one", one)]), store=":memory:")
    assert result.ok
    assert dict(result.artifacts) == {"x": 1}
    assert os.listdir(chdir_tmp) == []


def test_resume_from_memory_by_name_is_refused_with_the_fix(chdir_tmp: Path) -> None:
    wf = sv.Workflow("tiny", steps=[sv.Step("one", one)])
    with pytest.raises(InvalidSettingError, match=r"':memory:' is a new, empty in-memory store"):
        sv.resume("r", wf, store=":memory:")
    assert os.listdir(chdir_tmp) == []


def test_a_memory_store_object_still_resumes_its_own_runs(chdir_tmp: Path) -> None:
    store = sv.MemoryStore()
    failed: list[bool] = []

    def flaky(ctx: sv.StepContext) -> dict[str, int]:
        if not failed:
            failed.append(True)
            raise RuntimeError("once")
        return {"y": 2}

    wf = sv.Workflow("two", steps=[sv.Step("one", one), sv.Step("two", flaky, needs=["one"])])
    assert sv.run(wf, store=store, run_id="m").status is sv.RunStatus.FAILED
    result = sv.resume("m", wf, store=store)
    assert result.ok
    assert result.steps["one"].restored


@pytest.mark.parametrize("name", [":memory:", ""])
def test_sqlite_store_refuses_a_name_that_is_no_file(chdir_tmp: Path, name: str) -> None:
    with pytest.raises(StoreError, match=r"names no file; for a store that lives in memory"):
        SQLiteStore(name)
    assert os.listdir(chdir_tmp) == []


def test_cli_run_with_store_memory_keeps_nothing_and_status_says_why(
    chdir_tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (chdir_tmp / "tinysteps.py").write_text("def one(ctx):\n    return {'x': 1}\n")
    (chdir_tmp / "wf.yaml").write_text(WF_FILE)
    monkeypatch.syspath_prepend(str(chdir_tmp))
    assert main(["run", "wf.yaml", "--store", ":memory:"]) == 0
    made = sorted(p for p in os.listdir(chdir_tmp) if p != "__pycache__")
    assert made == ["tinysteps.py", "wf.yaml"]  # no store file, no .stepvisor directory
    capsys.readouterr()
    for command in (["status"], ["cancel", "r"], ["resume", "r"], ["report", "r", "--html", "x"]):
        for option in ("--store", "--db"):  # --db: the same option by its older name
            assert main([*command, option, ":memory:"]) == 2
            err = capsys.readouterr().err
            assert "--store :memory: is an in-memory store" in err, command
            assert "point --store at the store file" in err
    assert not (chdir_tmp / ":memory:").exists()
