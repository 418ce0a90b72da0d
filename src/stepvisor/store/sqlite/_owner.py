"""Run ownership: one program runs a run at a time, and a dead owner is seen at once.

An owner is recorded in the run's row (host, pid, process start time, boot
id, since when, a claim token) and holds an ``flock`` on a lock file of its
own, ``<store>.locks/run-<id>.lock``.  The kernel drops the lock when the
process dies however it dies (SIGKILL, OOM killer), so:

- a *claimer* on the same host knows the owner is dead when it gets the lock;
- a *reader* (``stepvisor status``, ``load``) must not take the lock (a reader
  holding it for a moment would make a claimer fail), so it asks ``/proc``:
  is the pid alive, and does it have the recorded start time?  A pid reused by
  another process has another start time; after a reboot the boot id differs;
- on another host neither works, and the heartbeat decides, as before.

One lock file per run (rather than one per store) lets one program own a run
while another owns another run of the same store.  ``flock`` (not ``lockf``)
because its lock belongs to the open file, not the process: two stores opened
in one process exclude each other too, and closing some other descriptor of the
file does not drop it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import secrets
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, Literal

from stepvisor.core.state import RunStatus
from stepvisor.errors import RunNotFoundError, RunOwnedError, StoreError
from stepvisor.store.base import RunOwner

__all__ = ["ClaimMode", "RunLock", "judge", "liveness", "me", "owned_error", "process_started"]

#: A claim of a new run (its id must be unused), a resume (it must exist), or either.
ClaimMode = Literal["new", "resume", "any"]

_SAFE_ID: Final = re.compile(r"[A-Za-z0-9._-]{1,80}")
_BOOT_ID_FILE: Final = Path("/proc/sys/kernel/random/boot_id")
_MAX_TRIES: Final = 50

#: Test seam: called as ``_seam(stage, run_id)`` inside a claim, after the
#: check and before the write (``stage == "checked"``).  No-op in production.
seam: Callable[[str, str], None] = lambda stage, run_id: None  # noqa: E731


def process_started(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks since boot); ``None`` if none runs.

    Field 22 of ``/proc/<pid>/stat``.  A zombie (dead, not yet reaped) counts as gone.
    """
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or ')'.
    fields = data[data.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def _boot_id() -> str | None:
    try:
        return _BOOT_ID_FILE.read_text().strip() or None
    except OSError:
        return None


def me(since: float) -> RunOwner:
    """This process as a new owner (a fresh token for each claim)."""
    pid = os.getpid()
    return RunOwner(
        host=socket.gethostname(),
        pid=pid,
        since=since,
        started=process_started(pid),
        boot_id=_boot_id(),
        token=secrets.token_hex(8),
    )


def liveness(owner: RunOwner) -> Literal["alive", "dead", "unknown"]:
    """Whether ``owner`` still runs: "unknown" when it is not on this machine."""
    boot = _boot_id()
    if owner.host != socket.gethostname() or boot is None or owner.boot_id != boot:
        # Another machine, or this one before a reboot (then the heartbeat is
        # long stale anyway): only the heartbeat can tell.
        return "unknown"
    if owner.started is None:
        return "unknown"
    return "alive" if process_started(owner.pid) == owner.started else "dead"


def lock_path(store: Path, run_id: str) -> Path:
    """``<store>.locks/run-<id>.lock``; ids that are not plain names are hashed."""
    if _SAFE_ID.fullmatch(run_id):
        name = f"run-{run_id}.lock"
    else:
        name = f"sha-{hashlib.sha256(run_id.encode()).hexdigest()[:24]}.lock"
    return store.with_name(f"{store.name}.locks") / name


class RunLock:
    """An exclusive ``flock`` on one run's lock file, held until :meth:`release`."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def try_acquire(cls, path: Path, owner: RunOwner) -> RunLock | None:
        """The lock, or ``None`` if another open file (a live program) holds it.

        Raises ``OSError`` when the lock file cannot be made (read-only, full).
        """
        for _ in range(_MAX_TRIES):
            if not path.parent.is_dir():  # a stat: cheaper than mkdir on every claim
                path.parent.mkdir(mode=0o700, exist_ok=True)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except FileNotFoundError:
                continue  # the directory was removed by a releaser meanwhile
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            except BaseException:
                os.close(fd)
                raise
            # A releaser unlinks the file before unlocking it: if ours was
            # unlinked between our open and our flock, we locked an orphan.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                # For people looking at the file; the store's row is what counts.
                os.ftruncate(fd, 0)
                os.write(fd, f"{owner.pid} {owner.host}\n".encode())
                return cls(path, fd)
            os.close(fd)
        raise OSError(f"the lock file {path} keeps being replaced")

    @staticmethod
    def tidy(store: Path) -> None:
        """Remove the store's lock directory if no run holds a lock there (best effort)."""
        with contextlib.suppress(OSError):
            lock_path(store, "x").parent.rmdir()

    def release(self) -> None:
        """Remove the lock file, then unlock it (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(fd)


# -- claims -------------------------------------------------------------------------


def judge(
    path: Path,
    run_id: str,
    row: tuple[Any, ...] | None,
    *,
    locked: bool,
    mode: ClaimMode,
    now: float,
    stale_after: float,
) -> None:
    """Raise unless the claim may go ahead (caller holds the write transaction)."""
    owner = owner_of(row[3:]) if row is not None else None
    if not locked:  # a live program on this machine holds the run's lock
        raise owned_error(run_id, owner)
    if row is None:
        if mode == "resume":
            raise RunNotFoundError(
                f"no run with id {run_id!r} in {path}; "
                "list the runs it holds with `stepvisor status`"
            )
        return
    if mode == "new":
        raise StoreError(
            f"run id {run_id!r} is already used by a run in {path}; choose another "
            f"run_id, or continue that run with resume({run_id!r}, ...)"
        )
    if owner is not None and liveness(owner) != "unknown":
        return  # its owner was on this machine, and its lock is free: it is gone
    status, heartbeat, started = row[:3]
    fresh = now - (heartbeat if heartbeat is not None else started) <= stale_after
    if fresh and (owner is not None or status == RunStatus.RUNNING.value):
        raise owned_error(run_id, owner)


def owned_error(run_id: str, owner: RunOwner | None) -> RunOwnedError:
    fix = f"wait for it to end, or stop it with `stepvisor cancel {run_id}`, then resume"
    if owner is None:
        text = f"run {run_id!r} is still running (its heartbeat is fresh); {fix}"
    else:
        text = f"run {run_id!r} is owned by another program: {owner.describe()}; {fix}"
    return RunOwnedError(text, run_id=run_id, owner=owner)


def owner_row(owner: RunOwner) -> tuple[Any, ...]:
    return (owner.host, owner.pid, owner.started, owner.boot_id, owner.since, owner.token)


def owner_of(columns: Sequence[Any]) -> RunOwner | None:
    host, pid, started, boot_id, since, token = columns
    if host is None or pid is None:
        return None
    return RunOwner(host, pid, since or 0.0, started, boot_id, token or "")
