"""Real faults for a run store, for tests and for the fault campaign.

Each injector makes the fault happen for real, and undoes it on exit:

- :func:`small_disk` mounts a tmpfs of a few hundred KiB (needs root and
  ``mount``; :func:`mounting_works` says whether it can), :func:`fill` fills it
  until the kernel says ENOSPC, and :func:`read_only` remounts it read-only
  (chmod would not do: root ignores permission bits).
- :func:`write_lock` holds ``BEGIN EXCLUSIVE`` on a second connection, as
  another program writing would.
- :func:`delete_store` / :func:`replace_store` unlink or replace the file
  under a program that has it open.
- :func:`tear_wal` truncates the write-ahead log in the middle of a frame,
  as a crash or power loss in the middle of a write would leave it.
- :func:`check_store` is the oracle: ``PRAGMA integrity_check``, foreign keys,
  one status row per step, and every succeeded step with its artifacts.

Nothing here imports the code under test beyond the store's file layout, so
a campaign can call these on any store path.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "StoreCheck",
    "check_store",
    "delete_store",
    "fill",
    "mounting_works",
    "read_only",
    "replace_store",
    "small_disk",
    "tear_wal",
    "write_lock",
]

_WAL_HEADER = 32
_FRAME_HEADER = 24


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=False, capture_output=True, text=True, timeout=30)


def mounting_works(where: Path) -> str | None:
    """``None`` if this process can mount a tmpfs, else why not (for a skip reason)."""
    if shutil.which("mount") is None or shutil.which("umount") is None:
        return "no mount/umount command"
    probe = where / ".mount-probe"
    probe.mkdir()
    try:
        done = _run("mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe))
        if done.returncode != 0:
            return f"cannot mount a tmpfs here: {done.stderr.strip()}"
        _run("umount", str(probe))
        return None
    finally:
        probe.rmdir()


@contextlib.contextmanager
def small_disk(where: Path, *, size_kib: int = 512) -> Iterator[Path]:
    """A tmpfs of ``size_kib`` KiB mounted at ``where`` (created), unmounted on exit."""
    where.mkdir(parents=True, exist_ok=True)
    done = _run("mount", "-t", "tmpfs", "-o", f"size={size_kib}k,mode=0700", "tmpfs", str(where))
    if done.returncode != 0:
        raise RuntimeError(f"cannot mount a tmpfs at {where}: {done.stderr.strip()}")
    try:
        yield where
    finally:
        if _run("umount", str(where)).returncode != 0:
            _run("umount", "-l", str(where))  # something still holds it: detach it anyway
        where.rmdir()


def fill(disk: Path) -> Path:
    """Write a file on ``disk`` until it is full (ENOSPC); return the file, to delete later."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    block = b"\0" * 4096
    try:
        while True:
            try:
                os.write(fd, block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
        # tmpfs may leave a partial page: fill the last bytes one by one.
        with contextlib.suppress(OSError):
            while os.write(fd, b"\0"):
                pass
    finally:
        os.close(fd)
    return filler


@contextlib.contextmanager
def read_only(mount: Path) -> Iterator[None]:
    """Remount ``mount`` read-only (no file on it may be open for writing), rw on exit."""
    done = _run("mount", "-o", "remount,ro", str(mount))
    if done.returncode != 0:
        raise RuntimeError(f"cannot remount {mount} read-only: {done.stderr.strip()}")
    try:
        yield
    finally:
        _run("mount", "-o", "remount,rw", str(mount))


@contextlib.contextmanager
def write_lock(db: Path) -> Iterator[sqlite3.Connection]:
    """Hold the store's write lock from a second connection, as another writer would.

    The connection may be released from another thread than the one that took it.
    """
    conn = sqlite3.connect(db, isolation_level=None, timeout=0, check_same_thread=False)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        yield conn
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    finally:
        conn.close()


def delete_store(db: Path) -> None:
    """Unlink the store file (its ``-wal``/``-shm`` stay: the open program holds them)."""
    db.unlink()


def replace_store(db: Path, replacement: Path) -> None:
    """Put ``replacement`` at the store's path, as a restore from backup would."""
    os.replace(replacement, db)


def tear_wal(db: Path, *, keep_frames: int, into_frame: int = 100) -> int:
    """Cut the store's WAL ``into_frame`` bytes into frame ``keep_frames`` (0-based).

    Call it while no connection has the store open (e.g. after its program was
    killed).  Returns the number of whole frames left.  SQLite then keeps the
    transactions whose commit frame is whole and checksummed, and drops the rest.
    """
    wal = Path(f"{db}-wal")
    page_size = int.from_bytes(wal.read_bytes()[8:12], "big")
    frame = _FRAME_HEADER + page_size
    frames = (wal.stat().st_size - _WAL_HEADER) // frame
    if not 0 < keep_frames < frames:
        raise ValueError(f"the WAL has {frames} frames; cannot keep {keep_frames}")
    os.truncate(wal, _WAL_HEADER + keep_frames * frame + into_frame)
    return keep_frames


def wal_frames(db: Path) -> int:
    """How many frames the store's WAL holds (0 when there is none)."""
    wal = Path(f"{db}-wal")
    if not wal.exists() or wal.stat().st_size < _WAL_HEADER:
        return 0
    page_size = int.from_bytes(wal.read_bytes()[8:12], "big")
    return (wal.stat().st_size - _WAL_HEADER) // (_FRAME_HEADER + page_size)


class StoreCheck:
    """What :func:`check_store` found: step statuses and attempt counts per run, what is wrong."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.steps: dict[str, dict[str, str]] = {}
        self.attempts: dict[str, dict[str, int]] = {}

    def succeeded(self, run_id: str) -> set[str]:
        return {sid for sid, status in self.steps.get(run_id, {}).items() if status == "succeeded"}


def check_store(db: Path) -> StoreCheck:
    """Open ``db`` read-only and check it is whole and consistent."""
    out = StoreCheck()
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        integrity = conn.execute("PRAGMA integrity_check").fetchall()
        if integrity != [("ok",)]:
            out.problems.append(f"integrity_check: {integrity}")
        broken = conn.execute("PRAGMA foreign_key_check").fetchall()
        if broken:
            out.problems.append(f"foreign_key_check: {broken}")
        rows = conn.execute("SELECT run_id, step_id, status, has_outputs FROM steps").fetchall()
        for run_id, step_id, status, has_outputs in rows:
            table = out.steps.setdefault(run_id, {})
            if step_id in table:
                out.problems.append(f"step {step_id!r} of run {run_id!r} has two rows")
            table[step_id] = status
            if status == "succeeded" and not has_outputs:
                out.problems.append(f"step {step_id!r} of {run_id!r} succeeded without outputs")
        counted = conn.execute(
            "SELECT run_id, step_id, COUNT(*) FROM attempts GROUP BY run_id, step_id"
        ).fetchall()
        for run_id, step_id, count in counted:
            out.attempts.setdefault(run_id, {})[step_id] = count
    finally:
        conn.close()
    return out
