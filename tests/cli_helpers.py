"""Running the ``stepvisor`` command in tests: its environment, its output, its store."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from pathlib import Path

from stepvisor.store.sqlite import SQLiteStore

__all__ = ["RUN_ID", "cli_env", "on_terminal", "open_store", "started_id", "stepvisor"]

RUN_ID = r"[0-9a-f]{12}"


def cli_env(**extra: str) -> dict[str, str]:
    """This environment without stepvisor settings (the test session marker stays)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("STEPVISOR_") or k == "STEPVISOR_TEST_SESSION"
    }
    return {**env, **extra}


def stepvisor(
    cwd: Path, *args: str, timeout: float = 30, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stepvisor", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or cli_env(),
        check=False,
    )


def started_id(stdout: str) -> str:
    match = re.match(rf"stepvisor: run ({RUN_ID}) started: ", stdout)
    assert match, stdout
    return match[1]


def open_store(project: Path) -> SQLiteStore:
    return SQLiteStore(project / ".stepvisor" / "runs.db", create=False)


def on_terminal(
    cwd: Path,
    *args: str,
    columns: int = 80,
    watch: Callable[[str], None] | None = None,
    timeout: float = 30,
) -> str:
    """Run ``stepvisor ARGS`` on a pseudo-terminal of 24 rows; return all it drew.

    ``watch`` is called with what was drawn so far before each read (a test may
    act on what it sees, e.g. let a held step go).  The program must exit 0.
    """
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "stepvisor", *args],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=follower,
        env=cli_env(),
    )
    os.close(follower)
    chunks: list[bytes] = []
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if watch is not None:
                watch(b"".join(chunks).decode("utf-8", errors="replace"))
            ready, _, _ = select.select([leader], [], [], 1.0)
            if not ready:
                continue
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the program closed its end
                break
            if not chunk:
                break
            chunks.append(chunk)
        screen = b"".join(chunks).decode("utf-8", errors="replace")
        assert proc.wait(timeout=10) == 0, screen
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        os.close(leader)
    return screen
