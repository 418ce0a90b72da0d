"""Fault campaigns: random workflows, random faults, every invariant checked after every run.

Unit tests check one promise of the engine against one fault picked by hand.  A
campaign checks all the promises at once, against faults and timings nobody
picked, and prints the seed of any run that breaks one, so that run can be
replayed alone::

    python -m tests.chaos --runs 1000 --seed 7      # make chaos
    python -m tests.chaos --replay 123456789 -v     # one run, by its seed

How one run goes::

    run seed ─▶ generate(): Scenario (a DAG of 3-25 steps; thread, async and      pure
                process steps; a fault per step, maybe; settings; a cancel,
                a driver kill, a store fault or an ownership race, maybe;
                map groups, maybe: mapped steps over fixed items or a
                splitter's list, chains of maps, a step needing a whole
                list, faults on some instances)
             ─▶ build_workflow(): sv.Workflow of chaos_step / chaos_step_async      pure
             ─▶ execute, in one of two ways, while a monitor loop on this thread
                SIGKILLs process steps that asked for it (pid files) and
                cancels the run on time:
                  in-process  memory or SQLite store
                  driver      a program running the workflow on SQLite is
                              SIGKILLed mid-run, then the run is resumed here
                              (at once, or with a clock that makes it stale),
                              in another program, or in another program that is
                              killed too before a last resume here
                  race        as driver, then two programs resume the run at
                              the same moment (a barrier over their pipes)
                  store fault a store fault strikes the run here as an attempt
                              begins (full disk, lock, file deleted/replaced),
                              or after a driver kill (read-only, torn WAL);
                              fixed, then resumed here at once
             ─▶ observe: the RunResult (or the stored run), the side-effect files,
                live processes and threads, the SQLite file
             ─▶ check: each invariant counted; a failure is a Violation naming
                the run seed

The campaign is test tooling, not part of the library: it lives with the tests,
run from the repository root (``make chaos`` does).  Its modules, in the order a
run uses them: ``scenario`` (generate, build_workflow), ``steps`` (the step
functions), ``runner`` (execute and observe), ``observe`` (what a run left),
``oracle`` (the checks), ``map_plans``, ``expect`` and ``map_checks`` (mapped
steps: their plan, what they must end with, their invariants), ``store_runs``
and ``oracle_store`` (store faults and racing resumes, and their checks),
``programs`` (the driver and racer programs), ``campaign`` (one run, many runs,
the command line).

The step functions are module-level functions of ``tests.chaos.steps``, so process
steps and resumed runs in other programs import them; each step learns what to do
from ``ctx.params`` and writes a line when it begins and ends an attempt into a
per-run directory, outside the program, so that "ran exactly once" is observed
rather than assumed.  Artifacts are a digest of the step id and its inputs, so
a faulty run that ends well must produce exactly the artifacts of a fault-free
run of the same workflow.

What is checked (``INVARIANTS``):

* ``terminal``: every step has exactly one terminal status;
* ``run-status``: succeeded iff every step succeeded, cancelled only if a
  cancel was injected, failed otherwise;
* ``oracle``: each step ends as its fault says it must (e.g. a step failing
  twice with ``max_attempts=3`` succeeds on attempt 3; a dependent of a failed
  step is skipped under ``on_failure="continue"``), with that many attempts;
* ``attempts``: attempt records are numbered 1..n and only the last may succeed;
* ``effects``: no attempt ran twice, none ran unrecorded, a succeeded step's
  last attempt really ran;
* ``no-rerun``: no step stored as succeeded before a kill ran again on resume;
* ``artifacts``: a run where every step succeeded has the fault-free artifacts;
* ``store``: the store holds what the result says; an SQLite file passes
  ``PRAGMA integrity_check`` and opens as a store;
* ``processes`` / ``threads``: nothing of the run is left running (abandoned
  daemon threads excepted, and counted);
* ``bound``: the run ended within a bound derived from its timeouts;
* ``store-fault``: a store fault stops the run with a ``StoreFaultError``
  naming the file and the fault (a brief lock is waited out), the store then
  passes ``tests.store_faults.check_store`` (integrity, one status row per
  step) and keeps every transition committed before the fault (a torn WAL:
  loses only whole transactions at its end); a read-only store refuses the
  resume and changes not a byte;
* ``one-owner``: a run whose owner was SIGKILLed reads ``interrupted`` at once,
  and a resume with a huge ``stale_after`` gets through; of two racing
  resumes exactly one owns the run, and the other's ``RunOwnedError`` and the
  store both name it;
* ``race``: across two racing resumes no step runs twice (the loser runs none);
* ``instances`` (mapped steps, :mod:`tests.chaos.map_checks`): no instance is
  lost or duplicated: a mapped step that expanded over N items has exactly one
  record for each of ``step[0]`` … ``step[N-1]``, each terminal, listed right
  after its step in index order; one that never expanded has none;
* ``map-summary``: a mapped step's status sums its instances' up (succeeded if
  and only if all did) and its note counts them;
* ``map-list``: a succeeded mapped step's list equals an uninterrupted
  fault-free run's (each value a pure function of its item).

Instances are units like steps for ``oracle``, ``attempts``, ``effects`` and
``no-rerun``: each has its own side-effect log (``effects/step[i].log``), so an
instance stored as succeeded that runs again after a driver kill is caught.

Not covered yet (the features are not built): no shared-memory segment left
behind after child and parent kills; an engine stays usable after any fault.
"""

