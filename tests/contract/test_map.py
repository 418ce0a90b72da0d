"""Mapped steps on every backend: items, chains, collected lists, failures, retries, deadlines.

A mapped step runs once per item (an *instance*, ``work[i]``); each instance
gets the step's timeout, retry policy and executor.  What an instance sees
(``ctx.item``, ``ctx.index``, the step's other inputs) and what its step
collects (one list per artifact, in index order) must be the same on a
thread, an event loop, a child process and Ray: items travel with the
instance's inputs, so NumPy items take each backend's own data path.
"""

from __future__ import annotations

from typing import Any

import pytest

import stepvisor as sv
from tests.contract import steps
from tests.contract.conftest import NO_WAIT, Backend, attempts_of

SUCCEEDED = sv.StepStatus.SUCCEEDED


def _got(index: int, item: Any, seen: list[str], sid: str = "work") -> dict[str, Any]:
    return {"id": f"{sid}[{index}]", "item": item, "index": index, "seen": seen}


def test_instances_see_their_item_index_and_the_steps_inputs(backend: Backend) -> None:
    items = [3, 1, 2]
    wf = sv.Workflow(
        "map",
        [
            backend.step(
                "config", steps.map_make, params={"name": "scale", "value": 10}, creates=["scale"]
            ),
            backend.step(
                "work", steps.map_report, map_over=items, requires=["scale"], creates=["got"]
            ),
            backend.step("total", steps.map_total, params={"of": "got"}, requires=["got"]),
        ],
    )
    result = backend.run(wf)
    assert result.status is sv.RunStatus.SUCCEEDED, result.error
    assert result.artifacts["got"] == [_got(i, item, ["scale"]) for i, item in enumerate(items)]
    assert result.artifacts["total"] == result.artifacts["got"]
    assert list(result.steps) == ["config", "work", "work[0]", "work[1]", "work[2]", "total"]
    assert result.steps["work"].status is SUCCEEDED
    assert result.steps["work"].note == "mapped over 3 items: 3 succeeded"
    assert [result.steps[f"work[{i}]"].attempt_count for i in range(3)] == [1, 1, 1]
    assert result.commits == ("config", "work[0]", "work[1]", "work[2]", "work", "total")


def test_a_map_over_arrays_chained_to_another_map_and_collected(backend: Backend) -> None:
    """1 MiB arrays made by one step, mapped, chained instance by instance, then summed."""
    pytest.importorskip("numpy", reason="the NumPy items need numpy: pip install numpy")
    wf = sv.Workflow(
        "map",
        [
            backend.step("split", steps.map_arrays, params={"n": 3}, creates=["chunks"]),
            backend.step("work", steps.map_report, map_over="chunks", creates=["doubled"]),
            backend.step("sum", steps.map_sum, map_over="doubled", creates=["sums"]),
            backend.step("total", steps.map_total, params={"of": "sums"}, requires=["sums"]),
        ],
    )
    result = backend.run(wf)
    assert result.status is sv.RunStatus.SUCCEEDED, result.error
    expected = [[2.0 * i * 131_072, i] for i in range(3)]
    assert result.artifacts["total"] == expected
    assert result.artifacts["sums"] == expected
    assert [result.steps[f"sum[{i}]"].status for i in range(3)] == [SUCCEEDED] * 3


def test_an_empty_list_is_a_map_of_no_instances(backend: Backend) -> None:
    wf = sv.Workflow(
        "map",
        [
            backend.step(
                "split", steps.map_make, params={"name": "chunks", "value": []}, creates=["chunks"]
            ),
            backend.step("work", steps.map_report, map_over="chunks", creates=["got"]),
            backend.step("total", steps.map_total, params={"of": "got"}, requires=["got"]),
        ],
    )
    result = backend.run(wf)
    assert result.status is sv.RunStatus.SUCCEEDED, result.error
    assert result.artifacts["got"] == []
    assert result.artifacts["total"] == []
    assert list(result.steps) == ["split", "work", "total"]
    assert backend.calls("work[0]") == []


