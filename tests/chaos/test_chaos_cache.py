"""The cache's fault campaign (``python -m tests.chaos.cache``): its checker catches what
it must, and a short campaign holds every invariant."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

import stepvisor as sv
from tests.chaos import cache as campaign

SPEC: list[campaign.StepSpec] = [
    ("s0", [], 1, True, "thread"),
    ("s1", ["s0"], 2, True, "thread"),
]


def two_runs(store: Path) -> list[tuple[str, list[campaign.StepSpec]]]:
    first = sv.run(campaign.workflow(SPEC), store=str(store))
    second = sv.run(campaign.workflow(SPEC), store=str(store))
    assert second.steps["s1"].reused_from == first.run_id
    return [(first.run_id, SPEC), (second.run_id, SPEC)]


def test_the_checker_passes_honest_runs(tmp_path: Path) -> None:
    report = campaign.Report(0)
    campaign._check(tmp_path / "runs.db", two_runs(tmp_path / "runs.db"), report)
    assert report.violations == []
    assert report.reused == 2


def test_the_checker_sees_a_wrong_artifact_and_a_reuse_of_a_failed_step(tmp_path: Path) -> None:
    store = tmp_path / "runs.db"
    runs = two_runs(store)
    with sqlite3.connect(store) as conn:
        # The second run reused s1: its outputs are read from the first run's rows.
        conn.execute(
            "UPDATE artifacts SET value = '999' WHERE run_id = ? AND step_id = 's1'", (runs[0][0],)
        )
        conn.execute(
            "UPDATE steps SET status = 'failed' WHERE run_id = ? AND step_id = 's0'", (runs[0][0],)
        )
    conn.close()
    report = campaign.Report(0)
    campaign._check(store, runs, report)
    kinds = sorted({v.split(":")[0] for v in report.violations})
    assert kinds == ["no-wrong-reuse", "reused-from-success"]


@pytest.mark.slow
def test_a_short_cache_campaign_holds_every_invariant(capsys: pytest.CaptureFixture[str]) -> None:
    assert campaign.main(["--runs", "2", "--seed", "11"]) == 0
    assert "violations: 0" in capsys.readouterr().out
