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
import secrets
import shutil
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
from stepvisor.errors import RunNotFoundError, StoreError
from stepvisor.store.sqlite import SQLiteStore
from tests.chaos.observe import Outcome, abandoned_threads, carries_mark, read_effects, start_counts
from tests.chaos.oracle import (
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
from tests.chaos.scenario import Scenario, build_workflow, generate, overrides, run_bound
from tests.chaos.steps import MARK_VAR

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
class _Context:
    """What the execution functions share for one run."""

    scenario: Scenario
    run_dir: Path
    token: str
    checker: Checker
    report: RunReport
    wf: Any
    order: tuple[str, ...]

    def mark(self, phase: str) -> str:
        return f"{self.token}.{self.scenario.seed}.{phase}"

    @property
    def db(self) -> Path:
        return self.run_dir / "runs.db"


def _set_mark(mark: str) -> None:
    os.environ[MARK_VAR] = mark


def _reference_artifacts(scenario: Scenario) -> dict[str, Any]:
    result = sv.run(
        build_workflow(scenario, None, reference=True),
        **{**overrides(scenario), "on_failure": "fail_fast"},
    )
    if str(result.status) != "succeeded":
        raise RuntimeError(f"the fault-free run of seed {scenario.seed} {result.status}")
    return dict(result.artifacts)


def _watch(
    ctx: _Context,
    done: Callable[[], bool],
    *,
    bound: float,
    cancel: Callable[[], bool] | None = None,
    cancel_at: float | None = None,
) -> tuple[bool, bool]:
    """Poll until ``done()`` or ``bound`` seconds; returns (finished, cancel issued)."""
    monitor = _Monitor(ctx.run_dir, ctx.mark(""), ctx.report.faults)
    start = time.monotonic()
    issued = False
    while not done():
        elapsed = time.monotonic() - start
        if elapsed > bound:
            return False, issued
        monitor.kill_requested()
        if cancel is not None and cancel_at is not None and not issued and elapsed >= cancel_at:
            issued = cancel()
        time.sleep(_POLL)
    return True, issued


def _run_in_process(ctx: _Context) -> Outcome | None:
    """Run the scenario here on a memory or SQLite store, cancelling it if planned."""
    scenario = ctx.scenario
    store: Any = sv.MemoryStore() if scenario.store == "memory" else str(ctx.db)
    threads_before = set(threading.enumerate())
    _set_mark(ctx.mark("p0"))
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
    _, issued = _watch(ctx, handle.done, bound=bound, cancel=cancel, cancel_at=scenario.cancel_at)
    result = _wait(ctx, handle, bound)
    if result is None:
        return None
    outcome = Outcome.from_result(result)
    check_outcome(ctx.checker, scenario, outcome, cancel_issued=issued, order=ctx.order)
    check_effects(ctx.checker, outcome, read_effects(ctx.run_dir), phase="p0")
    if isinstance(store, sv.MemoryStore):
        check_store_agrees(ctx.checker, store.load(scenario.run_id), outcome, ctx.order)
    else:
        _check_stored_run(ctx, outcome)
    check_processes_gone(ctx.checker, ctx.mark("p0"), what="the run")
    excepted = check_threads(ctx.checker, threads_before, abandoned_threads(outcome))
    ctx.report.abandoned += len(excepted)
    return outcome


def _wait(ctx: _Context, handle: Any, bound: float) -> Any:
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


def _check_stored_run(ctx: _Context, outcome: Outcome) -> None:
    check_sqlite_file(ctx.checker, ctx.db)
    with SQLiteStore(ctx.db, create=False) as store:
        check_store_agrees(ctx.checker, store.load(ctx.scenario.run_id), outcome, ctx.order)


# -- the driver scenario: SIGKILL the program running the workflow, then resume ----------------


class _Ahead:
    """A wall clock a minute ahead, so a killed run's last heartbeat reads as stale."""

    def wall(self) -> float:
        return time.time() + 60.0

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def call_later(self, delay: float, callback: Callable[[], None]) -> Any:
        raise NotImplementedError("only the store reads this clock")


def _spawn_driver(ctx: _Context, phase: str, *, resume: bool) -> subprocess.Popen[bytes]:
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
    log = open(ctx.run_dir / f"driver-{phase}.log", "wb")  # noqa: SIM115 - closed below
    try:
        return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()


def _driver_log(ctx: _Context, phase: str) -> str:
    try:
        text = (ctx.run_dir / f"driver-{phase}.log").read_text(errors="replace")
    except OSError:
        return ""
    return text.strip().splitlines()[-1] if text.strip() else ""


def _kill_driver_midway(ctx: _Context, phase: str, *, resume: bool, kill_after: int) -> None:
    """Start a driver program, SIGKILL it once ``kill_after`` attempts began, check the wreck."""
    scenario = ctx.scenario
    proc = _spawn_driver(ctx, phase, resume=resume)
    bound = run_bound(scenario) + 10.0
    effects_dir = ctx.run_dir / "effects"

    def progressed() -> bool:
        if proc.poll() is not None:
            return True
        begun = sum(p.read_bytes().count(b"start") for p in effects_dir.glob("*.log"))
        return begun >= kill_after

    finished, _ = _watch(ctx, progressed, bound=bound)
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
            "store", f"driver {phase} exited {proc.returncode}: {_driver_log(ctx, phase)}"
        )
    check_processes_gone(ctx.checker, ctx.mark(phase), what=f"the killed driver {phase}")
    check_sqlite_file(ctx.checker, ctx.db)


