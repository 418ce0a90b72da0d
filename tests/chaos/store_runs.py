"""Runs that fault the store or race for its runs, built on :mod:`tests.chaos.runner`.

Three kinds of run, each checked by :mod:`tests.chaos.oracle`:

* **an in-run store fault** (full disk, a write lock held briefly or past
  ``busy_timeout``, the file deleted or replaced): the run goes in this
  program; as the ``fault_at``-th eligible attempt begins it asks for the
  fault (a file handshake, see :func:`tests.chaos.steps._store_fault_due`) and
  waits while the monitor injects it with :mod:`tests.store_faults`.  The run
  must stop with a ``StoreFaultError`` naming the file and the fault (a brief
  lock: wait and complete), keep every transition committed before the
  fault, and, once the fault is fixed, resume without re-running a step
  stored as succeeded;
* **a fault after a kill** (read-only, torn WAL): a driver program is
  SIGKILLed midway; the store's file system goes read-only (the resume must
  be refused, naming the fault, with not a byte changed) or its WAL is cut
  mid-frame; then the fix and an immediate resume;
* **racing resumes**: a driver is SIGKILLed, then two programs resume the run
  at the same moment (a barrier over their pipes, see
  :mod:`tests.chaos.programs`): one runs it, the other gets ``RunOwnedError``
  naming the first, and no step runs twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import socket
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Final

import stepvisor as sv
from stepvisor.errors import StoreError
from stepvisor.store.sqlite import SQLiteStore
from tests.chaos.expect import mapped_ids
from tests.chaos.observe import Outcome, abandoned_threads, read_effects, start_counts
from tests.chaos.oracle import (
    check_effects,
    check_outcome,
    check_processes_gone,
    check_sqlite_file,
    check_threads,
)
from tests.chaos.oracle_store import (
    check_committed_kept,
    check_fault_error,
    check_faulted_run,
    check_no_fault_error,
    check_race_effects,
    check_store_whole,
    check_torn_store,
)
from tests.chaos.programs import RACE_LOST, RACE_WON
from tests.chaos.runner import (
    RunContext,
    check_dead_owner_seen,
    check_resumed,
    check_stored_run,
    driver_log,
    kill_driver_midway,
    resume_here,
    set_mark,
    spawn_driver,
    stored_successes,
    wait_result,
    watch,
)
from tests.chaos.scenario import NEVER_STALE, overrides, run_bound
from tests.chaos.steps import FAULT_ACK, FAULT_REQUEST
from tests.store_faults import (
    StoreCheck,
    check_store,
    delete_store,
    fill,
    read_only,
    replace_store,
    tear_wal,
    wal_frames,
    write_lock,
)

#: How long the two racers may take to get ready, claim, and end.
_RACE_WAIT: Final = 60.0
#: Statements that need the write lock (what a brief lock makes the engine wait at).
_WRITES: Final = ("BEGIN IMMEDIATE", "UPDATE", "INSERT")


# -- in-run store faults -------------------------------------------------------------------------


class _Injector:
    """The monitor's hook for an in-run store fault: injects it when asked, undoes it later."""

    def __init__(self, ctx: RunContext, store: SQLiteStore) -> None:
        self.ctx = ctx
        self.kind = ctx.scenario.store_fault
        self.db = ctx.db
        self.injected = False
        self.before: StoreCheck | None = None
        self.filler: Path | None = None
        self.replacement: str | None = None  # the digest of the file put at the path
        self._lock: contextlib.ExitStack | None = None
        self._held_since = 0.0
        self._holding = False
        self._tried = threading.Event()
        if self.kind == "lock_brief":
            conn = store._conn  # the engine's one connection: see when it tries to write
            assert conn is not None
            conn.set_trace_callback(self._trace)

    def _trace(self, sql: str) -> None:
        if self._holding and sql.lstrip().upper().startswith(_WRITES):
            self._tried.set()

    def poll(self) -> None:
        if not self.injected:
            if (self.ctx.run_dir / FAULT_REQUEST).exists():
                self._inject()
            return
        if self.kind == "lock_brief" and self._lock is not None:
            # Released once the engine tried to write under it; or, should that
            # write have begun just before the lock was ours, a while later.
            waited = self._tried.is_set()
            brief = self.ctx.scenario.busy_timeout / 4
            if waited or time.monotonic() - self._held_since > brief:
                self.ctx.report.faults[f"lock_brief:{'waited' if waited else 'timed'}"] += 1
                self.release()

    def _inject(self) -> None:
        if self.before is None:
            self.before = check_store(self.db)  # what was committed before the fault
        if self.kind == "disk_full":
            self.filler = fill(self.db.parent)
        elif self.kind in ("lock_brief", "lock_held"):
            if not self._take_lock():
                return  # the engine is writing: try again at the next poll
        elif self.kind == "deleted":
            delete_store(self.db)
        elif self.kind == "replaced":
            other = self.ctx.run_dir / "replacement.db"
            SQLiteStore(other).close()
            self.replacement = _digest(other)
            replace_store(self.db, other)
        (self.ctx.run_dir / FAULT_ACK).touch()
        self.injected = True

    def _take_lock(self) -> bool:
        stack = contextlib.ExitStack()
        self._holding = True
        try:
            stack.enter_context(write_lock(self.db))
        except sqlite3.OperationalError:
            self._holding = False
            stack.close()
            return False
        self._tried.clear()  # only a write tried from now on waited for this lock
        self._lock = stack
        self._held_since = time.monotonic()
        return True

    def release(self) -> None:
        lock, self._lock = self._lock, None
        self._holding = False
        if lock is not None:
            lock.close()


