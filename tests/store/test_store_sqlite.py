"""What only the SQLite store does: files, schema, durability, trust, concurrency.

The RunStore semantics it shares with MemoryStore are in test_store_contract.py.
Files that are not stores must come out of every test byte-for-byte unchanged;
time-dependent status (interrupted runs) is tested with a FakeClock and old
heartbeat values, never by waiting.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import enum
import math
import os
import pickle
import random
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stepvisor.clock import FakeClock
from stepvisor.core.state import AttemptRecord, RunStatus, StepRecord, StepStatus
from stepvisor.errors import (
    ArtifactCodecError,
    InvalidSettingError,
    InvalidTimeoutError,
    NotAStoreError,
    RunNotFoundError,
    SchemaVersionError,
    StoreError,
)
from stepvisor.store.base import RunInfo
from stepvisor.store.sqlite import APPLICATION_ID, SCHEMA_VERSION, SQLiteStore

T0 = 1_700_000_000.0
WAIT = 30.0  # bound on every blocking wait


# -- helpers -----------------------------------------------------------------------------


@contextlib.contextmanager
def raw(path: Path) -> Iterator[sqlite3.Connection]:
    """A plain sqlite3 connection, as another program would open one."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


@dataclasses.dataclass(frozen=True)
class FileState:
    content: bytes
    mtime_ns: int
    mode: int
    neighbours: tuple[str, ...]


def file_state(path: Path) -> FileState:
    info = path.stat()
    names = tuple(sorted(p.name for p in path.parent.iterdir()))
    return FileState(path.read_bytes(), info.st_mtime_ns, info.st_mode, names)


def run_info(run_id: str = "run-1", **changes: Any) -> RunInfo:
    fields: dict[str, Any] = {
        "run_id": run_id,
        "workflow_id": "etl",
        "fingerprint": "fp",
        "settings": {"max_parallel": 2},
        "seed": 1,
        "status": RunStatus.RUNNING,
        "started": T0,
        "heartbeat": T0,
    }
    fields.update(changes)
    return RunInfo(**fields)


def running(step_id: str) -> StepRecord:
    return StepRecord(step_id).with_attempt_started(AttemptRecord(1, T0))


