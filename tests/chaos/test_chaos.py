"""The fault campaign: its generator, its invariant checker (which must be able to fail), and a
bounded campaign that must find no violation.

The checker is tested on planted violations first: a checker that cannot fail
proves nothing.  The bounded campaign is marked ``slow``; ``make chaos`` runs the
full one (1,000 workflows).  Set ``STEPVISOR_CHAOS_SEED`` to explore other seeds.
"""

from __future__ import annotations

import functools
import os
import random
import shutil
import subprocess
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

import stepvisor as sv
from stepvisor._runtime import fingerprint
from stepvisor.core.state import AttemptRecord, StepRecord
from stepvisor.errors import ArtifactCodecError, StoreFaultError
from tests import chaos, store_faults
from tests.chaos import (
    FAULTS,
    FOREVER,
    MARK_VAR,
    Checker,
    Effect,
    Outcome,
    Scenario,
    StepPlan,
    Violation,
    build_workflow,
    check_artifacts,
    check_effects,
    check_no_rerun,
    check_outcome,
    check_processes_gone,
    check_threads,
    expected_outcome,
    generate,
    marked_processes,
    oracle,
    oracle_store,
    run_bound,
    run_one,
    run_seeds,
    store_runs,
)
from tests.chaos import campaign as campaign_module
from tests.chaos import scenario as scenario_module
from tests.chaos.scenario import by_hand, by_hand_step
from tests.conftest import wait_for

# -- helpers -----------------------------------------------------------------------------------


def plan(sid: str, **kw: object) -> StepPlan:
    return by_hand_step(sid, **kw)


def scenario(*steps: StepPlan, **kw: object) -> Scenario:
    return by_hand(*steps, **kw)


def attempt(number: int, outcome: str | None) -> AttemptRecord:
    return AttemptRecord(number=number, started=0.0, ended=1.0, outcome=outcome)


def record(sid: str, status: str, *outcomes: str | None) -> StepRecord:
    attempts = tuple(attempt(i, o) for i, o in enumerate(outcomes, start=1))
    return StepRecord(sid, sv.StepStatus(status), attempts)


def outcome(
    status: str, *records: StepRecord, artifacts: dict[str, object] | None = None
) -> Outcome:
    return Outcome(
        status=status,
        steps={r.step_id: r for r in records},
        artifacts=artifacts or {},
        failed_step=None,
    )


def invariants(checker: Checker) -> Counter[str]:
    return Counter(v.invariant for v in checker.violations)


# -- the generator --------------------------------------------------------------------------------


def test_the_same_seed_gives_the_same_scenario_and_workflow(tmp_path: Path) -> None:
    for seed in run_seeds(7, 20):
        assert generate(seed) == generate(seed)
        a = build_workflow(generate(seed), tmp_path)
        b = build_workflow(generate(seed), tmp_path)
        assert fingerprint(a) == fingerprint(b)  # so a resumed run is accepted
    assert list(run_seeds(7, 5)) == list(run_seeds(7, 5))
    assert list(run_seeds(7, 5)) != list(run_seeds(8, 5))


def test_generated_workflows_are_valid_dags_with_faults_where_they_can_happen(
    tmp_path: Path,
) -> None:
    faults: Counter[str] = Counter()
    executors: Counter[str] = Counter()
    drivers: Counter[str] = Counter()
    cancels = 0
    for seed in run_seeds(11, 400):
        sc = generate(seed)
        plain = [p for p in sc.steps if not p.mapped and not p.requires]  # map groups come after
        assert 3 <= len(plain) <= 25
        assert len(sc.steps) <= 45
        wf = build_workflow(sc, tmp_path)  # raises on a cycle or an unknown need
        assert len(wf.steps) == len(sc.steps)
        drivers[sc.driver] += 1
        cancels += sc.cancel_at is not None
        assert sc.cancel_at is None or sc.driver == "none"
        for p in sc.steps:
            faults[p.fault] += 1
            executors[p.executor] += 1
            if p.fault in chaos.FAULTS_PROCESS:
                assert p.executor == "process", p
            if p.fault == "unstorable":
                assert sc.store == "sqlite"
            if p.fault == "ignore_cancel":
                assert (p.executor, p.max_attempts) == ("thread", 1)
            if p.fault in ("timeout", "ignore_cancel"):
                assert p.timeout is not None
        if len(plain) == len(sc.steps):
            assert run_bound(sc) < 20 + 25 * 3 * 8
    assert set(faults) == set(FAULTS)
    assert set(executors) == {"thread", "async", "process"}
    assert set(drivers) == {
        "none",
        "resume-here",
        "resume-program",
        "kill-twice",
        "race",
        "resume-now",
    }
    assert cancels > 20