def run_with_store_fault(ctx: RunContext) -> Outcome | None:
    """Run here on SQLite; a store fault strikes at an attempt; fix it, resume, check."""
    scenario = ctx.scenario
    (ctx.run_dir / "tickets").mkdir()
    store = SQLiteStore(ctx.db, busy_timeout=scenario.busy_timeout)
    injector = _Injector(ctx, store)
    threads_before = set(threading.enumerate())
    set_mark(ctx.mark("p0"))
    bound = run_bound(scenario) + scenario.busy_timeout
    try:
        handle = sv.start(ctx.wf, store=store, run_id=scenario.run_id, **overrides(scenario))
        watch(ctx, handle.done, bound=bound, hook=injector.poll)
        injector.release()  # lock_held: held until the run ended
        result = wait_result(ctx, handle, bound)
    finally:
        injector.release()
        store.close()
    if result is None:
        return None
    outcome = Outcome.from_result(result)
    check_processes_gone(ctx.checker, ctx.mark("p0"), what="the run struck by a store fault")
    # A thread that ignores cancellation may still be sleeping out its hang.
    hangs = [p.timeout or 0.0 for p in scenario.steps if p.fault == "ignore_cancel"]
    grace = 1.0 + max(hangs, default=0.0) + scenario.kill_grace + 0.5
    excepted = check_threads(ctx.checker, threads_before, abandoned_threads(outcome), grace=grace)
    ctx.report.abandoned += len(excepted)
    kind = scenario.store_fault
    if not injector.injected or kind == "lock_brief":
        # Never struck (the attempt it waited for never began), or a brief lock that
        # the engine waited out: the run must have ended as its faults say.
        ctx.report.faults[f"store_fault:{kind}" + ("" if injector.injected else ":missed")] += 1
        check_no_fault_error(ctx.checker, kind, result.error)
        check_outcome(ctx.checker, scenario, outcome, cancel_issued=False, order=ctx.order)
        check_effects(
            ctx.checker, outcome, read_effects(ctx.run_dir), phase="p0", mapped=mapped_ids(scenario)
        )
        check_stored_run(ctx, outcome)
        return outcome
    ctx.report.faults[f"store_fault:{kind}"] += 1
    check_faulted_run(ctx.checker, kind, outcome.status, result.error)
    check_fault_error(ctx.checker, kind, result.error, ctx.db)
    if not _fix(ctx, injector):
        return None
    return _resume_after_fault(ctx, injector.before, what=f"after the {kind} fault")


def _fix(ctx: RunContext, injector: _Injector) -> bool:
    """Undo the fault as a user would; False when the store cannot be put back."""
    if injector.filler is not None:
        injector.filler.unlink()  # free the space
    if injector.kind not in ("deleted", "replaced"):
        return True
    db = ctx.db
    saved = sorted(db.parent.glob(f"{db.name}.recovered-*"))
    ok = ctx.checker.check(
        "store-fault",
        len(saved) == 1,
        lambda: f"{injector.kind}: expected one saved copy beside the store, found {saved}",
    )
    ctx.checker.check(
        "store-fault",
        not Path(f"{db}-wal").exists(),
        f"{injector.kind}: the faulted program's WAL was left at the store's path",
    )
    if injector.replacement is not None:
        ctx.checker.check(
            "store-fault",
            db.exists() and _digest(db) == injector.replacement,
            "replaced: the file put at the store's path was changed",
        )
    if not ok:
        return False
    os.replace(saved[0], db)  # put the saved store back
    return True


