"""The checks of store faults and ownership runs (:mod:`tests.chaos.store_runs`).

Like :mod:`tests.chaos.oracle`'s, each check is counted by a
:class:`~tests.chaos.oracle.Checker` and a failed one becomes a violation naming
the run seed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Final

from stepvisor.errors import StoreFaultError
from tests.chaos.observe import Effect
from tests.chaos.oracle import TERMINAL, Checker
from tests.store_faults import StoreCheck

#: The ``StoreFaultError.fault`` each store fault must be reported as.
STORE_FAULT_NAMES: Final[Mapping[str, str]] = {
    "disk_full": "disk full",
    "read_only": "read-only",
    "lock_held": "locked",
    "deleted": "file deleted",
    "replaced": "file replaced",
}


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
        if status in TERMINAL:
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
