"""Load: one run of thousands of steps, and many runs in one program, on the SQLite store.

The big run mixes backends (mostly thread, some async, a few process) with 5 %
of its steps failing for good and 2 % failing once then retried, under
``on_failure="continue"``; every invariant of the fault campaign is checked on
it (statuses, the fault oracle, attempts against side effects, the store against
the result, integrity, no process or thread left).  The loop of runs checks that
memory does not grow with the number of completed runs: what a run allocates is
freed once it is over.

``make test`` runs the short version (3,000 steps, 20 runs); set
``STEPVISOR_SOAK_FULL=1`` for the full one (20,000 steps, 50 runs).
"""

from __future__ import annotations

import gc
import os
import random
import shutil
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

import stepvisor as sv
from stepvisor.store.sqlite import SQLiteStore
from tests.chaos import (
    FOREVER,
    MARK_VAR,
    Checker,
    Outcome,
    Scenario,
    StepPlan,
    build_workflow,
    check_effects,
    check_outcome,
    check_processes_gone,
    check_sqlite_file,
    check_store_agrees,
    check_threads,
    read_effects,
)
from tests.chaos.scenario import by_hand

FULL = os.environ.get("STEPVISOR_SOAK_FULL") == "1"
SOAK_STEPS = 20_000 if FULL else 3_000
SOAK_PROCESS_STEPS = 12 if FULL else 4
LOOP_RUNS = 50 if FULL else 20
LOOP_STEPS = 60
#: Allowed memory growth per completed run, between the warm-up run and the last.
GROWTH_PER_RUN = 2 * 1024 * 1024 / 40  # 2 MB over runs 10..50


def soak_scenario(*, steps: int, seed: int, process_steps: int, async_share: float) -> Scenario:
    """Families of ten steps (a small random DAG each): wide, shallow, fan-in inside a family.

    Keeping each step's ancestors few keeps its inputs small, so the run measures
    the engine rather than the steps.
    """
    rng = random.Random(seed)
    plans: list[StepPlan] = []
    process_at = set(rng.sample(range(steps), k=process_steps))
    for i in range(steps):
        first = i - i % 10
        earlier = [f"s{j:05d}" for j in range(first, i)]
        needs = tuple(rng.sample(earlier, k=min(len(earlier), rng.randint(0, 2))))
        executor = "process" if i in process_at else "thread"
        if executor == "thread" and rng.random() < async_share:
            executor = "async"
        roll = rng.random()
        fault, failing, attempts = "ok", FOREVER, 1
        if roll < 0.05:
            fault = "raise"  # fails for good
        elif roll < 0.07:
            fault, failing, attempts = "raise", 1, 2  # fails once, then succeeds
        plans.append(
            StepPlan(
                f"s{i:05d}", needs, executor, fault, failing, "sleep", attempts, "none", None, 0.0
            )
        )
    return by_hand(*plans, seed=seed, max_parallel=8, kill_grace=0.5, store="sqlite")


def run_and_check(
    scenario: Scenario, run_dir: Path, db: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Checker, sv.RunResult]:
    """Run ``scenario`` on the store at ``db`` and check every invariant that applies."""
    (run_dir / "effects").mkdir(parents=True)
    (run_dir / "pids").mkdir()
    mark = f"soak.{scenario.seed}.p0"
    monkeypatch.setenv(MARK_VAR, mark)
    wf = build_workflow(scenario, run_dir)
    checker = Checker(scenario.seed)
    before = set(threading.enumerate())
    handle = sv.start(
        wf,
        store=db,
        run_id=f"soak-{scenario.seed}",
        max_parallel=scenario.max_parallel,
        on_failure=scenario.on_failure,
        kill_grace=scenario.kill_grace,
        seed=scenario.seed,
    )
    result = handle.wait(timeout=60.0 + 0.02 * len(scenario.steps))  # TimeoutError: a hang
    outcome = Outcome.from_result(result)
    check_outcome(checker, scenario, outcome, cancel_issued=False, order=wf.graph.order)
    check_effects(checker, outcome, read_effects(run_dir), phase="p0")
    check_sqlite_file(checker, db)
    with SQLiteStore(db, create=False) as store:
        check_store_agrees(checker, store.load(result.run_id), outcome, wf.graph.order)
    check_processes_gone(checker, mark, what="the run")
    check_threads(checker, before, set())
    return checker, result


@pytest.mark.slow
@pytest.mark.realtime
@pytest.mark.timeout(900 if FULL else 120)
def test_a_run_of_thousands_of_mixed_steps_keeps_every_invariant(
    tmp_path: Path, chdir_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scenario = soak_scenario(
        steps=SOAK_STEPS, seed=1, process_steps=SOAK_PROCESS_STEPS, async_share=0.15
    )
    started = time.monotonic()
    checker, result = run_and_check(scenario, tmp_path / "run", tmp_path / "runs.db", monkeypatch)
    took = time.monotonic() - started
    assert checker.violations == [], "\n".join(map(str, checker.violations[:20]))
    statuses = result.statuses()
    counts = {s.value: sum(1 for v in statuses.values() if v is s) for s in sv.StepStatus}
    # The oracle checked each step; this is the sum: every step planned to fail for
    # good failed, unless a dependency failed first and it was skipped.
    failed_for_good = sum(
        p.fault == "raise" and p.failing == FOREVER and statuses[p.id] is not sv.StepStatus.SKIPPED
        for p in scenario.steps
    )
    assert counts["failed"] == failed_for_good > 0
    assert counts["succeeded"] > 0.8 * len(scenario.steps)
    assert sum(rec.attempt_count for rec in result.steps.values()) > counts["succeeded"]
    print(
        f"\nsoak: {len(scenario.steps)} steps ({SOAK_PROCESS_STEPS} process) in {took:.1f} s "
        f"({len(scenario.steps) / took:.0f} steps/s, checks included); {counts}; "
        f"{sum(checker.counts.values())} checks; db {os.path.getsize(tmp_path / 'runs.db')} bytes"
    )


@pytest.mark.slow
@pytest.mark.realtime
@pytest.mark.timeout(900 if FULL else 120)
def test_memory_does_not_grow_with_the_number_of_completed_runs(
    tmp_path: Path, chdir_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    warm_up = LOOP_RUNS // 5
    measured: dict[int, int] = {}
    db = tmp_path / "runs.db"
    tracemalloc.start()
    try:
        for n in range(1, LOOP_RUNS + 1):
            scenario = soak_scenario(
                steps=LOOP_STEPS, seed=1000 + n, process_steps=int(n % 5 == 0), async_share=0.2
            )
            run_dir = tmp_path / f"run-{n}"
            checker, _ = run_and_check(scenario, run_dir, db, monkeypatch)
            assert checker.violations == [], "\n".join(map(str, checker.violations[:20]))
            shutil.rmtree(run_dir)
            if n in (warm_up, LOOP_RUNS):
                gc.collect()
                measured[n] = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    growth = measured[LOOP_RUNS] - measured[warm_up]
    allowed = GROWTH_PER_RUN * (LOOP_RUNS - warm_up)
    print(
        f"\nmemory: {measured[warm_up] / 1e6:.2f} MB after run {warm_up}, "
        f"{measured[LOOP_RUNS] / 1e6:.2f} MB after run {LOOP_RUNS}: "
        f"growth {growth / 1e3:.0f} kB (allowed {allowed / 1e3:.0f} kB)"
    )
    assert growth < allowed