def test_store_faults_and_ownership_runs_are_planned_from_the_seed(tmp_path: Path) -> None:
    kinds: Counter[str] = Counter()
    for seed in run_seeds(13, 1500):
        sc = generate(seed)
        assert sc == generate(seed)  # the same seed, the same fault plan
        kinds[sc.store_fault] += 1
        if sc.store_fault != "none" or sc.driver in chaos.OWNER_DRIVERS:
            assert sc.store == "sqlite"
            assert sc.cancel_at is None
        if sc.store_fault in chaos.STORE_FAULTS_IN_RUN:
            assert sc.driver == "none"
            eligible = [p for p in sc.steps if scenario_module.fault_eligible(p)]
            assert 1 <= sc.fault_at <= len(eligible)
            params = [s.params["fault_at"] for s in build_workflow(sc, tmp_path).steps]
            assert sorted(set(params) - {0}) == [sc.fault_at]
        else:
            assert sc.fault_at == 0
        if sc.store_fault in chaos.STORE_FAULTS_AFTER_KILL or sc.driver in chaos.OWNER_DRIVERS:
            assert sc.driver in chaos.OWNER_DRIVERS
            assert sc.kill_after >= 1  # killed once the run is stored
        if sc.store_fault == "lock_held":
            assert sc.busy_timeout < 1.0
        reference = build_workflow(sc, None, reference=True)
        assert all(s.params["fault_at"] == 0 for s in reference.steps)
    assert set(kinds) == {"none", *chaos.STORE_FAULTS}
    assert 0.05 < 1 - kinds["none"] / 1500 < 0.12


def test_the_fault_free_twin_has_the_same_graph_and_no_fault(tmp_path: Path) -> None:
    sc = next(
        generate(s) for s in run_seeds(3, 500) if any(p.fault != "ok" for p in generate(s).steps)
    )
    twin = build_workflow(sc, None, reference=True)
    real = build_workflow(sc, tmp_path)
    assert twin.graph.order == real.graph.order
    assert all(s.params["fault"] == "ok" and s.executor == "thread" for s in twin.steps)
    assert all(s.params["dir"] == "" for s in twin.steps)


@pytest.mark.parametrize(
    ("fault", "failing", "max_attempts", "crashes", "want"),
    [
        ("ok", FOREVER, 1, 3, ("succeeded", 1)),
        ("orphan", FOREVER, 2, 3, ("succeeded", 1)),
        ("raise", 2, 3, 3, ("succeeded", 3)),
        ("raise", 2, 2, 3, ("failed", 2)),
        ("retryable", 1, 2, 3, ("succeeded", 2)),
        ("fatal", FOREVER, 3, 3, ("failed", 1)),
        ("unpicklable", FOREVER, 3, 3, ("failed", 1)),
        ("unstorable", 1, 3, 3, ("failed", 1)),
        ("timeout", 1, 2, 3, ("succeeded", 2)),
        ("timeout", FOREVER, 2, 3, ("timed_out", 2)),
        ("ignore_cancel", 1, 1, 3, ("timed_out", 1)),
        ("sigkill", 1, 3, 3, ("succeeded", 2)),
        ("exit", 2, 3, 2, ("failed", 2)),  # max_worker_crashes stops it first
        ("outside_kill", FOREVER, 2, 4, ("failed", 2)),
    ],
)
def test_expected_outcome_follows_retries_and_the_crash_limit(
    fault: str, failing: int, max_attempts: int, crashes: int, want: tuple[str, int]
) -> None:
    step = plan("a", fault=fault, failing=failing, max_attempts=max_attempts)
    assert expected_outcome(step, max_worker_crashes=crashes) == want


