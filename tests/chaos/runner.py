"""Executing one run: in this program, or in a driver program that is SIGKILLed midway.

While a run goes, a monitor loop on this thread SIGKILLs process steps that
asked for it (pid files) and cancels the run on time.  A driver scenario runs
the workflow in another program (``python -m tests.chaos --drive SEED``), kills
it, then resumes here, in another program, or in one killed too before a last
resume here.  Every phase is checked with :mod:`tests.chaos.oracle`.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import stepvisor as sv
from stepvisor.core.model import Workflow
from stepvisor.core.state import RunStatus
from stepvisor.errors import RunNotFoundError, RunOwnedError, StoreError
from stepvisor.store.sqlite import SQLiteStore
from tests.chaos.expect import bad_list, mapped_ids
from tests.chaos.logs import check_logs
from tests.chaos.observe import Outcome, abandoned_threads, carries_mark, read_effects, start_counts
from tests.chaos.oracle import (
    Checker,
    Violation,
    check_effects,
    check_no_rerun,
    check_outcome,
    check_processes_gone,
    check_sqlite_file,
    check_store_agrees,
    check_threads,
)
from tests.chaos.scenario import (
    BAD_LIST,
    CRASHES,
    LOG_LIMIT,
    NEVER_STALE,
    STORE_FAULTS_MOUNTED,
    Scenario,
    build_workflow,
    chain_source,
    chatter_lines,
    map_size,
    overrides,
    run_bound,
)
from tests.chaos.steps import MARK_VAR
from tests.resumption import MinuteAhead

#: How often the monitor loop looks at pid files, the clock and the driver.
_POLL: Final = 0.005
#: The repository root: the driver program imports ``tests.chaos`` from there.
_REPO_ROOT: Final = str(Path(__file__).resolve().parents[2])
#: The directory holding the ``stepvisor`` package this program runs.
_PKG_ROOT: Final = str(Path(sv.__file__).resolve().parent.parent)


# -- executing a run --------------------------------------------------------------------------


@dataclass(slots=True)
class RunReport:
    """What one run did and what its checks found."""

    seed: int
    scenario: Scenario
    faults: Counter[str] = field(default_factory=Counter)
    checks: Counter[str] = field(default_factory=Counter)
    violations: list[Violation] = field(default_factory=list)
    abandoned: int = 0
    status: str = "?"
    seconds: float = 0.0
    #: Fault kind -> why it was not injected in this run (e.g. no tmpfs can be mounted).
    not_run: dict[str, str] = field(default_factory=dict)

    def line(self) -> str:
        s = self.scenario
        kinds = ",".join(sorted(k for k in self.faults if k != "ok")) or "-"
        return (
            f"seed {self.seed}: {len(s.steps)} steps, {s.store}, {s.on_failure}, "
            f"driver={s.driver} -> {self.status} in {self.seconds:.2f} s; faults {kinds}; "
            f"{sum(self.checks.values())} checks, {len(self.violations)} violations"
        )


class _Monitor:
    """The campaign's hands during a run: kills pid-file steps, cancels on time."""

    def __init__(self, run_dir: Path, mark_prefix: str, faults: Counter[str]) -> None:
        self.pids = run_dir / "pids"
        self.mark_prefix = mark_prefix
        self.faults = faults
        self.done: set[str] = set()

    def kill_requested(self) -> None:
        try:
            names = os.listdir(self.pids)
        except OSError:
            return
        for name in names:
            if not name.endswith(".pid") or name in self.done:
                continue
            self.done.add(name)
            try:
                pid = int((self.pids / name).read_text(encoding="ascii"))
            except (OSError, ValueError):
                continue
            if carries_mark(pid, self.mark_prefix):  # never a recycled pid
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    self.faults["outside_kill:done"] += 1


class _StoreCanceller:
    """Asks for a cancel through a second connection to the store, as `stepvisor cancel` does."""

    def __init__(self, db: Path, run_id: str) -> None:
        self.db = db
        self.run_id = run_id

    def try_cancel(self) -> bool:
        if not self.db.exists():
            return False

        try:
            with SQLiteStore(self.db, create=False) as store:
                store.request_cancel(self.run_id)
        except (RunNotFoundError, StoreError):
            return False  # not begun yet (or busy): try again at the next poll
        return True


