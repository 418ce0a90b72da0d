"""The durable run store: one SQLite file that outlives the program.

It holds the same records as :class:`~stepvisor.store.memory.MemoryStore`, so a
run can be resumed, inspected (``stepvisor status``) or cancelled
(``stepvisor cancel``) from another program while it runs.

How a store is opened::

    path missing? --create--> build it under a temporary name, fsync, link into place
         |                    (a store file is either absent or complete, never half-made)
    read the 100-byte header: SQLite magic + our application id?   else NotAStoreError
         |                    (plain file read: a foreign file is never opened by SQLite)
    connect, read ``meta``: our marker? schema version? codec?  else NotAStoreError /
         |                                                 SchemaVersionError / StoreError
    older schema? -> run the missing migrations in one transaction; current? -> no write

How a write goes: values are encoded *before* the transaction (a value the
codec cannot hold fails with nothing written), then ``BEGIN IMMEDIATE``, the
statements, ``COMMIT``.  A ``succeeded`` step and its artifacts are one
transaction, so a step is never stored succeeded without its artifacts.

Durability: the journal is a write-ahead log (WAL) with ``synchronous=NORMAL``.
In WAL mode NORMAL does not fsync at each commit, only at checkpoints, yet a
committed transaction is in the WAL file before ``COMMIT`` returns: it survives
the program crashing or being killed, which is the failure we must handle.  A
power loss or OS crash may lose the last few transactions (never corrupt the
file); a resumed run then redoes those steps.  ``FULL`` would fsync every step
transition and cost more than the steps it records.

Threads: the Supervisor thread writes while other threads (and programs) read.
The store keeps ONE connection, opened with ``check_same_thread=False`` and
guarded by a lock held for one method call.  Readers in other *programs* have
their own connections and, thanks to WAL, never block the writer nor wait for
it.  In-process readers wait at most one short transaction; a connection per
thread would let them read in parallel, but connections of threads that end
would linger until ``close()``, which could then not close them from its own
thread.  One connection keeps ``close()`` exact.

Trust: files are created readable by their owner only (0600, as are SQLite's
``-wal``/``-shm`` files, which copy the database file's mode), and a json store
never holds anything that runs code when read.  See :mod:`stepvisor.store.codec`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import sqlite3
import stat
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from stepvisor.clock import Clock
from stepvisor.core.state import AttemptRecord, RunStatus, StepRecord, StepStatus
from stepvisor.errors import (
    ArtifactCodecError,
    InvalidTimeoutError,
    NotAStoreError,
    RunNotFoundError,
    SchemaVersionError,
    StoreError,
)
from stepvisor.store.base import RunInfo, StoredRun
from stepvisor.store.codec import Codec, JsonCodec, codec_named

__all__ = ["APPLICATION_ID", "MIGRATIONS", "SCHEMA_VERSION", "SQLiteStore"]

#: ``PRAGMA application_id`` of every stepvisor store: "STPV" in ASCII.
APPLICATION_ID: Final = 0x53545056
#: The ``meta`` row that says "this file is a stepvisor run store".
MARKER: Final = "stepvisor run store"
#: Seconds without a heartbeat after which a ``running`` run reads ``interrupted``.
DEFAULT_STALE_AFTER: Final = 5.0
#: Seconds a write waits for another program's write lock before giving up.
DEFAULT_BUSY_TIMEOUT: Final = 5.0

_SQLITE_MAGIC: Final = b"SQLite format 3\x00"
_FILE_MODE: Final = 0o600
_DIR_MODE: Final = 0o700
_LIST_RUNS_HINT: Final = "list the runs it holds with `stepvisor status`"


# -- schema and migrations ------------------------------------------------------
#
# MIGRATIONS[i] takes a store from schema version i to i + 1, inside the caller's
# transaction.  A new store runs them all, so the path an old store takes to the
# current schema is the one every new store takes.  Never edit a shipped
# migration: append a new one.


def _v1_initial_schema(conn: sqlite3.Connection) -> None:
    """The first schema: runs, their steps, attempts and artifacts."""
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID")
    # runs and steps keep their rowid: it is the order rows were first written in,
    # which is the order MemoryStore's dictionaries keep.  attempts and artifacts
    # live in their primary key's b-tree (WITHOUT ROWID): one b-tree to write per
    # row instead of two, and they come back by attempt number / artifact name.
    conn.execute(
        """CREATE TABLE runs (
            run_id TEXT PRIMARY KEY,
            workflow_id TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            settings TEXT NOT NULL,
            seed INTEGER NOT NULL,
            status TEXT NOT NULL,
            started REAL NOT NULL,
            ended REAL,
            heartbeat REAL,
            error TEXT,
            cancel_requested INTEGER NOT NULL DEFAULT 0
        )"""
    )
    # has_outputs: outputs were saved for the step (possibly none), as MemoryStore
    # tells "saved empty" from "never saved".
    conn.execute(
        """CREATE TABLE steps (
            run_id TEXT NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
            step_id TEXT NOT NULL,
            status TEXT NOT NULL,
            note TEXT,
            restored INTEGER NOT NULL DEFAULT 0,
            has_outputs INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (run_id, step_id)
        )"""
    )
    conn.execute(
        """CREATE TABLE attempts (
            run_id TEXT NOT NULL,
            step_id TEXT NOT NULL,
            number INTEGER NOT NULL,
            started REAL NOT NULL,
            ended REAL,
            duration REAL,
            outcome TEXT,
            error_type TEXT,
            error_message TEXT,
            error_traceback TEXT,
            delay_after REAL,
            worker TEXT,
            note TEXT,
            PRIMARY KEY (run_id, step_id, number),
            FOREIGN KEY (run_id, step_id) REFERENCES steps (run_id, step_id) ON DELETE CASCADE
        ) WITHOUT ROWID"""
    )
    # value: JSON text or pickle bytes (BLOB affinity stores either unchanged).
    conn.execute(
        """CREATE TABLE artifacts (
            run_id TEXT NOT NULL,
            step_id TEXT NOT NULL,
            name TEXT NOT NULL,
            value BLOB NOT NULL,
            codec TEXT NOT NULL,
            PRIMARY KEY (run_id, step_id, name),
            FOREIGN KEY (run_id, step_id) REFERENCES steps (run_id, step_id) ON DELETE CASCADE
        ) WITHOUT ROWID"""
    )


def _v2_run_source(conn: sqlite3.Connection) -> None:
    """Where a run's workflow came from (for ``resume``), and newest-first listing by index."""
    conn.execute("ALTER TABLE runs ADD COLUMN source TEXT")
    # Entries are ordered (started DESC, rowid ASC): exactly list_runs' order.
    conn.execute("CREATE INDEX runs_newest_first ON runs (started DESC)")