def _stored_successes(ctx: _Context) -> set[str]:
    """Steps the store holds as succeeded now (none when the run was never begun)."""
    if not ctx.db.exists():
        return set()
    with SQLiteStore(ctx.db, create=False, clock=_Ahead()) as store:
        try:
            stored = store.load(ctx.scenario.run_id)
        except RunNotFoundError:
            return set()
    return {sid for sid, rec in stored.steps.items() if str(rec.status) == "succeeded"}


def _resume_here(ctx: _Context, phase: str) -> Outcome | None:
    scenario = ctx.scenario
    threads_before = set(threading.enumerate())
    _set_mark(ctx.mark(phase))
    store = SQLiteStore(ctx.db, clock=_Ahead())
    try:
        handle = _resume_or_start(store, ctx.wf, scenario, ctx.report.faults)
        bound = run_bound(scenario)
        _watch(ctx, handle.done, bound=bound)
        result = _wait(ctx, handle, bound)
    finally:
        store.close()
    if result is None:
        return None
    outcome = Outcome.from_result(result)
    _check_stored_run(ctx, outcome)
    check_processes_gone(ctx.checker, ctx.mark(phase), what="the resumed run")
    excepted = check_threads(ctx.checker, threads_before, abandoned_threads(outcome))
    ctx.report.abandoned += len(excepted)
    return outcome