@dataclass(slots=True)
class RunContext:
    """What the execution functions share for one run."""

    scenario: Scenario
    run_dir: Path
    token: str
    checker: Checker
    report: RunReport
    wf: Any
    order: tuple[str, ...]
    db: Path

    def mark(self, phase: str) -> str:
        return f"{self.token}.{self.scenario.seed}.{phase}"


def db_path(run_dir: Path, scenario: Scenario) -> Path:
    """Where a run's SQLite store lives: on the run's small tmpfs when its fault needs one.

    A function of the *generated* scenario, so the programs a run starts find it too.
    """
    if scenario.store_fault in STORE_FAULTS_MOUNTED:
        return run_dir / "disk" / "runs.db"
    return run_dir / "runs.db"


def set_mark(mark: str) -> None:
    os.environ[MARK_VAR] = mark


def reference_artifacts(scenario: Scenario) -> dict[str, Any]:
    """The artifacts of the scenario's fault-free twin, run here without interruption.

    A map over a value that is no list fails there too (it is the splitter's
    doing, not a fault): the twin then goes on past it, so every other step
    still has its artifacts to compare with.
    """
    bad = any(bad_list(scenario, p) for p in scenario.steps)
    result = sv.run(
        build_workflow(scenario, None, reference=True),
        **{**overrides(scenario), "on_failure": "continue" if bad else "fail_fast"},
    )
    if str(result.status) != "succeeded" and not bad:
        raise RuntimeError(f"the fault-free run of seed {scenario.seed} {result.status}")
    return dict(result.artifacts)


def watch(
    ctx: RunContext,
    done: Callable[[], bool],
    *,
    bound: float,
    cancel: Callable[[], bool] | None = None,
    cancel_at: float | None = None,
    hook: Callable[[], None] | None = None,
) -> tuple[bool, bool]:
    """Poll until ``done()`` or ``bound`` seconds; returns (finished, cancel issued).

    ``hook`` is called at every poll too (the store-fault injector).
    """
    monitor = _Monitor(ctx.run_dir, ctx.mark(""), ctx.report.faults)
    start = time.monotonic()
    issued = False
    while not done():
        elapsed = time.monotonic() - start
        if elapsed > bound:
            return False, issued
        monitor.kill_requested()
        if hook is not None:
            hook()
        if cancel is not None and cancel_at is not None and not issued and elapsed >= cancel_at:
            issued = cancel()
        time.sleep(_POLL)
    return True, issued


def run_in_process(ctx: RunContext) -> Outcome | None:
    """Run the scenario here on a memory or SQLite store, cancelling it if planned."""
    scenario = ctx.scenario
    store: Any = sv.MemoryStore() if scenario.store == "memory" else str(ctx.db)
    threads_before = set(threading.enumerate())
    set_mark(ctx.mark("p0"))
    handle = sv.start(ctx.wf, store=store, run_id=scenario.run_id, **overrides(scenario))
    cancel: Callable[[], bool] | None = None
    if scenario.cancel_at is not None:
        if scenario.cancel_via == "store":
            cancel = _StoreCanceller(ctx.db, scenario.run_id).try_cancel
            ctx.report.faults["cancel:store"] += 1
        else:

            def cancel() -> bool:
                handle.cancel()
                return True

            ctx.report.faults["cancel:handle"] += 1
    bound = run_bound(scenario)
    _, issued = watch(ctx, handle.done, bound=bound, cancel=cancel, cancel_at=scenario.cancel_at)
    result = wait_result(ctx, handle, bound)
    if result is None:
        return None
    outcome = Outcome.from_result(result)
    check_outcome(ctx.checker, scenario, outcome, cancel_issued=issued, order=ctx.order)
    check_effects(
        ctx.checker, outcome, read_effects(ctx.run_dir), phase="p0", mapped=mapped_ids(scenario)
    )
    if isinstance(store, sv.MemoryStore):
        check_store_agrees(ctx.checker, store.load(scenario.run_id), outcome, ctx.order)
    else:
        check_stored_run(ctx, outcome)
    check_run_logs(ctx, result, store)
    check_processes_gone(ctx.checker, ctx.mark("p0"), what="the run")
    excepted = check_threads(ctx.checker, threads_before, abandoned_threads(outcome))
    ctx.report.abandoned += len(excepted)
    return outcome