MIGRATIONS: Final[tuple[Callable[[sqlite3.Connection], None], ...]] = (
    _v1_initial_schema,
    _v2_run_source,
)
#: The schema version this stepvisor writes; stores from a newer one are refused.
SCHEMA_VERSION: Final = len(MIGRATIONS)


def _migrate(conn: sqlite3.Connection, from_version: int) -> None:
    """Bring a store at ``from_version`` to ``SCHEMA_VERSION`` (caller holds the transaction)."""
    for migration in MIGRATIONS[from_version:]:
        migration(conn)
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('schema_version', ?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (str(SCHEMA_VERSION),),
    )
    # A copy in the file header, for tools that read headers (`file`, `sqlite3 .dbinfo`).
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION:d}")


# -- statements ---------------------------------------------------------------------
#
# Constant SQL text: the sqlite3 module keeps each statement prepared in its
# per-connection cache, so a save_step prepares nothing.

_UPSERT_RUN: Final = """
    INSERT INTO runs (run_id, workflow_id, fingerprint, settings, seed, status, started,
                      ended, heartbeat, error, source, cancel_requested)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0)
    ON CONFLICT (run_id) DO UPDATE SET
        workflow_id = excluded.workflow_id, fingerprint = excluded.fingerprint,
        settings = excluded.settings, seed = excluded.seed, status = excluded.status,
        started = excluded.started, ended = excluded.ended, heartbeat = excluded.heartbeat,
        error = excluded.error, source = excluded.source, cancel_requested = 0"""
