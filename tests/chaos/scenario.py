"""The plan of a run, drawn from its seed, and the workflow built from it (pure).

Nothing here runs anything: :func:`generate` turns a run seed into a
:class:`Scenario` (the same seed, the same scenario), :func:`run_bound` says how
long its run may take, and :func:`build_workflow` makes the ``sv.Workflow`` whose
steps are the functions of :mod:`tests.chaos.steps`.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

from stepvisor.core.model import Executor, Step, Workflow
from stepvisor.policies.retry import Backoff, RetryPolicy
from tests.chaos.steps import chaos_step, chaos_step_async

# -- vocabulary -------------------------------------------------------------------------

#: Step faults, and where each can be injected.
FAULTS_ANY: Final = ("raise", "retryable", "fatal", "timeout")
FAULTS_THREAD: Final = ("ignore_cancel",)
FAULTS_PROCESS: Final = ("sigkill", "exit", "outside_kill", "orphan", "unpicklable")
FAULTS_SQLITE: Final = ("unstorable",)
FAULTS: Final = ("ok", *FAULTS_ANY, *FAULTS_THREAD, *FAULTS_PROCESS, *FAULTS_SQLITE)
CRASHES: Final = frozenset({"sigkill", "exit", "outside_kill"})
#: How rarely each fault is drawn, relative to the others (ignore_cancel costs time).
_WEIGHTS: Final[Mapping[str, float]] = {"ignore_cancel": 0.3, "timeout": 0.8}

#: ``failing`` for a fault that happens on every attempt.
FOREVER: Final = 99
#: How long a step "hangs" at most: long past any timeout, short of forever.
HANG_SECONDS: Final = 60.0

#: Extra time the engine gives non-thread backends past kill_grace (supervisor).
_BACKEND_MARGIN: Final = 2.0

#: Store faults (tests/store_faults.py), injected into the run's SQLite store.  The
#: first five strike inside a running program, as an attempt begins; the last two
#: strike a run whose program was SIGKILLed, before it is resumed.
STORE_FAULTS_IN_RUN: Final = ("disk_full", "lock_brief", "lock_held", "deleted", "replaced")
STORE_FAULTS_AFTER_KILL: Final = ("read_only", "torn_wal")
STORE_FAULTS: Final = (*STORE_FAULTS_IN_RUN, *STORE_FAULTS_AFTER_KILL)
#: Store faults that need a small tmpfs (root, and ``mount``).
STORE_FAULTS_MOUNTED: Final = frozenset({"disk_full", "read_only"})
#: Run kinds about ownership: two programs resume at once; a resume right after a kill.
OWNER_DRIVERS: Final = ("race", "resume-now")
#: How often a run gets a store fault, a racing resume, an immediate resume.
STORE_FAULT_RATE: Final = 0.08
OWNER_RATE: Final = 0.05
#: The ``stale_after`` of resumes that must get through by dead-owner detection alone.
NEVER_STALE: Final = 3600.0


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
    #: Mapped steps (planned by :mod:`tests.chaos.map_plans`): ``""`` for a plain
    #: step, ``"list"`` for a map over ``items`` fixed items, else the id of the step
    #: whose list it maps over (a splitter, or a mapped step: a chain).
    over: str = ""
    items: int = 0
    #: A plain step that makes a list for a map: its length (-1: it makes none;
    #: ``BAD_LIST``: it makes a string, which no step can map over).
    emits: int = -1
    #: A mapped step: the indexes of the instances its fault strikes (the others are ok).
    bad: tuple[int, ...] = ()
    #: Artifacts the step requires (a mapped step's whole list).
    requires: tuple[str, ...] = ()

    @property
    def mapped(self) -> bool:
        return bool(self.over)


#: ``StepPlan.emits`` of a splitter that returns a string instead of a list.
BAD_LIST: Final = -2


def list_name(plan: StepPlan) -> str:
    """The list artifact a step makes: a splitter's ``items_<id>``, a mapped step's ``l_<id>``."""
    return f"l_{plan.id}" if plan.mapped else f"items_{plan.id}"


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
    driver: str  # none | resume-here | resume-program | kill-twice | race | resume-now
    kill_after: int  # attempts begun before the driver is killed
    kill_delay: float
    store_fault: str = "none"  # none, or one of STORE_FAULTS
    fault_at: int = 0  # an in-run store fault strikes as the fault_at-th eligible attempt begins
    busy_timeout: float = 5.0  # the store's, in a run with a store fault
    tear_keep: float = 0.5  # torn_wal: the fraction of the WAL's frames left whole

    @property
    def run_id(self) -> str:
        return f"chaos-{self.seed}"

    def step(self, step_id: str) -> StepPlan:
        for plan in self.steps:
            if plan.id == step_id:
                return plan
        raise KeyError(step_id)


def by_hand_step(sid: str, **changes: object) -> StepPlan:
    """A step written by hand in a test: a thread step that succeeds, changed by ``changes``."""
    base = StepPlan(sid, (), "thread", "ok", FOREVER, "sleep", 1, "none", None, 0.0)
    return replace(base, **changes)  # type: ignore[arg-type]


def by_hand(*steps: StepPlan, **changes: object) -> Scenario:
    """A scenario written by hand in a test: no cancel, no driver, no store fault."""
    base = Scenario(
        seed=1,
        steps=steps,
        max_parallel=2,
        on_failure="continue",
        kill_grace=0.2,
        max_worker_crashes=3,
        step_timeout=None,
        store="memory",
        cancel_at=None,
        cancel_via="handle",
        driver="none",
        kill_after=0,
        kill_delay=0.0,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def generate(seed: int) -> Scenario:
    """The scenario of the run with this seed (the same seed, the same scenario).

    Store faults and ownership runs are drawn from a stream of their own, so a
    seed that gets neither gives the scenario it gave before they existed.
    """
    rng = random.Random(seed)
    special = random.Random(f"stepvisor-chaos-store-{seed}")
    store_fault, owner_driver = "none", "none"
    draw = special.random()
    if draw < STORE_FAULT_RATE:
        store_fault = special.choice(STORE_FAULTS)
    elif draw < STORE_FAULT_RATE + OWNER_RATE:
        owner_driver = special.choice(OWNER_DRIVERS)
    driver = "none"
    if rng.random() < 0.08:
        driver = rng.choices(["resume-here", "resume-program", "kill-twice"], [4, 3, 2])[0]
    if owner_driver != "none":
        driver = owner_driver
    elif store_fault in STORE_FAULTS_AFTER_KILL:
        driver = "resume-now"  # killed, the fault, then resumed here at once
    elif store_fault != "none":
        driver = "none"
    special_kind = store_fault if store_fault != "none" else owner_driver
    stored = driver != "none" or store_fault != "none"
    store = "sqlite" if stored or rng.random() < 0.5 else "memory"
    cancel_at: float | None = None
    cancel_via = "handle"
    if driver == "none" and store_fault == "none" and rng.random() < 0.15:
        cancel_at = round(rng.uniform(0.0, 0.3), 3)
        cancel_via = "store" if store == "sqlite" and rng.random() < 0.5 else "handle"
    kill_grace = rng.choice([0.1, 0.2, 0.5])
    steps = _generate_steps(rng, store=store, kill_grace=kill_grace)
    fault_at = 0
    if store_fault in STORE_FAULTS_IN_RUN:
        eligible = sum(map(fault_eligible, steps))
        if eligible == 0:
            store_fault = "none"  # no attempt could carry it: a plain SQLite run
        else:
            fault_at = special.randint(1, eligible)
    # An ownership or store-fault run is killed once its run is stored (an attempt began);
    # a torn WAL needs a kill before the run ends (an ended run folds its WAL into the file).
    kill_after = rng.randint(0 if special_kind == "none" else 1, len(steps))
    if store_fault == "torn_wal":
        kill_after = 1 + kill_after % max(1, len(steps) // 3)
    plain = Scenario(
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
        kill_after=kill_after,
        kill_delay=round(rng.uniform(0.0, 0.05), 3),
        store_fault=store_fault,
        fault_at=fault_at,
        busy_timeout=special.choice([0.1, 0.2, 0.3]) if store_fault == "lock_held" else 5.0,
        tear_keep=round(special.uniform(0.05, 0.95), 3),
    )
    # Maps are drawn from a stream of their own too, after everything else: a seed
    # that gets none gives the scenario it gave before mapped steps existed.
    from tests.chaos.map_plans import add_maps  # noqa: PLC0415 - it builds on this module

    return add_maps(plain)


def fault_eligible(plan: StepPlan) -> bool:
    """Whether an attempt of this step may carry an in-run store fault.

    The attempt waits while the campaign injects the fault; a step that hangs
    or has a short timeout would be stopped meanwhile, which is not the point.
    """
    return plan.fault in ("ok", "raise", "retryable", "fatal", "unstorable") and (
        plan.timeout is None or plan.timeout >= 20.0
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


def map_size(scenario: Scenario, plan: StepPlan) -> int:
    """How many instances the mapped step ``plan`` has (its splitter's list, its chain's)."""
    if plan.over == "list":
        return plan.items
    source = scenario.step(plan.over)
    return map_size(scenario, source) if source.mapped else max(source.emits, 0)


def chain_source(scenario: Scenario, plan: StepPlan) -> StepPlan | None:
    """The mapped step ``plan`` is chained to (``b[i]`` waits for ``a[i]`` alone), if any.

    As the graph decides: a map over a mapped step's list is chained unless the
    step also needs the whole of it.
    """
    if not plan.mapped or plan.over == "list":
        return None
    source = scenario.step(plan.over)
    if not source.mapped or source.id in plan.needs or list_name(source) in plan.requires:
        return None
    return source


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
        units = max(1, map_size(scenario, plan)) if plan.mapped else 1
        total += units * plan.max_attempts * (per_attempt + 0.05)
    return round(total, 1)


# -- building the workflow ------------------------------------------------------------------


def _params(
    plan: StepPlan, *, run_dir: Path | None, kill_grace: float, fault_at: int
) -> dict[str, Any]:
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
        "fault_at": fault_at if run_dir is not None and fault_eligible(plan) else 0,
        "bad": list(plan.bad),
        "emits": plan.emits,
        "list": list_name(plan),
        "chatter": 0 if run_dir is None else chatter_lines(plan.id),
    }


#: The output limit of every campaign run: a step of ``CHATTY`` lines writes past it.
LOG_LIMIT: Final = 4096
CHATTY: Final = 400


def chatter_lines(step_id: str) -> int:
    """How many output lines each attempt of a step writes before its fault strikes.

    Drawn from the step id (not the scenario's random stream, which would change
    every other draw): none, a few, or ``CHATTY``, past ``LOG_LIMIT``.
    """
    return (0, 3, 3, CHATTY)[zlib.crc32(step_id.encode()) % 4]


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
            plan = replace(
                plan,
                executor="thread",
                fault="ok",
                failing=FOREVER,
                style="sleep",
                max_attempts=1,
                backoff="none",
                timeout=None,
                duration=0.0,
                bad=(),
            )
        fn: Callable[..., Any] = chaos_step_async if plan.executor == "async" else chaos_step
        steps.append(
            Step(
                plan.id,
                fn,
                needs=plan.needs,
                requires=plan.requires,
                creates=(list_name(plan),) if plan.mapped or plan.emits != -1 else (),
                map_over=_map_over(scenario, plan),
                executor=_EXECUTORS[plan.executor],
                timeout=plan.timeout,
                retry=_policy(plan),
                params=_params(
                    plan,
                    run_dir=None if reference else run_dir,
                    kill_grace=scenario.kill_grace,
                    fault_at=scenario.fault_at,
                ),
            )
        )
    return Workflow(f"chaos-{scenario.seed}", steps)


def _map_over(scenario: Scenario, plan: StepPlan) -> str | list[str] | None:
    """What ``plan`` maps over: its fixed items, or the name of its source's list."""
    if not plan.mapped:
        return None
    if plan.over == "list":
        return [f"{plan.id}@{k}" for k in range(plan.items)]
    return list_name(scenario.step(plan.over))


def overrides(scenario: Scenario) -> dict[str, Any]:
    """Settings passed as arguments, so no environment or project file changes them."""
    return {
        "max_parallel": scenario.max_parallel,
        "on_failure": scenario.on_failure,
        "kill_grace": scenario.kill_grace,
        "max_worker_crashes": scenario.max_worker_crashes,
        "step_timeout": scenario.step_timeout,
        "seed": scenario.seed & 0xFFFFFFFF,
        "codec": "json",
        "capture": "store",
        "log_limit": LOG_LIMIT,
    }