def check_run_logs(ctx: RunContext, result: Any, store: Any) -> None:
    """Every attempt's log is its own, whole or cut (``tests.chaos.logs``), here and stored."""
    scenario = ctx.scenario
    stored: dict[tuple[str, int], str | None] | None = None
    if scenario.store_fault == "none":  # a faulted store may not hold (or show) them
        with contextlib.ExitStack() as stack:
            kept: sv.MemoryStore | SQLiteStore = (
                store
                if isinstance(store, sv.MemoryStore)
                else stack.enter_context(SQLiteStore(ctx.db, create=False))
            )
            stored = {
                (e.step_id, e.attempt): kept.load_log(scenario.run_id, e.step_id, e.attempt)
                for e in kept.list_logs(scenario.run_id)
            }
    chatter = {plan.id: chatter_lines(plan.id) for plan in scenario.steps}
    check_logs(ctx.checker, result.captured, result.steps, chatter, LOG_LIMIT, stored)


def wait_result(ctx: RunContext, handle: Any, bound: float) -> Any:
    """``handle.wait`` within what is left of the bound; a TimeoutError is a violation."""
    try:
        return handle.wait(timeout=max(1.0, bound * 0.1))
    except TimeoutError:
        ctx.checker.fail("bound", f"the run did not end within {bound:g} s (its bound)")
    handle.cancel()
    try:
        handle.wait(timeout=bound)
    except TimeoutError:
        ctx.checker.fail("bound", "the run did not end even after a cancel")
    return None


def check_stored_run(ctx: RunContext, outcome: Outcome) -> None:
    check_sqlite_file(ctx.checker, ctx.db)
    with SQLiteStore(ctx.db, create=False) as store:
        check_store_agrees(ctx.checker, store.load(ctx.scenario.run_id), outcome, ctx.order)


# -- the driver scenario: SIGKILL the program running the workflow, then resume ----------------


def spawn_driver(
    ctx: RunContext, phase: str, *, resume: bool, race: bool = False
) -> subprocess.Popen[bytes]:
    """A driver program for ``phase``: runs the workflow, resumes it, or races to resume it.

    A racer talks to this program over its stdin and stdout (see
    :mod:`tests.chaos.programs`); the others write to a log file.
    """
    env = dict(os.environ)
    env[MARK_VAR] = ctx.mark(phase)
    # The driver must import this stepvisor and this tests.chaos, whatever its directory.
    path = [_PKG_ROOT, _REPO_ROOT, env.get("PYTHONPATH")]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, path))
    argv = [
        sys.executable,
        "-m",
        "tests.chaos",
        "--drive",
        str(ctx.scenario.seed),
        "--drive-dir",
        str(ctx.run_dir),
    ]
    if resume:
        argv.append("--drive-resume")
    if race:
        argv.append("--drive-race")
    log = open(ctx.run_dir / f"driver-{phase}.log", "wb")  # noqa: SIM115 - closed below
    try:
        if race:
            pipe = subprocess.PIPE
            return subprocess.Popen(argv, env=env, stdin=pipe, stdout=pipe, stderr=log)
        return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()


def driver_log(ctx: RunContext, phase: str) -> str:
    try:
        text = (ctx.run_dir / f"driver-{phase}.log").read_text(errors="replace")
    except OSError:
        return ""
    return text.strip().splitlines()[-1] if text.strip() else ""


def kill_driver_midway(
    ctx: RunContext, phase: str, *, resume: bool, kill_after: int, inspect: bool = True
) -> None:
    """Start a driver program, SIGKILL it once ``kill_after`` attempts began, check the wreck.

    ``inspect=False`` leaves the store unopened (the caller checks it later):
    the last connection to close folds the WAL into the file, and a torn-WAL
    run must tear the WAL the killed program left.
    """
    scenario = ctx.scenario
    proc = spawn_driver(ctx, phase, resume=resume)
    bound = run_bound(scenario) + 10.0
    effects_dir = ctx.run_dir / "effects"

    def progressed() -> bool:
        if proc.poll() is not None:
            return True
        begun = sum(p.read_bytes().count(b"start") for p in effects_dir.glob("*.log"))
        return begun >= kill_after

    finished, _ = watch(ctx, progressed, bound=bound)
    if not finished:
        ctx.checker.fail("bound", f"driver {phase} made no progress in {bound:g} s")
    time.sleep(scenario.kill_delay)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        ctx.report.faults["driver_sigkill"] += 1
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        ctx.checker.fail("processes", f"driver {phase} did not die of SIGKILL within 30 s")
        return
    if proc.returncode not in (0, -signal.SIGKILL):
        ctx.checker.fail(
            "store", f"driver {phase} exited {proc.returncode}: {driver_log(ctx, phase)}"
        )
    check_processes_gone(ctx.checker, ctx.mark(phase), what=f"the killed driver {phase}")
    if inspect:
        check_sqlite_file(ctx.checker, ctx.db)
        check_dead_owner_seen(ctx)