def test_run_bound_grows_with_timeouts_and_attempts() -> None:
    quick = scenario(plan("a"), plan("b"))
    slow = scenario(plan("a"), plan("b", fault="timeout", timeout=2.0, max_attempts=3))
    assert run_bound(slow) > run_bound(quick) + 3 * 2.0


# -- the checker catches what it is for ----------------------------------------------------------


def test_checker_reports_a_non_terminal_step_and_a_run_status_that_lies() -> None:
    sc = scenario(plan("a"), plan("b", needs=("a",)))
    planted = outcome(
        "succeeded",
        record("a", "running", None),  # problem 1: no terminal status
        record("b", "failed", "failed"),  # problem 2: the run says succeeded
    )
    checker = Checker(seed=4242)
    check_outcome(checker, sc, planted, cancel_issued=False, order=("a", "b"))
    found = invariants(checker)
    assert found["terminal"] == 1
    assert found["run-status"] >= 1
    messages = [str(v) for v in checker.violations]
    assert any("step a ended 'running'" in m for m in messages), messages
    assert any("the run succeeded but its steps are" in m for m in messages), messages
    assert all(m.startswith("seed 4242: ") for m in messages)


def test_checker_passes_a_run_that_ended_as_its_faults_say() -> None:
    sc = scenario(
        plan("a", fault="raise", failing=1, max_attempts=2),
        plan("b", fault="fatal", needs=("a",)),
        plan("c", needs=("b",)),
    )
    good = outcome(
        "failed",
        record("a", "succeeded", "failed", "succeeded"),
        record("b", "failed", "failed"),
        record("c", "skipped"),
    )
    checker = Checker(seed=1)
    check_outcome(checker, sc, good, cancel_issued=False, order=("a", "b", "c"))
    assert checker.violations == []
    assert sum(checker.counts.values()) >= 10


def test_checker_catches_wrong_attempt_counts_a_stray_cancel_and_a_missed_skip() -> None:
    sc = scenario(
        plan("a", fault="raise", failing=1, max_attempts=3),
        plan("b", fault="fatal"),
        plan("c", needs=("b",)),
        plan("d"),
    )
    bad = outcome(
        "failed",
        record("a", "succeeded", "failed", "failed", "succeeded"),  # 3 attempts, expected 2
        record("b", "failed", "failed"),
        record("c", "succeeded", "succeeded"),  # its dependency failed: must be skipped
        record("d", "cancelled"),  # continue mode and no cancel: nothing may be cancelled
    )
    checker = Checker(seed=9)
    check_outcome(checker, sc, bad, cancel_issued=False, order=("a", "b", "c", "d"))
    messages = " | ".join(str(v) for v in checker.violations)
    assert "step a (raise x1) succeeded after 3 attempts; expected 2" in messages
    assert "step c" in messages
    assert "step d" in messages
    assert invariants(checker)["oracle"] >= 3


def test_checker_refuses_a_cancelled_run_nobody_cancelled() -> None:
    sc = scenario(plan("a"))
    checker = Checker(seed=2)
    check_outcome(checker, sc, outcome("cancelled", record("a", "cancelled")), cancel_issued=False)
    assert "the run was cancelled but no cancel was injected" in [
        v.detail for v in checker.violations
    ]
    allowed = Checker(seed=2)
    check_outcome(allowed, sc, outcome("cancelled", record("a", "cancelled")), cancel_issued=True)
    assert allowed.violations == []


def test_effects_check_catches_a_double_run_and_an_unrecorded_attempt() -> None:
    ran = outcome(
        "succeeded", record("a", "succeeded", "succeeded"), record("b", "failed", "failed")
    )
    effects = {
        "a": [
            Effect("start", "p0", 1, 10),
            Effect("start", "p0", 1, 11),
            Effect("end", "p0", 1, 11),
        ],
        "b": [Effect("start", "p0", 1, 12), Effect("start", "p0", 2, 12)],
    }
    checker = Checker(seed=3)
    check_effects(checker, ran, effects, phase="p0")
    messages = [v.detail for v in checker.violations]
    assert "step a: an attempt began twice: [1, 1]" in messages
    assert "step b began attempts [1, 2], but only 1 are recorded" in messages
    clean = Checker(seed=3)
    check_effects(clean, ran, {"a": effects["a"][1:], "b": effects["b"][:1]}, phase="p0")
    assert clean.violations == []