def _resume_after_fault(ctx: RunContext, before: StoreCheck | None, *, what: str) -> Outcome | None:
    """The store is whole and kept what was committed; resume at once; nothing reruns."""
    scenario = ctx.scenario
    after = check_store(ctx.db)
    step_ids = [p.id for p in scenario.steps]
    check_store_whole(ctx.checker, after, scenario.run_id, step_ids, what=what)
    if before is not None:
        check_committed_kept(ctx.checker, before, after, scenario.run_id, what=what)
    done_before = after.succeeded(scenario.run_id)
    counts_before = start_counts(read_effects(ctx.run_dir))
    phase = "p2" if scenario.store_fault == "read_only" else "p1"
    outcome = resume_here(ctx, phase, immediate=True)
    outcome = check_resumed(ctx, outcome, phase, done_before, counts_before)
    final = check_store(ctx.db)
    check_store_whole(ctx.checker, final, scenario.run_id, step_ids, what=f"the resume {what}")
    return outcome


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- store faults after a kill ------------------------------------------------------------------


def run_after_kill_fault(ctx: RunContext) -> Outcome | None:
    """SIGKILL a driver midway, fault its store (read-only, torn WAL), fix it, resume at once."""
    scenario = ctx.scenario
    kind = scenario.store_fault
    ctx.report.faults[f"driver:{scenario.driver}"] += 1
    kill_driver_midway(
        ctx, "p0", resume=False, kill_after=scenario.kill_after, inspect=kind != "torn_wal"
    )
    if not ctx.db.exists():
        ctx.checker.fail("store-fault", f"{kind}: the killed driver left no store")
        return None
    frames = wal_frames(ctx.db)
    before = check_store(ctx.db)  # a read-only connection: it leaves the WAL as it is
    if kind == "read_only":
        _refused_while_read_only(ctx)
        return _resume_after_fault(ctx, before, what="after the read-only fault")
    if frames < 2:
        # The driver ended before the kill, and its store folded the WAL into the file.
        ctx.report.faults["store_fault:torn_wal:whole"] += 1
    else:
        keep = min(frames - 1, max(1, round(frames * scenario.tear_keep)))
        tear_wal(ctx.db, keep_frames=keep)
        ctx.report.faults["store_fault:torn_wal"] += 1
    after = check_store(ctx.db)
    lost = before.succeeded(scenario.run_id) - after.succeeded(scenario.run_id)
    ctx.report.faults["torn_wal:successes_lost"] += len(lost)  # to be run again
    check_sqlite_file(ctx.checker, ctx.db)
    check_dead_owner_seen(ctx)
    check_torn_store(ctx.checker, before, after, scenario.run_id, [p.id for p in scenario.steps])
    return _resume_after_fault(ctx, None, what="after the torn WAL")


def _refused_while_read_only(ctx: RunContext) -> None:
    """With the file system read-only, a resume is refused, naming the fault, changing nothing."""
    db = ctx.db
    files = [db, Path(f"{db}-wal")]
    digests = [_digest(f) if f.exists() else None for f in files]
    error: BaseException | None = None
    set_mark(ctx.mark("p1"))
    try:
        with read_only(db.parent):
            ctx.report.faults["store_fault:read_only"] += 1
            try:
                with SQLiteStore(db, stale_after=NEVER_STALE) as store:
                    sv.resume(ctx.scenario.run_id, ctx.wf, store=store, **overrides(ctx.scenario))
            except StoreError as exc:
                error = exc
    except RuntimeError as exc:  # the remount failed: a file on it is open for writing
        ctx.checker.fail("store-fault", f"read_only: {exc}")
        return
    check_fault_error(ctx.checker, "read_only", error, db)
    after = [_digest(f) if f.exists() else None for f in files]
    ctx.checker.check(
        "store-fault",
        after == digests,
        "read_only: the refused resume changed the store's files",
    )
    check_processes_gone(ctx.checker, ctx.mark("p1"), what="the refused resume")
    ran = {
        sid
        for sid, lines in read_effects(ctx.run_dir).items()
        if any(e.phase == "p1" for e in lines)
    }
    ctx.checker.check("store-fault", not ran, f"read_only: the refused resume ran {sorted(ran)}")


# -- racing resumes -----------------------------------------------------------------------------


