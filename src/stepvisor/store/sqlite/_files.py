"""Files: creating a store whole, checking a file is one, connecting, naming faults.

How a store is opened::

    path missing? --create--> build it under a temporary name, fsync, link into place
         |                    (a store file is either absent or complete, never half-made)
    read the 100-byte header: SQLite magic + our application id?   else NotAStoreError
         |                    (plain file read: a foreign file is never opened by SQLite)
    connect, read ``meta``: our marker? schema version? codec?  else NotAStoreError /
                                                           SchemaVersionError / StoreError

A fault (disk full, read-only, locked, file replaced) becomes a
:class:`~stepvisor.errors.StoreFaultError` that names the store file, the
fault and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import secrets
import sqlite3
import stat
import time
import urllib.parse
from pathlib import Path
from typing import Final, NamedTuple

from stepvisor.errors import InvalidTimeoutError, NotAStoreError, StoreError, StoreFaultError
from stepvisor.store.sqlite._schema import APPLICATION_ID, MARKER, migrate

_SQLITE_MAGIC: Final = b"SQLite format 3\x00"
FILE_MODE: Final = 0o600
DIR_MODE: Final = 0o700


def connect(path: Path, *, busy_timeout: float) -> sqlite3.Connection:
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


def create_store(path: Path, *, codec: str) -> None:
    """Create a complete, empty store at ``path`` unless a file appears there first.

    The store is built under a temporary name and hard-linked into place, so a
    crash during creation can leave a stray temporary file but never a
    half-made store at ``path``; and ``link`` fails rather than replace a store
    that another program created meanwhile.
    """
    path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.creating")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)  # whatever the umask: owner read/write, nobody else
    finally:
        os.close(fd)
    try:
        conn = connect(tmp, busy_timeout=0.0)
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
    migrate(conn, 0)
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


def check_header(path: Path) -> None:
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


def rollback(conn: sqlite3.Connection) -> None:
    # SQLite may already have rolled back (e.g. after SQLITE_FULL); never hide the cause.
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


class FileId(NamedTuple):
    """Which file a path names: a store deleted or replaced under us has another id."""

    device: int
    inode: int

    @classmethod
    def of(cls, path: Path) -> FileId | None:
        try:
            info = os.stat(path)
        except FileNotFoundError:
            return None
        return cls(info.st_dev, info.st_ino)


def save_copy(conn: sqlite3.Connection, path: Path) -> Path | None:
    """Copy what ``conn`` holds (the file it still has open) beside ``path``.

    Used when the store file was deleted or replaced under a running program:
    the transitions committed so far live only in the file this connection
    still holds open, which nobody else can reach.  ``None`` if it cannot be saved.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.recovered-{stamp}-{secrets.token_hex(3)}")
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        os.close(fd)
        copy = sqlite3.connect(target)
        try:
            conn.backup(copy)
        finally:
            copy.close()
    except (OSError, sqlite3.Error):
        with contextlib.suppress(OSError):
            target.unlink()
        return None
    return target


#: SQLite's primary result code -> (fault name, what to do about it).
_FAULTS: Final[dict[int, tuple[str, str]]] = {
    sqlite3.SQLITE_FULL: ("disk full", "the disk is full; free some space and resume the run"),
    sqlite3.SQLITE_READONLY: (
        "read-only",
        "the file or its directory cannot be written (read-only file system or "
        "permissions); make it writable, then resume the run",
    ),
    sqlite3.SQLITE_CANTOPEN: (
        "cannot open",
        "check that you may write the file and its directory",
    ),
    sqlite3.SQLITE_PERM: (
        "permission denied",
        "check that you may write the file and its directory",
    ),
    sqlite3.SQLITE_IOERR: (
        "I/O error",
        "the disk refused a read or write (full, removed, or over a file size limit); "
        "fix the disk, then resume the run",
    ),
    sqlite3.SQLITE_CORRUPT: (
        "damaged",
        "the file is damaged; restore it from a backup, or move it aside",
    ),
    sqlite3.SQLITE_NOTADB: (
        "damaged",
        "the file is damaged; restore it from a backup, or move it aside",
    ),
}


#: What SQLite says when the real cause is a read-only file system or directory:
#: it opens such a file read-only, then cannot make the WAL's index beside it.
_READ_ONLY_SIGNS: Final = (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_PERM)


def _read_only(path: Path) -> bool:
    try:
        if os.statvfs(path.parent).f_flag & os.ST_RDONLY:
            return True
    except OSError:
        return False
    return not os.access(path.parent, os.W_OK)


def fault_error(path: Path, what: str, exc: sqlite3.Error, *, busy_timeout: float) -> StoreError:
    """The error for an SQLite failure: a ``StoreFaultError`` naming ``path`` and the fault."""
    primary = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    if primary in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        fault = "locked"
        fix = (
            f"another program held it locked for over {busy_timeout:g} s; "
            "try again, or find the program writing to it"
        )
    elif primary in _READ_ONLY_SIGNS and _read_only(path):
        fault, fix = _FAULTS[sqlite3.SQLITE_READONLY]
    elif primary in _FAULTS:
        fault, fix = _FAULTS[primary]
    else:
        return StoreError(f"cannot {what} the run store {path}: {exc}; see SQLite's message")
    return StoreFaultError(
        f"cannot {what} the run store {path}: {exc} ({fault}); {fix}", path=str(path), fault=fault
    )


def os_fault(path: Path, what: str, exc: OSError) -> StoreError:
    """The error for a failed file operation beside the store (its lock files)."""
    fault = {
        errno.ENOSPC: "disk full",
        errno.EROFS: "read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.EDQUOT: "disk full",
    }.get(exc.errno or 0, "I/O error")
    return StoreFaultError(
        f"cannot {what} beside the run store {path}: {exc.strerror or exc} ({fault}); "
        "make the store's directory writable (and not full), then try again",
        path=str(path),
        fault=fault,
    )


def check_seconds(name: str, value: float, *, allow_zero: bool) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise InvalidTimeoutError(
            f"SQLiteStore({name}=...) must be a finite number of seconds {bound}, got {value!r}"
        )
