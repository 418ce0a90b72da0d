"""The programs a campaign starts: a driver that runs or resumes a workflow, and a racer.

``python -m tests.chaos --drive SEED --drive-dir DIR`` runs the scenario of
``SEED`` on the run's store; ``--drive-resume`` resumes it instead (the
campaign SIGKILLs either midway); ``--drive-race`` resumes it in lockstep with
another racer, talking to the campaign over stdin and stdout::

    racer                                   campaign
      "ready"  ───────────────────────────▶   (both ready: the barrier)
               ◀───────────────────────────  "go" to both at once
      resume_start()
      "claimed" | "owned {owner}" | "error …" ─▶  one owner?  the loser names it?
      ... runs the run; in finish_run:
               ◀───────────────────────────  "settle" (the loser has been seen)
      exit 0 (ran it) | 3 (RunOwnedError) | 4 (another error)

The winner cannot give the run up before the campaign has seen the loser's
claim fail, so the race is a race however the machine schedules the two.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Final

import stepvisor as sv
from stepvisor.core.state import RunStatus
from stepvisor.errors import RunOwnedError, StoreError
from stepvisor.store.sqlite import SQLiteStore
from tests.chaos.runner import db_path, resume_or_start
from tests.chaos.scenario import NEVER_STALE, Scenario, build_workflow, generate, overrides
from tests.resumption import MinuteAhead

#: Exit codes of a racer.
RACE_WON: Final = 0
RACE_LOST: Final = 3
RACE_ERROR: Final = 4


def drive(seed: int, run_dir: Path, *, resume: bool, race: bool = False) -> int:
    """The driver program: run, resume, or race to resume the scenario of ``seed``."""
    scenario = generate(seed)
    wf = build_workflow(scenario, run_dir)
    db = db_path(run_dir, scenario)
    if race:
        return _race(scenario, wf, db)
    if not resume:
        sv.run(wf, store=str(db), run_id=scenario.run_id, **overrides(scenario))
        return 0
    with SQLiteStore(db, clock=MinuteAhead()) as store:
        resume_or_start(store, wf, scenario, Counter()).wait()
    return 0


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class _GatedStore(SQLiteStore):
    """A store whose ``finish_run`` first waits for the campaign's "settle" on stdin."""

    def finish_run(
        self, run_id: str, status: RunStatus, *, ended: float, error: str | None = None
    ) -> None:
        sys.stdin.readline()  # "settle", or end of file if the campaign is gone
        super().finish_run(run_id, status, ended=ended, error=error)


def _race(scenario: Scenario, wf: sv.Workflow, db: Path) -> int:
    """One racer: resume with a huge ``stale_after``, so a live owner can never look dead."""
    store = _GatedStore(db, stale_after=NEVER_STALE)
    try:
        _say("ready")
        if sys.stdin.readline().strip() != "go":
            return RACE_ERROR
        try:
            handle = sv.resume_start(scenario.run_id, wf, store=store, **overrides(scenario))
        except RunOwnedError as exc:
            owner = exc.owner
            seen = {
                "pid": None if owner is None else owner.pid,
                "host": None if owner is None else owner.host,
                "token": None if owner is None else owner.token,
                "message": str(exc),
            }
            _say("owned " + json.dumps(seen))
            return RACE_LOST
        except StoreError as exc:
            _say(f"error {type(exc).__name__}: {exc}")
            return RACE_ERROR
        _say("claimed")
        handle.wait()
        return RACE_WON
    finally:
        store.close()