def check_dead_owner_seen(ctx: RunContext) -> None:
    """A run whose owner was killed reads ``interrupted`` at once, however fresh its heartbeat."""
    if not ctx.db.exists():
        return
    with SQLiteStore(ctx.db, create=False, stale_after=NEVER_STALE) as store:
        try:
            info = store.load(ctx.scenario.run_id).info
        except RunNotFoundError:
            return
    ctx.checker.check(
        "one-owner",
        info.status is not RunStatus.RUNNING,
        lambda: f"the run's owner was killed, but the store still reads it running ({info.owner})",
    )


def stored_successes(ctx: RunContext) -> set[str]:
    """Steps the store holds as succeeded now (none when the run was never begun)."""
    if not ctx.db.exists():
        return set()
    with SQLiteStore(ctx.db, create=False, clock=MinuteAhead()) as store:
        try:
            stored = store.load(ctx.scenario.run_id)
        except RunNotFoundError:
            return set()
    return {sid for sid, rec in stored.steps.items() if str(rec.status) == "succeeded"}


def resume_here(ctx: RunContext, phase: str, *, immediate: bool = False) -> Outcome | None:
    """Resume the run in this program; ``immediate``: with the real clock and a huge
    ``stale_after``, so only the detection of a dead owner can let the resume through."""
    scenario = ctx.scenario
    threads_before = set(threading.enumerate())
    set_mark(ctx.mark(phase))
    if immediate:
        store = SQLiteStore(ctx.db, stale_after=NEVER_STALE)
    else:
        store = SQLiteStore(ctx.db, clock=MinuteAhead())
    try:
        try:
            handle = resume_or_start(store, ctx.wf, scenario, ctx.report.faults)
        except RunOwnedError as exc:
            ctx.checker.fail("one-owner", f"the resume was refused: {exc}")
            return None
        if immediate:
            check_owner_is_me(ctx, store)
        bound = run_bound(scenario)
        watch(ctx, handle.done, bound=bound)
        result = wait_result(ctx, handle, bound)
    finally:
        store.close()
    if result is None:
        return None
    outcome = Outcome.from_result(result)
    check_stored_run(ctx, outcome)
    check_processes_gone(ctx.checker, ctx.mark(phase), what="the resumed run")
    excepted = check_threads(ctx.checker, threads_before, abandoned_threads(outcome))
    ctx.report.abandoned += len(excepted)
    return outcome


def check_owner_is_me(ctx: RunContext, store: SQLiteStore) -> None:
    """Once a resume is under way, the store names this program as the run's one owner."""
    owner = store.load(ctx.scenario.run_id).info.owner
    ctx.checker.check(
        "one-owner",
        owner is not None and owner.pid == os.getpid(),
        lambda: f"this program resumed the run, but the store names {owner} as its owner",
    )


def resume_or_start(
    store: SQLiteStore, wf: Workflow, scenario: Scenario, faults: Counter[str]
) -> sv.RunHandle:
    """Resume the run, or start it afresh if the kill came before it was stored."""
    run_id = scenario.run_id
    settings = overrides(scenario)
    try:
        store.load(run_id)
    except RunNotFoundError:
        faults["driver_killed_before_begin"] += 1
        return sv.start(wf, store=store, run_id=run_id, **settings)
    return sv.resume_start(run_id, wf, store=store, **settings)


def resume_in_program(ctx: RunContext, phase: str) -> Outcome | None:
    proc = spawn_driver(ctx, phase, resume=True)
    bound = run_bound(ctx.scenario) + 10.0
    finished, _ = watch(ctx, lambda: proc.poll() is not None, bound=bound)
    if not finished:
        ctx.checker.fail("bound", f"the resuming program did not end within {bound:g} s")
        proc.kill()
    proc.wait()
    if proc.returncode != 0:
        ctx.checker.fail(
            "store", f"the resuming program exited {proc.returncode}: {driver_log(ctx, phase)}"
        )
        return None
    check_sqlite_file(ctx.checker, ctx.db)
    with SQLiteStore(ctx.db, create=False) as store:
        stored = store.load(ctx.scenario.run_id)
    check_processes_gone(ctx.checker, ctx.mark(phase), what="the resuming program")
    return Outcome.from_stored(stored, ctx.order)


