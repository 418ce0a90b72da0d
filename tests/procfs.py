"""Reading /proc: is a process gone, and which processes carry a marker.

Used by the fault campaign, the test suite's leak check and the benchmarks to
see that what stepvisor killed is really gone.  Processes are found by a
variable in their environment rather than by parent pid: a grandchild whose
parent was killed is re-parented, and only the inherited environment still
ties it to whoever started it.  Linux only.
"""

from __future__ import annotations

import os

__all__ = ["pid_gone", "process_state", "processes_with_env"]


def process_state(pid: int) -> bytes | None:
    """The state letter of ``pid`` from /proc (``b"R"``, ``b"Z"``, ...), or ``None``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def pid_gone(pid: int) -> bool:
    """Whether ``pid`` no longer names a live process (a zombie counts as gone)."""
    return process_state(pid) in (None, b"Z", b"X")


def processes_with_env(name: str, value: str) -> set[int]:
    """Live processes (not this one, not zombies) whose environment has ``name=value``."""
    needle = f"{name}={value}\0".encode()
    me = os.getpid()
    found: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                env = fh.read() + b"\0"
        except OSError:
            continue
        if needle in env and not pid_gone(int(entry)):
            found.add(int(entry))
    return found