def _resume_or_start(
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


def _resume_in_program(ctx: _Context, phase: str) -> Outcome | None:
    proc = _spawn_driver(ctx, phase, resume=True)
    bound = run_bound(ctx.scenario) + 10.0
    finished, _ = _watch(ctx, lambda: proc.poll() is not None, bound=bound)
    if not finished:
        ctx.checker.fail("bound", f"the resuming program did not end within {bound:g} s")
        proc.kill()
    proc.wait()
    if proc.returncode != 0:
        ctx.checker.fail(
            "store", f"the resuming program exited {proc.returncode}: {_driver_log(ctx, phase)}"
        )
        return None
    check_sqlite_file(ctx.checker, ctx.db)
    with SQLiteStore(ctx.db, create=False) as store:
        stored = store.load(ctx.scenario.run_id)
    check_processes_gone(ctx.checker, ctx.mark(phase), what="the resuming program")
    return Outcome.from_stored(stored, ctx.order)


def _run_with_driver(ctx: _Context) -> Outcome | None:
    """Kill a driver program mid-run (maybe twice), then resume; check nothing ran again."""
    scenario = ctx.scenario
    ctx.report.faults[f"driver:{scenario.driver}"] += 1
    _kill_driver_midway(ctx, "p0", resume=False, kill_after=scenario.kill_after)
    phase = "p1"
    if scenario.driver == "kill-twice":
        done_before = _stored_successes(ctx)
        counts_before = start_counts(read_effects(ctx.run_dir))
        again = random.Random(scenario.seed + 1).randint(0, len(scenario.steps))
        _kill_driver_midway(ctx, "p1", resume=True, kill_after=sum(counts_before.values()) + again)
        check_no_rerun(
            ctx.checker,
            succeeded_before=done_before,
            counts_before=counts_before,
            counts_after=start_counts(read_effects(ctx.run_dir)),
            what="the second kill",
        )
        phase = "p2"
    done_before = _stored_successes(ctx)
    counts_before = start_counts(read_effects(ctx.run_dir))
    if scenario.driver == "resume-program":
        outcome = _resume_in_program(ctx, phase)
    else:
        outcome = _resume_here(ctx, phase)
    if outcome is None:
        return None
    check_no_rerun(
        ctx.checker,
        succeeded_before=done_before,
        counts_before=counts_before,
        counts_after=start_counts(read_effects(ctx.run_dir)),
        what="the resume",
    )
    check_outcome(ctx.checker, scenario, outcome, cancel_issued=False, order=ctx.order)
    check_effects(ctx.checker, outcome, read_effects(ctx.run_dir), phase=phase)
    return outcome


def drive(seed: int, run_dir: Path, *, resume: bool) -> int:
    """The driver program: run (or resume) the scenario of ``seed`` on ``run_dir/runs.db``."""
    scenario = generate(seed)
    wf = build_workflow(scenario, run_dir)
    db = run_dir / "runs.db"
    if not resume:
        sv.run(wf, store=str(db), run_id=scenario.run_id, **overrides(scenario))
        return 0
    with SQLiteStore(db, clock=_Ahead()) as store:
        _resume_or_start(store, wf, scenario, Counter()).wait()
    return 0


# -- one run, a campaign ------------------------------------------------------------------------


def _count_faults(scenario: Scenario, faults: Counter[str]) -> None:
    for plan in scenario.steps:
        faults[plan.fault] += 1
        faults[f"executor:{plan.executor}"] += 1


def run_one(seed: int, workdir: Path, *, token: str | None = None) -> RunReport:
    """Generate, execute and check the run of ``seed`` in a fresh directory under ``workdir``."""
    scenario = generate(seed)
    report = RunReport(seed, scenario)
    checker = Checker(seed)
    run_dir = workdir / f"run-{seed}"
    (run_dir / "effects").mkdir(parents=True)
    (run_dir / "pids").mkdir()
    wf = build_workflow(scenario, run_dir)
    ctx = _Context(
        scenario, run_dir, token or secrets.token_hex(4), checker, report, wf, wf.graph.order
    )
    _count_faults(scenario, report.faults)
    started = time.monotonic()
    previous_mark = os.environ.get(MARK_VAR)
    try:
        execute = _run_in_process if scenario.driver == "none" else _run_with_driver
        outcome = execute(ctx)
        if outcome is not None:
            report.status = outcome.status
            if outcome.status == "succeeded":
                check_artifacts(checker, outcome, _reference_artifacts(scenario))
    finally:
        if previous_mark is None:
            os.environ.pop(MARK_VAR, None)
        else:
            os.environ[MARK_VAR] = previous_mark
        report.seconds = time.monotonic() - started
        report.checks = checker.counts
        report.violations = checker.violations
        shutil.rmtree(run_dir, ignore_errors=True)
    return report