def run_with_driver(ctx: RunContext) -> Outcome | None:
    """Kill a driver program mid-run (maybe twice), then resume; check nothing ran again."""
    scenario = ctx.scenario
    ctx.report.faults[f"driver:{scenario.driver}"] += 1
    kill_driver_midway(ctx, "p0", resume=False, kill_after=scenario.kill_after)
    note_mid_map(ctx)
    phase = "p1"
    if scenario.driver == "kill-twice":
        done_before = stored_successes(ctx)
        counts_before = start_counts(read_effects(ctx.run_dir))
        again = random.Random(scenario.seed + 1).randint(0, len(scenario.steps))
        kill_driver_midway(ctx, "p1", resume=True, kill_after=sum(counts_before.values()) + again)
        note_mid_map(ctx)
        check_no_rerun(
            ctx.checker,
            succeeded_before=done_before,
            counts_before=counts_before,
            counts_after=start_counts(read_effects(ctx.run_dir)),
            what="the second kill",
        )
        phase = "p2"
    done_before = stored_successes(ctx)
    counts_before = start_counts(read_effects(ctx.run_dir))
    if scenario.driver == "resume-program":
        outcome = resume_in_program(ctx, phase)
    else:
        outcome = resume_here(ctx, phase, immediate=scenario.driver == "resume-now")
    return check_resumed(ctx, outcome, phase, done_before, counts_before)


def check_resumed(
    ctx: RunContext,
    outcome: Outcome | None,
    phase: str,
    done_before: set[str],
    counts_before: dict[str, int],
) -> Outcome | None:
    """The checks of a resumed run: nothing stored succeeded ran again, and the oracle."""
    if outcome is None:
        return None
    scenario = ctx.scenario
    check_no_rerun(
        ctx.checker,
        succeeded_before=done_before,
        counts_before=counts_before,
        counts_after=start_counts(read_effects(ctx.run_dir)),
        what="the resume",
    )
    check_outcome(ctx.checker, scenario, outcome, cancel_issued=False, order=ctx.order)
    check_effects(
        ctx.checker, outcome, read_effects(ctx.run_dir), phase=phase, mapped=mapped_ids(scenario)
    )
    return outcome


def count_faults(scenario: Scenario, faults: Counter[str]) -> None:
    for plan in scenario.steps:
        faults[plan.fault] += 1
        faults[f"executor:{plan.executor}"] += 1
        if plan.requires:
            faults["map:requires_list"] += 1
        if plan.emits == BAD_LIST:
            faults["map:not_a_list"] += 1
        if not plan.mapped:
            continue
        size = map_size(scenario, plan)
        faults["map:steps"] += 1
        faults[f"map:instances_{plan.executor}"] += size
        if plan.over == "list":
            faults["map:fixed"] += 1
        elif chain_source(scenario, plan) is not None:
            faults["map:chained"] += 1
        elif scenario.step(plan.over).mapped:
            faults["map:over_map_barrier"] += 1
        else:
            faults["map:over_artifact"] += 1
        if size <= 1:
            faults[f"map:length_{size}"] += 1
        struck = sum(i < size for i in plan.bad) if plan.fault != "ok" else 0
        faults["map:faulty_instances"] += struck
        if plan.fault in CRASHES:
            faults["map:crashing_instances"] += struck


def note_mid_map(ctx: RunContext) -> None:
    """Count a driver kill that left a mapped step running (some instances ended, some not)."""
    if not ctx.db.exists() or not any(p.mapped for p in ctx.scenario.steps):
        return
    with SQLiteStore(ctx.db, create=False, clock=MinuteAhead()) as store:
        try:
            stored = store.load(ctx.scenario.run_id)
        except RunNotFoundError:
            return
    if any(
        p.mapped and p.id in stored.steps and str(stored.steps[p.id].status) == "running"
        for p in ctx.scenario.steps
    ):
        ctx.report.faults["map:driver_killed_mid_map"] += 1