class _Racer:
    """A racing program and the lines it says, read by a thread into a queue."""

    def __init__(self, phase: str, proc: subprocess.Popen[bytes]) -> None:
        self.phase = phase
        self.proc = proc
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"chaos-racer-{phase}")
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw.decode(errors="replace").strip())
        self.lines.put(None)

    def line(self, deadline: float) -> str | None:
        try:
            return self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return None

    def say(self, word: str) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.write(f"{word}\n".encode())
            self.proc.stdin.flush()

    def end(self, timeout: float) -> int | None:
        """Close its stdin and wait for it (killed past ``timeout``); its exit code."""
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None
        finally:
            self._reader.join(timeout)
            assert self.proc.stdout is not None
            self.proc.stdout.close()
        return self.proc.returncode


def run_race(ctx: RunContext) -> Outcome | None:
    """SIGKILL a driver midway; two programs resume at once: one owner, no step twice."""
    scenario = ctx.scenario
    ctx.report.faults["driver:race"] += 1
    kill_driver_midway(ctx, "p0", resume=False, kill_after=scenario.kill_after)
    done_before = stored_successes(ctx)
    counts_before = start_counts(read_effects(ctx.run_dir))
    racers = [
        _Racer(phase, spawn_driver(ctx, phase, resume=True, race=True)) for phase in ("p1", "p2")
    ]
    try:
        winner = _race(ctx, racers)
    finally:
        bound = run_bound(scenario) + 10.0
        codes = {r.phase: r.end(bound) for r in racers}
    for racer in racers:
        check_processes_gone(ctx.checker, ctx.mark(racer.phase), what=f"racer {racer.phase}")
    if winner is None:
        return None
    loser = next(r for r in racers if r is not winner)
    ctx.checker.check(
        "race",
        codes == {winner.phase: RACE_WON, loser.phase: RACE_LOST},
        lambda: f"the racers exited {codes}: {driver_log(ctx, winner.phase)}",
    )
    check_race_effects(
        ctx.checker, read_effects(ctx.run_dir), winner=winner.phase, loser=loser.phase
    )
    check_sqlite_file(ctx.checker, ctx.db)
    with SQLiteStore(ctx.db, create=False) as store:
        stored = store.load(scenario.run_id)
    outcome = Outcome.from_stored(stored, ctx.order)
    return check_resumed(ctx, outcome, winner.phase, done_before, counts_before)


def _race(ctx: RunContext, racers: list[_Racer]) -> _Racer | None:
    """Let both go at once; check one claimed, the other was refused naming it; settle."""
    deadline = time.monotonic() + _RACE_WAIT
    ready = [r.line(deadline) for r in racers]
    if ready != ["ready", "ready"]:
        ctx.checker.fail("race", f"the racers did not get ready: {ready}")
        return None
    for racer in racers:  # both are blocked reading stdin: the barrier
        racer.say("go")
    said = {r.phase: r.line(deadline) for r in racers}
    winners = [r for r in racers if said[r.phase] == "claimed"]
    losers = [r for r in racers if (said[r.phase] or "").startswith("owned ")]
    ok = ctx.checker.check(
        "one-owner",
        len(winners) == 1 and len(losers) == 1,
        lambda: f"of two racing resumes, exactly one must own the run; they said {said}",
    )
    if not ok:
        for racer in winners:
            racer.say("settle")
        return None
    winner = winners[0]
    seen: dict[str, Any] = json.loads((said[losers[0].phase] or "")[len("owned ") :])
    _check_loser_names_winner(ctx, seen, winner.proc.pid)
    winner.say("settle")  # only now may the winner give the run up
    return winner


def _check_loser_names_winner(ctx: RunContext, seen: dict[str, Any], pid: int) -> None:
    """The refused racer's error names the winner, and so does the store (one owner)."""
    host = socket.gethostname()
    ctx.checker.check(
        "one-owner",
        seen["pid"] == pid
        and seen["host"] == host
        and f"pid {pid} on host {host}" in seen["message"],
        lambda: f"the refused racer names {seen}; the winner is pid {pid} on {host}",
    )
    with SQLiteStore(ctx.db, create=False, stale_after=NEVER_STALE) as store:
        owner = store.load(ctx.scenario.run_id).info.owner  # the winner is held in finish_run
    ctx.checker.check(
        "one-owner",
        owner is not None and owner.pid == pid and owner.token == seen["token"],
        lambda: f"the store names {owner} as the owner; the winner is pid {pid}",
    )