def test_no_rerun_check_catches_a_succeeded_step_that_ran_again() -> None:
    checker = Checker(seed=5)
    check_no_rerun(
        checker,
        succeeded_before={"a", "b"},
        counts_before={"a": 1, "b": 2},
        counts_after={"a": 1, "b": 3, "c": 1},
        what="the resume",
    )
    assert [v.detail for v in checker.violations] == [
        "step b was stored succeeded before the resume but ran again "
        "(2 attempts begun before, 3 after)"
    ]


def test_artifact_check_compares_with_the_fault_free_run_only_when_all_succeeded() -> None:
    checker = Checker(seed=6)
    check_artifacts(checker, outcome("succeeded", artifacts={"x": "1"}), {"x": "2"})
    check_artifacts(checker, outcome("failed", artifacts={"x": "1"}), {"x": "2"})
    assert invariants(checker) == Counter({"artifacts": 1})
    assert "['x']" in checker.violations[0].detail


def test_process_check_finds_a_marked_process_and_kills_it() -> None:
    mark = f"test.{random.getrandbits(32)}.p0"
    sleep = shutil.which("sleep")
    assert sleep is not None
    proc = subprocess.Popen([sleep, "30"], env={**os.environ, MARK_VAR: mark})
    try:
        # Popen can return before the child has exec'd: until then /proc shows the
        # parent's environment, without the mark.
        wait_for(lambda: proc.pid in marked_processes(mark), timeout=10, what="the marked child")
        assert proc.pid not in marked_processes(mark + "x")
        checker = Checker(seed=7)
        check_processes_gone(checker, mark, what="the test", grace=0.05)
        assert invariants(checker) == Counter({"processes": 1})
        assert proc.wait(timeout=10) < 0  # killed by the check
    finally:
        proc.kill()
        proc.wait(timeout=10)
    clean = Checker(seed=7)
    check_processes_gone(clean, mark, what="the test", grace=0.05)
    assert clean.violations == []


def test_thread_check_finds_a_new_thread_unless_it_is_excepted() -> None:
    before = set(threading.enumerate())
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, args=(10,), name="left-behind")
    thread.start()
    try:
        checker = Checker(seed=8)
        check_threads(checker, before, set(), grace=0.05)
        assert [v.detail for v in checker.violations] == [
            "threads ['left-behind'] outlived the run"
        ]
        excused = Checker(seed=8)
        assert check_threads(excused, before, {"left-behind"}, grace=0.05) == ["left-behind"]
        assert excused.violations == []
    finally:
        stop.set()
        thread.join(10)


# -- real runs -------------------------------------------------------------------------------------


def _quick_seed() -> int:
    """A small in-process scenario with faults but nothing slow (no process, no timeout)."""
    for seed in run_seeds(21, 5000):
        sc = generate(seed)
        if (
            sc.driver == "none"
            and sc.cancel_at is None
            and len(sc.steps) <= 12
            and all(p.executor != "process" for p in sc.steps)
            and all(p.fault not in ("timeout", "ignore_cancel") for p in sc.steps)
            and sum(p.fault != "ok" for p in sc.steps) >= 2
        ):
            return seed
    raise AssertionError("no quick seed found")


@pytest.mark.realtime
def test_one_run_is_executed_and_checked_without_violation(tmp_path: Path, chdir_tmp: Path) -> None:
    seed = _quick_seed()
    report = run_one(seed, tmp_path)
    assert report.violations == [], "\n".join(map(str, report.violations))
    assert report.checks["terminal"] == len(report.scenario.steps) + 1  # + the set of ids
    assert report.checks["effects"] > 0
    assert report.checks["threads"] == 1
    assert report.status in ("succeeded", "failed")
    assert os.environ.get(MARK_VAR) is None
    assert list(tmp_path.iterdir()) == []  # the run's directory is gone


