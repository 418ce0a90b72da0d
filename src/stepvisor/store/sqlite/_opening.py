"""Opening an existing store: check what it is, migrate an older schema.

Opening a current store writes nothing; an older one is migrated in one
transaction, re-checked under the write lock (another program may have
migrated it meanwhile).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from pathlib import Path

from stepvisor.errors import NotAStoreError, SchemaVersionError, StoreError
from stepvisor.store.codec import Codec
from stepvisor.store.sqlite._files import fault_error, rollback
from stepvisor.store.sqlite._schema import MARKER, SCHEMA_VERSION, migrate

__all__ = ["open_error", "open_existing"]


def open_existing(conn: sqlite3.Connection, path: Path, codec: Codec, busy_timeout: float) -> None:
    """Check the marker, the version and the codec; migrate an older schema."""
    version = _check_meta(path, codec, _read_meta(conn, path, busy_timeout))
    if version < SCHEMA_VERSION:
        _upgrade(conn, path, codec, busy_timeout)
    try:
        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            conn.execute("PRAGMA journal_mode = WAL")  # someone switched it off by hand
    except sqlite3.Error as exc:
        raise fault_error(path, "open", exc, busy_timeout=busy_timeout) from exc


def open_error(path: Path, exc: sqlite3.Error, busy_timeout: float) -> StoreError:
    """The error for a store that cannot be opened: damaged, or a fault."""
    if getattr(exc, "sqlite_errorcode", 0) & 0xFF in (
        sqlite3.SQLITE_CORRUPT,
        sqlite3.SQLITE_NOTADB,
    ):
        return NotAStoreError(
            f"{path} cannot be read as a run store ({exc}); it is damaged and was "
            "left untouched. Restore it from a backup, or move it aside to start a new store"
        )
    return fault_error(path, "open", exc, busy_timeout=busy_timeout)


def _read_meta(conn: sqlite3.Connection, path: Path, busy_timeout: float) -> dict[str, str]:
    try:
        found = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
        ).fetchone()
        rows = conn.execute("SELECT key, value FROM meta").fetchall() if found else []
    except sqlite3.Error as exc:
        raise open_error(path, exc, busy_timeout) from exc
    meta = {str(key): str(value) for key, value in rows}
    if meta.get("application") != MARKER:
        raise NotAStoreError(
            f"{path} carries stepvisor's application id but not its marker, so it "
            "is not a stepvisor run store; it was left untouched. Give the path of a "
            "store, or a path that does not exist yet to create one there"
        )
    return meta


def _check_meta(path: Path, codec: Codec, meta: Mapping[str, str]) -> int:
    try:
        version = int(meta["schema_version"])
    except (KeyError, ValueError):
        raise NotAStoreError(
            f"{path} has no readable schema version; it is damaged and was left "
            "untouched. Restore it from a backup, or move it aside to start a new store"
        ) from None
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{path} was written by a newer stepvisor (store schema v{version}; this "
            f"one reads up to v{SCHEMA_VERSION}); upgrade stepvisor to use it "
            "(pip install -U stepvisor)"
        )
    recorded = meta.get("codec", "json")
    if recorded != codec.name:
        raise StoreError(_codec_mismatch(path, codec, recorded))
    return version


def _codec_mismatch(path: Path, codec: Codec, recorded: str) -> str:
    if recorded == "pickle":
        return (
            f"{path} stores artifacts with codec='pickle'; open it with "
            "SQLiteStore(path, codec='pickle'), but only if you trust everyone who "
            "can write the file: reading pickled artifacts runs code"
        )
    return (
        f"{path} stores artifacts with codec={recorded!r}; open it with "
        f"codec={recorded!r}. A store's codec is fixed when it is created: give a new "
        f"path to keep artifacts with codec={codec.name!r}"
    )


def _upgrade(conn: sqlite3.Connection, path: Path, codec: Codec, busy_timeout: float) -> None:
    """Run the missing migrations, all in one transaction."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Read again under the write lock: another program may have upgraded it.
            version = _check_meta(path, codec, _read_meta(conn, path, busy_timeout))
            migrate(conn, version)
            conn.execute("COMMIT")
        except BaseException:
            rollback(conn)
            raise
    except sqlite3.Error as exc:
        raise fault_error(path, "upgrade the schema of", exc, busy_timeout=busy_timeout) from exc
