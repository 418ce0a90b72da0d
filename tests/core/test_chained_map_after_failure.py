"""A map chained to a map that failed, under ``on_failure="continue"``, when it expands late.

``b`` maps over ``a``'s list (chained: ``b[i]`` waits for ``a[i]`` alone) and also
needs ``slow``.  Whether ``a`` fails (one instance fails) before or after ``slow``
ends is a matter of timing; the run's outcome must not depend on it, and ``b``
must end once.  Found while planning the fault campaign's chained maps (tests/chaos).
"""

from __future__ import annotations

from typing import Any

import stepvisor as sv
from stepvisor.core.effects import Emit, SaveStep, SaveSteps
from stepvisor.core.events import StepCommitted, StepFinished
from tests.machine_sim import Sim, make_plan, noop


def _workflow() -> sv.Workflow:
    return sv.Workflow(
        "chained-after-failure",
        [
            sv.Step("a", noop, map_over=[0, 1, 2], creates=["la"]),
            sv.Step("slow", noop),
            sv.Step("b", noop, map_over="la", needs=["slow"], creates=["lb"]),
        ],
    )


def _run(first_prefix: str) -> tuple[Sim, sv.RunResult]:
    """Run with ``a[1]`` failing; attempts whose step id starts with ``first_prefix`` end first."""
    sim = Sim(make_plan(_workflow(), max_parallel=8, on_failure="continue"), {("a[1]", 1): "fatal"})
    sim.start()

    def choose(options: list[tuple[str, Any]]) -> tuple[str, Any]:
        preferred = [o for o in options if o[0] == "end" and o[1][1][0].startswith(first_prefix)]
        return (preferred or options)[0]

    return sim, sim.run_to_end(choose)


def _finished(sim: Sim, sid: str) -> list[str]:
    return [
        e.event.status
        for e in sim.effects
        if isinstance(e, Emit) and isinstance(e.event, StepFinished) and e.event.step_id == sid
    ]


def _commits(sim: Sim) -> list[tuple[str, str]]:
    return [
        (e.event.step_id, e.event.status)
        for e in sim.effects
        if isinstance(e, Emit) and isinstance(e.event, StepCommitted)
    ]


def _saved(sim: Sim, sid: str) -> list[str]:
    records = []
    for e in sim.effects:
        if isinstance(e, SaveStep):
            records.append(e.record)
        elif isinstance(e, SaveSteps):
            records.extend(e.records)
    return [str(r.status) for r in records if r.step_id == sid]


def _summary(result: sv.RunResult) -> dict[str, tuple[str, str | None, int]]:
    return {sid: (str(r.status), r.note, len(r.attempts)) for sid, r in result.steps.items()}


def test_a_chained_map_expanding_after_its_source_failed_ends_once_as_if_expanded_first() -> None:
    early_sim, early = _run("slow")  # b expands before a[1] fails
    late_sim, late = _run("a[")  # a fails (a[1]) while b still waits for slow
    assert _summary(late) == _summary(early)
    assert str(late.steps["b"].status) == "skipped"
    assert [str(late.steps[f"b[{i}]"].status) for i in range(3)] == [
        "succeeded",
        "skipped",
        "succeeded",
    ]
    # b ends once, and is committed once: never skipped, then brought back and run.
    assert _finished(late_sim, "b") == ["skipped"]
    assert _saved(late_sim, "b") == _saved(early_sim, "b")
    assert _commits(late_sim) == _commits(early_sim)


def test_a_chained_map_that_also_needs_the_failed_map_whole_is_skipped() -> None:
    """``c`` is chained to ``b`` (chained to ``a``) but also needs all of ``a``: skipped."""
    wf = sv.Workflow(
        "chained-and-whole",
        [
            sv.Step("a", noop, map_over=[0, 1, 2], creates=["la"]),
            sv.Step("b", noop, map_over="la", creates=["lb"]),
            sv.Step("c", noop, map_over="lb", needs=["a"], creates=["lc"]),
        ],
    )
    sim = Sim(make_plan(wf, max_parallel=8, on_failure="continue"), {("a[1]", 1): "fatal"})
    sim.start()
    result = sim.run_to_end(lambda options: options[0])
    assert wf.graph.maps[wf.graph.rank["c"]].source == wf.graph.rank["b"]  # chained to b
    assert _summary(result)["c"] == ("skipped", "skipped: it depends on 'a', which failed", 0)
    assert not any(sid.startswith("c[") for sid in result.steps)
    assert _finished(sim, "c") == ["skipped"]
    assert [str(result.steps[f"b[{i}]"].status) for i in range(3)] == [
        "succeeded",
        "skipped",
        "succeeded",
    ]