_UPSERT_STEP: Final = """
    INSERT INTO steps (run_id, step_id, status, note, restored, has_outputs)
    VALUES (?, ?, ?, ?, ?, ?)
    ON CONFLICT (run_id, step_id) DO UPDATE SET
        status = excluded.status, note = excluded.note, restored = excluded.restored,
        has_outputs = max(has_outputs, excluded.has_outputs)"""
_DELETE_ATTEMPTS: Final = "DELETE FROM attempts WHERE run_id = ? AND step_id = ?"
_INSERT_ATTEMPT: Final = """
    INSERT INTO attempts (run_id, step_id, number, started, ended, duration, outcome,
                          error_type, error_message, error_traceback, delay_after, worker, note)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"""
_DELETE_ARTIFACTS: Final = "DELETE FROM artifacts WHERE run_id = ? AND step_id = ?"
_INSERT_ARTIFACT: Final = (
    "INSERT INTO artifacts (run_id, step_id, name, value, codec) VALUES (?, ?, ?, ?, ?)"
)
_FINISH_RUN: Final = "UPDATE runs SET status = ?, ended = ?, error = ? WHERE run_id = ?"
_HEARTBEAT: Final = "UPDATE runs SET heartbeat = ? WHERE run_id = ?"
_REQUEST_CANCEL: Final = "UPDATE runs SET cancel_requested = 1 WHERE run_id = ?"
_CANCEL_REQUESTED: Final = "SELECT cancel_requested FROM runs WHERE run_id = ?"
_RUN_COLUMNS: Final = (
    "run_id, workflow_id, fingerprint, settings, seed, status, started, ended, heartbeat,"
    " error, source"
)
_SELECT_RUN: Final = f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_id = ?"  # noqa: S608 - constant
_SELECT_RUNS: Final = f"SELECT {_RUN_COLUMNS} FROM runs ORDER BY started DESC, rowid"  # noqa: S608
_SELECT_STEPS: Final = (
    "SELECT step_id, status, note, restored, has_outputs FROM steps WHERE run_id = ? ORDER BY rowid"
)
_SELECT_ATTEMPTS: Final = """
    SELECT step_id, number, started, ended, duration, outcome, error_type, error_message,
           error_traceback, delay_after, worker, note
    FROM attempts WHERE run_id = ? ORDER BY step_id, number"""
_SELECT_ARTIFACTS: Final = (
    "SELECT step_id, name, value, codec FROM artifacts WHERE run_id = ? ORDER BY step_id, name"
)
_RUN_EXISTS: Final = "SELECT 1 FROM runs WHERE run_id = ?"

_Row = tuple[Any, ...]
#: Run settings are stored as JSON whatever the artifact codec.
_SETTINGS_CODEC: Final = JsonCodec()


# -- opening and creating files ---------------------------------------------------------


def _connect(path: Path, *, busy_timeout: float) -> sqlite3.Connection:
    """A connection to an existing file (``mode=rw``: SQLite never creates one here)."""
    uri = "file:" + urllib.parse.quote(os.fspath(path)) + "?mode=rw"
    conn = sqlite3.connect(
        uri,
        uri=True,
        timeout=busy_timeout,  # sqlite3_busy_timeout: wait for other writers this long
        isolation_level=None,  # we issue BEGIN/COMMIT ourselves
        check_same_thread=False,  # used from several threads, one at a time (the lock)
    )
    try:
        conn.execute("PRAGMA synchronous = NORMAL")  # see the module docstring
        conn.execute("PRAGMA foreign_keys = ON")
    except BaseException:
        conn.close()
        raise
    return conn


