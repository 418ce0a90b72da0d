"""The cache on every backend: a reused step takes no Worker and never runs again.

The step's calls are counted in its log (``steps.begin``), which every backend
writes to, so "it did not run" is read from what the backends did, not from
the records the engine wrote.  The store is an SQLite file, as a second run of
a program would find it.
"""

from __future__ import annotations

from pathlib import Path

import stepvisor as sv
from tests.contract import steps
from tests.contract.conftest import Backend


def test_a_second_run_reuses_a_cached_step_without_running_it(
    backend: Backend, tmp_path: Path
) -> None:
    store = tmp_path / "cache.db"
    wf = sv.Workflow(
        "cached",
        [
            backend.step("a", steps.emit, params={"out": {"x": 1}}),
            backend.step("b", steps.emit, needs=["a"], params={"out": {"y": 2}}, cache=True),
        ],
    )
    first = backend.run(wf, store=store)
    assert first.status is sv.RunStatus.SUCCEEDED, first.error
    assert first.steps["b"].cache_note == "computed: no entry"
    events: list[sv.Event] = []
    second = backend.run(wf, store=store, on_event=events.append)
    assert second.status is sv.RunStatus.SUCCEEDED, second.error
    # a is not cached: it ran again and made the same x, so b was reused (early cutoff).
    assert [attempt for attempt, _pid in backend.calls("a")] == [1, 1]
    assert [attempt for attempt, _pid in backend.calls("b")] == [1]
    assert second.steps["b"].reused_from == first.run_id
    assert second.steps["b"].attempts == ()
    assert dict(second.artifacts) == dict(first.artifacts)
    dispatched = [e.step_id for e in events if isinstance(e, sv.StepDispatched)]
    assert dispatched == ["a"]


def test_a_changed_input_makes_the_cached_step_run_and_says_which(
    backend: Backend, tmp_path: Path
) -> None:
    store = tmp_path / "cache.db"

    def workflow(x: int) -> sv.Workflow:
        return sv.Workflow(
            "cached",
            [
                backend.step("a", steps.emit, params={"out": {"x": x}}),
                backend.step("b", steps.emit, needs=["a"], params={"out": {}}, cache=True),
            ],
        )

    backend.run(workflow(1), store=store)
    second = backend.run(workflow(2), store=store)
    assert second.status is sv.RunStatus.SUCCEEDED, second.error
    assert second.steps["b"].cache_note == "computed: input x changed"
    assert second.artifacts["x_at_b"] == 2
    assert [attempt for attempt, _pid in backend.calls("b")] == [1, 1]


def test_each_instance_of_a_cached_map_is_reused_on_its_own(
    backend: Backend, tmp_path: Path
) -> None:
    store = tmp_path / "cache.db"

    def workflow(items: list[int]) -> sv.Workflow:
        return sv.Workflow(
            "cached-map",
            [backend.step("m", steps.emit, params={"out": {}}, map_over=items, cache=True)],
        )

    first = backend.run(workflow([0, 1]), store=store)
    assert first.status is sv.RunStatus.SUCCEEDED, first.error
    second = backend.run(workflow([0, 2]), store=store)
    assert second.status is sv.RunStatus.SUCCEEDED, second.error
    assert second.steps["m[0]"].reused_from == first.run_id
    assert second.steps["m[1]"].cache_note == "computed: item changed"
    assert [sid for sid in ("m[0]", "m[1]") for _ in backend.calls(sid)] == ["m[0]", "m[1]", "m[1]"]
