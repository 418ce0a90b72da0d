"""The oracle and the invariant checks: what a run must have done, given its scenario.

Each check is counted by a :class:`Checker`; a failed one becomes a
:class:`Violation` naming the run seed, so the run can be replayed alone.
:func:`expected_outcome` is the oracle proper: the status and attempt count a
step's fault implies; the other checks compare what ran, what was stored and
what is left running with what the run reported.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from stepvisor.actors.supervisor import NOT_RETRIED_STOPPING
from stepvisor.errors import StoreError, StoreFaultError
from stepvisor.store.sqlite import SQLiteStore
from tests.chaos.observe import Effect, Outcome, cmdlines, marked_processes, merged_outputs
from tests.chaos.scenario import CRASHES, Scenario, StepPlan
from tests.store_faults import StoreCheck

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
    "logs",
)

#: The ``StoreFaultError.fault`` each store fault must be reported as.
STORE_FAULT_NAMES: Final[Mapping[str, str]] = {
    "disk_full": "disk full",
    "read_only": "read-only",
    "lock_held": "locked",
    "deleted": "file deleted",
    "replaced": "file replaced",
}

#: How long processes may take to vanish once their run (or program) is gone.
_PROCESS_GRACE: Final = 5.0
_STATUS_NAMES: Final = ("succeeded", "failed", "timed_out", "cancelled", "skipped")


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
    if fault in CRASHES:
        cap = min(m, max_worker_crashes)
        return ("succeeded", k + 1) if k < cap else ("failed", cap)
    return ("succeeded", k + 1) if k < m else ("failed", m)  # raise, retryable


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
    # The one outcome the oracle cannot foresee (see _check_step): a cooperative
    # thread a loaded machine did not schedule within its grace period is
    # abandoned, never retried, and so fails the run its fault would not have.
    abandoned = any(
        _abandoned_under_load(p, outcome.steps[p.id])
        for p in scenario.steps
        if p.id in outcome.steps
    )
    checker.check(
        "oracle",
        status == want or (abandoned and status == "failed"),
        lambda: f"the run {status}; with its faults it must have {want} ({summary})",
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
    abandoned = _abandoned_under_load(plan, record)
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


# -- store faults and ownership ------------------------------------------------------------------


def check_fault_error(checker: Checker, kind: str, error: BaseException | None, db: Path) -> None:
    """The error a store fault ended with is a ``StoreFaultError`` naming the file and the fault."""
    want = STORE_FAULT_NAMES[kind]
    ok = (
        isinstance(error, StoreFaultError)
        and error.fault == want
        and error.path == str(db)
        and str(db) in str(error)
    )
    checker.check(
        "store-fault",
        ok,
        lambda: f"{kind}: expected a StoreFaultError ({want!r}) naming {db}, got {error!r}",
    )


def check_no_fault_error(checker: Checker, kind: str, error: BaseException | None) -> None:
    """A run a store fault did not stop (never struck; a brief lock waited out) has no fault error.

    Other store errors are a step's own doing (an artifact the codec refuses).
    """
    checker.check(
        "store-fault",
        not isinstance(error, StoreFaultError),
        lambda: f"{kind}: the run was not to be stopped by the store, but ended with {error!r}",
    )


def check_faulted_run(
    checker: Checker, kind: str, status: str, error: BaseException | None
) -> None:
    """A run a store fault struck ended failed, with the fault's own error."""
    checker.check(
        "store-fault",
        status == "failed",
        lambda: f"{kind}: the run struck by the fault ended {status}, not failed ({error!r})",
    )


def check_store_whole(
    checker: Checker, found: StoreCheck, run_id: str, step_ids: Iterable[str], *, what: str
) -> None:
    """``check_store`` found nothing wrong, and the run has one status row per step (or none)."""
    checker.check(
        "store-fault", not found.problems, lambda: f"{what}: the store is damaged: {found.problems}"
    )
    rows = set(found.steps.get(run_id, {}))
    want = set(step_ids)
    checker.check(
        "store-fault",
        rows in (want, set()),
        lambda: f"{what}: the store has step rows {sorted(rows)}, the workflow {sorted(want)}",
    )


def check_committed_kept(
    checker: Checker, before: StoreCheck, after: StoreCheck, run_id: str, *, what: str
) -> None:
    """Every transition committed before the fault is still there after it.

    A step in a terminal status keeps that status and its attempts; any other
    step has at least the attempts it had.
    """
    old, new = before.steps.get(run_id, {}), after.steps.get(run_id, {})
    old_attempts, new_attempts = before.attempts.get(run_id, {}), after.attempts.get(run_id, {})
    for sid, status in sorted(old.items()):
        was, now = old_attempts.get(sid, 0), new_attempts.get(sid, 0)
        if status in _TERMINAL:
            ok = new.get(sid) == status and now == was
        else:
            ok = sid in new and now >= was
        checker.check(
            "store-fault",
            ok,
            f"{what}: step {sid} was stored {status} with {was} attempts before the "
            f"fault, and is {new.get(sid)} with {now} after it",
        )


def check_torn_store(
    checker: Checker, before: StoreCheck, after: StoreCheck, run_id: str, step_ids: Iterable[str]
) -> None:
    """A torn WAL loses whole transactions at its end, never invents or half-keeps one."""
    check_store_whole(checker, after, run_id, step_ids, what="the torn WAL")
    kept, had = after.succeeded(run_id), before.succeeded(run_id)
    checker.check(
        "store-fault",
        kept <= had,
        lambda: f"after the WAL was torn, steps {sorted(kept - had)} read succeeded; they had not",
    )


def check_race_effects(
    checker: Checker, effects: Mapping[str, list[Effect]], *, winner: str, loser: str
) -> None:
    """Across two racing resumes no step ran twice: the loser ran nothing at all."""
    for sid, lines in sorted(effects.items()):
        lost = [e.attempt for e in lines if e.phase == loser and e.event == "start"]
        checker.check(
            "race",
            not lost,
            f"step {sid} began attempts {lost} in the losing resume",
        )
        both = [e.attempt for e in lines if e.phase in (winner, loser) and e.event == "start"]
        checker.check(
            "race",
            len(both) == len(set(both)),
            f"step {sid}: attempts {both} began across the racing resumes",
        )