@pytest.mark.realtime
def test_replay_runs_one_seed_and_exits_0(
    chdir_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seed = _quick_seed()
    assert chaos.main(["--replay", str(seed), "-v"]) == 0
    out = capsys.readouterr().out
    assert f"seed {seed}: " in out
    assert "1 runs in" in out
    assert ", 0 violations" in out


@pytest.mark.parametrize("argv", [["--runs", "0"], ["--budget-seconds", "-1"], ["--drive", "1"]])
def test_campaign_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        chaos.main(argv)
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.realtime
@pytest.mark.timeout(240)
def test_a_bounded_campaign_finds_no_violation(chdir_tmp: Path) -> None:
    seed = int(os.environ.get("STEPVISOR_CHAOS_SEED", "20240611"))
    summary = chaos.run_campaign(runs=1000, seed=seed, budget_seconds=75.0)
    text = summary.render()
    print(text)
    assert summary.violations == [], text
    assert summary.runs >= 60, text
    injected = {k for k, v in summary.faults.items() if v and k in FAULTS}
    assert injected >= set(FAULTS) - {"ok"}, text
    assert summary.faults["driver_sigkill"] >= 3, text
    assert summary.faults["outside_kill:done"] >= 1, text
    assert summary.scenarios["cancel"] >= 3, text
    assert summary.statuses["succeeded"] >= 10, text
    assert summary.checks["artifacts"] == summary.statuses["succeeded"], text
    # Store faults and ownership runs, at a low rate (the first 60 runs of the default
    # seed plan 5 store faults, a race and an immediate resume).
    struck = [k for k in summary.faults if k.startswith("store_fault:")]
    planned = summary.scenarios["store_fault"]
    assert planned >= 3, text
    # Every planned store fault is accounted for: struck, missed, nothing to tear, or not run.
    assert sum(summary.faults[k] for k in struck) + sum(summary.not_run.values()) == planned, text
    assert summary.faults["driver:race"] >= 1, text
    assert summary.faults["driver:resume-now"] >= 1, text
    assert summary.checks["one-owner"] >= 3, text
    assert summary.checks["race"] >= 1, text
    # Mapped steps, in about a third of the runs (13 of the first 60 of the default seed,
    # 5 of them killed and resumed): every map invariant is checked, on instances that
    # fail and succeed.  (A kill that lands mid-map every time: test_map_driver_kill.py.)
    assert summary.scenarios["maps"] >= 10, text
    for invariant in ("instances", "map-summary", "map-list"):
        assert summary.checks[invariant] >= 10, (invariant, text)
    for kind in ("chained", "over_artifact", "fixed", "length_0", "faulty_instances"):
        assert summary.faults[f"map:{kind}"] >= 1, (kind, text)


def _scenario_and_plan(
    wanted: Callable[[Scenario], bool], step: Callable[[StepPlan], bool]
) -> tuple[Scenario, StepPlan]:
    """The first generated scenario ``wanted`` accepts, and its first step ``step`` accepts."""
    scenario = next(
        c for c in map(chaos.generate, range(2000)) if wanted(c) and any(map(step, c.steps))
    )
    return scenario, next(p for p in scenario.steps if step(p))


def _oracle_on_one_timeout(
    scenario: Scenario, plan: StepPlan, note: str | None, *, also_failed: bool = False
) -> list[Violation]:
    """The oracle's verdicts on ``plan`` ending ``timed_out`` after one attempt noted ``note``.

    Every other step succeeded, unless ``also_failed``: then another step
    failed too (what stops a fail-fast run).
    """
    statuses = {p.id: "succeeded" for p in scenario.steps}
    statuses[plan.id] = "timed_out"
    if also_failed:
        statuses["zz_other"] = "failed"
    attempt = sv.AttemptRecord(1, 0.0, 1.0, 1.0, "timed_out", note=note)
    record = sv.StepRecord(plan.id, sv.StepStatus.TIMED_OUT, (attempt,))
    checker = Checker(seed=1)
    oracle._check_step(checker, scenario, plan, record, statuses, cancel_issued=False)
    return [v for v in checker.violations if v.invariant == "oracle"]


def test_oracle_accepts_an_abandoned_cooperative_thread_only_when_recorded_abandoned() -> None:
    """Under load a cooperative thread can miss a short grace period and be abandoned."""
    scenario, plan = _scenario_and_plan(
        lambda c: True, lambda p: p.executor == "thread" and p.fault == "timeout"
    )
    for note, expected_violations in (("abandoned", 0), (None, 1)):
        oracle = _oracle_on_one_timeout(scenario, plan, note)
        assert len(oracle) >= expected_violations
        if expected_violations == 0:
            assert oracle == []


def test_oracle_accepts_a_failure_the_stop_kept_from_retrying_only_when_noted() -> None:
    """Fail-fast: a step that times out as the run stops keeps ``timed_out``, noted."""
    scenario, plan = _scenario_and_plan(
        lambda c: c.on_failure == "fail_fast",
        lambda p: p.fault == "timeout" and p.failing < p.max_attempts,
    )
    noted = "not retried: the run is stopping (step 'zz_other' failed)"
    for note, expected_violations in ((noted, 0), (None, 1)):
        oracle = _oracle_on_one_timeout(scenario, plan, note, also_failed=True)
        assert len(oracle) == expected_violations, oracle


def test_oracle_accepts_fewer_attempts_only_when_the_last_was_abandoned() -> None:
    """Seed 994880692838 (make chaos): a thread step timing out on every attempt, with
    three attempts, was abandoned on the first under load and so never retried."""
    scenario, plan = _scenario_and_plan(
        lambda c: c.on_failure == "continue",
        lambda p: (
            p.executor == "thread" and p.fault == "timeout" and p.failing >= p.max_attempts == 3
        ),
    )
    for note, expected_violations in (("abandoned", 0), (None, 1)):
        oracle = _oracle_on_one_timeout(scenario, plan, note)
        assert len(oracle) == expected_violations, oracle


# -- store faults and ownership: the checks catch what they are for -----------------------------


def _found(steps: dict[str, tuple[str, int]], *problems: str) -> store_faults.StoreCheck:
    """A ``check_store`` verdict for run ``r``: step -> (status, attempts)."""
    found = store_faults.StoreCheck()
    found.problems.extend(problems)
    found.steps["r"] = {sid: status for sid, (status, _) in steps.items()}
    found.attempts["r"] = {sid: n for sid, (_, n) in steps.items() if n}
    return found


def test_fault_error_check_wants_the_fault_and_the_path_named(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    right = StoreFaultError(
        f"cannot save a step in the run store {db}: (disk full)", path=str(db), fault="disk full"
    )
    checker = Checker(seed=1)
    chaos.check_fault_error(checker, "disk_full", right, db)
    assert checker.violations == []
    for wrong in (
        StoreFaultError(f"... {db} ... (locked)", path=str(db), fault="locked"),  # another fault
        StoreFaultError("no path in the message (disk full)", path=str(db), fault="disk full"),
        RuntimeError("stepvisor's supervisor failed"),  # not the store's error
        None,
    ):
        bad = Checker(seed=1)
        chaos.check_fault_error(bad, "disk_full", wrong, db)
        assert invariants(bad) == Counter({"store-fault": 1}), wrong


def test_a_run_not_stopped_by_the_store_may_end_with_a_step_s_own_store_error() -> None:
    """Seed 368070511691 (first campaign with store faults): a step returned a value the
    json codec refuses, so the run ended with an ArtifactCodecError, a StoreError that is
    the step's doing; only a StoreFaultError says the store stopped the run."""
    checker = Checker(seed=1)
    codec = ArtifactCodecError("cannot store artifact 'v_c18' of step 'c18' with the json codec")
    oracle_store.check_no_fault_error(checker, "disk_full", codec)
    oracle_store.check_no_fault_error(checker, "lock_brief", None)
    assert checker.violations == []
    oracle_store.check_no_fault_error(
        checker, "lock_brief", StoreFaultError("x", path="p", fault="locked")
    )
    assert invariants(checker) == Counter({"store-fault": 1})


def test_committed_check_catches_a_lost_or_changed_transition() -> None:
    before = _found({"a": ("succeeded", 1), "b": ("failed", 2), "c": ("running", 1)})
    kept = _found({"a": ("succeeded", 1), "b": ("failed", 2), "c": ("succeeded", 2)})
    checker = Checker(seed=1)
    chaos.check_committed_kept(checker, before, kept, "r", what="the fault")
    assert checker.violations == []
    lost = _found({"a": ("running", 1), "b": ("failed", 1), "c": ("pending", 0)})
    bad = Checker(seed=1)
    chaos.check_committed_kept(bad, before, lost, "r", what="the fault")
    details = [v.detail for v in bad.violations]
    assert len(details) == 3, details
    assert "step a was stored succeeded with 1 attempts before the fault" in details[0]


def test_store_whole_check_wants_one_row_per_step_or_none() -> None:
    checker = Checker(seed=1)
    oracle_store.check_store_whole(checker, _found({"a": ("ok", 0)}), "r", ["a"], what="x")
    oracle_store.check_store_whole(checker, store_faults.StoreCheck(), "r", ["a"], what="x")
    assert checker.violations == []
    oracle_store.check_store_whole(checker, _found({"a": ("ok", 0)}), "r", ["a", "b"], what="x")
    oracle_store.check_store_whole(
        checker, _found({"a": ("ok", 0)}, "integrity"), "r", ["a"], what="x"
    )
    assert invariants(checker) == Counter({"store-fault": 2})


def test_torn_store_check_refuses_a_success_the_wal_never_held() -> None:
    before = _found({"a": ("succeeded", 1), "b": ("running", 1)})
    checker = Checker(seed=1)
    chaos.check_torn_store(
        checker, before, _found({"a": ("running", 1), "b": ("running", 1)}), "r", ["a", "b"]
    )
    assert checker.violations == []  # losing the last transactions is what a torn WAL does
    chaos.check_torn_store(
        checker, before, _found({"a": ("succeeded", 1), "b": ("succeeded", 1)}), "r", ["a", "b"]
    )
    assert [v.detail for v in checker.violations] == [
        "after the WAL was torn, steps ['b'] read succeeded; they had not"
    ]


def test_race_check_catches_a_step_run_by_the_loser_or_twice() -> None:
    effects = {
        "a": [Effect("start", "p0", 1, 9), Effect("start", "p1", 1, 10)],
        "b": [Effect("start", "p1", 1, 10), Effect("start", "p2", 1, 11)],
    }
    checker = Checker(seed=1)
    chaos.check_race_effects(checker, effects, winner="p1", loser="p2")
    assert [v.detail for v in checker.violations] == [
        "step b began attempts [1] in the losing resume",
        "step b: attempts [1, 1] began across the racing resumes",
    ]
    clean = Checker(seed=1)
    chaos.check_race_effects(clean, {"a": effects["a"]}, winner="p1", loser="p2")
    assert clean.violations == []


class _FakeRacer:
    """What ``store_runs._race`` talks to: lines said, words heard."""

    def __init__(self, phase: str, lines: list[str], pid: int) -> None:
        self.phase = phase
        self._lines = iter(lines)
        self.heard: list[str] = []
        self.proc = type("P", (), {"pid": pid})()

    def line(self, deadline: float) -> str | None:
        return next(self._lines, None)

    def say(self, word: str) -> None:
        self.heard.append(word)


def test_race_check_refuses_two_owners_and_lets_both_go_at_once(tmp_path: Path) -> None:
    checker = Checker(seed=1)
    ctx = type("Ctx", (), {"checker": checker})()
    both = [_FakeRacer(p, ["ready", "claimed"], 100 + i) for i, p in enumerate(("p1", "p2"))]
    assert store_runs._race(ctx, both) is None  # type: ignore[arg-type]
    assert [v.detail for v in checker.violations] == [
        "of two racing resumes, exactly one must own the run; "
        "they said {'p1': 'claimed', 'p2': 'claimed'}"
    ]
    assert [r.heard for r in both] == [["go", "settle"], ["go", "settle"]]
    late = [_FakeRacer("p1", ["ready"], 1), _FakeRacer("p2", [], 2)]
    checker.violations.clear()
    assert store_runs._race(ctx, late) is None  # type: ignore[arg-type]
    assert [r.heard for r in late] == [[], []]  # nobody goes before both are ready
    assert "the racers did not get ready" in checker.violations[0].detail


# -- store faults and ownership: real runs --------------------------------------------------------


def _kind_seed(kind: str) -> int:
    """A small, quick scenario of this store fault or ownership kind, sure to strike."""
    return _kind_seeds()[kind]


@functools.cache
def _kind_seeds() -> dict[str, int]:
    wanted = {*chaos.STORE_FAULTS, *chaos.OWNER_DRIVERS}
    found: dict[str, int] = {}
    for seed in run_seeds(31, 30000):
        sc = generate(seed)
        kind = sc.store_fault if sc.store_fault != "none" else sc.driver
        if kind not in wanted or kind in found:
            continue
        quick = all(p.executor != "process" for p in sc.steps) and all(
            p.fault not in ("timeout", "ignore_cancel") for p in sc.steps
        )
        if kind in chaos.STORE_FAULTS_IN_RUN:
            quick = quick and sc.fault_at == 1 and all(p.fault == "ok" for p in sc.steps)
            quick = quick and len(sc.steps) <= 12
        else:
            # Killed as its first attempt begins, with the rest of the run still to go.
            rest = sum(p.duration for p in sc.steps) / min(sc.max_parallel, 2)
            quick = quick and sc.kill_after == 1 and sc.kill_delay < 0.01 and rest > 0.03
        if quick:
            found[kind] = seed
            if set(found) == wanted:
                return found
    raise AssertionError(f"no quick seed of kinds {sorted(wanted - set(found))}")


@pytest.mark.realtime
@pytest.mark.parametrize("kind", [*chaos.STORE_FAULTS, *chaos.OWNER_DRIVERS])
def test_each_store_fault_and_ownership_run_strikes_and_passes_its_checks(
    kind: str, tmp_path: Path, chdir_tmp: Path
) -> None:
    if kind in chaos.STORE_FAULTS_MOUNTED and chaos.mount_problem() is not None:
        pytest.skip(f"{kind} needs a tmpfs: {chaos.mount_problem()}")
    seed = _kind_seed(kind)
    report = run_one(seed, tmp_path)
    assert report.violations == [], "\n".join(map(str, report.violations))
    struck = {
        k: v for k, v in report.faults.items() if k.startswith(("store_fault:", "lock_brief:"))
    }
    if kind in chaos.STORE_FAULTS:
        assert report.faults[f"store_fault:{kind}"] == 1, struck
        # A brief lock is waited out: the run is checked as any other, plus "no fault error".
        assert report.checks["store-fault"] >= (1 if kind == "lock_brief" else 3), report.checks
    if kind == "lock_brief":
        assert report.faults["lock_brief:waited"] + report.faults["lock_brief:timed"] == 1
    if kind in ("race", "resume-now", *chaos.STORE_FAULTS_AFTER_KILL):
        assert report.faults["driver_sigkill"] == 1
        assert report.checks["one-owner"] >= 2
    if kind == "race":
        assert report.checks["race"] >= len(report.scenario.steps)
        assert report.checks["one-owner"] >= 3
    assert report.status in ("succeeded", "failed")
    assert list(tmp_path.iterdir()) == []  # the run's directory (and any mount) is gone


@pytest.mark.realtime
@pytest.mark.parametrize("kind", sorted(chaos.STORE_FAULTS_MOUNTED))
def test_a_fault_that_needs_a_mount_is_reported_not_run_never_dropped(
    kind: str, tmp_path: Path, chdir_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(campaign_module, "mount_problem", lambda: "cannot mount (test)")
    seed = _kind_seed(kind)
    report = run_one(seed, tmp_path)
    assert report.violations == [], "\n".join(map(str, report.violations))
    assert report.not_run == {kind: "not run: cannot mount (test)"}
    assert not any(k.startswith("store_fault:") for k in report.faults)
    summary = chaos.CampaignSummary(seed=0)
    summary.add(report)
    assert f"store faults not run: {kind} 1 (not run: cannot mount (test))" in summary.render()
