"""Functions the joblib backend tests run in worker processes (importable by the children).

Calls signal through files: one that must be running writes its pid, so a test
waits for the file rather than sleeping in the hope that the call has started.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
from joblib.parallel import get_active_backend


def square(x: int) -> int:
    return x * x


def pid_of(_: object) -> int:
    return os.getpid()


def fail_on(x: int, bad: int) -> int:
    if x == bad:
        raise ValueError(f"bad value {x}")
    return x


def hang_after_writing_pid(path: str) -> None:
    """Write this process's pid, then hang far past any timeout a test sets."""
    Path(path).write_text(str(os.getpid()))
    time.sleep(60)


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def flaky(marker: str) -> str:
    """Fails the first time (no marker file yet), succeeds the second."""
    path = Path(marker)
    if not path.exists():
        path.write_text("failed once")
        raise ConnectionError("transient")
    return "ok"


def describe_array(a: Any) -> tuple[float, bool, bool]:
    """(sum, writable, whether this process maps a stepvisor shared-memory segment)."""
    maps = Path("/proc/self/maps").read_text()
    return float(a.sum()), bool(a.flags.writeable), "memfd:stepvisor" in maps


def nested_backend(_: object) -> tuple[str, int | None]:
    """The backend a nested Parallel call gets inside a batch, and its nesting level."""
    backend, _n_jobs = get_active_backend()
    return type(backend).__name__, backend.nesting_level


def native_threads(_: object) -> str | None:
    return os.environ.get("OMP_NUM_THREADS")


def big_result(n: int) -> Any:
    return np.arange(n, dtype=np.float64)