def _fsync_path(path: Path, *, directory: bool = False) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if directory else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_store(path: Path, *, codec: str) -> None:
    """Create a complete, empty store at ``path`` unless a file appears there first.

    The store is built under a temporary name and hard-linked into place, so a
    crash during creation can leave a stray temporary file but never a
    half-made store at ``path``; and ``link`` fails rather than replace a store
    that another program created meanwhile.
    """
    path.parent.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.creating")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _FILE_MODE)
    try:
        os.fchmod(fd, _FILE_MODE)  # whatever the umask: owner read/write, nobody else
    finally:
        os.close(fd)
    try:
        conn = _connect(tmp, busy_timeout=0.0)
        try:
            _initialize(conn, codec=codec)
        finally:
            conn.close()  # last connection: checkpoints the WAL into the file, removes it
        _fsync_path(tmp)
        _publish(tmp, path)
    finally:
        for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()


def _initialize(conn: sqlite3.Connection, *, codec: str) -> None:
    conn.execute("PRAGMA journal_mode = WAL")  # persistent: recorded in the file header
    conn.execute("BEGIN IMMEDIATE")
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID:d}")
    _migrate(conn, 0)
    conn.executemany(
        "INSERT INTO meta (key, value) VALUES (?, ?)",
        [("application", MARKER), ("codec", codec), ("created", repr(time.time()))],
    )
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # page 1 (the header) into the main file


def _publish(tmp: Path, path: Path) -> None:
    try:
        os.link(tmp, path)
    except FileExistsError:
        return  # another program created it meanwhile: it is checked like any store
    except OSError:
        # No hard links on this file system: rename instead, which could only
        # replace a store created in the instant since the check.
        if path.exists():
            return
        os.replace(tmp, path)
    _fsync_path(path.parent, directory=True)


