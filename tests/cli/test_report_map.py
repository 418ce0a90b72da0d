"""The HTML report of a run with mapped steps: instances folded under their step.

One real run (a map with a failing instance under ``on_failure: continue``)
on a memory store, and one stored run built by hand with more instances than
the report lists, so the cap and the pending count are exact.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import stepvisor as sv
from stepvisor.cli._report import _BARS, _INSTANCE_ROWS, render_html
from stepvisor.core.state import AttemptRecord, RunStatus, StepRecord, StepStatus
from stepvisor.store.base import RunInfo, StoredRun


def split(ctx: sv.StepContext) -> dict[str, list[int]]:
    return {"chunks": list(range(6))}


def score(ctx: sv.StepContext) -> dict[str, int]:
    if ctx.item == 3:
        raise ValueError("item 3 is bad")
    return {"scores": ctx.item}


@pytest.fixture
def stored(chdir_tmp: Path) -> StoredRun:
    wf = sv.Workflow(
        "report-map",
        [sv.Step("split", split, creates=["chunks"]), sv.Step("score", score, map_over="chunks")],
        settings=sv.Settings(max_parallel=2, on_failure="continue"),
    )
    store = sv.MemoryStore()
    result = sv.run(wf, store=store)
    assert result.failed_step == "score[3]"
    return store.load(result.run_id)


def _mapped_block(page: str, sid: str) -> str:
    """The mapped step's table row, nested instance rows included."""
    start = page.index(f'<tr class="step mapped" id="step-{sid}" data-step="{sid}">')
    after = page.find('<tr class="step', start + 1)
    return page[start : after if after >= 0 else page.index("</tbody></table></section>", start)]


def test_a_mapped_step_is_one_row_with_its_counts_and_its_instances_inside(
    stored: StoredRun,
) -> None:
    page = render_html(stored)
    top = re.findall(r'<tr class="step[^"]*" id="step-([^"]+)"', page)
    assert top == ["split", "score"]  # instances are not rows of the steps table
    block = _mapped_block(page, "score")
    assert '<summary class="err">5/6 succeeded, 1 failed</summary>' in block
    assert '<span class="badge" style="background:#d64545">failed</span>' in block
    instances = re.findall(r'<tr class="instance" id="step-(score\[\d\])"', block)
    assert instances == [f"score[{i}]" for i in range(6)]
    assert "ValueError: item 3 is bad" in block
    assert "<th>steps</th><td>1 succeeded, 1 failed</td>" in page
    assert "<th>instances</th><td>6: 5 succeeded, 1 failed</td>" in page


def test_an_instances_bars_belong_to_its_step_and_name_the_instance(stored: StoredRun) -> None:
    page = render_html(stored)
    bars = re.findall(
        r'<g class="bar" data-step="([^"]+)" data-outcome="([^"]+)"(?: data-instance="([^"]+)")?',
        page,
    )
    assert sorted(bars) == sorted(
        [("split", "succeeded", "")]
        + [("score", "failed" if i == 3 else "succeeded", f"score[{i}]") for i in range(6)]
    )
    assert "getAttribute('data-instance')" in page  # a click opens the instance's row


def _record(i: int, status: StepStatus) -> StepRecord:
    attempt = AttemptRecord(1, 100.0 + i, 100.5 + i, 0.5, status.value, worker="w1")
    return StepRecord(f"m[{i}]", status, (attempt,))


def test_a_large_map_lists_every_instance_that_did_not_succeed_then_the_first_ones() -> None:
    failed = {5, 700, 1100}
    steps = {"m": StepRecord("m", StepStatus.RUNNING, note="mapped over 1250 items")}
    for i in range(1200):  # 50 more have not started: no rows yet
        record = _record(i, StepStatus.FAILED if i in failed else StepStatus.SUCCEEDED)
        steps[record.step_id] = record
    info = RunInfo("r1", "wf", "fp", {}, 1, RunStatus.RUNNING, started=100.0)
    page = render_html(StoredRun(info, steps), now=2000.0)
    block = _mapped_block(page, "m")
    listed = [int(i) for i in re.findall(r'<tr class="instance" id="step-m\[(\d+)\]"', block)]
    first_ok = [i for i in range(1200) if i not in failed][: _INSTANCE_ROWS - len(failed)]
    assert listed == sorted(failed | set(first_ok))  # in index order, failures included
    assert "200 more instances that succeeded are not listed" in block
    assert "50 instances never started (pending)." in block
    assert '<summary class="err">1197/1250 succeeded, 3 failed</summary>' in block


def test_a_timeline_of_more_attempts_than_it_draws_keeps_steps_and_failures() -> None:
    size = 6000
    failed = {10, 4321}
    steps = {
        "first": StepRecord(
            "first",
            StepStatus.SUCCEEDED,
            (AttemptRecord(1, 99.0, 100.0, 1.0, "succeeded", worker="w2"),),
        ),
        "m": StepRecord("m", StepStatus.FAILED, note=f"mapped over {size} items"),
    }
    for i in range(size):
        record = _record(i, StepStatus.FAILED if i in failed else StepStatus.SUCCEEDED)
        steps[record.step_id] = record
    info = RunInfo("r1", "wf", "fp", {}, 1, RunStatus.FAILED, started=99.0, ended=7000.0)
    page = render_html(StoredRun(info, steps))
    bars = re.findall(
        r'<g class="bar" data-step="(\w+)" data-outcome="(\w+)"(?: data-instance="m\[(\d+)\]")?',
        page,
    )
    every = -(-(size - len(failed)) // (_BARS - 1 - len(failed)))  # ceil: room left after them
    assert every == 2
    sampled = [i for i in range(size) if i not in failed][::every]
    assert sorted((step, outcome, int(i or -1)) for step, outcome, i in bars) == sorted(
        [("first", "succeeded", -1)]
        + [("m", "failed", i) for i in failed]
        + [("m", "succeeded", i) for i in sampled]
    )
    assert len(bars) <= _BARS
    assert (
        f"{len(bars)} of {size + 1} attempts drawn: every step's and every one that did not "
        f"succeed; of the instances' attempts that succeeded, every {every}nd in start order."
    ) in page
    # The legend counts every attempt, drawn or not.
    assert "failed (2)</span>" in page
    assert f"succeeded ({size - 1})</span>" in page
