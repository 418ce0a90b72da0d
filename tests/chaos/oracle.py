"""The oracle and the invariant checks: what a run must have done, given its scenario.

Each check is counted by a :class:`Checker`; a failed one becomes a
:class:`Violation` naming the run seed, so the run can be replayed alone.
:func:`check_outcome` holds every step and every instance of a mapped step to
what its fault implies (:mod:`tests.chaos.expect`); the other checks compare
what ran, what was stored and what is left running with what the run
reported.  Mapped steps' own invariants are :mod:`tests.chaos.map_checks`'s,
store faults' and ownership's :mod:`tests.chaos.oracle_store`'s.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from stepvisor.actors.supervisor import NOT_RETRIED_STOPPING
from stepvisor.core.records import instance_id
from stepvisor.errors import StoreError
from stepvisor.store.sqlite import SQLiteStore
from tests.chaos.expect import (
    dependencies,
    expected_status,
    own_instance,
    plan_of,
    summary_of,
)
from tests.chaos.map_checks import check_maps, expanded, instance_records
from tests.chaos.observe import Effect, Outcome, cmdlines, marked_processes, merged_outputs
from tests.chaos.scenario import Scenario, StepPlan, chain_source

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
    "store-fault",
    "one-owner",
    "race",
    "instances",
    "map-summary",
    "map-list",
    "logs",
)

#: How long processes may take to vanish once their run (or program) is gone.
_PROCESS_GRACE: Final = 5.0
_STATUS_NAMES: Final = ("succeeded", "failed", "timed_out", "cancelled", "skipped")


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
        #: Steps an oracle rule let off for what load does (late starts), by rule.
        self.tolerated: Counter[str] = Counter()

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


#: The statuses a step or an instance may end with.
TERMINAL: Final = frozenset(_STATUS_NAMES)


def check_outcome(
    checker: Checker,
    scenario: Scenario,
    outcome: Outcome,
    *,
    cancel_issued: bool,
    order: Sequence[str] | None = None,
) -> None:
    """Statuses, run status, the fault oracle and attempt records of one finished run.

    Instances of mapped steps are checked as units of their own (the step's fault
    strikes its ``bad`` indexes), and :func:`~tests.chaos.map_checks.check_maps`
    checks that none is lost or duplicated and that each mapped step sums them up.
    """
    steps = outcome.steps
    ids = [p.id for p in scenario.steps]
    known = set(ids)
    own = sorted(sid for sid in steps if sid in known)
    strays = sorted(sid for sid in steps if sid not in known and plan_of(scenario, sid) is None)
    checker.check(
        "terminal",
        own == sorted(ids) and not strays,
        lambda: f"the run has records for {own + strays}, the workflow has {sorted(ids)}",
    )
    statuses = {sid: str(steps[sid].status) for sid in own}
    for sid in own:
        checker.check(
            "terminal",
            statuses[sid] in TERMINAL,
            f"step {sid} ended {statuses[sid]!r}, not a terminal status",
        )
    _check_run_status(checker, scenario, outcome, statuses, cancel_issued=cancel_issued)
    for plan in scenario.steps:
        record = steps.get(plan.id)
        if record is not None:
            _check_step(
                checker, scenario, plan, record, statuses, cancel_issued=cancel_issued, steps=steps
            )
            _check_attempt_records(checker, plan.id, record)
    for uid, record in steps.items():
        found = None if uid in known else plan_of(scenario, uid)
        if found is not None:
            _check_instance(checker, scenario, found, record, statuses, steps, cancel_issued)
            _check_attempt_records(checker, uid, record)
    if outcome.known_failed_step and order is not None:
        first = _first_failed(order, steps)
        checker.check(
            "run-status",
            outcome.failed_step == first,
            lambda: f"failed_step is {outcome.failed_step!r}, the first failed step is {first!r}",
        )
    check_maps(checker, scenario, outcome)


def _first_failed(order: Sequence[str], steps: Mapping[str, Any]) -> str | None:
    """The first failed step in canonical order; for a mapped step, its first failed instance."""
    failed = ("failed", "timed_out")
    for sid in order:
        record = steps.get(sid)
        if record is None or str(record.status) not in failed:
            continue
        index = 0
        while f"{sid}[{index}]" in steps:
            if str(steps[f"{sid}[{index}]"].status) in failed:
                return f"{sid}[{index}]"
            index += 1
        return sid
    return None


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
    must_succeed = all(expected_status(scenario, p)[0] == "succeeded" for p in scenario.steps)
    want = "succeeded" if must_succeed else "failed"
    # The one outcome the oracle cannot foresee (see _check_unit): a cooperative
    # thread a loaded machine did not schedule within its grace period is
    # abandoned, never retried, and so fails the run its fault would not have.
    abandoned = False
    for uid, record in outcome.steps.items():
        found = plan_of(scenario, uid)
        if found is not None and (
            _abandoned_under_load(found[0], record)
            or _late(found[0], found[1] < 0 or found[1] in found[0].bad, record)
        ):
            abandoned = True
    checker.check(
        "oracle",
        status == want or (abandoned and status == "failed"),
        lambda: f"the run {status}; with its faults it must have {want} ({summary})",
    )


#: Timeouts this short can pass while an attempt waits to start on a loaded
#: machine (or behind a sibling busy-looping on the GIL, or a process starting).
LATE_START_TIMEOUT: Final = 5.0


def _late(plan: StepPlan, struck: bool, record: Any) -> int:
    """Attempts that timed out although the step's code would not have hung on them.

    The deadline runs from dispatch: on a loaded machine an attempt can start so
    late that it times out before it begins ("stopped before it started") or
    while it runs briefly.  Such an attempt of a unit whose fault would not
    strike it (an instance off the ``bad`` list, an attempt past ``failing``)
    costs one attempt more; with a timeout that must never fire, none is allowed.
    """
    timeout = plan.timeout
    if timeout is None or timeout >= LATE_START_TIMEOUT:
        return 0
    failing = plan.failing if struck and plan.fault != "ok" else 0
    return sum(
        a.outcome == "timed_out"
        and a.number > failing
        # its deadline really passed: the timeout elapsed between dispatch and the outcome
        and a.ended is not None
        and a.ended - a.started >= 0.9 * timeout
        for a in record.attempts
    )


def _abandoned_under_load(plan: StepPlan, record: Any) -> bool:
    """A cooperative thread step, meant to stop at its timeout, abandoned instead."""
    last = record.attempts[-1] if record.attempts else None
    return (
        plan.executor == "thread"
        and plan.fault == "timeout"
        and last is not None
        and last.note == "abandoned"
    )


def _stopping(scenario: Scenario, statuses: Mapping[str, str], *, cancel_issued: bool) -> bool:
    return cancel_issued or (
        scenario.on_failure == "fail_fast"
        and any(s in ("failed", "timed_out") for s in statuses.values())
    )


def _check_step(
    checker: Checker,
    scenario: Scenario,
    plan: StepPlan,
    record: Any,
    statuses: Mapping[str, str],
    *,
    cancel_issued: bool,
    steps: Mapping[str, Any] | None = None,
) -> None:
    """One step against its fault and its dependencies; a mapped step against its summary.

    A mapped step that expanded ended with the summary of its instances: the
    expected one, unless a stop or a thread abandoned under load changed an
    instance's end (each instance is checked on its own, and ``map-summary``
    checks the sum).  One chained to a map that never expanded waits on it whole.
    """
    want, attempts = expected_status(scenario, plan)
    blocked = [n for n in dependencies(scenario, plan) if statuses.get(n) != "succeeded"]
    source = chain_source(scenario, plan)
    source_record = steps.get(source.id) if steps and source else None
    if source and not expanded(source_record) and statuses.get(source.id) != "succeeded":
        blocked.append(source.id)
    stopping = _stopping(scenario, statuses, cancel_issued=cancel_issued)
    also: set[str] = set()
    if plan.mapped and steps is not None and expanded(record):
        mine = instance_records(steps, plan.id)
        disturbed = stopping or any(
            _abandoned_under_load(p, r)
            for p in _chain_of(scenario, plan)
            for r in instance_records(steps, p.id).values()
        )
        if disturbed:
            also.add(summary_of(str(r.status) for r in mine.values()))
    if_blocked = "skipped" if scenario.on_failure == "continue" else ""
    unit = _Unit(plan.id, want, attempts, blocked, if_blocked, frozenset(also))
    _check_unit(checker, scenario, plan, unit, record, stopping=stopping)


def _chain_of(scenario: Scenario, plan: StepPlan) -> list[StepPlan]:
    """``plan`` and the maps it is chained to, up the chain."""
    chain = [plan]
    source = chain_source(scenario, plan)
    while source is not None:
        chain.append(source)
        source = chain_source(scenario, source)
    return chain


def _check_instance(
    checker: Checker,
    scenario: Scenario,
    found: tuple[StepPlan, int],
    record: Any,
    statuses: Mapping[str, str],
    steps: Mapping[str, Any],
    cancel_issued: bool,
) -> None:
    """One instance: its own fault (if its index is a bad one), or skipped after its source's."""
    plan, index = found
    want, attempts = own_instance(scenario, plan, index)
    source = chain_source(scenario, plan)
    blocked: list[str] = []
    if source is not None:
        upstream = steps.get(instance_id(source.id, index))
        if upstream is None or str(upstream.status) != "succeeded":
            blocked = [instance_id(source.id, index)]
    struck = index in plan.bad
    unit = _Unit(instance_id(plan.id, index), want, attempts, blocked, "skipped", struck=struck)
    stopping = _stopping(scenario, statuses, cancel_issued=cancel_issued)
    _check_unit(checker, scenario, plan, unit, record, stopping=stopping)