def _check_header(path: Path) -> None:
    """``NotAStoreError`` unless ``path`` starts like a stepvisor store.  Reads only."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise NotAStoreError(
                f"{path} is not a regular file, so it is not a stepvisor run store; "
                "give the path of a store file (such as .stepvisor/runs.db)"
            )
        with open(path, "rb") as file:
            header = file.read(100)
    except OSError as exc:
        raise StoreError(
            f"cannot read the run store {path}: {exc.strerror}; "
            "check the path and that you may read it"
        ) from exc
    if len(header) < 100 or not header.startswith(_SQLITE_MAGIC):
        raise NotAStoreError(
            f"{path} is not a stepvisor run store (it is not an SQLite database); "
            "it was left untouched. Give the path of a store, or a path that does not "
            "exist yet to create one there"
        )
    if int.from_bytes(header[68:72], "big") != APPLICATION_ID:
        raise NotAStoreError(
            f"{path} is an SQLite database that stepvisor did not create; it was left "
            "untouched. Give the path of a stepvisor store, or a path that does not exist "
            "yet to create one there"
        )


# -- rows <-> records -----------------------------------------------------------------


def _step_row(run_id: str, record: StepRecord, *, has_outputs: bool) -> _Row:
    return (run_id, record.step_id, str(record.status), record.note, record.restored, has_outputs)


def _attempt_rows(run_id: str, record: StepRecord, into: list[_Row]) -> None:
    previous = 0
    for a in record.attempts:
        if not (isinstance(a.number, int) and a.number > previous):
            numbers = [x.number for x in record.attempts]
            raise StoreError(
                f"step {record.step_id!r} of run {run_id!r} has attempts numbered {numbers}; "
                "attempt numbers must increase from one attempt to the next"
            )
        previous = a.number
        into.append(
            (
                run_id,
                record.step_id,
                a.number,
                a.started,
                a.ended,
                a.duration,
                a.outcome,
                a.error_type,
                a.error_message,
                a.error_traceback,
                a.delay_after,
                a.worker,
                a.note,
            )
        )


def _attempt_from_row(row: _Row) -> AttemptRecord:
    return AttemptRecord(
        number=row[1],
        started=row[2],
        ended=row[3],
        duration=row[4],
        outcome=row[5],
        error_type=row[6],
        error_message=row[7],
        error_traceback=row[8],
        delay_after=row[9],
        worker=row[10],
        note=row[11],
    )


class SQLiteStore:
    """Run state in one SQLite file, for runs that must survive their program.

    ``SQLiteStore(path)`` opens the store at ``path``, creating it (and its
    directory) when nothing is there and ``create`` is true.  ``codec`` is how
    artifacts are stored: ``"json"`` (plain data, safe to read) or ``"pickle"``
    (any picklable value; reading it runs code, so trusted stores only).  It is
    fixed when the store is created, and must be given the same on every open.

    A run stored ``running`` whose last heartbeat (or start) is more than
    ``stale_after`` seconds old, by ``clock.wall()``, reads as ``interrupted``:
    its program stopped beating, so it died.  Writes wait up to
    ``busy_timeout`` seconds for another program's write to finish.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        codec: str = "json",
        create: bool = True,
        stale_after: float = DEFAULT_STALE_AFTER,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        clock: Clock | None = None,
    ) -> None:
        _check_seconds("stale_after", stale_after, allow_zero=False)
        _check_seconds("busy_timeout", busy_timeout, allow_zero=True)
        self.path = Path(os.path.abspath(path))
        self._codec: Codec = codec_named(codec)
        self._stale_after = float(stale_after)
        self._busy_timeout = float(busy_timeout)
        self._wall: Callable[[], float] = clock.wall if clock is not None else time.time
        self._lock = threading.Lock()
        if not os.path.lexists(self.path):
            if not create:
                raise StoreError(
                    f"there is no run store at {self.path}; check the path, or pass "
                    "create=True to create one there"
                )
            try:
                _create_store(self.path, codec=self._codec.name)
            except (OSError, sqlite3.Error) as exc:
                raise StoreError(
                    f"cannot create a run store at {self.path}: {exc}; check that the "
                    "directory can be created and written by you, or give another path"
                ) from exc
        _check_header(self.path)
        try:
            self._conn: sqlite3.Connection | None = _connect(
                self.path, busy_timeout=self._busy_timeout
            )
        except sqlite3.Error as exc:
            raise self._open_error(exc) from exc
        try:
            self._open_existing()
        except BaseException:
            self.close()
            raise

    @property
    def codec(self) -> str:
        """The name of the codec artifacts are stored with (fixed at creation)."""
        return self._codec.name

    # -- opening ----------------------------------------------------------------------

    def _open_existing(self) -> None:
        """Check the marker, the version and the codec; migrate an older schema."""
        conn = self._connection()
        version = self._check_meta(self._read_meta(conn))
        if version < SCHEMA_VERSION:
            self._upgrade(conn)
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode = WAL")  # someone switched it off by hand
        except sqlite3.Error as exc:
            raise self._error("open", exc) from exc

    def _read_meta(self, conn: sqlite3.Connection) -> dict[str, str]:
        try:
            found = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
            ).fetchone()
            rows = conn.execute("SELECT key, value FROM meta").fetchall() if found else []
        except sqlite3.Error as exc:
            raise self._open_error(exc) from exc
        meta = {str(key): str(value) for key, value in rows}
        if meta.get("application") != MARKER:
            raise NotAStoreError(
                f"{self.path} carries stepvisor's application id but not its marker, so it "
                "is not a stepvisor run store; it was left untouched. Give the path of a "
                "store, or a path that does not exist yet to create one there"
            )
        return meta

    def _open_error(self, exc: sqlite3.Error) -> StoreError:
        if getattr(exc, "sqlite_errorcode", 0) & 0xFF in (
            sqlite3.SQLITE_CORRUPT,
            sqlite3.SQLITE_NOTADB,
        ):
            return NotAStoreError(
                f"{self.path} cannot be read as a run store ({exc}); it is damaged and was "
                "left untouched. Restore it from a backup, or move it aside to start a new store"
            )
        return self._error("open", exc)

    def _check_meta(self, meta: Mapping[str, str]) -> int:
        try:
            version = int(meta["schema_version"])
        except (KeyError, ValueError):
            raise NotAStoreError(
                f"{self.path} has no readable schema version; it is damaged and was left "
                "untouched. Restore it from a backup, or move it aside to start a new store"
            ) from None
        if version > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{self.path} was written by a newer stepvisor (store schema v{version}; this "
                f"one reads up to v{SCHEMA_VERSION}); upgrade stepvisor to use it "
                "(pip install -U stepvisor)"
            )
        recorded = meta.get("codec", "json")
        if recorded != self._codec.name:
            raise StoreError(self._codec_mismatch(recorded))
        return version

    def _codec_mismatch(self, recorded: str) -> str:
        if recorded == "pickle":
            return (
                f"{self.path} stores artifacts with codec='pickle'; open it with "
                "SQLiteStore(path, codec='pickle'), but only if you trust everyone who "
                "can write the file: reading pickled artifacts runs code"
            )
        return (
            f"{self.path} stores artifacts with codec={recorded!r}; open it with "
            f"codec={recorded!r}. A store's codec is fixed when it is created: give a new "
            f"path to keep artifacts with codec={self._codec.name!r}"
        )

    def _upgrade(self, conn: sqlite3.Connection) -> None:
        """Run the missing migrations, all in one transaction."""
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                # Read again under the write lock: another program may have upgraded it.
                version = self._check_meta(self._read_meta(conn))
                _migrate(conn, version)
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
        except sqlite3.Error as exc:
            raise self._error("upgrade the schema of", exc) from exc

    # -- transactions ---------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(
                f"the run store {self.path} is closed; open a new SQLiteStore to use it"
            )
        return self._conn

    @contextlib.contextmanager
    def _transaction(self, what: str, run_id: str, *, write: bool) -> Iterator[sqlite3.Connection]:
        """Hold the lock and one transaction: all of the block's statements, or none."""
        with self._lock:
            conn = self._connection()
            try:
                # IMMEDIATE takes the write lock now (waiting busy_timeout for it),
                # instead of failing at the first write when another program wrote.
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    _rollback(conn)
                    raise
            except sqlite3.Error as exc:
                raise self._error(what, exc, run_id=run_id) from exc

    def _update_run(self, what: str, sql: str, params: _Row, run_id: str) -> None:
        """One UPDATE of one run row: a transaction of its own (autocommit)."""
        with self._lock:
            conn = self._connection()
            try:
                changed = conn.execute(sql, params).rowcount
            except sqlite3.Error as exc:
                raise self._error(what, exc, run_id=run_id) from exc
        if changed == 0:
            raise self._not_found(run_id)

    def _not_found(self, run_id: str) -> RunNotFoundError:
        return RunNotFoundError(f"no run with id {run_id!r} in {self.path}; {_LIST_RUNS_HINT}")

    def _error(self, what: str, exc: sqlite3.Error, *, run_id: str = "") -> StoreError:
        code = getattr(exc, "sqlite_errorcode", 0)
        if code == sqlite3.SQLITE_CONSTRAINT_FOREIGNKEY and run_id:
            return self._not_found(run_id)  # a step row for a run that does not exist
        primary = code & 0xFF
        if primary in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            fix = (
                f"another program held it locked for over {self._busy_timeout:g} s; "
                "try again, or find the program writing to it"
            )
        elif primary == sqlite3.SQLITE_FULL:
            fix = "the disk is full; free some space and resume the run"
        elif primary in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM):
            fix = "check that you may write the file and its directory"
        elif primary in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
            fix = "the file is damaged; restore it from a backup, or move it aside"
        else:
            fix = "see SQLite's message"
        return StoreError(f"cannot {what} the run store {self.path}: {exc}; {fix}")

    # -- encoding ------------------------------------------------------------------------

    def _encode_outputs(self, run_id: str, step_id: str, outputs: Mapping[str, Any]) -> list[_Row]:
        codec = self._codec
        rows: list[_Row] = []
        for name, value in outputs.items():
            if type(name) is not str:
                raise ArtifactCodecError(
                    f"step {step_id!r} (run {run_id!r}) returned an artifact named {name!r}; "
                    "artifact names must be str"
                )
            try:
                data = codec.encode(value)
            except ArtifactCodecError as exc:
                raise ArtifactCodecError(
                    f"cannot store artifact {name!r} of step {step_id!r} (run {run_id!r}) "
                    f"with the {codec.name} codec: {exc}"
                ) from exc
            rows.append((run_id, step_id, name, data, codec.name))
        return rows

    def _decode_artifact(self, run_id: str, row: _Row) -> Any:
        step_id, name, data, codec_name = row
        where = f"artifact {name!r} of step {step_id!r} (run {run_id!r}) in {self.path}"
        if codec_name not in ("json", self._codec.name):
            raise ArtifactCodecError(
                f"{where} was written with codec {codec_name!r}, which this store does not "
                "use: refusing to decode it (someone changed the file). Remove the row, or "
                "restore the store from a backup"
            )
        try:
            return codec_named(codec_name).decode(data)
        except Exception as exc:
            raise ArtifactCodecError(
                f"{where} cannot be decoded ({type(exc).__name__}: {exc}); the store is damaged "
                "or the value's type no longer exists: restore it, or re-run the step"
            ) from exc

    # -- RunStore: writes --------------------------------------------------------------------

    def begin_run(self, info: RunInfo, steps: Sequence[StepRecord]) -> None:
        try:
            settings = _SETTINGS_CODEC.encode(dict(info.settings))
        except ArtifactCodecError as exc:
            raise StoreError(
                f"the settings of run {info.run_id!r} cannot be stored: {exc}"
            ) from exc
        run_row = (
            info.run_id,
            info.workflow_id,
            info.fingerprint,
            settings,
            info.seed,
            str(info.status),
            info.started,
            info.ended,
            info.heartbeat,
            info.error,
            info.source,
        )
        step_rows = [_step_row(info.run_id, r, has_outputs=False) for r in steps]
        attempt_rows: list[_Row] = []
        for record in steps:
            _attempt_rows(info.run_id, record, attempt_rows)
        with self._transaction("begin a run in", info.run_id, write=True) as conn:
            conn.execute(_UPSERT_RUN, run_row)
            _write_steps(conn, step_rows, attempt_rows)

    def save_step(
        self, run_id: str, record: StepRecord, outputs: Mapping[str, Any] | None = None
    ) -> None:
        artifacts = None
        if outputs is not None:  # encoded before the transaction: a bad value writes nothing
            artifacts = self._encode_outputs(run_id, record.step_id, outputs)
        step_row = _step_row(run_id, record, has_outputs=outputs is not None)
        attempt_rows: list[_Row] = []
        _attempt_rows(run_id, record, attempt_rows)
        with self._transaction("save a step in", run_id, write=True) as conn:
            conn.execute(_UPSERT_STEP, step_row)
            conn.execute(_DELETE_ATTEMPTS, step_row[:2])
            conn.executemany(_INSERT_ATTEMPT, attempt_rows)
            if artifacts is not None:
                conn.execute(_DELETE_ARTIFACTS, step_row[:2])
                conn.executemany(_INSERT_ARTIFACT, artifacts)

    def save_steps(self, run_id: str, records: Sequence[StepRecord]) -> None:
        step_rows = [_step_row(run_id, r, has_outputs=False) for r in records]
        attempt_rows: list[_Row] = []
        for record in records:
            _attempt_rows(run_id, record, attempt_rows)
        with self._transaction("save steps in", run_id, write=True) as conn:
            # Checked, not left to the foreign key: an empty list must fail too.
            if conn.execute(_RUN_EXISTS, (run_id,)).fetchone() is None:
                raise self._not_found(run_id)
            _write_steps(conn, step_rows, attempt_rows)

    def finish_run(
        self, run_id: str, status: RunStatus, *, ended: float, error: str | None = None
    ) -> None:
        params = (str(status), ended, error, run_id)
        self._update_run("finish a run in", _FINISH_RUN, params, run_id)

    def heartbeat(self, run_id: str, now: float) -> None:
        self._update_run("record a heartbeat in", _HEARTBEAT, (now, run_id), run_id)

    def request_cancel(self, run_id: str) -> None:
        self._update_run("request a cancel in", _REQUEST_CANCEL, (run_id,), run_id)

    # -- RunStore: reads -------------------------------------------------------------------

    def cancel_requested(self, run_id: str) -> bool:
        with self._lock:
            conn = self._connection()
            try:
                row = conn.execute(_CANCEL_REQUESTED, (run_id,)).fetchone()
            except sqlite3.Error as exc:
                raise self._error("read the cancel flag from", exc, run_id=run_id) from exc
        return bool(row is not None and row[0])

    def exists(self, run_id: str) -> bool:
        with self._lock:
            conn = self._connection()
            try:
                row = conn.execute(_RUN_EXISTS, (run_id,)).fetchone()
            except sqlite3.Error as exc:
                raise self._error("look up", exc, run_id=run_id) from exc
        return row is not None

    def load(self, run_id: str) -> StoredRun:
        # One read transaction: a snapshot, never half of a concurrent write.
        with self._transaction("load a run from", run_id, write=False) as conn:
            run_row = conn.execute(_SELECT_RUN, (run_id,)).fetchone()
            if run_row is None:
                raise self._not_found(run_id)
            step_rows = conn.execute(_SELECT_STEPS, (run_id,)).fetchall()
            attempt_rows = conn.execute(_SELECT_ATTEMPTS, (run_id,)).fetchall()
            artifact_rows = conn.execute(_SELECT_ARTIFACTS, (run_id,)).fetchall()
        # Decoding happens outside the lock: unpickling runs arbitrary code.
        attempts: dict[str, list[AttemptRecord]] = {}
        for row in attempt_rows:
            attempts.setdefault(row[0], []).append(_attempt_from_row(row))
        steps: dict[str, StepRecord] = {}
        outputs: dict[str, dict[str, Any]] = {}
        for step_id, status, note, restored, has_outputs in step_rows:
            steps[step_id] = StepRecord(
                step_id=step_id,
                status=StepStatus(status),
                attempts=tuple(attempts.get(step_id, ())),
                note=note,
                restored=bool(restored),
            )
            if has_outputs:
                outputs[step_id] = {}
        for row in artifact_rows:
            outputs.setdefault(row[0], {})[row[1]] = self._decode_artifact(run_id, row)
        return StoredRun(info=self._run_info(run_row, self._wall()), steps=steps, outputs=outputs)

    def list_runs(self) -> list[RunInfo]:
        with self._transaction("list the runs of", "", write=False) as conn:
            rows = conn.execute(_SELECT_RUNS).fetchall()
        now = self._wall()
        return [self._run_info(row, now) for row in rows]

    def _run_info(self, row: _Row, now: float) -> RunInfo:
        run_id, workflow_id, fingerprint, settings, seed, status, started, *rest = row
        ended, heartbeat, error, source = rest
        run_status = RunStatus(status)
        last_sign_of_life = heartbeat if heartbeat is not None else started
        if run_status is RunStatus.RUNNING and now - last_sign_of_life > self._stale_after:
            run_status = RunStatus.INTERRUPTED  # its program stopped beating: it died
        return RunInfo(
            run_id=run_id,
            workflow_id=workflow_id,
            fingerprint=fingerprint,
            settings=json.loads(settings),
            seed=seed,
            status=run_status,
            started=started,
            ended=ended,
            heartbeat=heartbeat,
            error=error,
            source=source,
        )

    # -- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection (idempotent); the store cannot be used afterwards."""
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def __enter__(self) -> SQLiteStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._conn is None else "open"
        return f"<SQLiteStore {os.fspath(self.path)!r} codec={self._codec.name} {state}>"


def _write_steps(conn: sqlite3.Connection, step_rows: list[_Row], attempt_rows: list[_Row]) -> None:
    """Upsert step rows and replace their attempts (caller holds the transaction)."""
    conn.executemany(_UPSERT_STEP, step_rows)
    conn.executemany(_DELETE_ATTEMPTS, [row[:2] for row in step_rows])
    conn.executemany(_INSERT_ATTEMPT, attempt_rows)


def _rollback(conn: sqlite3.Connection) -> None:
    # SQLite may already have rolled back (e.g. after SQLITE_FULL); never hide the cause.
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _check_seconds(name: str, value: float, *, allow_zero: bool) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise InvalidTimeoutError(
            f"SQLiteStore({name}=...) must be a finite number of seconds {bound}, got {value!r}"
        )
