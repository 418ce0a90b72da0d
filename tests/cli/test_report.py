"""The HTML report: right content for a real run, escaped text, no network, and it renders.

The main fixture runs a real workflow (successes, a retry, a cooperative
timeout and a failure) on a memory store and renders its report; the geometry
test builds a stored run by hand so positions are exact; the last test opens
the page in headless Chromium and looks at the screenshot.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

import stepvisor as sv
from stepvisor.cli._report import render_html, write_html
from stepvisor.core.state import AttemptRecord, RunStatus, StepRecord, StepStatus
from stepvisor.store.base import RunInfo, StoredRun
from tests.browser import need_chromium, screenshot


def ok(ctx: sv.StepContext) -> dict[str, Any]:
    return {ctx.step_id: True}


def flaky(ctx: sv.StepContext) -> None:
    if ctx.attempt == 1:
        raise ConnectionError("try again")


def slow(ctx: sv.StepContext) -> None:
    ctx.wait_cancelled(10.0)  # wakes at the deadline
    ctx.raise_if_cancelled()


def bad(ctx: sv.StepContext) -> None:
    raise ValueError("<b>boom</b> & co")


@pytest.fixture
def stored(chdir_tmp: Path) -> StoredRun:
    wf = sv.Workflow(
        "report-demo",
        [
            sv.Step("ok_a", ok),
            sv.Step("ok_b", ok, needs=["ok_a"]),
            sv.Step(
                "flaky",
                flaky,
                retry=sv.RetryPolicy(max_attempts=3, backoff=sv.Backoff.fixed(0.05)),
            ),
            sv.Step("slow", slow, timeout=0.2),
            sv.Step("bad", bad),
        ],
        settings=sv.Settings(max_parallel=3, on_failure="continue", seed=1234),
    )
    store = sv.MemoryStore()
    result = sv.run(wf, store=store)
    assert result.statuses() == {
        "bad": StepStatus.FAILED,
        "flaky": StepStatus.SUCCEEDED,
        "ok_a": StepStatus.SUCCEEDED,
        "ok_b": StepStatus.SUCCEEDED,
        "slow": StepStatus.TIMED_OUT,
    }
    return store.load(result.run_id)


def test_report_has_one_bar_per_attempt_colored_by_outcome(stored: StoredRun) -> None:
    page = render_html(stored)
    outcomes = re.findall(r'<g class="bar" data-step="([^"]+)" data-outcome="([^"]+)"', page)
    assert sorted(outcomes) == [
        ("bad", "failed"),
        ("flaky", "failed"),
        ("flaky", "succeeded"),
        ("ok_a", "succeeded"),
        ("ok_b", "succeeded"),
        ("slow", "timed_out"),
    ]
    workers = {a.worker for r in stored.steps.values() for a in r.attempts}
    rows = re.findall(r'<text class="worker"[^>]*>([^<]+)</text>', page)
    assert sorted(rows) == sorted(w for w in workers if w)


def test_report_hover_text_names_step_attempt_duration_and_error(stored: StoredRun) -> None:
    page = render_html(stored)
    titles = re.findall(r"<title>([^<]*)</title>", page)
    flaky_first = next(t for t in titles if t.startswith("flaky · attempt 1 of 2"))
    assert "failed after" in flaky_first
    assert "ConnectionError: try again" in flaky_first
    slow_title = next(t for t in titles if t.startswith("slow · attempt 1 of 1"))
    assert "timed_out after" in slow_title
    assert "StepTimeoutError" in slow_title


def test_report_escapes_text_from_the_run(stored: StoredRun) -> None:
    page = render_html(stored)
    assert "ValueError: &lt;b&gt;boom&lt;/b&gt; &amp; co" in page
    assert "<b>boom" not in page


def test_report_summary_shows_status_counts_seed_and_settings(stored: StoredRun) -> None:
    page = render_html(stored)
    assert stored.info.run_id in page
    assert '<span class="badge" style="background:#d64545">failed</span>' in page
    for text in ("3 succeeded", "1 failed", "1 timed out", "6 (1 retry)", ">1234<"):
        assert text in page, text
    assert "<th>max_parallel</th><td><code>3</code>" in page
    assert "<th>on_failure</th><td><code>&quot;continue&quot;</code>" in page


def test_report_is_self_contained(stored: StoredRun) -> None:
    page = render_html(stored)
    assert "default-src 'none'" in page
    assert not re.search(r"https?://", page)
    assert not re.search(r"<(link|img|iframe)\b|\bsrc=", page)


def _attempt(
    number: int, start: float, end: float | None, worker: str, outcome: str | None
) -> AttemptRecord:
    return AttemptRecord(
        number=number,
        started=start,
        ended=end,
        duration=None if end is None else end - start,
        outcome=outcome,
        worker=worker,
    )


def test_timeline_places_bars_in_proportion_and_skips_restored_steps() -> None:
    t0 = 1_000_000.0
    steps = {
        "kept": StepRecord(
            "kept",
            StepStatus.SUCCEEDED,
            (_attempt(1, t0 - 3600, t0 - 3599, "w1", "succeeded"),),
            restored=True,
        ),
        "first": StepRecord(
            "first", StepStatus.SUCCEEDED, (_attempt(1, t0, t0 + 5, "w1", "succeeded"),)
        ),
        "second": StepRecord(
            "second", StepStatus.RUNNING, (_attempt(1, t0 + 5, None, "w10", None),)
        ),
        "third": StepRecord(
            "third", StepStatus.CANCELLED, (_attempt(1, t0 + 2, t0 + 4, "w2", "cancelled"),)
        ),
    }
    info = RunInfo("r1", "wf", "fp", {}, 7, RunStatus.INTERRUPTED, started=t0)
    page = render_html(StoredRun(info, steps), now=t0 + 10)
    bar = (
        r'data-step="(\w+)" data-outcome="(\w+)">.*?'
        + r'<rect x="([\d.]+)" y="([\d.]+)" width="([\d.]+)"'
    )
    bars = re.findall(bar, page, flags=re.DOTALL)
    found = {sid: (outcome, float(x), float(y), float(w)) for sid, outcome, x, y, w in bars}
    assert set(found) == {"first", "second", "third"}
    inner = 1100 - 64 - 16
    assert found["first"][1:] == (64.0, found["first"][2], inner / 2)
    assert found["third"][1] == pytest.approx(64 + inner * 0.2, abs=0.1)
    assert found["second"][0] == "unfinished"  # never ended: drawn up to "now"
    assert found["second"][1] + found["second"][3] == pytest.approx(64 + inner, abs=0.1)
    # Lanes in natural order: w1, w2, w10.
    assert found["first"][2] < found["third"][2] < found["second"][2]
    assert "1 steps succeeded in an earlier session (not drawn)" in page


def test_write_html_creates_the_directory_and_returns_the_path(
    stored: StoredRun, tmp_path: Path
) -> None:
    path = write_html(stored, tmp_path / "out" / "report.html")
    assert path == (tmp_path / "out" / "report.html").resolve()
    assert path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]


@pytest.mark.realtime
def test_report_renders_in_headless_chromium(stored: StoredRun, tmp_path: Path) -> None:
    need_chromium()
    page = write_html(stored, tmp_path / "report.html")
    data = screenshot(page, tmp_path / "shot.png", tmp_path, env=os.environ)
    assert len(data) > 20_000  # a blank page compresses to a few kilobytes