@pytest.mark.parametrize("value", ["text", {"a": 1}, None, 7], ids=repr)
def test_a_list_that_is_not_a_sequence_fails_the_mapped_step(
    backend: Backend, value: object
) -> None:
    wf = sv.Workflow(
        "map",
        [
            backend.step(
                "split",
                steps.map_make,
                params={"name": "chunks", "value": value},
                creates=["chunks"],
            ),
            backend.step("work", steps.map_report, map_over="chunks", creates=["got"]),
            backend.step("after", steps.map_total, params={"of": "got"}, requires=["got"]),
        ],
        settings=sv.Settings(on_failure="continue"),
    )
    result = backend.run(wf)
    assert result.status is sv.RunStatus.FAILED
    assert result.failed_step == "work"
    assert isinstance(result.error, sv.MapOverError)
    assert f"its value is a {type(value).__name__}, not a sequence" in str(result.error)
    assert result.steps["work"].status is sv.StepStatus.FAILED
    assert result.steps["after"].status is sv.StepStatus.SKIPPED
    assert result.steps["split"].status is SUCCEEDED


def test_a_failed_instance_stops_a_fail_fast_run_and_is_named(backend: Backend) -> None:
    wf = sv.Workflow(
        "map",
        [backend.step("work", steps.map_report, map_over=[0, 1], params={"bad": [1]})],
        settings=sv.Settings(max_parallel=1),
    )
    result = backend.run(wf)
    assert result.status is sv.RunStatus.FAILED
    assert result.failed_step == "work[1]"
    assert "bad item 1" in str(result.error)
    assert result.steps["work[1]"].status is sv.StepStatus.FAILED
    assert result.steps["work"].status is sv.StepStatus.FAILED
    assert result.error_message is not None
    assert result.error_message.startswith("step 'work[1]' failed: ValueError: bad item 1")


def test_continue_runs_the_other_instances_and_skips_what_needs_the_failed_one(
    backend: Backend,
) -> None:
    wf = sv.Workflow(
        "map",
        [
            backend.step(
                "work",
                steps.map_report,
                map_over=[0, 1, 2],
                params={"bad": [1]},
                creates=["doubled"],
            ),
            backend.step("sum", steps.map_sum, map_over="doubled", creates=["sums"]),
            backend.step("total", steps.map_total, params={"of": "sums"}, requires=["sums"]),
        ],
        settings=sv.Settings(on_failure="continue"),
    )
    result = backend.run(wf)
    assert result.status is sv.RunStatus.FAILED
    statuses = result.statuses()
    assert [statuses[f"work[{i}]"] for i in range(3)] == [SUCCEEDED, "failed", SUCCEEDED]
    assert [statuses[f"sum[{i}]"] for i in range(3)] == [SUCCEEDED, "skipped", SUCCEEDED]
    assert result.steps["sum[1]"].note == "skipped: it depends on 'work[1]', which failed"
    assert (statuses["work"], statuses["sum"], statuses["total"]) == (
        "failed",
        "skipped",
        "skipped",
    )
    assert result.failed_step == "work[1]"
    assert "sums" not in result.artifacts


def test_each_instance_is_retried_under_the_steps_policy(backend: Backend) -> None:
    twice = sv.RetryPolicy(max_attempts=2, backoff=NO_WAIT)
    wf = sv.Workflow(
        "map",
        [
            backend.step(
                "work", steps.map_report, map_over=[5, 6], params={"flaky": [6]}, retry=twice
            )
        ],
    )
    result = backend.run(wf)
    assert result.status is sv.RunStatus.SUCCEEDED, result.error
    assert attempts_of(result, "work[0]") == [("succeeded", None)]
    assert attempts_of(result, "work[1]") == [("failed", "ValueError"), ("succeeded", None)]
    assert [attempt for attempt, _ in backend.calls("work[1]")] == [1, 2]


@pytest.mark.realtime
def test_each_instance_has_the_steps_deadline(backend: Backend) -> None:
    twice = sv.RetryPolicy(max_attempts=2, backoff=NO_WAIT)
    wf = sv.Workflow(
        "map",
        [
            backend.step(
                "work", steps.map_report, map_over=[0, 1], params={"block": [1]}, timeout=0.5,
                retry=twice,
            )
        ],
    )  # fmt: skip
    result = backend.run(wf)
    assert result.status is sv.RunStatus.SUCCEEDED, result.error
    assert attempts_of(result, "work[1]") == [
        ("timed_out", "stepvisor.errors.StepTimeoutError"),
        ("succeeded", None),
    ]
    assert "step 'work[1]' exceeded its 0.5 s timeout on attempt 1 of 2" in (
        result.steps["work[1]"].attempts[0].error_message or ""
    )
    [(_, first), _] = backend.calls("work[1]")
    backend.assert_stopped(first)
    assert not backend.did("work[1]", "late"), "the timed-out instance went on"
