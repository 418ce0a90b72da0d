"""The SQLite store class: the RunStore port over one file, with run ownership."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from stepvisor._closing import Closing
from stepvisor.clock import Clock
from stepvisor.core.state import RunStatus, StepRecord
from stepvisor.errors import (
    ArtifactCodecError,
    RunNotFoundError,
    RunOwnedError,
    StoreError,
    StoreFaultError,
)
from stepvisor.store.base import LogEntry, RunInfo, RunOwner, StoredRun
from stepvisor.store.codec import Codec, JsonCodec, codec_named
from stepvisor.store.sqlite import _owner
from stepvisor.store.sqlite._cache import CacheTable
from stepvisor.store.sqlite._files import (
    FileId,
    check_header,
    check_seconds,
    connect,
    create_store,
    fault_error,
    os_fault,
    rollback,
    save_copy,
)
from stepvisor.store.sqlite._opening import open_error, open_existing
from stepvisor.store.sqlite._records import run_info, run_row, step_records
from stepvisor.store.sqlite._schema import (
    CANCEL_REQUESTED,
    DELETE_ARTIFACTS,
    DELETE_ATTEMPTS,
    FINISH_RUN,
    HEARTBEAT,
    INSERT_ARTIFACT,
    INSERT_ATTEMPT,
    REQUEST_CANCEL,
    RUN_EXISTS,
    SELECT_ARTIFACTS,
    SELECT_ATTEMPTS,
    SELECT_CLAIM,
    SELECT_LOG,
    SELECT_LOGS,
    SELECT_RUN,
    SELECT_RUNS,
    SELECT_STEP_ARTIFACTS,
    SELECT_STEPS,
    UPSERT_LOG,
    UPSERT_RUN,
    UPSERT_STEP,
    WRITE_OWNER,
    Row,
    attempt_rows,
    decode_artifact,
    encode_outputs,
    step_row,
    write_steps,
)

__all__ = ["DEFAULT_BUSY_TIMEOUT", "DEFAULT_STALE_AFTER", "SQLiteStore"]

#: Seconds without a heartbeat after which a ``running`` run reads ``interrupted``.
DEFAULT_STALE_AFTER: Final = 5.0
#: Seconds a write waits for another program's write lock before giving up.
DEFAULT_BUSY_TIMEOUT: Final = 5.0

_LIST_RUNS_HINT: Final = "list the runs it holds with `stepvisor status`"
#: Run settings are stored as JSON whatever the artifact codec.
_SETTINGS_CODEC: Final = JsonCodec()


class SQLiteStore(CacheTable, Closing):
    """Run state in one SQLite file, for runs that must survive their program.

    ``SQLiteStore(path)`` opens the store at ``path``, creating it (and its
    directory) when nothing is there and ``create`` is true.  ``codec`` is how
    artifacts are stored: ``"json"`` (plain data, safe to read) or ``"pickle"``
    (any picklable value; reading it runs code, so trusted stores only).  It is
    fixed when the store is created, and must be given the same on every open.

    A run has one owner at a time (see :mod:`stepvisor.store.sqlite._owner`).
    A run stored ``running`` reads as ``interrupted`` when its owner on this
    machine is dead, or when its last heartbeat (or start) is more than
    ``stale_after`` seconds old by ``clock.wall()`` (the only sign for an owner
    on another machine).  Writes wait up to ``busy_timeout`` seconds for
    another program's write to finish, then fail with ``StoreFaultError``.
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
        check_seconds("stale_after", stale_after, allow_zero=False)
        check_seconds("busy_timeout", busy_timeout, allow_zero=True)
        if os.fspath(path) in ("", ":memory:"):
            raise StoreError(
                f"SQLiteStore({os.fspath(path)!r}) names no file; for a store that lives in "
                "memory use store=':memory:' or MemoryStore(), for a durable one give a "
                "file path such as '.stepvisor/runs.db'"
            )
        self.path = Path(os.path.abspath(path))
        self._codec: Codec = codec_named(codec)
        self._stale_after = float(stale_after)
        self._busy_timeout = float(busy_timeout)
        self._wall: Callable[[], float] = clock.wall if clock is not None else time.time
        self._lock = threading.Lock()
        self._claims: dict[str, tuple[RunOwner, _owner.RunLock]] = {}
        self._fault: StoreFaultError | None = None
        if not os.path.lexists(self.path):
            if not create:
                raise StoreError(
                    f"there is no run store at {self.path}; check the path, or pass "
                    "create=True to create one there"
                )
            try:
                create_store(self.path, codec=self._codec.name)
            except (OSError, sqlite3.Error) as exc:
                raise StoreError(
                    f"cannot create a run store at {self.path}: {exc}; check that the "
                    "directory can be created and written by you, or give another path"
                ) from exc
        check_header(self.path)
        try:
            self._conn: sqlite3.Connection | None = connect(
                self.path, busy_timeout=self._busy_timeout
            )
        except sqlite3.Error as exc:
            raise open_error(self.path, exc, self._busy_timeout) from exc
        self._file_id = FileId.of(self.path)
        #: The log files this connection uses, to remove ours (and only ours) if the
        #: store file is deleted under us: SQLite leaves them then.
        self._logs = [(log, FileId.of(log)) for log in _logs(self.path)]
        try:
            open_existing(self._conn, self.path, self._codec, self._busy_timeout)
        except BaseException:
            self.close()
            raise

    @property
    def codec(self) -> str:
        """The name of the codec artifacts are stored with (fixed at creation)."""
        return self._codec.name

    # -- transactions ---------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._fault is not None:
            raise self._fault
        if self._conn is None:
            raise StoreError(
                f"the run store {self.path} is closed; open a new SQLiteStore to use it"
            )
        return self._conn

    def _check_file(self) -> None:
        """Refuse to write when the store file was deleted or replaced under us.

        SQLite in WAL mode would go on writing the file it holds open, which
        nobody can open any more: every later transition would be lost.  So
        the first write after it happened saves what the open file holds
        beside the path, closes the connection (which also removes its ``-wal``,
        so a file put at the path never reads our log) and fails from then on.
        Called with ``self._lock`` held.
        """
        now = FileId.of(self.path)
        if now == self._file_id or self._conn is None:
            return
        conn, self._conn = self._conn, None
        saved = save_copy(conn, self.path)
        conn.close()
        for log, log_id in self._logs:
            if log_id is not None and FileId.of(log) == log_id:
                with contextlib.suppress(OSError):
                    log.unlink()
        kind = "file deleted" if now is None else "file replaced"
        where = (
            f"what it held up to now was saved to {saved}; move that back to {self.path} "
            "and resume the run"
            if saved is not None
            else "what it held up to now could not be saved"
        )
        self._fault = StoreFaultError(
            f"the run store {self.path} was {kind.split()[1]} while this program was using "
            f"it ({kind}); writes stopped, {where}",
            path=str(self.path),
            fault=kind,
        )
        raise self._fault

    @contextlib.contextmanager
    def _transaction(self, what: str, run_id: str, *, write: bool) -> Iterator[sqlite3.Connection]:
        """Hold the lock and one transaction: all of the block's statements, or none."""
        with self._lock:
            conn = self._connection()
            if write:
                self._check_file()
            try:
                # IMMEDIATE takes the write lock now (waiting busy_timeout for it),
                # instead of failing at the first write when another program wrote.
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    rollback(conn)
                    raise
            except sqlite3.Error as exc:
                raise self._error(what, exc, run_id=run_id) from exc

    def _update_run(self, what: str, sql: str, params: Row, run_id: str) -> int:
        """One UPDATE of one run row: a transaction of its own (autocommit)."""
        with self._lock:
            conn = self._connection()
            self._check_file()
            try:
                changed: int = conn.execute(sql, params).rowcount
                if changed == 0 and conn.execute(RUN_EXISTS, (run_id,)).fetchone() is None:
                    raise self._not_found(run_id)
            except sqlite3.Error as exc:
                raise self._error(what, exc, run_id=run_id) from exc
        return changed

    def _not_found(self, run_id: str) -> RunNotFoundError:
        return RunNotFoundError(f"no run with id {run_id!r} in {self.path}; {_LIST_RUNS_HINT}")

    def _error(self, what: str, exc: sqlite3.Error, *, run_id: str = "") -> StoreError:
        code = getattr(exc, "sqlite_errorcode", 0)
        if code == sqlite3.SQLITE_CONSTRAINT_FOREIGNKEY and run_id:
            return self._not_found(run_id)  # a step row for a run that does not exist
        return fault_error(self.path, what, exc, busy_timeout=self._busy_timeout)

    # -- ownership ---------------------------------------------------------------------------

    def claim_run(self, run_id: str, *, new: bool) -> None:
        """Own ``run_id``, or raise ``RunOwnedError`` naming the program that does.

        ``new``: the id must be unused (``StoreError`` otherwise); else the run
        must exist (``RunNotFoundError``).  The check and the write are one
        ``BEGIN IMMEDIATE`` transaction, and the run's lock file is locked
        inside it: of two programs claiming at once, the second waits for the
        first's transaction, then finds the lock taken and the owner written.
        """
        self._claim(run_id, "new" if new else "resume")

    def release_run(self, run_id: str) -> None:
        """Give ``run_id`` up (idempotent): unlock it, so another program may claim it.

        Nothing is written (a faulted store may not be writable): a run left
        ``running`` keeps this process as its recorded owner, which a claimer
        on this machine passes over once the lock is free, and which readers
        see as running until this process ends or its heartbeat goes stale.
        """
        with self._lock:
            claim = self._claims.pop(run_id, None)
        if claim is not None:
            claim[1].release()

    def _claim(self, run_id: str, mode: _owner.ClaimMode) -> RunOwner:
        with self._lock:
            conn = self._connection()
            if run_id in self._claims:
                owner = self._claims[run_id][0]
                raise RunOwnedError(
                    f"run {run_id!r} is already being run through this store object "
                    f"({owner.describe()}); wait for that run to end",
                    run_id=run_id,
                    owner=owner,
                )
            self._check_file()
            owner = _owner.me(self._wall())
            lock: _owner.RunLock | None = None
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    row = conn.execute(SELECT_CLAIM, (run_id,)).fetchone()
                    _owner.seam("checked", run_id)
                    try:
                        lock = _owner.RunLock.try_acquire(
                            _owner.lock_path(self.path, run_id), owner
                        )
                    except OSError as exc:
                        raise os_fault(self.path, f"lock run {run_id!r}", exc) from exc
                    _owner.judge(
                        self.path,
                        run_id,
                        row,
                        locked=lock is not None,
                        mode=mode,
                        now=self._wall(),
                        stale_after=self._stale_after,
                    )
                    if row is not None:
                        conn.execute(WRITE_OWNER, (*_owner.owner_row(owner), owner.since, run_id))
                    conn.execute("COMMIT")
                except BaseException:
                    rollback(conn)
                    raise
            except BaseException as exc:
                if lock is not None:
                    lock.release()
                if isinstance(exc, sqlite3.Error):
                    raise self._error("claim a run in", exc, run_id=run_id) from exc
                raise
            assert lock is not None
            self._claims[run_id] = (owner, lock)
            return owner

    # -- RunStore: writes --------------------------------------------------------------------

    def begin_run(self, info: RunInfo, steps: Sequence[StepRecord]) -> None:
        try:
            settings = _SETTINGS_CODEC.encode(dict(info.settings))
        except ArtifactCodecError as exc:
            raise StoreError(
                f"the settings of run {info.run_id!r} cannot be stored: {exc}"
            ) from exc
        claim = self._claims.get(info.run_id)
        if claim is None and info.status is RunStatus.RUNNING:
            owner: RunOwner | None = self._claim(info.run_id, "any")  # used directly, unclaimed
        else:
            owner = claim[0] if claim is not None else None
        run = run_row(info, settings, owner)
        step_rows = [step_row(info.run_id, r, has_outputs=False) for r in steps]
        attempts: list[Row] = []
        for record in steps:
            attempt_rows(info.run_id, record, attempts)
        with self._transaction("begin a run in", info.run_id, write=True) as conn:
            conn.execute(UPSERT_RUN, run)
            write_steps(conn, step_rows, attempts)

    def save_step(
        self, run_id: str, record: StepRecord, outputs: Mapping[str, Any] | None = None
    ) -> None:
        self.save_step_batch(run_id, ((record, outputs),))

    def save_step_batch(
        self, run_id: str, items: Sequence[tuple[StepRecord, Mapping[str, Any] | None]]
    ) -> None:
        """Several :meth:`save_step` in one transaction: all of them, or none.

        The shell writes the transitions it carries out back to back this way
        (a batch of tiny attempts dispatched, or their outcomes): one commit,
        one fsync of the WAL, instead of one per step.
        """
        encoded = []
        for record, outputs in items:  # encoded before the transaction: a bad value writes nothing
            artifacts = None
            # Reused from the cache: its source run stored these outputs, load reads them there.
            if outputs is not None and record.reused_from is None:
                artifacts = encode_outputs(self._codec, run_id, record.step_id, outputs)
            attempts: list[Row] = []
            attempt_rows(run_id, record, attempts)
            encoded.append(
                (step_row(run_id, record, has_outputs=outputs is not None), attempts, artifacts)
            )
        with self._transaction("save a step in", run_id, write=True) as conn:
            for row, attempts, artifacts in encoded:
                conn.execute(UPSERT_STEP, row)
                conn.execute(DELETE_ATTEMPTS, row[:2])
                conn.executemany(INSERT_ATTEMPT, attempts)
                if artifacts is not None:
                    conn.execute(DELETE_ARTIFACTS, row[:2])
                    conn.executemany(INSERT_ARTIFACT, artifacts)

    def save_steps(self, run_id: str, records: Sequence[StepRecord]) -> None:
        step_rows = [step_row(run_id, r, has_outputs=False) for r in records]
        attempts: list[Row] = []
        for record in records:
            attempt_rows(run_id, record, attempts)
        with self._transaction("save steps in", run_id, write=True) as conn:
            # Checked, not left to the foreign key: an empty list must fail too.
            if conn.execute(RUN_EXISTS, (run_id,)).fetchone() is None:
                raise self._not_found(run_id)
            write_steps(conn, step_rows, attempts)

    def finish_run(
        self, run_id: str, status: RunStatus, *, ended: float, error: str | None = None
    ) -> None:
        params = (str(status), ended, error, run_id)
        self._update_run("finish a run in", FINISH_RUN, params, run_id)
        self.release_run(run_id)  # the row has no owner any more; drop the lock

    def heartbeat(self, run_id: str, now: float) -> None:
        claim = self._claims.get(run_id)
        token = claim[0].token if claim is not None else ""
        params = (now, run_id, token)
        if self._update_run("record a heartbeat in", HEARTBEAT, params, run_id) == 0:
            # Another program took the run over (ours went silent past stale_after).
            raise _owner.owned_error(run_id, self.load(run_id).info.owner)

    def request_cancel(self, run_id: str) -> None:
        self._update_run("request a cancel in", REQUEST_CANCEL, (run_id,), run_id)

    # -- RunStore: reads -------------------------------------------------------------------

    def cancel_requested(self, run_id: str) -> bool:
        row = self._read_row("read the cancel flag from", CANCEL_REQUESTED, run_id)
        return bool(row is not None and row[0])

    def exists(self, run_id: str) -> bool:
        return self._read_row("look up", RUN_EXISTS, run_id) is not None

    def _read_row(self, what: str, sql: str, run_id: str) -> Row | None:
        """One row about one run, or ``None``: a single statement, no transaction."""
        with self._lock:
            conn = self._connection()
            try:
                row: Row | None = conn.execute(sql, (run_id,)).fetchone()
            except sqlite3.Error as exc:
                raise self._error(what, exc, run_id=run_id) from exc
        return row

    def load(self, run_id: str) -> StoredRun:
        # One read transaction: a snapshot, never half of a concurrent write.
        with self._transaction("load a run from", run_id, write=False) as conn:
            run_row = conn.execute(SELECT_RUN, (run_id,)).fetchone()
            if run_row is None:
                raise self._not_found(run_id)
            step_rows = conn.execute(SELECT_STEPS, (run_id,)).fetchall()
            attempt_rows_ = conn.execute(SELECT_ATTEMPTS, (run_id,)).fetchall()
            artifact_rows = conn.execute(SELECT_ARTIFACTS, (run_id,)).fetchall()
            for row in step_rows:  # reused from the cache: the outputs its source stored
                if row[5] is not None and row[4]:
                    artifact_rows += conn.execute(SELECT_STEP_ARTIFACTS, (row[5], row[0]))
        # Decoding happens outside the lock: unpickling runs arbitrary code.
        steps, outputs = step_records(
            step_rows,
            attempt_rows_,
            artifact_rows,
            decode=lambda row: decode_artifact(self._codec, self.path, run_id, row),
        )
        return StoredRun(info=self._run_info(run_row, self._wall()), steps=steps, outputs=outputs)

    def list_runs(self) -> list[RunInfo]:
        with self._transaction("list the runs of", "", write=False) as conn:
            rows = conn.execute(SELECT_RUNS).fetchall()
        now = self._wall()
        return [self._run_info(row, now) for row in rows]

    # -- logs (beside the records: see store.base.LogStore) ---------------------------------

    def save_log(self, run_id: str, step_id: str, attempt: int, text: str, *, cut: int) -> None:
        self.save_logs(run_id, [(step_id, attempt, text, cut)])

    def save_logs(self, run_id: str, logs: Sequence[tuple[str, int, str, int]]) -> None:
        rows = [(run_id, step_id, attempt, text, cut) for step_id, attempt, text, cut in logs]
        with self._transaction("save logs in", run_id, write=True) as conn:
            conn.executemany(UPSERT_LOG, rows)

    def load_log(self, run_id: str, step_id: str, attempt: int) -> str | None:
        with self._transaction("read a log from", run_id, write=False) as conn:
            row = conn.execute(SELECT_LOG, (run_id, step_id, attempt)).fetchone()
        return None if row is None else str(row[0])

    def list_logs(self, run_id: str) -> list[LogEntry]:
        with self._transaction("list the logs of", run_id, write=False) as conn:
            if conn.execute(RUN_EXISTS, (run_id,)).fetchone() is None:
                raise self._not_found(run_id)
            rows = conn.execute(SELECT_LOGS, (run_id,)).fetchall()
        return [LogEntry(str(s), int(a), int(n), int(c)) for s, a, n, c in rows]

    def _run_info(self, row: Row, now: float) -> RunInfo:
        return run_info(row, now=now, stale_after=self._stale_after)

    # -- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        """Give up every run this store owns, close the connection (idempotent)."""
        claimed = bool(self._claims)
        for run_id in list(self._claims):
            self.release_run(run_id)
        if claimed or self._conn is not None:
            _owner.RunLock.tidy(self.path)
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def __repr__(self) -> str:
        state = "closed" if self._conn is None else "open"
        return f"<SQLiteStore {os.fspath(self.path)!r} codec={self._codec.name} {state}>"


def _logs(path: Path) -> list[Path]:
    return [Path(f"{path}-wal"), Path(f"{path}-shm")]
