"""Finding stepvisor's shared-memory segments from outside: /proc and /dev/shm.

A segment is a memfd named ``stepvisor`` (:data:`stepvisor.backends._shm.MEMFD_NAME`):
it shows as ``/memfd:stepvisor (deleted)`` among a process's descriptors and
mappings, and never in /dev/shm; the leak check looks in both, so that a named
segment would be caught too.  Linux only.
"""

from __future__ import annotations

import os

from stepvisor.backends._shm import MEMFD_NAME

__all__ = ["dev_shm_entries", "segment_fds", "segment_inodes", "segment_maps"]

_LINK = f"/memfd:{MEMFD_NAME} "


def dev_shm_entries() -> set[str]:
    """Names in /dev/shm that carry the project's prefix."""
    try:
        return {name for name in os.listdir("/dev/shm") if name.startswith(MEMFD_NAME)}
    except OSError:
        return set()


def segment_fds(pid: int | str = "self") -> dict[int, int]:
    """The descriptors of ``pid`` open on a segment: fd -> the segment's inode."""
    found: dict[int, int] = {}
    try:
        entries = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for entry in entries:
        path = f"/proc/{pid}/fd/{entry}"
        try:
            if os.readlink(path).startswith(_LINK):
                found[int(entry)] = os.stat(path).st_ino
        except OSError:  # closed meanwhile
            continue
    return found


def segment_maps(pid: int | str = "self") -> dict[int, int]:
    """The segments ``pid`` has mapped: inode -> bytes mapped."""
    found: dict[int, int] = {}
    try:
        with open(f"/proc/{pid}/maps") as fh:
            lines = fh.readlines()
    except OSError:
        return found
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith(_LINK.rstrip()):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            inode = int(fields[4])
            found[inode] = found.get(inode, 0) + end - start
    return found


def segment_inodes(pids: list[int | str]) -> set[int]:
    """Every segment any of ``pids`` holds, by descriptor or by mapping."""
    inodes: set[int] = set()
    for pid in pids:
        inodes |= set(segment_fds(pid).values()) | set(segment_maps(pid))
    return inodes
