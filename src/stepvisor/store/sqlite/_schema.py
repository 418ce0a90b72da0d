"""The store's schema, its migrations, its statements, and rows <-> records.

MIGRATIONS[i] takes a store from schema version i to i + 1, inside the caller's
transaction.  A new store runs them all, so the path an old store takes to the
current schema is the one every new store takes.  Never edit a shipped
migration: append a new one.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

from stepvisor.core.state import AttemptRecord, StepRecord
from stepvisor.errors import ArtifactCodecError, StoreError
from stepvisor.store.codec import Codec, codec_named

#: ``PRAGMA application_id`` of every stepvisor store: "STPV" in ASCII.
APPLICATION_ID: Final = 0x53545056
#: The ``meta`` row that says "this file is a stepvisor run store".
MARKER: Final = "stepvisor run store"

Row = tuple[Any, ...]


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


def _v3_run_owner(conn: sqlite3.Connection) -> None:
    """Who owns a run: host, pid, process start time, boot id, since when, claim token."""
    for column in (
        "owner_host TEXT",
        "owner_pid INTEGER",
        "owner_started INTEGER",
        "owner_boot TEXT",
        "owner_since REAL",
        "owner_token TEXT",
    ):
        conn.execute(f"ALTER TABLE runs ADD COLUMN {column}")


def _v4_attempt_logs(conn: sqlite3.Connection) -> None:
    """Each attempt's captured output, beside (not inside) the step and attempt rows.

    ``cut`` is how many bytes of the middle were left out (``log_limit``).
    """
    conn.execute(
        """CREATE TABLE attempt_logs (
            run_id TEXT NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
            step_id TEXT NOT NULL,
            attempt INTEGER NOT NULL,
            text TEXT NOT NULL,
            cut INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (run_id, step_id, attempt)
        ) WITHOUT ROWID"""
    )


def _v5_cache(conn: sqlite3.Connection) -> None:
    """The cache of step results, and on each step where its result came from and why.

    Entries do not belong to a run (the run that made one may be deleted or
    never finish): they are addressed by their key, listed by step.  Payloads
    live in a table of their own: recording a use (``last_used``) rewrites a
    small row, not a row holding a 200 MB array.  Steps written before this
    version read ``reused_from`` and ``cache_note`` as NULL.
    """
    conn.execute("ALTER TABLE steps ADD COLUMN reused_from TEXT")
    conn.execute("ALTER TABLE steps ADD COLUMN cache_note TEXT")
    conn.execute(
        """CREATE TABLE cache_entries (
            key TEXT PRIMARY KEY,
            workflow_id TEXT NOT NULL,
            step_id TEXT NOT NULL,
            parts TEXT NOT NULL,
            run_id TEXT NOT NULL,
            checksum TEXT NOT NULL,
            digests TEXT NOT NULL,
            size INTEGER NOT NULL,
            created REAL NOT NULL,
            last_used REAL NOT NULL
        )"""
    )
    conn.execute("CREATE INDEX cache_by_step ON cache_entries (workflow_id, step_id, created)")
    conn.execute(
        "CREATE TABLE cache_payloads (key TEXT PRIMARY KEY, payload BLOB NOT NULL) WITHOUT ROWID"
    )


MIGRATIONS: Final[tuple[Callable[[sqlite3.Connection], None], ...]] = (
    _v1_initial_schema,
    _v2_run_source,
    _v3_run_owner,
    _v4_attempt_logs,
    _v5_cache,
)
#: The schema version this stepvisor writes; stores from a newer one are refused.
SCHEMA_VERSION: Final = len(MIGRATIONS)


def migrate(conn: sqlite3.Connection, from_version: int) -> None:
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

_OWNER_COLUMNS: Final = "owner_host, owner_pid, owner_started, owner_boot, owner_since, owner_token"
UPSERT_RUN: Final = f"""
    INSERT INTO runs (run_id, workflow_id, fingerprint, settings, seed, status, started,
                      ended, heartbeat, error, source, {_OWNER_COLUMNS}, cancel_requested)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0)
    ON CONFLICT (run_id) DO UPDATE SET
        workflow_id = excluded.workflow_id, fingerprint = excluded.fingerprint,
        settings = excluded.settings, seed = excluded.seed, status = excluded.status,
        started = excluded.started, ended = excluded.ended, heartbeat = excluded.heartbeat,
        error = excluded.error, source = excluded.source,
        owner_host = excluded.owner_host, owner_pid = excluded.owner_pid,
        owner_started = excluded.owner_started, owner_boot = excluded.owner_boot,
        owner_since = excluded.owner_since, owner_token = excluded.owner_token,
        cancel_requested = 0"""  # noqa: S608 - constant text
UPSERT_STEP: Final = """
    INSERT INTO steps (run_id, step_id, status, note, restored, has_outputs, reused_from,
                       cache_note)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (run_id, step_id) DO UPDATE SET
        status = excluded.status, note = excluded.note, restored = excluded.restored,
        has_outputs = max(has_outputs, excluded.has_outputs),
        reused_from = excluded.reused_from, cache_note = excluded.cache_note"""
DELETE_ATTEMPTS: Final = "DELETE FROM attempts WHERE run_id = ? AND step_id = ?"
INSERT_ATTEMPT: Final = """
    INSERT INTO attempts (run_id, step_id, number, started, ended, duration, outcome,
                          error_type, error_message, error_traceback, delay_after, worker, note)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"""
DELETE_ARTIFACTS: Final = "DELETE FROM artifacts WHERE run_id = ? AND step_id = ?"
INSERT_ARTIFACT: Final = (
    "INSERT INTO artifacts (run_id, step_id, name, value, codec) VALUES (?, ?, ?, ?, ?)"
)
#: A finished run has no owner any more: the next program may claim it at once.
FINISH_RUN: Final = """
    UPDATE runs SET status = ?, ended = ?, error = ?, owner_host = NULL, owner_pid = NULL,
        owner_started = NULL, owner_boot = NULL, owner_since = NULL, owner_token = NULL
    WHERE run_id = ?"""
#: Only the run's owner (or anyone, for a run without one) may say it is alive.
HEARTBEAT: Final = (
    "UPDATE runs SET heartbeat = ? WHERE run_id = ? AND (owner_token IS NULL OR owner_token = ?)"
)
WRITE_OWNER: Final = """
    UPDATE runs SET owner_host = ?, owner_pid = ?, owner_started = ?, owner_boot = ?,
        owner_since = ?, owner_token = ?, heartbeat = ?
    WHERE run_id = ?"""
REQUEST_CANCEL: Final = "UPDATE runs SET cancel_requested = 1 WHERE run_id = ?"
CANCEL_REQUESTED: Final = "SELECT cancel_requested FROM runs WHERE run_id = ?"
_RUN_COLUMNS: Final = (
    "run_id, workflow_id, fingerprint, settings, seed, status, started, ended, heartbeat,"
    f" error, source, {_OWNER_COLUMNS}"
)
SELECT_RUN: Final = f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_id = ?"  # noqa: S608 - constant
SELECT_RUNS: Final = f"SELECT {_RUN_COLUMNS} FROM runs ORDER BY started DESC, rowid"  # noqa: S608
#: What a claim decides on: status, signs of life and the recorded owner.
SELECT_CLAIM: Final = (
    f"SELECT status, heartbeat, started, {_OWNER_COLUMNS} FROM runs WHERE run_id = ?"  # noqa: S608
)
SELECT_STEPS: Final = (
    "SELECT step_id, status, note, restored, has_outputs, reused_from, cache_note"
    " FROM steps WHERE run_id = ? ORDER BY rowid"
)
SELECT_ATTEMPTS: Final = """
    SELECT step_id, number, started, ended, duration, outcome, error_type, error_message,
           error_traceback, delay_after, worker, note
    FROM attempts WHERE run_id = ? ORDER BY step_id, number"""
SELECT_ARTIFACTS: Final = (
    "SELECT step_id, name, value, codec FROM artifacts WHERE run_id = ? ORDER BY step_id, name"
)
#: One step's artifacts in another run: the source of a step reused from the cache.
SELECT_STEP_ARTIFACTS: Final = (
    "SELECT step_id, name, value, codec FROM artifacts WHERE run_id = ? AND step_id = ?"
    " ORDER BY name"
)
RUN_EXISTS: Final = "SELECT 1 FROM runs WHERE run_id = ?"
# Attempt logs (schema v4), kept beside the records.
UPSERT_LOG: Final = (
    "INSERT INTO attempt_logs (run_id, step_id, attempt, text, cut) VALUES (?, ?, ?, ?, ?)"
    " ON CONFLICT (run_id, step_id, attempt) DO UPDATE SET text = excluded.text, cut = excluded.cut"
)
SELECT_LOG: Final = "SELECT text FROM attempt_logs WHERE run_id = ? AND step_id = ? AND attempt = ?"
SELECT_LOGS: Final = (
    "SELECT step_id, attempt, length(text), cut FROM attempt_logs WHERE run_id = ?"
    " ORDER BY step_id, attempt"
)


# -- rows <-> records -----------------------------------------------------------------


def step_row(run_id: str, record: StepRecord, *, has_outputs: bool) -> Row:
    return (
        run_id, record.step_id, str(record.status), record.note, record.restored, has_outputs,
        record.reused_from, record.cache_note,
    )  # fmt: skip


def attempt_rows(run_id: str, record: StepRecord, into: list[Row]) -> None:
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


def attempt_from_row(row: Row) -> AttemptRecord:
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


def write_steps(conn: sqlite3.Connection, step_rows: list[Row], attempt_rows: list[Row]) -> None:
    """Upsert step rows and replace their attempts (caller holds the transaction)."""
    conn.executemany(UPSERT_STEP, step_rows)
    conn.executemany(DELETE_ATTEMPTS, [row[:2] for row in step_rows])
    conn.executemany(INSERT_ATTEMPT, attempt_rows)


# -- artifacts ---------------------------------------------------------------------------


def encode_outputs(
    codec: Codec, run_id: str, step_id: str, outputs: Mapping[str, Any]
) -> list[Row]:
    """Artifact rows, encoded before any transaction: a bad value writes nothing."""
    rows: list[Row] = []
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


def decode_artifact(codec: Codec, path: Path, run_id: str, row: Row) -> Any:
    """One artifact's value; only the json codec or the store's own is ever decoded."""
    step_id, name, data, codec_name = row
    where = f"artifact {name!r} of step {step_id!r} (run {run_id!r}) in {path}"
    if codec_name not in ("json", codec.name):
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
