"""The fault campaign's mapped steps: how they are planned, what is expected, what is checked.

The campaign itself (tests/chaos/test_chaos.py) runs them; here each piece is shown
to do its job, and each new check to fail when its invariant is broken.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import stepvisor as sv
from stepvisor.core.state import AttemptRecord, StepRecord
from tests import chaos
from tests.chaos import (
    Checker,
    Outcome,
    Scenario,
    StepPlan,
    build_workflow,
    check_effects,
    check_map_lists,
    check_no_rerun,
    check_outcome,
    generate,
    run_seeds,
)
from tests.chaos.expect import expected_instance, expected_status, summary_of
from tests.chaos.observe import read_effects, start_counts
from tests.chaos.scenario import (
    BAD_LIST,
    CRASHES,
    by_hand,
    by_hand_step,
    chain_source,
    map_size,
)
from tests.chaos.steps import instance_value

# -- a small map scenario, by hand --------------------------------------------------------------


def plan(sid: str, **kw: object) -> StepPlan:
    return by_hand_step(sid, **kw)


def scenario(*steps: StepPlan, **kw: object) -> Scenario:
    return by_hand(*steps, **{"seed": 5, **kw})


#: s makes 3 items; m maps over them (instance 1 raises for good); b is chained to m;
#: t requires b's whole list.
MAP = scenario(
    plan("s", emits=3),
    plan("m", over="s", fault="raise", bad=(1,)),
    plan("b", over="m"),
    plan("t", requires=("l_b",)),
)


def rec(sid: str, status: str, *outcomes: str, note: str | None = None) -> StepRecord:
    attempts = tuple(
        AttemptRecord(number=i, started=0.0, ended=1.0, outcome=o)
        for i, o in enumerate(outcomes, start=1)
    )
    return StepRecord(sid, sv.StepStatus(status), attempts, note=note)


def good_records() -> list[StepRecord]:
    """What the run of ``MAP`` must end with (in the order a result lists them)."""
    return [
        rec("s", "succeeded", "succeeded"),
        rec("m", "failed", note="mapped over 3 items: 1 failed, 2 succeeded"),
        rec("m[0]", "succeeded", "succeeded"),
        rec("m[1]", "failed", "failed"),
        rec("m[2]", "succeeded", "succeeded"),
        rec("b", "skipped", note="mapped over 3 items: 1 skipped, 2 succeeded"),
        rec("b[0]", "succeeded", "succeeded"),
        rec("b[1]", "skipped", note="skipped: it depends on 'm[1]', which failed"),
        rec("b[2]", "succeeded", "succeeded"),
        rec("t", "skipped", note="skipped: it depends on 'm', which failed"),
    ]


def outcome_of(records: list[StepRecord], *, ids: list[str] | None = None) -> Outcome:
    return Outcome(
        status="failed",
        steps={r.step_id: r for r in records},
        artifacts={},
        failed_step="m[1]",
        known_failed_step=True,
        ids=tuple(ids if ids is not None else [r.step_id for r in records]),
    )


def violations(records: list[StepRecord], *, ids: list[str] | None = None) -> Counter[str]:
    checker = Checker(seed=5)
    order = ["s", "m", "b", "t"]
    check_outcome(checker, MAP, outcome_of(records, ids=ids), cancel_issued=False, order=order)
    return Counter(v.invariant for v in checker.violations)


def replaced(records: list[StepRecord], sid: str, new: StepRecord | None) -> list[StepRecord]:
    out = [new if r.step_id == sid else r for r in records]
    return [r for r in out if r is not None]


# -- planning ---------------------------------------------------------------------------------


def test_maps_are_planned_from_the_seed_in_every_shape() -> None:
    seen: Counter[str] = Counter()
    for seed in run_seeds(21, 600):
        sc = generate(seed)
        assert sc == generate(seed)
        mapped = [p for p in sc.steps if p.mapped]
        if not mapped:
            continue
        assert sc.store_fault == "none"  # their checks count one store row per step
        seen["runs"] += 1
        seen[f"driver:{sc.driver}"] += 1
        seen["cancel"] += sc.cancel_at is not None
        for p in mapped:
            size = map_size(sc, p)
            seen[f"length:{min(size, 2)}"] += 1
            source = None if p.over == "list" else sc.step(p.over)
            if source is None:
                seen["fixed"] += 1
            elif not source.mapped:
                seen["over-artifact"] += 1
            else:
                seen["chained" if chain_source(sc, p) is not None else "barrier"] += 1
            assert all(0 <= i < size for i in p.bad)
            if p.bad and p.fault in CRASHES:
                assert p.executor == "process"
                seen["crashing-instances"] += 1
            seen[f"executor:{p.executor}"] += 1
        seen["requires"] += sum(bool(p.requires) for p in sc.steps)
        seen["not-a-list"] += sum(p.emits == BAD_LIST for p in sc.steps)
    assert 0.2 < seen["runs"] / 600 < 0.5, seen
    for kind in (
        "length:0",
        "length:1",
        "length:2",
        "fixed",
        "over-artifact",
        "chained",
        "barrier",
        "requires",
        "not-a-list",
        "crashing-instances",
        "executor:thread",
        "executor:async",
        "executor:process",
        "driver:resume-here",
        "driver:resume-program",
        "driver:kill-twice",
        "cancel",
    ):
        assert seen[kind] > 0, (kind, seen)


def test_a_map_scenario_builds_the_mapped_steps_it_planned(tmp_path: Path) -> None:
    sc = next(
        s
        for s in map(generate, run_seeds(22, 400))
        if any(chain_source(s, p) for p in s.steps) and any(p.over == "list" for p in s.steps)
    )
    for twin in (build_workflow(sc, tmp_path), build_workflow(sc, None, reference=True)):
        steps = {s.id: s for s in twin.steps}
        for p in sc.steps:
            step = steps[p.id]
            assert step.mapped == p.mapped
            if p.over == "list":
                assert step.map_over == tuple(f"{p.id}@{k}" for k in range(p.items))
            elif p.mapped:
                source = sc.step(p.over)
                assert step.map_over == ("l_" if source.mapped else "items_") + source.id
            link = twin.graph.maps.get(twin.graph.rank[p.id])
            chained = chain_source(sc, p)
            assert (link is not None and link.source is not None) == (chained is not None)


# -- what is expected ---------------------------------------------------------------------------


def test_an_instance_ends_as_its_fault_says_only_on_a_bad_index_and_chains_skip_after_it() -> None:
    m, b = MAP.step("m"), MAP.step("b")
    assert [expected_instance(MAP, m, i) for i in range(3)] == [
        ("succeeded", 1),
        ("failed", 1),
        ("succeeded", 1),
    ]
    assert [expected_instance(MAP, b, i)[0] for i in range(3)] == [
        "succeeded",
        "skipped",
        "succeeded",
    ]
    assert expected_status(MAP, m) == ("failed", 0)
    assert expected_status(MAP, b) == ("skipped", 0)
    empty = scenario(plan("e", over="list", items=0))
    assert expected_status(empty, empty.step("e")) == ("succeeded", 0)
    stringy = scenario(plan("s", emits=BAD_LIST), plan("m", over="s"))
    assert expected_status(stringy, stringy.step("m")) == ("failed", 0)


def test_the_summary_rule() -> None:
    assert summary_of([]) == "succeeded"
    assert summary_of(["succeeded", "succeeded"]) == "succeeded"
    assert summary_of(["succeeded", "timed_out", "cancelled"]) == "failed"
    assert summary_of(["succeeded", "cancelled", "skipped"]) == "cancelled"
    assert summary_of(["succeeded", "skipped"]) == "skipped"


def test_an_instance_value_is_a_pure_function_of_its_item() -> None:
    assert instance_value("m[0]", "x", {"a": 1}) == instance_value("m[0]", "x", {"a": 1})
    assert instance_value("m[0]", "x", {"a": 1}) != instance_value("m[0]", "y", {"a": 1})
    assert instance_value("m[0]", "x", {"a": 1}) != instance_value("m[1]", "x", {"a": 1})


# -- the checks ---------------------------------------------------------------------------------


def test_the_checks_pass_a_map_run_that_ended_as_its_faults_say() -> None:
    assert violations(good_records()) == Counter()


def test_a_lost_an_extra_or_an_unfinished_instance_is_caught() -> None:
    good = good_records()
    assert violations(replaced(good, "m[2]", None))["instances"] >= 1
    extra = [*good, rec("m[3]", "succeeded", "succeeded")]
    assert violations(extra)["instances"] >= 1
    assert violations(replaced(good, "b[0]", rec("b[0]", "running")))["instances"] >= 1
    ghost = [*good, rec("t[0]", "succeeded", "succeeded")]  # t is not mapped
    assert violations(ghost)["terminal"] >= 1


def test_an_instance_listed_twice_or_away_from_its_step_is_caught() -> None:
    good = good_records()
    ids = [r.step_id for r in good]
    assert violations(good, ids=[*ids, "m[1]"])["instances"] >= 1
    moved = [i for i in ids if i != "m[0]"] + ["m[0]"]
    assert violations(good, ids=moved)["instances"] >= 1


def test_a_summary_that_does_not_follow_its_instances_is_caught() -> None:
    good = good_records()
    lying = rec("m", "succeeded", note="mapped over 3 items: 1 failed, 2 succeeded")
    assert violations(replaced(good, "m", lying))["map-summary"] >= 1
    miscounted = rec("b", "skipped", note="mapped over 3 items: 3 succeeded")
    assert violations(replaced(good, "b", miscounted))["map-summary"] >= 1


def test_an_instance_that_broke_the_oracle_is_caught() -> None:
    good = good_records()
    # m[0] has no fault: it must succeed on its first attempt.
    assert violations(replaced(good, "m[0]", rec("m[0]", "failed", "failed")))["oracle"] >= 1
    # b[1]'s source failed: b[1] cannot have run.
    ran = rec("b[1]", "succeeded", "succeeded")
    assert violations(replaced(good, "b[1]", ran))["oracle"] >= 1


def test_a_collected_list_unlike_the_uninterrupted_run_s_is_caught() -> None:
    sc = scenario(plan("m", over="list", items=2))
    records = {
        "m": rec("m", "succeeded", note="mapped over 2 items: 2 succeeded"),
        "m[0]": rec("m[0]", "succeeded", "succeeded"),
        "m[1]": rec("m[1]", "succeeded", "succeeded"),
    }
    reference = {"l_m": ["a", "b"]}

    def list_violations(got: object) -> int:
        checker = Checker(seed=5)
        outcome = Outcome(status="succeeded", steps=records, artifacts={"l_m": got})
        check_map_lists(checker, sc, outcome, reference)
        assert checker.counts["map-list"] == 2
        return len(checker.violations)

    assert list_violations(["a", "b"]) == 0
    assert list_violations(["b", "a"]) == 1
    assert list_violations(["a"]) == 2


def test_a_succeeded_instance_that_ran_again_after_a_resume_is_caught() -> None:
    checker = Checker(seed=5)
    check_no_rerun(
        checker,
        succeeded_before={"m[0]", "m[2]"},
        counts_before={"m[0]": 1, "m[1]": 1, "m[2]": 1},
        counts_after={"m[0]": 1, "m[1]": 2, "m[2]": 2},
        what="the resume",
    )
    assert [v.detail.split()[1] for v in checker.violations] == ["m[2]"]


def test_a_mapped_step_never_runs_itself(tmp_path: Path) -> None:
    (tmp_path / "effects").mkdir()
    (tmp_path / "effects" / "m.log").write_text("start p0 1 123\n", encoding="ascii")
    checker = Checker(seed=5)
    records = {"m": rec("m", "succeeded", note="mapped over 0 items")}
    check_effects(
        checker,
        Outcome(status="succeeded", steps=records, artifacts={}),
        read_effects(tmp_path),
        phase="p0",
        mapped={"m"},
    )
    assert [v.invariant for v in checker.violations] == ["effects"]


# -- whole runs ---------------------------------------------------------------------------------


def test_a_map_run_killed_and_resumed_passes_every_check() -> None:
    """A run whose driver is SIGKILLed while maps run, then resumed: no violation,
    and the map checks (instances, no-rerun of instances) were made."""
    seed = next(
        s
        for s in run_seeds(23, 2000)
        if generate(s).driver == "resume-here"
        and sum(map_size(generate(s), p) for p in generate(s).steps if p.mapped) >= 6
        and all(p.fault == "ok" for p in generate(s).steps)
    )
    with tempfile.TemporaryDirectory() as workdir:
        report = chaos.run_one(seed, Path(workdir))
    assert report.violations == [], report.violations
    assert report.faults["driver_sigkill"] + report.faults["driver_killed_before_begin"] >= 1
    assert report.checks["instances"] > 0
    assert report.checks["map-summary"] > 0
    assert report.status == "succeeded"
    assert report.checks["map-list"] > 0


def test_the_instance_logs_count_attempts_per_instance(tmp_path: Path) -> None:
    (tmp_path / "effects").mkdir()
    (tmp_path / "effects" / "m[0].log").write_text(
        "start p0 1 1\nend p0 1 1\nstart p1 1 2\n", encoding="ascii"
    )
    assert start_counts(read_effects(tmp_path)) == {"m[0]": 2}


def test_an_instance_that_timed_out_for_starting_late_is_let_off_only_if_its_deadline_passed() -> (
    None
):
    """A sibling's timeout fault gives every instance a short timeout; on a loaded machine
    one that never hangs can still miss its deadline before it starts.  The oracle lets
    it off for that (one attempt more) only when the timeout really elapsed."""
    sc = scenario(
        plan("m", over="list", items=2, fault="timeout", bad=(1,), max_attempts=2, timeout=0.2)
    )

    def verdicts(ended: float) -> tuple[Counter[str], Counter[str]]:
        late = AttemptRecord(1, 100.0, 100.0 + ended, 0.0, "timed_out", error_message="x")
        ok = AttemptRecord(2, 101.0, 101.1, 0.1, "succeeded")
        records = [
            rec("m", "failed", note="mapped over 2 items: 1 succeeded, 1 timed_out"),
            StepRecord("m[0]", sv.StepStatus.SUCCEEDED, (late, ok)),
            rec("m[1]", "timed_out", "timed_out", "timed_out"),
        ]
        checker = Checker(seed=5)
        outcome = Outcome(status="failed", steps={r.step_id: r for r in records}, artifacts={})
        check_outcome(checker, sc, outcome, cancel_issued=False)
        return Counter(v.invariant for v in checker.violations), checker.tolerated

    assert verdicts(ended=0.25) == (Counter(), Counter({"late start": 1}))
    found, tolerated = verdicts(ended=0.05)  # timed out before its timeout elapsed: a bug
    assert found["oracle"] >= 1
    assert not tolerated
