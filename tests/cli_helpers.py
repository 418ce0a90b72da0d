"""Running the ``stepvisor`` command in tests: its environment, its output, its store."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from stepvisor.store.sqlite import SQLiteStore

__all__ = ["RUN_ID", "cli_env", "open_store", "started_id", "stepvisor"]

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