def succeeded(step_id: str) -> StepRecord:
    return running(step_id).with_last_attempt(
        AttemptRecord(1, T0, T0 + 1, 1.0, "succeeded"), StepStatus.SUCCEEDED
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(wall_start=T0)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / ".stepvisor" / "runs.db"


@pytest.fixture
def store(path: Path, clock: FakeClock) -> Iterator[SQLiteStore]:
    with SQLiteStore(path, clock=clock) as made:
        yield made


def make_store(path: Path, *, runs: int = 1, codec: str = "json") -> None:
    """A closed store at ``path`` holding ``runs`` runs, one succeeded step each."""
    with SQLiteStore(path, codec=codec, clock=FakeClock(wall_start=T0)) as s:
        for i in range(runs):
            s.begin_run(run_info(f"run-{i}"), [StepRecord("a")])
            s.save_step(f"run-{i}", succeeded("a"), {"n": i})


# -- files ---------------------------------------------------------------------------------


def test_new_store_is_wal_with_stepvisor_ids_and_meta(store: SQLiteStore, path: Path) -> None:
    with raw(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("PRAGMA application_id").fetchone() == (APPLICATION_ID,)
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    assert meta["application"] == "stepvisor run store"
    assert meta["schema_version"] == str(SCHEMA_VERSION)
    assert meta["codec"] == "json"


def test_store_and_wal_files_are_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "deep" / ".stepvisor" / "runs.db"
    old = os.umask(0)
    try:
        with SQLiteStore(path) as s:
            s.begin_run(run_info(), [StepRecord("a")])
            names = sorted(p.name for p in path.parent.iterdir())
            # no temporary left; the running run's lock file has a directory of its own
            assert names == ["runs.db", "runs.db-shm", "runs.db-wal", "runs.db.locks"]
            for name in names[:3]:
                assert stat.S_IMODE((path.parent / name).stat().st_mode) == 0o600, name
            locks = path.parent / "runs.db.locks"
            assert stat.S_IMODE(locks.stat().st_mode) == 0o700
            assert [p.name for p in locks.iterdir()] == ["run-run-1.lock"]
            assert stat.S_IMODE((locks / "run-run-1.lock").stat().st_mode) == 0o600
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert sorted(p.name for p in path.parent.iterdir()) == ["runs.db"]  # WAL folded on close


def test_without_create_a_missing_store_is_refused_and_nothing_made(tmp_path: Path) -> None:
    missing = tmp_path / "nothing" / "runs.db"
    with pytest.raises(StoreError, match=r"no run store at .*nothing/runs.db.*create=True"):
        SQLiteStore(missing, create=False)
    assert list(tmp_path.iterdir()) == []


def test_store_that_cannot_be_created_says_so_and_changes_nothing(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the store's directory should go")
    before = file_state(blocker)
    with pytest.raises(StoreError, match=r"cannot create a run store at .*not-a-dir/runs.db"):
        SQLiteStore(blocker / "runs.db")
    assert file_state(blocker) == before


def test_runs_survive_closing_and_reopening(path: Path, clock: FakeClock) -> None:
    with SQLiteStore(path, clock=clock) as s:
        s.begin_run(run_info(), [StepRecord("a")])
        s.save_step("run-1", succeeded("a"), {"rows": [1, 2]})
        before = s.load("run-1")
    with SQLiteStore(path, clock=clock, create=False) as s:
        assert s.load("run-1") == before


def test_opening_a_current_store_does_not_write_it(path: Path) -> None:
    make_store(path, runs=3)
    before = file_state(path)
    with SQLiteStore(path, clock=FakeClock(wall_start=T0)) as s:
        assert len(s.list_runs()) == 3
        assert s.load("run-2").outputs == {"a": {"n": 2}}
        assert not s.cancel_requested("run-1")
    assert file_state(path) == before


def test_closed_store_refuses_use_and_closes_once(path: Path) -> None:
    s = SQLiteStore(path)
    with s:
        s.begin_run(run_info(), [])
    s.close()  # again: nothing happens
    assert s.codec == "json"
    with pytest.raises(StoreError, match="closed; open a new SQLiteStore"):
        s.load("run-1")
    with pytest.raises(StoreError, match="closed"):
        s.heartbeat("run-1", T0)
    assert "closed" in repr(s)


@pytest.mark.parametrize(
    ("option", "value"),
    [("stale_after", 0), ("stale_after", -1.0), ("stale_after", math.inf), ("busy_timeout", -1)],
)
def test_bad_timing_options_are_refused(path: Path, option: str, value: float) -> None:
    options: dict[str, Any] = {option: value}
    with pytest.raises(InvalidTimeoutError, match=option):
        SQLiteStore(path, **options)
    assert not path.parent.exists()


# -- interrupted runs -------------------------------------------------------------------------


def test_running_run_with_a_stale_heartbeat_reads_interrupted(
    store: SQLiteStore, clock: FakeClock
) -> None:
    store.begin_run(run_info(heartbeat=T0 - 5.5), [])
    assert store.load("run-1").info.status is RunStatus.INTERRUPTED
    assert store.list_runs()[0].status is RunStatus.INTERRUPTED
    store.heartbeat("run-1", clock.wall())
    assert store.load("run-1").info.status is RunStatus.RUNNING
    clock.advance(5.0)  # exactly stale_after: not yet
    assert store.list_runs()[0].status is RunStatus.RUNNING
    clock.advance(0.01)
    assert store.list_runs()[0].status is RunStatus.INTERRUPTED
    assert store.load("run-1").info.heartbeat == T0  # the stored row is not changed


def test_run_that_never_beat_is_judged_by_its_start(store: SQLiteStore) -> None:
    store.begin_run(run_info("fresh", heartbeat=None, started=T0 - 1), [])
    store.begin_run(run_info("dead", heartbeat=None, started=T0 - 60), [])
    status = {r.run_id: r.status for r in store.list_runs()}
    assert status == {"fresh": RunStatus.RUNNING, "dead": RunStatus.INTERRUPTED}


def test_finished_runs_are_never_interrupted(store: SQLiteStore) -> None:
    store.begin_run(run_info(heartbeat=T0 - 3600), [])
    store.finish_run("run-1", RunStatus.SUCCEEDED, ended=T0 - 3500)
    assert store.load("run-1").info.status is RunStatus.SUCCEEDED


def test_staleness_threshold_is_an_option(path: Path, clock: FakeClock) -> None:
    with SQLiteStore(path, clock=clock, stale_after=120.0) as s:
        s.begin_run(run_info(heartbeat=T0 - 60), [])
        assert s.load("run-1").info.status is RunStatus.RUNNING


def test_staleness_uses_the_system_wall_clock_by_default(path: Path) -> None:
    with SQLiteStore(path) as s:
        s.begin_run(run_info("now", started=time.time(), heartbeat=None), [])
        s.begin_run(run_info("long-ago", started=time.time() - 600, heartbeat=None), [])
        status = {r.run_id: r.status for r in s.list_runs()}
    assert status == {"now": RunStatus.RUNNING, "long-ago": RunStatus.INTERRUPTED}


# -- schema versions and migrations -----------------------------------------------------------

# Schema v1 exactly as stepvisor 0.1 shipped it, written out here (not imported)
# so that a change to the shipped migration cannot go unnoticed.
V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE runs (
    run_id TEXT PRIMARY KEY, workflow_id TEXT NOT NULL, fingerprint TEXT NOT NULL,
    settings TEXT NOT NULL, seed INTEGER NOT NULL, status TEXT NOT NULL,
    started REAL NOT NULL, ended REAL, heartbeat REAL, error TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0);
CREATE TABLE steps (
    run_id TEXT NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
    step_id TEXT NOT NULL, status TEXT NOT NULL, note TEXT,
    restored INTEGER NOT NULL DEFAULT 0, has_outputs INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (run_id, step_id));
CREATE TABLE attempts (
    run_id TEXT NOT NULL, step_id TEXT NOT NULL, number INTEGER NOT NULL,
    started REAL NOT NULL, ended REAL, duration REAL, outcome TEXT, error_type TEXT,
    error_message TEXT, error_traceback TEXT, delay_after REAL, worker TEXT, note TEXT,
    PRIMARY KEY (run_id, step_id, number),
    FOREIGN KEY (run_id, step_id) REFERENCES steps (run_id, step_id) ON DELETE CASCADE
) WITHOUT ROWID;
CREATE TABLE artifacts (
    run_id TEXT NOT NULL, step_id TEXT NOT NULL, name TEXT NOT NULL,
    value BLOB NOT NULL, codec TEXT NOT NULL,
    PRIMARY KEY (run_id, step_id, name),
    FOREIGN KEY (run_id, step_id) REFERENCES steps (run_id, step_id) ON DELETE CASCADE
) WITHOUT ROWID;
INSERT INTO meta VALUES ('application', 'stepvisor run store'), ('schema_version', '1'),
                        ('codec', 'json');
INSERT INTO runs VALUES ('old-run', 'etl', 'fp', '{"max_parallel":3}', 9, 'succeeded',
                         1000.0, 1010.0, 1009.0, NULL, 0);
INSERT INTO steps VALUES ('old-run', 'a', 'succeeded', 'kept', 0, 1);
INSERT INTO attempts VALUES ('old-run', 'a', 1, 1000.0, 1001.0, 1.0, 'succeeded',
                             NULL, NULL, NULL, NULL, 'thread-0', NULL);
INSERT INTO artifacts VALUES ('old-run', 'a', 'rows', '[1,2,3]', 'json');
"""


def make_v1_store(path: Path, *, extra_sql: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with raw(path) as conn:
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute("PRAGMA user_version = 1")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.executescript(f"BEGIN; {V1_SCHEMA} {extra_sql} COMMIT;")
    path.chmod(0o600)


def test_v1_store_is_migrated_keeping_its_runs(path: Path) -> None:
    make_v1_store(path)
    with SQLiteStore(path, clock=FakeClock(wall_start=T0)) as s:
        old = s.load("old-run")
        assert old.info == RunInfo(
            "old-run", "etl", "fp", {"max_parallel": 3}, 9, RunStatus.SUCCEEDED,
            1000.0, 1010.0, 1009.0, None, None,
        )  # fmt: skip
        assert old.steps["a"].note == "kept"
        assert old.steps["a"].attempts == (
            AttemptRecord(1, 1000.0, 1001.0, 1.0, "succeeded", worker="thread-0"),
        )
        assert old.outputs == {"a": {"rows": [1, 2, 3]}}
        s.begin_run(run_info("new-run", source="flows/etl.yaml"), [])
        assert s.load("new-run").info.source == "flows/etl.yaml"
    with raw(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (
            str(SCHEMA_VERSION),
        )
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert "runs_newest_first" in indexes


def test_a_migrated_store_is_not_rewritten_on_the_next_open(path: Path) -> None:
    make_v1_store(path)
    SQLiteStore(path).close()
    before = file_state(path)
    SQLiteStore(path).close()
    assert file_state(path) == before


def test_a_migration_that_fails_leaves_the_old_schema_whole(path: Path) -> None:
    # An index with the name v2 creates makes the v2 migration fail half-way.
    make_v1_store(path, extra_sql="CREATE INDEX runs_newest_first ON runs (run_id);")
    with pytest.raises(StoreError, match="upgrade the schema"):
        SQLiteStore(path)
    with raw(path) as conn:
        columns = [r[1] for r in conn.execute("PRAGMA table_info(runs)")]
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        assert conn.execute("PRAGMA user_version").fetchone() == (1,)
    assert "source" not in columns
    assert version == ("1",)


def test_store_from_a_newer_stepvisor_is_refused_untouched(path: Path) -> None:
    make_store(path)
    with raw(path) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    before = file_state(path)
    with pytest.raises(SchemaVersionError, match=r"schema v99.*upgrade stepvisor"):
        SQLiteStore(path)
    assert file_state(path) == before


# -- files that are not stores --------------------------------------------------------------


def assert_refused_untouched(path: Path, match: str) -> None:
    before = file_state(path)
    with pytest.raises(NotAStoreError, match=match) as caught:
        SQLiteStore(path)
    assert str(path) in str(caught.value)
    assert file_state(path) == before  # same bytes, same mtime, no -wal/-shm/-journal made


@pytest.mark.parametrize("journal_mode", ["delete", "wal"])
def test_foreign_sqlite_database_is_refused_untouched(tmp_path: Path, journal_mode: str) -> None:
    path = tmp_path / "app.db"
    with raw(path) as conn:
        conn.execute(f"PRAGMA journal_mode = {journal_mode}")
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("INSERT INTO users (name) VALUES ('ada')")
    assert_refused_untouched(path, "SQLite database that stepvisor did not create.*untouched")


def test_database_with_our_id_but_no_marker_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    with raw(path) as conn:
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute("CREATE TABLE meta (key TEXT, value TEXT)")
    assert_refused_untouched(path, "not its marker")


def test_random_bytes_are_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "noise.db"
    path.write_bytes(random.Random(7).randbytes(64 * 1024))
    assert_refused_untouched(path, "not an SQLite database.*untouched")


def test_empty_file_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    path.touch()
    assert_refused_untouched(path, "not an SQLite database")


def test_damaged_store_is_refused_untouched(path: Path) -> None:
    make_store(path, runs=5)
    data = bytearray(path.read_bytes())
    data[100:4096] = random.Random(3).randbytes(4096 - 100)  # page 1 past the header
    path.write_bytes(bytes(data))
    assert_refused_untouched(path, "damaged.*untouched.*backup")


def test_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(NotAStoreError, match="not a regular file"):
        SQLiteStore(tmp_path)


# -- codecs -------------------------------------------------------------------------------------


class Colour(enum.StrEnum):
    RED = "red"


def containing_itself() -> list[Any]:
    loop: list[Any] = [1]
    loop.append(loop)
    return loop


def nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ({1, 2}, "builtins.set is not JSON data"),
        (b"raw", "builtins.bytes"),
        (object(), "builtins.object"),
        ({1: "one"}, "dict key 1 is not a str"),
        ({"ok": [1, {"deep": datetime.date(2024, 1, 1)}]}, r"value\['ok'\]\[1\]\['deep'\]"),
        (Colour.RED, "Colour"),
        (collections.OrderedDict(a=1), "OrderedDict"),
        (containing_itself(), "contains itself"),
        (nested(600), "nested deeper than 500"),
        ([10**5000], "Exceeds the limit"),
    ],
)
def test_value_json_cannot_hold_is_refused_and_nothing_written(
    store: SQLiteStore, value: object, why: str
) -> None:
    store.begin_run(run_info(), [StepRecord("load")])
    store.save_step("run-1", running("load"))
    before = store.load("run-1")
    with pytest.raises(ArtifactCodecError, match=rf"'bad' of step 'load'.*{why}") as caught:
        store.save_step("run-1", succeeded("load"), {"good": 1, "bad": value})
    assert "codec='pickle'" in str(caught.value)
    assert store.load("run-1") == before


@pytest.mark.parametrize(
    "value",
    [None, True, 0, -(2**100), 10**4000, 1.5, 1e-300, "",
     "ünï\u20ac\U0001f600", "lone \ud800 surrogate", [], {}, {"a": [1, {"b": None}]},
     nested(400)],
)  # fmt: skip
def test_json_data_round_trips_equal_and_of_the_same_type(store: SQLiteStore, value: Any) -> None:
    store.begin_run(run_info(), [StepRecord("s")])
    store.save_step("run-1", succeeded("s"), {"v": value})
    back = store.load("run-1").outputs["s"]["v"]
    assert back == value
    assert type(back) is type(value)


def test_json_tuples_come_back_as_lists_and_non_finite_floats_survive(store: SQLiteStore) -> None:
    store.begin_run(run_info(), [StepRecord("s")])
    store.save_step(
        "run-1", succeeded("s"), {"t": (1, (2, 3)), "f": [math.inf, -math.inf, math.nan]}
    )
    back = store.load("run-1").outputs["s"]
    assert back["t"] == [1, [2, 3]]
    assert back["f"][:2] == [math.inf, -math.inf]
    assert math.isnan(back["f"][2])


def test_artifact_names_must_be_strings(store: SQLiteStore) -> None:
    store.begin_run(run_info(), [StepRecord("s")])
    with pytest.raises(ArtifactCodecError, match="artifact named 1; artifact names must be str"):
        store.save_step("run-1", succeeded("s"), {1: "x"})  # type: ignore[dict-item]
    assert store.load("run-1").steps["s"] == StepRecord("s")


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: int


def test_pickle_store_holds_any_picklable_value(path: Path) -> None:
    values = {"set": {1, 2}, "point": Point(1, 2), "tuple": (1, 2), "bytes": b"\x00\xff"}
    with SQLiteStore(path, codec="pickle") as s:
        s.begin_run(run_info(), [StepRecord("s")])
        s.save_step("run-1", succeeded("s"), values)
    with SQLiteStore(path, codec="pickle", stale_after=1e9) as s:
        assert s.codec == "pickle"
        assert s.load("run-1").outputs == {"s": values}


def test_pickle_store_refuses_unpicklable_values_and_writes_nothing(path: Path) -> None:
    with SQLiteStore(path, codec="pickle", stale_after=1e9) as s:
        s.begin_run(run_info(), [StepRecord("s")])
        with pytest.raises(ArtifactCodecError, match=r"'fn' of step 's'.*cannot be pickled"):
            s.save_step("run-1", succeeded("s"), {"fn": lambda: None})
        assert s.load("run-1").steps["s"] == StepRecord("s")


def test_json_store_refuses_to_open_as_pickle_untouched(path: Path) -> None:
    make_store(path)
    before = file_state(path)
    with pytest.raises(StoreError, match=r"codec='json'.*fixed when it is created"):
        SQLiteStore(path, codec="pickle")
    assert file_state(path) == before


def test_pickle_store_refuses_to_open_without_opting_in(path: Path) -> None:
    make_store(path, codec="pickle")
    before = file_state(path)
    with pytest.raises(StoreError, match=r"codec='pickle'.*only if you trust.*runs code"):
        SQLiteStore(path)
    assert file_state(path) == before


def test_unknown_codec_is_refused_naming_the_choices(path: Path) -> None:
    with pytest.raises(InvalidSettingError, match="'yaml'; use one of: json, pickle"):
        SQLiteStore(path, codec="yaml")
    assert not path.exists()


UNPICKLED: list[str] = []


def record_unpickling() -> str:
    UNPICKLED.append("ran")
    return "ran"


class RunsCodeWhenUnpickled:
    def __reduce__(self) -> tuple[object, ...]:
        return (record_unpickling, ())


def test_pickled_row_planted_in_a_json_store_is_never_unpickled(
    store: SQLiteStore, path: Path
) -> None:
    store.begin_run(run_info(), [StepRecord("s")])
    store.save_step("run-1", succeeded("s"), {"ok": 1})
    with raw(path) as conn:
        conn.execute(
            "INSERT INTO artifacts VALUES ('run-1', 's', 'evil', ?, 'pickle')",
            (pickle.dumps(RunsCodeWhenUnpickled()),),
        )
    with pytest.raises(ArtifactCodecError, match=r"'evil' of step 's'.*refusing to decode"):
        store.load("run-1")
    assert UNPICKLED == []


def test_undecodable_artifact_names_the_artifact(store: SQLiteStore, path: Path) -> None:
    store.begin_run(run_info(), [StepRecord("s")])
    store.save_step("run-1", succeeded("s"), {"ok": 1})
    with raw(path) as conn:
        conn.execute("UPDATE artifacts SET value = '{broken' WHERE name = 'ok'")
    with pytest.raises(ArtifactCodecError, match=r"'ok' of step 's'.*cannot be decoded"):
        store.load("run-1")


def test_settings_that_are_not_json_are_refused(store: SQLiteStore) -> None:
    with pytest.raises(StoreError, match="settings of run 'run-1' cannot be stored"):
        store.begin_run(run_info(settings={"when": datetime.date(2024, 1, 1)}), [])
    assert store.list_runs() == []


# -- transactions ---------------------------------------------------------------------------------


def test_a_step_is_never_stored_succeeded_without_its_artifacts(
    store: SQLiteStore, path: Path
) -> None:
    store.begin_run(run_info(), [StepRecord("s")])
    store.save_step("run-1", running("s"))
    with raw(path) as conn:  # fail the transaction at its very last statement
        conn.execute(
            "CREATE TRIGGER fail_late BEFORE INSERT ON artifacts WHEN NEW.name = 'zz' "
            "BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
        )
    before = store.load("run-1")
    with pytest.raises(StoreError, match="injected failure"):
        store.save_step("run-1", succeeded("s"), {"aa": 1, "zz": 2})
    assert store.load("run-1") == before
    store.save_step("run-1", succeeded("s"), {"aa": 1})  # the store is still usable
    assert store.load("run-1").outputs == {"s": {"aa": 1}}


def test_attempt_numbers_must_increase(store: SQLiteStore) -> None:
    store.begin_run(run_info(), [StepRecord("s")])
    twice = StepRecord("s", StepStatus.FAILED, (AttemptRecord(1, T0), AttemptRecord(1, T0)))
    with pytest.raises(StoreError, match=r"numbered \[1, 1\]; attempt numbers must increase"):
        store.save_step("run-1", twice)
    assert store.load("run-1").steps["s"] == StepRecord("s")


def test_integrity_check_passes_after_many_writes(store: SQLiteStore, path: Path) -> None:
    rng = random.Random(11)
    for r in range(10):
        ids = [f"s{i:03d}" for i in range(40)]
        store.begin_run(run_info(f"run-{r}", started=T0 + r), [StepRecord(i) for i in ids])
        for sid in ids:
            store.save_step(f"run-{r}", running(sid))
            if rng.random() < 0.3:
                retry = StepRecord(sid, StepStatus.WAITING_RETRY, (AttemptRecord(1, T0, T0),))
                store.save_step(f"run-{r}", retry.with_attempt_started(AttemptRecord(2, T0)))
            store.save_step(f"run-{r}", succeeded(sid), {"v": rng.random(), "sid": sid})
        store.save_steps(f"run-{r}", [StepRecord(i, StepStatus.SKIPPED) for i in ids[::7]])
        store.heartbeat(f"run-{r}", T0 + r)
        store.finish_run(f"run-{r}", RunStatus.SUCCEEDED, ended=T0 + r + 1)
    with raw(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        assert conn.execute("SELECT count(*) FROM artifacts").fetchone() == (10 * 40 * 2,)


# -- concurrency ---------------------------------------------------------------------------------


def test_reader_in_another_connection_sees_only_whole_transitions(
    store: SQLiteStore, path: Path
) -> None:
    ids = [f"s{i:03d}" for i in range(150)]
    store.begin_run(run_info(), [StepRecord(i) for i in ids])
    reader_started = threading.Event()
    errors: list[BaseException] = []

    def write() -> None:
        try:
            assert reader_started.wait(WAIT)
            for sid in ids:
                store.save_step("run-1", running(sid))
                store.save_step("run-1", succeeded(sid), {f"{sid}.x": sid, f"{sid}.y": [sid]})
        except BaseException as exc:
            errors.append(exc)

    writer = threading.Thread(target=write)
    writer.start()
    loads = 0
    with SQLiteStore(path, create=False, clock=FakeClock(wall_start=T0)) as reader:
        while True:
            done = not writer.is_alive()  # read once more after the writer ends
            snapshot = reader.load("run-1")
            reader_started.set()
            loads += 1
            for sid, record in snapshot.steps.items():
                if record.status is StepStatus.SUCCEEDED:
                    assert snapshot.outputs[sid] == {f"{sid}.x": sid, f"{sid}.y": [sid]}
                else:
                    assert sid not in snapshot.outputs
            if done:
                break
    writer.join(WAIT)
    assert not writer.is_alive()
    assert errors == []
    assert all(r.status is StepStatus.SUCCEEDED for r in snapshot.steps.values())
    assert loads >= 2


def test_open_read_transaction_elsewhere_does_not_block_the_writer(path: Path) -> None:
    with SQLiteStore(path, busy_timeout=0, clock=FakeClock(wall_start=T0)) as s:
        s.begin_run(run_info(), [StepRecord("a")])
        with raw(path) as other:
            other.execute("BEGIN")
            assert other.execute("SELECT status FROM steps").fetchone() == ("pending",)
            s.save_step("run-1", succeeded("a"), {"x": 1})  # would raise if it had to wait
            assert other.execute("SELECT status FROM steps").fetchone() == ("pending",)
            other.execute("COMMIT")
            assert other.execute("SELECT status FROM steps").fetchone() == ("succeeded",)


def test_writer_locked_out_by_another_program_reports_it(path: Path) -> None:
    with SQLiteStore(path, busy_timeout=0, clock=FakeClock(wall_start=T0)) as s:
        s.begin_run(run_info(), [StepRecord("a")])
        with raw(path) as other:
            other.execute("BEGIN IMMEDIATE")  # holds the write lock
            with pytest.raises(StoreError, match="locked for over 0 s; try again"):
                s.save_step("run-1", running("a"))
            with pytest.raises(StoreError, match="locked"):
                s.heartbeat("run-1", T0)
            other.execute("ROLLBACK")
        s.save_step("run-1", running("a"))
        assert s.load("run-1").steps["a"] == running("a")


def test_threads_can_read_while_the_supervisor_thread_writes(store: SQLiteStore) -> None:
    ids = [f"s{i:03d}" for i in range(100)]
    store.begin_run(run_info(), [StepRecord(i) for i in ids])
    start = threading.Barrier(4, timeout=WAIT)
    stop = threading.Event()
    seen: list[int] = []
    errors: list[BaseException] = []

    def read() -> None:
        try:
            start.wait()
            while not stop.is_set():
                run = store.load("run-1")
                seen.append(sum(r.status is StepStatus.SUCCEEDED for r in run.steps.values()))
                store.list_runs()
                store.cancel_requested("run-1")
        except BaseException as exc:
            errors.append(exc)

    readers = [threading.Thread(target=read) for _ in range(3)]
    for t in readers:
        t.start()
    start.wait()
    for n, sid in enumerate(ids):
        store.save_step("run-1", succeeded(sid), {"v": sid})
        if n == len(ids) // 2:
            # Halfway, let the readers finish a read while writes are still to come
            # (on a loaded machine the writer could otherwise finish first).
            deadline = time.monotonic() + WAIT
            while len(seen) < 3 and not errors and time.monotonic() < deadline:
                time.sleep(0.001)
    stop.set()
    for t in readers:
        t.join(WAIT)
    assert not any(t.is_alive() for t in readers)
    assert errors == []
    assert seen  # the readers really ran
    assert store.load("run-1").outputs == {sid: {"v": sid} for sid in ids}


def test_another_program_can_request_a_cancel(store: SQLiteStore, path: Path) -> None:
    store.begin_run(run_info(), [])
    code = (
        "import sys\n"
        "from stepvisor.store.sqlite import SQLiteStore\n"
        "with SQLiteStore(sys.argv[1], create=False) as s:\n"
        "    s.request_cancel('run-1')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert done.returncode == 0, done.stderr
    assert store.cancel_requested("run-1")


def test_cancel_of_an_unknown_run_names_the_store(store: SQLiteStore, path: Path) -> None:
    with pytest.raises(RunNotFoundError, match=f"'ghost' in {path}"):
        store.request_cancel("ghost")