from __future__ import annotations

from tests.chaos.campaign import (
    CampaignSummary,
    main,
    mount_problem,
    run_campaign,
    run_one,
    run_seeds,
)
from tests.chaos.expect import expected_outcome
from tests.chaos.map_checks import check_map_lists, check_maps
from tests.chaos.observe import (
    Effect,
    Outcome,
    marked_processes,
    read_effects,
)
from tests.chaos.oracle import (
    INVARIANTS,
    Checker,
    Violation,
    check_artifacts,
    check_effects,
    check_no_rerun,
    check_outcome,
    check_processes_gone,
    check_sqlite_file,
    check_store_agrees,
    check_threads,
)
from tests.chaos.oracle_store import (
    check_committed_kept,
    check_fault_error,
    check_race_effects,
    check_torn_store,
)
from tests.chaos.runner import RunReport
from tests.chaos.scenario import (
    FAULTS,
    FAULTS_PROCESS,
    FOREVER,
    OWNER_DRIVERS,
    STORE_FAULTS,
    STORE_FAULTS_AFTER_KILL,
    STORE_FAULTS_IN_RUN,
    STORE_FAULTS_MOUNTED,
    Scenario,
    StepPlan,
    build_workflow,
    generate,
    run_bound,
)
from tests.chaos.steps import (
    MARK_VAR,
    chaos_step,
    chaos_step_async,
)

__all__ = [
    "FAULTS",
    "FAULTS_PROCESS",
    "FOREVER",
    "INVARIANTS",
    "MARK_VAR",
    "OWNER_DRIVERS",
    "STORE_FAULTS",
    "STORE_FAULTS_AFTER_KILL",
    "STORE_FAULTS_IN_RUN",
    "STORE_FAULTS_MOUNTED",
    "CampaignSummary",
    "Checker",
    "Effect",
    "Outcome",
    "RunReport",
    "Scenario",
    "StepPlan",
    "Violation",
    "build_workflow",
    "chaos_step",
    "chaos_step_async",
    "check_artifacts",
    "check_committed_kept",
    "check_effects",
    "check_fault_error",
    "check_map_lists",
    "check_maps",
    "check_no_rerun",
    "check_outcome",
    "check_processes_gone",
    "check_race_effects",
    "check_sqlite_file",
    "check_store_agrees",
    "check_threads",
    "check_torn_store",
    "expected_outcome",
    "generate",
    "main",
    "marked_processes",
    "mount_problem",
    "read_effects",
    "run_bound",
    "run_campaign",
    "run_one",
    "run_seeds",
]
