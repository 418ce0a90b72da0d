"""Fault campaigns: random workflows, random faults, every invariant checked after every run.

Unit tests check one promise of the engine against one fault picked by hand.  A
campaign checks all the promises at once, against faults and timings nobody
picked, and prints the seed of any run that breaks one, so that run can be
replayed alone::

    python -m stepvisor.chaos --runs 1000 --seed 7      # make chaos
    python -m stepvisor.chaos --replay 123456789 -v     # one run, by its seed

How one run goes::

    run seed ─▶ generate(): Scenario (a DAG of 3-25 steps; thread, async and      pure
                process steps; a fault per step, maybe; settings; a cancel
                or a driver kill, maybe)
             ─▶ build_workflow(): sv.Workflow of chaos_step / chaos_step_async      pure
             ─▶ execute, in one of two ways, while a monitor loop on this thread
                SIGKILLs process steps that asked for it (pid files) and
                cancels the run on time:
                  in-process  memory or SQLite store
                  driver      a program running the workflow on SQLite is
                              SIGKILLed mid-run, then the run is resumed here,
                              in another program, or in another program that is
                              killed too before a last resume here
             ─▶ observe: the RunResult (or the stored run), the side-effect files,
                live processes and threads, the SQLite file
             ─▶ check: each invariant counted; a failure is a Violation naming
                the run seed

The step functions are module-level functions of this module, so process steps
and resumed runs in other programs import them; each step learns what to do
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
* ``bound``: the run ended within a bound derived from its timeouts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import stepvisor as sv
from stepvisor._procfs import processes_with_env
from stepvisor.actors.supervisor import NOT_RETRIED_STOPPING
from stepvisor.actors.worker import worker_thread_name
from stepvisor.context import StepContext
from stepvisor.core.model import Executor, Step, Workflow
from stepvisor.errors import FatalError, RetryableError, RunNotFoundError, StoreError
from stepvisor.policies.retry import Backoff, RetryPolicy
from stepvisor.store.sqlite import SQLiteStore

__all__ = [
    "FAULTS",
    "INVARIANTS",
    "CampaignSummary",
    "Checker",
    "Outcome",
    "Scenario",
    "StepPlan",
    "Violation",
    "build_workflow",
    "chaos_step",
    "chaos_step_async",
    "check_artifacts",
    "check_effects",
    "check_no_rerun",
    "check_outcome",
    "check_processes_gone",
    "check_sqlite_file",
    "check_store_agrees",
    "check_threads",
    "expected_outcome",
    "generate",
    "main",
    "marked_processes",
    "read_effects",
    "run_bound",
    "run_campaign",
    "run_one",
    "run_seeds",
]

# -- vocabulary -------------------------------------------------------------------------

#: Step faults, and where each can be injected.
FAULTS_ANY: Final = ("raise", "retryable", "fatal", "timeout")
FAULTS_THREAD: Final = ("ignore_cancel",)
FAULTS_PROCESS: Final = ("sigkill", "exit", "outside_kill", "orphan", "unpicklable")
FAULTS_SQLITE: Final = ("unstorable",)
FAULTS: Final = ("ok", *FAULTS_ANY, *FAULTS_THREAD, *FAULTS_PROCESS, *FAULTS_SQLITE)
_CRASHES: Final = frozenset({"sigkill", "exit", "outside_kill"})
#: How rarely each fault is drawn, relative to the others (ignore_cancel costs time).
_WEIGHTS: Final[Mapping[str, float]] = {"ignore_cancel": 0.3, "timeout": 0.8}

#: ``failing`` for a fault that happens on every attempt.
FOREVER: Final = 99
#: How long a step "hangs" at most: long past any timeout, short of forever.
HANG_SECONDS: Final = 60.0

INVARIANTS: Final = (
    "terminal",
    "run-status",
    "oracle",
    "attempts",
    "effects",
    "no-rerun",
    "artifacts",
    "store",
    "processes",
    "threads",
    "bound",
)

#: The environment variable that tags every process of a run (and its phase).
MARK_VAR: Final = "STEPVISOR_CHAOS_MARK"
#: Extra time the engine gives non-thread backends past kill_grace (supervisor).
_BACKEND_MARGIN: Final = 2.0
#: How long processes may take to vanish once their run (or program) is gone.
_PROCESS_GRACE: Final = 5.0
#: How often the monitor loop looks at pid files, the clock and the driver.
_POLL: Final = 0.005
_PKG_ROOT: Final = str(Path(__file__).resolve().parent.parent)

_STATUS_NAMES: Final = ("succeeded", "failed", "timed_out", "cancelled", "skipped")


# -- the plan of a run (pure) --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StepPlan:
    """One generated step: where it runs, what goes wrong, and how it is retried."""

    id: str
    needs: tuple[str, ...]
    executor: str  # thread | async | process
    fault: str  # one of FAULTS
    failing: int  # how many attempts misbehave (FOREVER: all)
    style: str  # how a hang hangs: sleep | busy | stubborn
    max_attempts: int
    backoff: str  # none | fixed | exponential
    timeout: float | None
    duration: float


@dataclass(frozen=True, slots=True)
class Scenario:
    """Everything one run will do, drawn from its seed."""

    seed: int
    steps: tuple[StepPlan, ...]
    max_parallel: int
    on_failure: str
    kill_grace: float
    max_worker_crashes: int
    step_timeout: float | None
    store: str  # memory | sqlite
    cancel_at: float | None  # seconds after start, or no cancel
    cancel_via: str  # handle | store
    driver: str  # none | resume-here | resume-program | kill-twice
    kill_after: int  # attempts begun before the driver is killed
    kill_delay: float

    @property
    def run_id(self) -> str:
        return f"chaos-{self.seed}"

    def step(self, step_id: str) -> StepPlan:
        for plan in self.steps:
            if plan.id == step_id:
                return plan
        raise KeyError(step_id)


def generate(seed: int) -> Scenario:
    """The scenario of the run with this seed (the same seed, the same scenario)."""
    rng = random.Random(seed)
    driver = "none"
    if rng.random() < 0.08:
        driver = rng.choices(["resume-here", "resume-program", "kill-twice"], [4, 3, 2])[0]
    store = "sqlite" if driver != "none" or rng.random() < 0.5 else "memory"
    cancel_at: float | None = None
    cancel_via = "handle"
    if driver == "none" and rng.random() < 0.15:
        cancel_at = round(rng.uniform(0.0, 0.3), 3)
        cancel_via = "store" if store == "sqlite" and rng.random() < 0.5 else "handle"
    kill_grace = rng.choice([0.1, 0.2, 0.5])
    steps = _generate_steps(rng, store=store, kill_grace=kill_grace)
    return Scenario(
        seed=seed,
        steps=steps,
        max_parallel=rng.choice([1, 2, 3, 4, 8]),
        on_failure=rng.choice(["fail_fast", "continue"]),
        kill_grace=kill_grace,
        max_worker_crashes=rng.randint(1, 4),
        step_timeout=rng.choice([None, None, 30.0]),
        store=store,
        cancel_at=cancel_at,
        cancel_via=cancel_via,
        driver=driver,
        kill_after=rng.randint(0, len(steps)),
        kill_delay=round(rng.uniform(0.0, 0.05), 3),
    )


def _generate_steps(rng: random.Random, *, store: str, kill_grace: float) -> tuple[StepPlan, ...]:
    n = rng.randint(3, 25)
    # Random letters ahead of the index make the canonical (id) order differ
    # from the order the steps were generated in.
    ids = [f"{rng.choice('abcdefgh')}{i:02d}" for i in range(n)]
    density = rng.choice([0.05, 0.15, 0.3])
    fault_rate = rng.choice([0.0, 0.0, 0.1, 0.2, 0.5])
    process_ids: set[int] = set()
    if rng.random() < 0.35:
        process_ids = set(rng.sample(range(n), k=min(n, rng.randint(1, 3))))
    steps: list[StepPlan] = []
    for i, sid in enumerate(ids):
        earlier = [ids[j] for j in range(i) if rng.random() < density]
        needs = tuple(rng.sample(earlier, k=min(len(earlier), 4)))
        executor = "process" if i in process_ids else _thread_or_async(rng)
        fault = "ok"
        # Process steps are few and their faults the most varied: fault them more.
        if rng.random() < (max(fault_rate, 0.5) if executor == "process" else fault_rate):
            fault = _pick_fault(rng, executor=executor, store=store)
        steps.append(_step_plan(rng, sid, needs, executor, fault, kill_grace=kill_grace))
    return tuple(steps)


def _thread_or_async(rng: random.Random) -> str:
    return "async" if rng.random() < 0.25 else "thread"


def _pick_fault(rng: random.Random, *, executor: str, store: str) -> str:
    choices = list(FAULTS_ANY)
    if executor == "thread":
        choices += FAULTS_THREAD
    if executor == "process":
        choices += FAULTS_PROCESS * 2
    if store == "sqlite":
        choices += FAULTS_SQLITE
    return rng.choices(choices, [_WEIGHTS.get(c, 1.0) for c in choices])[0]


def _step_plan(
    rng: random.Random,
    sid: str,
    needs: tuple[str, ...],
    executor: str,
    fault: str,
    *,
    kill_grace: float,
) -> StepPlan:
    failing = rng.choice([1, 1, 1, 2, FOREVER]) if fault not in ("ok", "fatal") else FOREVER
    max_attempts = rng.randint(1, 3)
    timeout: float | None = None
    style = "sleep"
    if fault == "timeout":
        styles = {"thread": ["sleep", "busy"], "async": ["sleep"]}
        style = rng.choice(styles.get(executor, ["sleep", "busy", "stubborn"]))
        # A process retry may wait for a fresh interpreter: give it room.
        timeout = round(
            rng.uniform(1.0, 1.3) if executor == "process" else rng.uniform(0.1, 0.25), 3
        )
    elif fault == "ignore_cancel":
        max_attempts = 1  # abandoned attempts are never retried; keep the oracle exact
        timeout = round(rng.uniform(0.05, 0.15), 3)
    elif executor == "process" and rng.random() < 0.3:
        timeout = 20.0  # a generous per-step timeout that must never fire
    return StepPlan(
        id=sid,
        needs=needs,
        executor=executor,
        fault=fault,
        failing=failing,
        style=style,
        max_attempts=max_attempts,
        backoff=rng.choice(["none", "fixed", "exponential"]),
        timeout=timeout,
        duration=rng.choice([0.0, 0.0, 0.001, 0.005, 0.02]),
    )


def expected_outcome(plan: StepPlan, *, max_worker_crashes: int) -> tuple[str, int]:
    """The status a step must end with, and its number of attempts, if it runs undisturbed."""
    fault, k, m = plan.fault, plan.failing, plan.max_attempts
    if fault in ("ok", "orphan"):
        return "succeeded", 1
    if fault in ("fatal", "unpicklable", "unstorable"):
        return "failed", 1  # never retried
    if fault == "ignore_cancel":
        return "timed_out", 1  # abandoned, never retried
    if fault == "timeout":
        return ("succeeded", k + 1) if k < m else ("timed_out", m)
    if fault in _CRASHES:
        cap = min(m, max_worker_crashes)
        return ("succeeded", k + 1) if k < cap else ("failed", cap)
    return ("succeeded", k + 1) if k < m else ("failed", m)  # raise, retryable


def run_bound(scenario: Scenario) -> float:
    """Seconds within which the run must end: the sum of every step's worst case, plus slack.

    A step's worst case is each of its attempts running to its timeout, then the
    kill grace and the engine's margin, then the longest backoff; steps without
    a timeout fault are bounded by their duration and, for process steps, an
    interpreter start-up.
    """
    total = 20.0
    for plan in scenario.steps:
        per_attempt = plan.duration + 1.0 + (3.0 if plan.executor == "process" else 0.0)
        if plan.fault in ("timeout", "ignore_cancel"):
            assert plan.timeout is not None
            per_attempt += plan.timeout + scenario.kill_grace + _BACKEND_MARGIN + 0.5
        total += plan.max_attempts * (per_attempt + 0.05)
    return round(total, 1)


# -- building the workflow ------------------------------------------------------------------


def _params(plan: StepPlan, *, run_dir: Path | None, kill_grace: float) -> dict[str, Any]:
    hang = HANG_SECONDS
    if plan.fault == "ignore_cancel":
        assert plan.timeout is not None
        hang = plan.timeout + kill_grace + 0.5  # past abandonment, then it returns
    return {
        "dir": "" if run_dir is None else str(run_dir),
        "executor": plan.executor,
        "fault": plan.fault,
        "failing": plan.failing,
        "style": plan.style,
        "duration": plan.duration,
        "hang": hang,
    }


def _policy(plan: StepPlan) -> RetryPolicy:
    backoff = {
        "none": Backoff.none(),
        "fixed": Backoff.fixed(0.005),
        "exponential": Backoff.exponential(initial=0.002, cap=0.02),
    }[plan.backoff]
    return RetryPolicy(max_attempts=plan.max_attempts, backoff=backoff)


_EXECUTORS: Final[Mapping[str, Executor]] = {
    "thread": "thread",
    "async": "async",
    "process": "process",
}


def build_workflow(
    scenario: Scenario, run_dir: Path | None, *, reference: bool = False
) -> Workflow:
    """The ``sv.Workflow`` of a scenario.

    ``reference=True`` builds its fault-free twin: every step a thread step
    without a fault and without side-effect files, to compute the artifacts a
    good run must end with.
    """

    steps = []
    for original in scenario.steps:
        plan = original
        if reference:
            plan = StepPlan(
                plan.id, plan.needs, "thread", "ok", FOREVER, "sleep", 1, "none", None, 0.0
            )
        fn: Callable[..., Any] = chaos_step_async if plan.executor == "async" else chaos_step
        steps.append(
            Step(
                plan.id,
                fn,
                needs=plan.needs,
                executor=_EXECUTORS[plan.executor],
                timeout=plan.timeout,
                retry=_policy(plan),
                params=_params(
                    plan, run_dir=None if reference else run_dir, kill_grace=scenario.kill_grace
                ),
            )
        )
    return Workflow(f"chaos-{scenario.seed}", steps)


def _overrides(scenario: Scenario) -> dict[str, Any]:
    """Settings passed as arguments, so no environment or project file changes them."""
    return {
        "max_parallel": scenario.max_parallel,
        "on_failure": scenario.on_failure,
        "kill_grace": scenario.kill_grace,
        "max_worker_crashes": scenario.max_worker_crashes,
        "step_timeout": scenario.step_timeout,
        "seed": scenario.seed & 0xFFFFFFFF,
        "codec": "json",
    }


# -- the step functions (imported by process steps and by other programs) ---------------------


def _phase() -> str:
    return os.environ.get(MARK_VAR, "?").rsplit(".", 1)[-1]


def _note(ctx: StepContext, event: str) -> None:
    """Append one line about this attempt to the step's side-effect file (one write: atomic)."""
    directory = ctx.params["dir"]
    if not directory:
        return
    line = f"{event} {_phase()} {ctx.attempt} {os.getpid()}\n".encode()
    fd = os.open(
        os.path.join(directory, "effects", f"{ctx.step_id}.log"),
        os.O_WRONLY | os.O_CREAT | os.O_APPEND,
        0o600,
    )
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _artifacts(step_id: str, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """Deterministic outputs: a digest of the step id and its inputs.

    Every step also writes ``shared``, so the value a step sees there says which
    ancestor came last in canonical order: merging order is checked too.
    """
    text = json.dumps(sorted(inputs.items()), sort_keys=True)
    digest = hashlib.sha256(f"{step_id}|{text}".encode()).hexdigest()
    return {f"v_{step_id}": digest[:16], "shared": f"{step_id}:{digest[:8]}"}


def _misbehaving(ctx: StepContext) -> bool:
    return ctx.params["fault"] != "ok" and ctx.attempt <= int(ctx.params["failing"])


def _hang_here(ctx: StepContext, *, in_process: bool) -> None:
    """Run past the deadline until stopped, the way the step's style says."""
    style = ctx.params["style"]
    end = time.monotonic() + float(ctx.params["hang"])
    if in_process:
        if style == "stubborn":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only SIGKILL stops it
        while time.monotonic() < end:
            if style != "busy":
                time.sleep(0.05)
        return
    if style == "busy":
        while time.monotonic() < end and not ctx.cancelled:
            pass
    else:
        ctx.wait_cancelled(float(ctx.params["hang"]))
    ctx.raise_if_cancelled()


def _ask_to_be_killed(ctx: StepContext) -> None:
    """Write a pid file the campaign's monitor kills us through, then wait for it."""
    pids = os.path.join(ctx.params["dir"], "pids")
    name = f"{ctx.step_id}.{_phase()}.{ctx.attempt}"
    tmp = os.path.join(pids, f".{name}.tmp")
    with open(tmp, "w", encoding="ascii") as fh:
        fh.write(str(os.getpid()))
    os.replace(tmp, os.path.join(pids, f"{name}.pid"))
    time.sleep(float(ctx.params["hang"]))


def _leave_a_grandchild() -> None:
    sleep = shutil.which("sleep")
    argv = [sleep, "60"] if sleep else [sys.executable, "-c", "import time; time.sleep(60)"]
    subprocess.Popen(argv, stdin=subprocess.DEVNULL, close_fds=True)


def _fail_the_attempt(ctx: StepContext, *, in_process: bool) -> None:
    """Raise, crash or hang as the step's fault says (called only while misbehaving)."""
    fault = ctx.params["fault"]
    if fault == "raise":
        raise ValueError(f"chaos: planned failure of {ctx.step_id} on attempt {ctx.attempt}")
    if fault == "retryable":
        raise RetryableError(f"chaos: please retry {ctx.step_id}", after=0.001)
    if fault == "fatal":
        raise FatalError(f"chaos: {ctx.step_id} fails for good")
    if fault == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault == "exit":
        os._exit(13)
    if fault == "outside_kill":
        _ask_to_be_killed(ctx)
    if fault in ("timeout", "ignore_cancel"):
        if fault == "ignore_cancel":
            time.sleep(float(ctx.params["hang"]))  # deaf to the cancel request
            return
        _hang_here(ctx, in_process=in_process)


def chaos_step(ctx: StepContext) -> dict[str, Any] | None:
    """The step every thread and process step of a campaign runs; ``ctx.params`` steers it."""
    _note(ctx, "start")
    in_process = ctx.params["executor"] == "process"
    if _misbehaving(ctx):
        _fail_the_attempt(ctx, in_process=in_process)
        if ctx.params["fault"] == "ignore_cancel":
            return None  # abandoned long ago: its outcome is discarded, write nothing
    if ctx.params["duration"]:
        if in_process:
            time.sleep(float(ctx.params["duration"]))
        else:
            ctx.wait_cancelled(float(ctx.params["duration"]))
            ctx.raise_if_cancelled()
    out = _artifacts(ctx.step_id, ctx.inputs)
    fault = ctx.params["fault"]
    if fault == "orphan":
        _leave_a_grandchild()
    elif fault == "unpicklable":
        out["lock"] = threading.Lock()
    elif fault == "unstorable":
        out[f"v_{ctx.step_id}"] = {1, 2}  # a set: the json codec refuses it
    _note(ctx, "end")
    return out


async def chaos_step_async(ctx: StepContext) -> dict[str, Any] | None:
    """The async twin of :func:`chaos_step` (timeouts are cancelled tasks)."""
    _note(ctx, "start")
    if _misbehaving(ctx):
        if ctx.params["fault"] == "timeout":
            await asyncio.sleep(float(ctx.params["hang"]))
        else:
            _fail_the_attempt(ctx, in_process=False)
    if ctx.params["duration"]:
        await asyncio.sleep(float(ctx.params["duration"]))
    out = _artifacts(ctx.step_id, ctx.inputs)
    if ctx.params["fault"] == "unstorable":
        out[f"v_{ctx.step_id}"] = {1, 2}
    _note(ctx, "end")
    return out


# -- observing a run ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a run ended with, from a RunResult or read back from a store."""

    status: str
    steps: Mapping[str, Any]  # step id -> StepRecord
    artifacts: Mapping[str, Any]
    failed_step: str | None = None
    known_failed_step: bool = False

    @classmethod
    def from_result(cls, result: Any) -> Outcome:
        return cls(
            status=str(result.status),
            steps=dict(result.steps),
            artifacts=dict(result.artifacts),
            failed_step=result.failed_step,
            known_failed_step=True,
        )

    @classmethod
    def from_stored(cls, stored: Any, order: Sequence[str]) -> Outcome:
        return cls(
            status=str(stored.info.status),
            steps=dict(stored.steps),
            artifacts=_merged_outputs(stored, order),
        )


def _merged_outputs(stored: Any, order: Sequence[str]) -> dict[str, Any]:
    """The artifacts a stored run adds up to: succeeded steps' outputs in canonical order."""
    merged: dict[str, Any] = {}
    for sid in order:
        record = stored.steps.get(sid)
        if record is not None and str(record.status) == "succeeded":
            merged.update(stored.outputs.get(sid, {}))
    return merged


@dataclass(frozen=True, slots=True)
class Effect:
    """One line of a step's side-effect file."""

    event: str  # start | end
    phase: str
    attempt: int
    pid: int


def read_effects(run_dir: Path) -> dict[str, list[Effect]]:
    """Step id -> the attempts it began and ended, in the order written."""
    found: dict[str, list[Effect]] = {}
    directory = run_dir / "effects"
    if not directory.is_dir():
        return found
    for path in sorted(directory.glob("*.log")):
        effects: list[Effect] = []
        for line in path.read_text(encoding="ascii").splitlines():
            event, phase, attempt, pid = line.split()
            effects.append(Effect(event, phase, int(attempt), int(pid)))
        found[path.name.removesuffix(".log")] = effects
    return found


def start_counts(effects: Mapping[str, list[Effect]]) -> dict[str, int]:
    """Step id -> how many attempts it began, across every program."""
    return {sid: sum(e.event == "start" for e in lines) for sid, lines in effects.items()}


def marked_processes(mark: str) -> set[int]:
    """Live (non-zombie) processes whose environment carries ``MARK_VAR=mark``."""
    return processes_with_env(MARK_VAR, mark)


def _carries_mark(pid: int, mark_prefix: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return f"{MARK_VAR}={mark_prefix}".encode() in fh.read()
    except OSError:
        return False


# -- checking -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Violation:
    """A broken invariant, with the seed that reproduces it."""

    seed: int
    invariant: str
    detail: str

    def __str__(self) -> str:
        return f"seed {self.seed}: {self.invariant}: {self.detail}"


class Checker:
    """Counts the checks made and collects the ones that failed."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.counts: Counter[str] = Counter()
        self.violations: list[Violation] = []

    def check(self, invariant: str, ok: bool, detail: str | Callable[[], str]) -> bool:
        """Record one check of ``invariant``; ``detail`` (or its call) says what broke."""
        assert invariant in INVARIANTS, invariant
        self.counts[invariant] += 1
        if not ok:
            text = detail() if callable(detail) else detail
            self.violations.append(Violation(self.seed, invariant, text))
        return ok

    def fail(self, invariant: str, detail: str) -> None:
        self.check(invariant, False, detail)


_TERMINAL: Final = frozenset(_STATUS_NAMES)


def check_outcome(
    checker: Checker,
    scenario: Scenario,
    outcome: Outcome,
    *,
    cancel_issued: bool,
    order: Sequence[str] | None = None,
) -> None:
    """Statuses, run status, the fault oracle and attempt records of one finished run."""
    steps = outcome.steps
    ids = [p.id for p in scenario.steps]
    checker.check(
        "terminal",
        sorted(steps) == sorted(ids),
        lambda: f"the run has records for {sorted(steps)}, the workflow has {sorted(ids)}",
    )
    statuses = {sid: str(rec.status) for sid, rec in steps.items()}
    for sid in ids:
        if sid in statuses:
            checker.check(
                "terminal",
                statuses[sid] in _TERMINAL,
                f"step {sid} ended {statuses[sid]!r}, not a terminal status",
            )
    _check_run_status(checker, scenario, outcome, statuses, cancel_issued=cancel_issued)
    for plan in scenario.steps:
        record = steps.get(plan.id)
        if record is not None:
            _check_step(checker, scenario, plan, record, statuses, cancel_issued=cancel_issued)
            _check_attempt_records(checker, plan.id, record)
    if outcome.known_failed_step and order is not None:
        first = next((s for s in order if statuses.get(s) in ("failed", "timed_out")), None)
        checker.check(
            "run-status",
            outcome.failed_step == first,
            lambda: f"failed_step is {outcome.failed_step!r}, the first failed step is {first!r}",
        )


def _check_run_status(
    checker: Checker,
    scenario: Scenario,
    outcome: Outcome,
    statuses: Mapping[str, str],
    *,
    cancel_issued: bool,
) -> None:
    status = outcome.status
    all_ok = bool(statuses) and all(s == "succeeded" for s in statuses.values())
    summary = ", ".join(f"{k}={v}" for k, v in sorted(Counter(statuses.values()).items()))
    checker.check(
        "run-status",
        (status == "succeeded") == all_ok,
        lambda: f"the run {status} but its steps are {summary}",
    )
    checker.check(
        "run-status",
        status in ("succeeded", "failed", "cancelled"),
        lambda: f"the run ended with status {status!r}",
    )
    checker.check(
        "run-status",
        status != "cancelled" or cancel_issued,
        "the run was cancelled but no cancel was injected",
    )
    if status == "cancelled":
        return
    must_succeed = all(
        expected_outcome(p, max_worker_crashes=scenario.max_worker_crashes)[0] == "succeeded"
        for p in scenario.steps
    )
    want = "succeeded" if must_succeed else "failed"
    checker.check(
        "oracle",
        status == want,
        lambda: f"the run {status}; with its faults it must have {want} ({summary})",
    )


def _check_step(
    checker: Checker,
    scenario: Scenario,
    plan: StepPlan,
    record: Any,
    statuses: Mapping[str, str],
    *,
    cancel_issued: bool,
) -> None:
    status = str(record.status)
    if record.restored:
        want, _ = expected_outcome(plan, max_worker_crashes=scenario.max_worker_crashes)
        checker.check(
            "oracle",
            status == "succeeded" and want == "succeeded",
            lambda: f"step {plan.id} was restored as {status}; its fault says it must {want}",
        )
        return
    want, attempts = expected_outcome(plan, max_worker_crashes=scenario.max_worker_crashes)
    blocked = [n for n in plan.needs if statuses.get(n) != "succeeded"]
    stopping = cancel_issued or (
        scenario.on_failure == "fail_fast"
        and any(s in ("failed", "timed_out") for s in statuses.values())
    )
    allowed = {want}
    if blocked:
        # A dependency did not succeed: this step cannot have run.
        allowed = {"skipped"} if scenario.on_failure == "continue" else set()
    if stopping:
        allowed |= {"cancelled"} | ({"skipped"} if scenario.on_failure == "continue" else set())
    last = record.attempts[-1] if record.attempts else None
    abandoned = (
        plan.executor == "thread"
        and plan.fault == "timeout"
        and last is not None
        and last.note == "abandoned"
    )
    if abandoned:
        # A cooperative thread that a loaded machine does not schedule within the
        # grace period looks exactly like one that ignores the request: the engine
        # abandons it and, by design, never retries an abandoned attempt, so the
        # step can also end with fewer attempts than its fault would take.
        allowed |= {"timed_out"}
    if stopping and last is not None and (last.note or "").startswith(NOT_RETRIED_STOPPING):
        # The attempt failed as its fault says while the run was stopping: the
        # engine keeps that status and records that the stop prevented a retry.
        allowed |= {"failed" if last.outcome == "crashed" else str(last.outcome)}
    checker.check(
        "oracle",
        status in allowed,
        lambda: (
            f"step {plan.id} ({plan.executor}, fault {plan.fault} x{plan.failing}, "
            f"max_attempts {plan.max_attempts}) ended {status}; allowed: {sorted(allowed)}"
            + (f" (dependencies {blocked} did not succeed)" if blocked else "")
            + f"; attempts: {_attempt_history(record)}"
        ),
    )
    got = len(record.attempts)
    if status == "skipped":
        checker.check(
            "oracle", got == 0, lambda: f"step {plan.id} was skipped after {got} attempts"
        )
    elif abandoned and status == "timed_out":
        earlier = [a.outcome for a in record.attempts[:-1]]
        checker.check(
            "oracle",
            got <= attempts and all(o == "timed_out" for o in earlier),
            lambda: (
                f"step {plan.id} was abandoned on attempt {got}; expected at most {attempts}, "
                f"each before it timed out (got {earlier})"
            ),
        )
    elif status == want and (status == "succeeded" or not stopping):
        checker.check(
            "oracle",
            got == attempts,
            lambda: (
                f"step {plan.id} ({plan.fault} x{plan.failing}) {status} after {got} "
                f"attempts; expected {attempts}; attempts: {_attempt_history(record)}"
            ),
        )
    elif status == want:
        checker.check(
            "oracle",
            1 <= got <= attempts,
            lambda: f"step {plan.id} {status} after {got} attempts; expected 1..{attempts}",
        )


def _attempt_history(record: Any) -> str:
    """The attempts of a step in one line, so a violation can be read without a replay."""
    parts = []
    for a in record.attempts:
        took = "?" if a.duration is None else f"{a.duration:.3f} s"
        parts.append(
            f"#{a.number} {a.outcome} after {took}"
            + (f" [{a.note}]" if a.note else "")
            + (f" {a.error_type}: {a.error_message}" if a.error_type else "")
        )
    return "; ".join(parts) or "none"


def _check_attempt_records(checker: Checker, sid: str, record: Any) -> None:
    attempts = record.attempts
    numbers = [a.number for a in attempts]
    if not record.restored:
        checker.check(
            "attempts",
            numbers == list(range(1, len(numbers) + 1)),
            lambda: f"step {sid} has attempts numbered {numbers}",
        )
    outcomes = [a.outcome for a in attempts]
    checker.check(
        "attempts",
        all(o not in (None, "succeeded") for o in outcomes[:-1]),
        lambda: f"step {sid}: an attempt before the last succeeded or never ended: {outcomes}",
    )
    status = str(record.status)
    if attempts and status != "cancelled":
        last = outcomes[-1]
        ok = (last == "succeeded") == (status == "succeeded")
        checker.check(
            "attempts",
            ok and last is not None,
            lambda: f"step {sid} is {status} but its last attempt's outcome is {last!r}",
        )


def check_effects(
    checker: Checker,
    outcome: Outcome,
    effects: Mapping[str, list[Effect]],
    *,
    phase: str,
) -> None:
    """What really ran in ``phase`` agrees with the attempts the run recorded."""
    for sid, record in outcome.steps.items():
        lines = [e for e in effects.get(sid, []) if e.phase == phase]
        begun = [e.attempt for e in lines if e.event == "start"]
        checker.check(
            "effects",
            len(begun) == len(set(begun)),
            f"step {sid}: an attempt began twice: {begun}",
        )
        if record.restored:
            checker.check(
                "effects",
                not begun,
                f"restored step {sid} ran again: {begun}",
            )
            continue
        recorded = len(record.attempts)
        checker.check(
            "effects",
            all(a <= recorded for a in begun),
            f"step {sid} began attempts {begun}, but only {recorded} are recorded",
        )
        if str(record.status) == "succeeded":
            ended = {e.attempt for e in lines if e.event == "end"}
            checker.check(
                "effects",
                recorded in begun and recorded in ended,
                f"step {sid} succeeded on attempt {recorded}, which never ran",
            )


def check_no_rerun(
    checker: Checker,
    *,
    succeeded_before: Iterable[str],
    counts_before: Mapping[str, int],
    counts_after: Mapping[str, int],
    what: str,
) -> None:
    """No step stored as succeeded before ``what`` began another attempt after it."""
    for sid in sorted(succeeded_before):
        before, after = counts_before.get(sid, 0), counts_after.get(sid, 0)
        checker.check(
            "no-rerun",
            before == after,
            f"step {sid} was stored succeeded before {what} but ran again "
            f"({before} attempts begun before, {after} after)",
        )


def check_artifacts(checker: Checker, outcome: Outcome, reference: Mapping[str, Any]) -> None:
    """A run whose steps all succeeded has the artifacts of the fault-free run."""
    if outcome.status != "succeeded":
        return
    got = dict(outcome.artifacts)
    want = dict(reference)

    def describe() -> str:
        keys = sorted(set(got) | set(want))
        diff = [k for k in keys if got.get(k) != want.get(k)]
        return f"artifacts differ from the fault-free run's at {diff[:5]} (of {len(keys)})"

    checker.check("artifacts", got == want, describe)


def check_store_agrees(
    checker: Checker, stored: Any, outcome: Outcome, order: Sequence[str]
) -> None:
    """The stored run (status, step statuses, outputs) says what the outcome says."""
    checker.check(
        "store",
        str(stored.info.status) == outcome.status,
        lambda: f"the store says the run {stored.info.status}, the result says {outcome.status}",
    )
    mine = {sid: str(r.status) for sid, r in outcome.steps.items()}
    theirs = {sid: str(r.status) for sid, r in stored.steps.items()}
    checker.check(
        "store",
        mine == theirs,
        lambda: (
            "stored step statuses differ: "
            + str({k: (mine.get(k), theirs.get(k)) for k in mine if mine.get(k) != theirs.get(k)})
        ),
    )
    merged = _merged_outputs(stored, order)
    checker.check(
        "store",
        merged == dict(outcome.artifacts),
        "the stored outputs of succeeded steps do not add up to the run's artifacts",
    )


def check_sqlite_file(checker: Checker, db: Path) -> None:
    """``PRAGMA integrity_check`` says ok, and the file opens as a stepvisor store."""
    if not db.exists():
        return
    conn = sqlite3.connect(db)
    try:
        verdict = conn.execute("PRAGMA integrity_check").fetchall()
    finally:
        conn.close()
    checker.check(
        "store", verdict == [("ok",)], lambda: f"integrity_check of {db.name}: {verdict[:3]}"
    )

    try:
        SQLiteStore(db, create=False).close()
    except StoreError as exc:
        checker.fail("store", f"{db.name} no longer opens as a store: {exc}")
    else:
        checker.check("store", True, "")


def check_processes_gone(
    checker: Checker, mark: str, *, what: str, grace: float = _PROCESS_GRACE
) -> None:
    """No process carrying ``mark`` is alive ``grace`` seconds from now (leftovers are killed)."""
    deadline = time.monotonic() + grace
    left = marked_processes(mark)
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = marked_processes(mark)
    checker.check(
        "processes",
        not left,
        lambda: f"processes {sorted(left)} ({_cmdlines(left)}) outlived {what} by {grace:g} s",
    )
    for pid in left:  # do not let one violation spoil the following runs
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _cmdlines(pids: Iterable[int]) -> str:
    out = []
    for pid in sorted(pids):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                out.append(fh.read().replace(b"\0", b" ").decode(errors="replace")[:60])
        except OSError:
            continue
    return "; ".join(out)


def _abandoned_threads(outcome: Outcome) -> set[str]:
    names = set()
    for record in outcome.steps.values():
        last = record.attempts[-1] if record.attempts else None
        if last is not None and last.note == "abandoned" and last.worker:
            names.add(worker_thread_name(last.worker))
    return names


def check_threads(
    checker: Checker, before: set[threading.Thread], excepted: set[str], *, grace: float = 1.0
) -> list[str]:
    """No thread alive that was not alive ``before``, but those named in ``excepted``.

    Returns the names of the excepted threads found (abandoned daemon threads).
    """
    deadline = time.monotonic() + grace
    while True:
        new = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        left = [t.name for t in new if t.name not in excepted]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    checker.check("threads", not left, lambda: f"threads {left} outlived the run")
    return [t.name for t in new if t.name in excepted]


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
            if _carries_mark(pid, self.mark_prefix):  # never a recycled pid
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
        **{**_overrides(scenario), "on_failure": "fail_fast"},
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
    handle = sv.start(ctx.wf, store=store, run_id=scenario.run_id, **_overrides(scenario))
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
    excepted = check_threads(ctx.checker, threads_before, _abandoned_threads(outcome))
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
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PKG_ROOT, env.get("PYTHONPATH")]))
    argv = [
        sys.executable,
        "-m",
        "stepvisor.chaos",
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
    excepted = check_threads(ctx.checker, threads_before, _abandoned_threads(outcome))
    ctx.report.abandoned += len(excepted)
    return outcome


def _resume_or_start(
    store: SQLiteStore, wf: Workflow, scenario: Scenario, faults: Counter[str]
) -> sv.RunHandle:
    """Resume the run, or start it afresh if the kill came before it was stored."""
    run_id = scenario.run_id
    overrides = _overrides(scenario)
    try:
        store.load(run_id)
    except RunNotFoundError:
        faults["driver_killed_before_begin"] += 1
        return sv.start(wf, store=store, run_id=run_id, **overrides)
    return sv.resume_start(run_id, wf, store=store, **overrides)


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
        sv.run(wf, store=str(db), run_id=scenario.run_id, **_overrides(scenario))
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


@dataclass(slots=True)
class CampaignSummary:
    """The figures of a campaign."""

    seed: int
    runs: int = 0
    seconds: float = 0.0
    faults: Counter[str] = field(default_factory=Counter)
    checks: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    scenarios: Counter[str] = field(default_factory=Counter)
    violations: list[Violation] = field(default_factory=list)
    abandoned: int = 0
    slowest: tuple[float, int] = (0.0, 0)

    def add(self, report: RunReport) -> None:
        self.runs += 1
        self.faults.update(report.faults)
        self.checks.update(report.checks)
        self.statuses[report.status] += 1
        s = report.scenario
        self.scenarios[f"store:{s.store}"] += 1
        self.scenarios[f"on_failure:{s.on_failure}"] += 1
        if s.driver != "none":
            self.scenarios["driver"] += 1
        if s.cancel_at is not None:
            self.scenarios["cancel"] += 1
        self.violations.extend(report.violations)
        self.abandoned += report.abandoned
        self.slowest = max(self.slowest, (report.seconds, report.seed))

    def render(self) -> str:
        steps = {k.split(":")[1]: v for k, v in self.faults.items() if k.startswith("executor:")}
        step_faults = {k: v for k, v in self.faults.items() if k in FAULTS and k != "ok"}
        run_faults = {
            k: v for k, v in self.faults.items() if ":" in k and not k.startswith("executor:")
        }
        run_faults |= {k: v for k, v in self.faults.items() if k.startswith("driver_")}
        lines = [
            f"stepvisor chaos: {self.runs} runs in {self.seconds:.1f} s "
            f"(campaign seed {self.seed}), {len(self.violations)} violations",
            f"  steps: {sum(steps.values())} ({_pairs(steps)})",
            f"  runs: {_pairs(self.scenarios)}",
            f"  run statuses: {_pairs(self.statuses)}",
            f"  step faults injected: {sum(step_faults.values())} ({_pairs(step_faults)})",
            f"  run faults injected: {_pairs(run_faults)}",
            f"  invariant checks: {sum(self.checks.values())} ({_pairs(self.checks)})",
            f"  abandoned daemon threads (excepted from the thread check): {self.abandoned}",
            f"  slowest run: {self.slowest[0]:.2f} s (seed {self.slowest[1]})",
        ]
        for violation in self.violations[:50]:
            lines.append(f"  VIOLATION {violation}")
        if self.violations:
            lines.append("  replay one: python -m stepvisor.chaos --replay SEED -v")
        return "\n".join(lines)


def _pairs(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def run_seeds(seed: int, runs: int) -> Iterator[int]:
    """The run seeds of a campaign: a function of the campaign seed alone."""
    rng = random.Random(seed)
    for _ in range(runs):
        yield rng.getrandbits(40)


def run_campaign(
    *,
    runs: int,
    seed: int,
    budget_seconds: float | None = None,
    progress: Callable[[RunReport, CampaignSummary], None] | None = None,
    seeds: Sequence[int] | None = None,
) -> CampaignSummary:
    """Run ``runs`` scenarios (fewer if ``budget_seconds`` runs out) and add up the figures."""
    summary = CampaignSummary(seed=seed)
    started = time.monotonic()
    token = secrets.token_hex(4)
    workdir = Path(tempfile.mkdtemp(prefix="stepvisor-chaos-"))
    try:
        for run_seed in seeds if seeds is not None else run_seeds(seed, runs):
            if budget_seconds is not None and time.monotonic() - started > budget_seconds:
                break
            report = run_one(run_seed, workdir, token=token)
            summary.add(report)
            summary.seconds = time.monotonic() - started
            if progress is not None:
                progress(report, summary)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        summary.seconds = time.monotonic() - started
    return summary


# -- command line --------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m stepvisor.chaos",
        description="Run random workflows with random faults and check stepvisor's invariants "
        "after each; exit 1 if any is broken.",
    )
    parser.add_argument("--runs", type=int, default=100, help="workflows to run (default 100)")
    parser.add_argument("--seed", type=int, default=None, help="campaign seed (default: random)")
    parser.add_argument(
        "--budget-seconds",
        type=float,
        default=None,
        help="start no new run after this many seconds",
    )
    parser.add_argument(
        "--replay",
        type=int,
        action="append",
        default=None,
        metavar="SEED",
        help="run only the run with this run seed (repeatable)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="print a line per run")
    parser.add_argument("--drive", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--drive-dir", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--drive-resume", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stepvisor.chaos``: 0 when every invariant held, 1 otherwise, 2 on bad usage."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.drive is not None:
        if args.drive_dir is None:
            parser.error("--drive needs --drive-dir")
        return drive(args.drive, args.drive_dir, resume=args.drive_resume)
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")
    if args.budget_seconds is not None and not args.budget_seconds > 0:
        parser.error(f"--budget-seconds must be a positive number, got {args.budget_seconds}")
    seed = args.seed if args.seed is not None else secrets.randbits(32)
    every = max(1, args.runs // 20)

    def progress(report: RunReport, summary: CampaignSummary) -> None:
        if args.verbose or report.violations:
            print(report.line(), flush=True)
            for violation in report.violations:
                print(f"  VIOLATION {violation}", flush=True)
        elif summary.runs % every == 0:
            print(
                f"  {summary.runs}/{args.runs} runs, {len(summary.violations)} violations, "
                f"{summary.seconds:.0f} s",
                flush=True,
            )

    runs = len(args.replay) if args.replay else args.runs
    print(f"stepvisor chaos: campaign seed {seed}, {runs} runs", flush=True)
    summary = run_campaign(
        runs=runs,
        seed=seed,
        budget_seconds=args.budget_seconds,
        progress=progress,
        seeds=args.replay,
    )
    print(summary.render(), flush=True)
    return 1 if summary.violations else 0


if __name__ == "__main__":
    # Run the importable module's main, not this __main__ copy: step functions must be
    # ``stepvisor.chaos.chaos_step`` in every program, or a resumed run's workflow
    # fingerprint (which names them by module) would differ, and process steps would
    # travel by value instead of by reference.
    from stepvisor.chaos import main as _main

    sys.exit(_main())
