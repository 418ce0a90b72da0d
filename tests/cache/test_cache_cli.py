"""``stepvisor cache``: list, clear and prune, and the prune decision on its own."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

import stepvisor as sv
from stepvisor.cache._entry import EntryInfo
from stepvisor.cache._prune import parse_age, parse_size, to_prune
from stepvisor.cli.main import main
from stepvisor.errors import InvalidCacheError
from stepvisor.store.sqlite import SQLiteStore

DAY = 86400.0


def entry(key: str, *, size: int, created: float, used: float) -> EntryInfo:
    return EntryInfo(key, "w", f"step-{key}", "run", size, created, used)


def test_prune_removes_the_unused_then_the_least_recently_used_past_the_bound() -> None:
    now = 100 * DAY
    entries = [
        entry("old", size=10, created=now - 30 * DAY, used=now - 8 * DAY),
        entry("a", size=40, created=now - 5 * DAY, used=now - 3 * DAY),
        entry("b", size=40, created=now - 5 * DAY, used=now - 1 * DAY),
        entry("c", size=40, created=now - 1 * DAY, used=now - 2 * DAY),
    ]
    assert to_prune(entries, now=now, older_than=7 * DAY) == ["old"]
    assert to_prune(entries, now=now, max_size=80) == ["old", "a"]  # LRU first: old, a
    assert to_prune(entries, now=now, older_than=7 * DAY, max_size=80) == ["old", "a"]
    assert to_prune(entries, now=now, max_size=10_000) == []
    assert to_prune(entries, now=now, max_size=0) == ["old", "a", "c", "b"]


def test_ages_and_sizes_read_as_people_write_them() -> None:
    assert parse_age("7d") == 7 * DAY
    assert parse_age("12h") == 12 * 3600
    assert parse_age("90") == 90
    assert parse_size("2G") == 2 << 30
    assert parse_size("500M") == 500 << 20
    assert parse_size("1.5KiB") == 1536
    with pytest.raises(InvalidCacheError, match="--older-than takes an age such as 7d"):
        parse_age("a week")
    with pytest.raises(InvalidCacheError, match="--max-size takes a size such as 2G"):
        parse_size("lots")


def produce(ctx: sv.StepContext) -> dict[str, Any]:
    return {"blob": "x" * ctx.params["n"]}


def filled_store(path: Path) -> list[str]:
    run_ids = []
    for n in (1000, 2000, 3000):
        wf = sv.Workflow("fill", [sv.Step("produce", produce, params={"n": n}, cache=True)])
        result = sv.run(wf, store=str(path))
        assert result.status == "succeeded"
        run_ids.append(result.run_id)
    return run_ids


def test_cache_lists_entries_with_step_workflow_size_age_and_last_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "runs.db"
    assert main(["cache", "--store", str(path)]) == 2  # no store yet: usage error
    capsys.readouterr()
    filled_store(path)
    assert main(["cache", "--store", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["STEP", "WORKFLOW", "SIZE", "AGE", "LAST", "USE", "RUN"]
    assert [line.split()[:2] for line in out[1:4]] == [["produce", "fill"]] * 3
    assert out[-1].startswith("3 entries")


def test_cache_prune_to_a_size_then_clear(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "runs.db"
    filled_store(path)
    with SQLiteStore(path) as store:
        sizes = {e.key: e.size for e in store.cache_list()}
        newest = store.cache_list()[0].key
    bound = sizes[newest]
    assert main(["cache", "prune", "--max-size", str(bound), "--store", str(path)]) == 0
    assert "removed 2 entries" in capsys.readouterr().out
    with SQLiteStore(path) as store:
        assert [e.key for e in store.cache_list()] == [newest]
    assert main(["cache", "prune", "--store", str(path)]) == 2
    assert "prune needs a bound" in capsys.readouterr().err
    assert main(["cache", "prune", "--older-than", "soon", "--store", str(path)]) == 2
    assert main(["cache", "clear", "--store", str(path)]) == 0
    assert "removed 1 entries" in capsys.readouterr().out
    with SQLiteStore(path) as store:
        assert store.cache_list() == []
    assert main(["cache", "--store", str(path)]) == 0
    assert "is empty" in capsys.readouterr().out


def test_a_pruned_entry_is_computed_again_with_no_entry(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    wf = sv.Workflow("fill", [sv.Step("produce", produce, params={"n": 10}, cache=True)])
    sv.run(wf, store=str(path))
    assert main(["cache", "clear", "--store", str(path)]) == 0
    again = sv.run(wf, store=str(path))
    assert again.steps["produce"].cache_note == "computed: no entry"


def test_stepvisor_run_with_set_cache_reuses_and_status_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cache_cli_steps.py").write_text(
        "def make(ctx):\n    return {'rows': [1, 2, 3]}\n\n"
        "def total(ctx):\n    return {'total': sum(ctx.inputs['rows'])}\n"
    )
    flow = tmp_path / "flow.yaml"
    flow.write_text(
        "id: flow\nsteps:\n  - {id: make, run: 'cache_cli_steps:make', creates: [rows]}\n"
        "  - {id: total, run: 'cache_cli_steps:total', requires: [rows]}\n"
    )
    db = str(tmp_path / "runs.db")
    monkeypatch.delitem(sys.modules, "cache_cli_steps", raising=False)
    assert main(["run", str(flow), "--set", "cache=true", "--store", db]) == 0
    assert main(["run", str(flow), "--set", "cache=true", "--store", db]) == 0
    capsys.readouterr()
    with SQLiteStore(db) as store:
        newest = store.list_runs()[0].run_id
    assert main(["status", newest, "--store", db]) == 0
    out = capsys.readouterr().out
    assert "cache     2 reused, 0 computed" in out
    sys.modules.pop("cache_cli_steps", None)
