"""One owner per run: claims are atomic, a dead owner is seen at once, a live one names itself.

The races here are forced, never timed: a barrier makes both claimers read the
run before either claims it, and a seam inside the claim holds one claimer
between its check and its write while the other tries.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from stepvisor.clock import FakeClock
from stepvisor.core.state import RunStatus, StepRecord
from stepvisor.errors import RunOwnedError
from stepvisor.store.base import RunInfo
from stepvisor.store.sqlite import SCHEMA_VERSION, SQLiteStore, _owner
from tests.store.test_store_sqlite import make_v1_store, raw

WAIT = 30.0
T0 = 1_700_000_000.0


def info(run_id: str = "r", *, status: RunStatus = RunStatus.RUNNING, at: float = T0) -> RunInfo:
    return RunInfo(run_id, "etl", "fp", {}, 1, status, at, heartbeat=at)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """A store holding run ``r``, failed (so resumable), owned by nobody."""
    path = tmp_path / "runs.db"
    with SQLiteStore(path) as store:
        store.begin_run(info(at=time.time()), [StepRecord("a")])
        store.finish_run("r", RunStatus.FAILED, ended=time.time())
    return path


def test_of_two_claimers_that_both_read_the_run_first_exactly_one_owns_it(db: Path) -> None:
    both_read = threading.Barrier(2, timeout=WAIT)
    outcomes: dict[str, object] = {}

    def resume(name: str) -> None:
        with SQLiteStore(db) as store:  # a connection and a lock file of its own
            assert store.load("r").info.status is RunStatus.FAILED  # both see it resumable
            both_read.wait()  # neither has claimed yet
            try:
                store.claim_run("r", new=False)
                outcomes[name] = "owner"
                assert store.load("r").info.owner is not None
                both_read.wait()  # hold the claim until the other has tried
            except RunOwnedError as exc:
                outcomes[name] = exc
                both_read.wait()

    threads = [threading.Thread(target=resume, args=(n,)) for n in ("A", "B")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert sorted(map(str, outcomes.values())).count("owner") == 1
    (loser,) = [v for v in outcomes.values() if isinstance(v, RunOwnedError)]
    assert loser.owner is not None
    assert loser.owner.pid == os.getpid()
    assert loser.owner.host == socket.gethostname()
    message = str(loser)
    assert f"pid {os.getpid()} on host {socket.gethostname()} since " in message
    assert "stepvisor cancel r" in message


def test_a_claimer_cannot_check_while_another_is_between_its_check_and_its_write(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first_checked = threading.Event()
    go = threading.Event()
    second_trying = threading.Event()
    first = threading.current_thread()

    def seam(stage: str, run_id: str) -> None:
        if threading.current_thread() is first and stage == "checked":
            first_checked.set()
            assert go.wait(WAIT)

    monkeypatch.setattr(_owner, "seam", seam)
    outcome: list[BaseException] = []
    with SQLiteStore(db) as a, SQLiteStore(db, busy_timeout=WAIT) as b:

        def second() -> None:
            try:
                b.claim_run("r", new=False)
            except BaseException as exc:
                outcome.append(exc)

        conn = b._conn
        assert conn is not None
        conn.set_trace_callback(
            lambda sql: second_trying.set() if sql.startswith("BEGIN IMMEDIATE") else None
        )

        def release_first() -> None:
            assert first_checked.wait(WAIT)
            t.start()
            assert second_trying.wait(WAIT)  # B is claiming while A sits between check and write
            go.set()

        t = threading.Thread(target=second)
        releaser = threading.Thread(target=release_first)
        releaser.start()
        a.claim_run("r", new=False)  # pauses in the seam until B is claiming
        releaser.join(WAIT)
        t.join(WAIT)
        conn.set_trace_callback(None)
        (error,) = outcome
        assert isinstance(error, RunOwnedError), repr(error)
        # B's check ran after A's write: it names A's claim, token and all.
        assert error.owner == a.load("r").info.owner
        assert error.owner is not None
        assert error.owner.token == a._claims["r"][0].token


CHILD = """
import sys, time
from stepvisor.store.sqlite import SQLiteStore
from stepvisor.store.base import RunInfo
from stepvisor.core.state import RunStatus, StepRecord
store = SQLiteStore(sys.argv[1])
now = time.time()
store.begin_run(RunInfo("r", "etl", "fp", {}, 1, RunStatus.RUNNING, now, heartbeat=now), [])
print("owned", flush=True)
sys.stdin.read()  # until killed
"""


def test_a_sigkilled_owner_on_this_machine_reads_interrupted_at_once_and_can_be_claimed(
    db: Path,
) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(db)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "owned"
        with SQLiteStore(db) as store:  # the real clock: the heartbeat is fresh
            seen = store.load("r").info
            assert seen.status is RunStatus.RUNNING
            assert seen.owner is not None
            assert seen.owner.pid == child.pid
            with pytest.raises(RunOwnedError, match=f"pid {child.pid} on host"):
                store.claim_run("r", new=False)
            child.send_signal(signal.SIGKILL)
            child.wait(WAIT)
            assert store.load("r").info.status is RunStatus.INTERRUPTED  # no stale_after wait
            store.claim_run("r", new=False)
            store.release_run("r")
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(WAIT)
        assert child.stdin is not None
        assert child.stdout is not None
        child.stdin.close()
        child.stdout.close()


def _set_owner(db: Path, **columns: object) -> None:
    sets = ", ".join(f"owner_{name} = ?" for name in columns)
    with raw(db) as conn:
        conn.execute(f"UPDATE runs SET {sets} WHERE run_id = 'r'", tuple(columns.values()))


@pytest.fixture
def live_owner(db: Path) -> Path:
    """Run ``r`` running, fresh at T0, owned (on paper) by this process."""
    clock = FakeClock(wall_start=T0)
    with SQLiteStore(db, clock=clock) as store:
        store.begin_run(info(), [])
    return db


def test_a_reused_pid_is_not_taken_for_the_owner(live_owner: Path) -> None:
    started = _owner.process_started(os.getpid())
    assert started is not None
    with SQLiteStore(live_owner, clock=FakeClock(wall_start=T0)) as store:
        assert store.load("r").info.status is RunStatus.RUNNING  # pid and start time match
        _set_owner(live_owner, started=started + 1)  # the same pid, another process
        assert store.load("r").info.status is RunStatus.INTERRUPTED


def test_an_owner_before_a_reboot_or_on_another_host_is_judged_by_its_heartbeat(
    live_owner: Path,
) -> None:
    clock = FakeClock(wall_start=T0)
    with SQLiteStore(live_owner, clock=clock) as store:
        for columns in ({"boot": "another-boot"}, {"host": "elsewhere", "pid": 1}):
            _set_owner(live_owner, **columns)
            assert store.load("r").info.status is RunStatus.RUNNING  # fresh: maybe alive
            with pytest.raises(RunOwnedError, match="owned by another program"):
                store.claim_run("r", new=False)
        clock.advance(5.01)
        assert store.load("r").info.status is RunStatus.INTERRUPTED
        store.claim_run("r", new=False)  # stale: the owner is taken for dead
        assert store.load("r").info.owner == store._claims["r"][0]


def test_a_heartbeat_after_another_program_took_the_run_over_fails(live_owner: Path) -> None:
    with SQLiteStore(live_owner, clock=FakeClock(wall_start=T0)) as store:
        store.begin_run(info(), [])
        _set_owner(live_owner, host="elsewhere", token="theirs")
        with pytest.raises(RunOwnedError, match="on host elsewhere"):
            store.heartbeat("r", T0 + 1)


def test_finishing_a_run_gives_it_up_and_removes_its_lock_file(db: Path) -> None:
    locks = db.with_name("runs.db.locks")
    with SQLiteStore(db) as a, SQLiteStore(db) as b:
        a.claim_run("r", new=False)
        assert [p.name for p in locks.iterdir()] == ["run-r.lock"]
        with pytest.raises(RunOwnedError):
            b.claim_run("r", new=False)
        a.finish_run("r", RunStatus.FAILED, ended=time.time())
        assert list(locks.iterdir()) == []
        assert a.load("r").info.owner is None
        b.claim_run("r", new=False)  # at once
        with pytest.raises(RunOwnedError, match="already being run through this store"):
            b.claim_run("r", new=False)
    assert not locks.exists()  # the last store to close removes the empty directory


def test_one_program_can_own_one_run_while_another_owns_another(db: Path) -> None:
    with SQLiteStore(db) as a, SQLiteStore(db) as b:
        a.begin_run(info("x", at=time.time()), [])
        b.begin_run(info("y", at=time.time()), [])
        assert a.load("x").info.owner == a._claims["x"][0]
        assert b.load("y").info.owner == b._claims["y"][0]
        assert a._claims["x"][0].token != b._claims["y"][0].token
        assert sorted(p.name for p in db.with_name("runs.db.locks").iterdir()) == [
            "run-x.lock",
            "run-y.lock",
        ]


def test_run_ids_that_are_not_plain_names_get_a_hashed_lock_file(db: Path) -> None:
    with SQLiteStore(db) as store:
        store.begin_run(info("../../etc/passwd", at=time.time()), [])
        (lock,) = db.with_name("runs.db.locks").iterdir()
        assert lock.name.startswith("sha-")
        assert lock.parent == db.with_name("runs.db.locks")


def test_a_v2_store_migrates_to_v3_and_its_running_run_keeps_the_heartbeat_rule(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    fresh = (
        "ALTER TABLE runs ADD COLUMN source TEXT;"
        "CREATE INDEX runs_newest_first ON runs (started DESC);"
        "UPDATE meta SET value = '2' WHERE key = 'schema_version';"
        f"INSERT INTO runs VALUES ('live', 'etl', 'fp', '{{}}', 1, 'running', {T0}, NULL, {T0},"
        " NULL, 0, 'flows/etl.yaml');"
    )
    make_v1_store(path, extra_sql=fresh)
    clock = FakeClock(wall_start=T0 + 1)
    with SQLiteStore(path, clock=clock) as store:
        live = store.load("live").info
        assert (live.status, live.owner, live.source) == (RunStatus.RUNNING, None, "flows/etl.yaml")
        with pytest.raises(RunOwnedError, match="still running"):  # an older stepvisor runs it
            store.claim_run("live", new=False)
        clock.advance(5.0)
        store.claim_run("live", new=False)
        assert store.load("old-run").info.status is RunStatus.SUCCEEDED
    with raw(path) as conn:
        columns = {r[1] for r in conn.execute("PRAGMA table_info(runs)")}
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    assert SCHEMA_VERSION >= 3  # and later migrations ran after it
    assert {"owner_host", "owner_pid", "owner_started", "owner_boot", "owner_since"} <= columns
    assert "owner_token" in columns


def test_process_start_time_comes_from_proc_and_a_gone_pid_has_none() -> None:
    mine = _owner.process_started(os.getpid())
    assert isinstance(mine, int)
    assert mine > 0
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(WAIT)
    assert _owner.process_started(child.pid) is None  # reaped: gone


def test_status_shows_and_cancel_reaches_a_run_another_program_owns(
    db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from stepvisor.cli.main import main  # noqa: PLC0415

    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(db)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "owned"
        capsys.readouterr()
        assert main(["status", "r", "--db", str(db)]) == 0
        shown = capsys.readouterr().out
        assert "status    running" in shown
        assert f"owner     pid {child.pid} on host {socket.gethostname()} since " in shown
        assert main(["status", "--db", str(db)]) == 0
        assert f"run r is run by pid {child.pid} on host" in capsys.readouterr().out
        assert main(["cancel", "r", "--db", str(db)]) == 0
        assert "cancel requested for run r" in capsys.readouterr().out
        with SQLiteStore(db) as store:
            assert store.cancel_requested("r")  # what the owner's Supervisor polls
    finally:
        child.kill()
        child.wait(WAIT)
        assert child.stdin is not None
        assert child.stdout is not None
        child.stdin.close()
        child.stdout.close()
