"""What a benchmark run was measured on: versions, the machine, its load, the commit.

Figures without their context cannot be compared across runs, so every JSON
the harness writes carries this beside the rows.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

__all__ = ["environment", "loadavg"]


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages (empty where the system has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _memory_total_mb() -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024, 1)
    return None


def environment() -> dict[str, Any]:
    """Versions of what was measured and a description of the machine it ran on."""
    import stepvisor  # noqa: PLC0415 - imported late so discovery errors show first

    return {
        "versions": {
            "stepvisor": stepvisor.__version__,
            "python": platform.python_version(),
            "dask": _version("dask"),
            "ray": _version("ray"),
        },
        "machine": {
            "cores": os.cpu_count(),
            "python": f"{platform.python_implementation()} {platform.python_version()}",
            "platform": platform.platform(),
            "processor": platform.machine(),
            "memory_mb": _memory_total_mb(),
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        },
        "commit": _git_commit(),
    }