@dataclass(frozen=True, slots=True)
class _Unit:
    """What one step or instance must end with: ``want`` after ``attempts``, unless
    ``blocked`` (then only ``if_blocked``, or nothing, is allowed)."""

    uid: str
    want: str
    attempts: int
    blocked: list[str]
    if_blocked: str
    #: Other statuses allowed (a mapped step's actual summary, when disturbed).
    also: frozenset[str] = frozenset()
    #: Whether the step's fault strikes this unit (an instance off ``bad``: no).
    struck: bool = True


def _check_unit(
    checker: Checker,
    scenario: Scenario,
    plan: StepPlan,
    unit: _Unit,
    record: Any,
    *,
    stopping: bool,
) -> None:
    status = str(record.status)
    want, attempts, blocked = unit.want, unit.attempts, unit.blocked
    if record.restored:
        checker.check(
            "oracle",
            status == "succeeded" and want == "succeeded",
            lambda: f"step {unit.uid} was restored as {status}; its fault says it must {want}",
        )
        return
    allowed = {want} | unit.also
    if blocked:
        # A dependency did not succeed: this step cannot have run.
        allowed = {unit.if_blocked} - {""}
    if stopping:
        allowed |= {"cancelled"} | ({"skipped"} if scenario.on_failure == "continue" else set())
    last = record.attempts[-1] if record.attempts else None
    abandoned = _abandoned_under_load(plan, record)
    if abandoned:
        checker.tolerated["abandoned under load"] += 1
        # A cooperative thread that a loaded machine does not schedule within the
        # grace period looks exactly like one that ignores the request: the engine
        # abandons it and, by design, never retries an abandoned attempt, so the
        # step can also end with fewer attempts than its fault would take.
        allowed |= {"timed_out"}
    late = _late(plan, unit.struck, record)
    if late:
        checker.tolerated["late start"] += 1
        # Each attempt that timed out for starting late took one attempt more;
        # when they used them all, the step timed out.
        allowed |= {"timed_out"}
        attempts = min(attempts + late, plan.max_attempts)
    if stopping and last is not None and (last.note or "").startswith(NOT_RETRIED_STOPPING):
        # The attempt failed as its fault says while the run was stopping: the
        # engine keeps that status and records that the stop prevented a retry.
        allowed |= {"failed" if last.outcome == "crashed" else str(last.outcome)}
    checker.check(
        "oracle",
        status in allowed,
        lambda: (
            f"step {unit.uid} ({plan.executor}, fault {plan.fault} x{plan.failing}, "
            f"max_attempts {plan.max_attempts}) ended {status}; allowed: {sorted(allowed)}"
            + (f" (dependencies {blocked} did not succeed)" if blocked else "")
            + f"; attempts: {_attempt_history(record)}"
        ),
    )
    got = len(record.attempts)
    if status == "skipped":
        checker.check(
            "oracle", got == 0, lambda: f"step {unit.uid} was skipped after {got} attempts"
        )
    elif late and status == "timed_out" and want != "timed_out":
        checker.check(
            "oracle",
            got == plan.max_attempts,
            lambda: (
                f"step {unit.uid} timed out after {got} attempts, {late} of them late; "
                f"expected all {plan.max_attempts} used"
            ),
        )
    elif abandoned and status == "timed_out":
        earlier = [a.outcome for a in record.attempts[:-1]]
        checker.check(
            "oracle",
            got <= attempts and all(o == "timed_out" for o in earlier),
            lambda: (
                f"step {unit.uid} was abandoned on attempt {got}; expected at most {attempts}, "
                f"each before it timed out (got {earlier})"
            ),
        )
    elif status == want and (status == "succeeded" or not stopping):
        checker.check(
            "oracle",
            got == attempts,
            lambda: (
                f"step {unit.uid} ({plan.fault} x{plan.failing}) {status} after {got} "
                f"attempts; expected {attempts}; attempts: {_attempt_history(record)}"
            ),
        )
    elif status == want:
        checker.check(
            "oracle",
            min(1, attempts) <= got <= attempts,
            lambda: f"step {unit.uid} {status} after {got} attempts; expected 1..{attempts}",
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
    mapped: Collection[str] = (),
) -> None:
    """What really ran in ``phase`` agrees with the attempts the run recorded.

    ``mapped`` steps never run themselves (their instances do): they have no log.
    """
    for sid, record in outcome.steps.items():
        if sid in mapped:
            checker.check("effects", sid not in effects, f"mapped step {sid} ran as a step")
            continue
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
    merged = merged_outputs(stored, order)
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
        lambda: f"processes {sorted(left)} ({cmdlines(left)}) outlived {what} by {grace:g} s",
    )
    for pid in left:  # do not let one violation spoil the following runs
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


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
