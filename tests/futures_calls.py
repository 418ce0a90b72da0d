"""Functions the Executor tests submit, importable by a process child (no pytest here).

Calls and tests talk through files (a process call shares no memory with the
test): a call that must be caught running writes ``<name>.started`` holding
its pid, and one that must wait does so until the test writes ``<name>.go``,
for at most ``BOUND`` seconds, so a missing signal fails a test instead of
hanging it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import stepvisor as sv

BOUND = 20.0
_POLL = 0.005


def mul(x: int, y: int) -> int:
    return x * y


def capture(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return args, kwargs


def fail(message: str) -> None:
    raise ValueError(message)


def die(code: int) -> None:
    os._exit(code)


def started(folder: str, name: str) -> Path:
    path = Path(folder) / f"{name}.started"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(str(os.getpid()))
    tmp.rename(path)
    return path


def block(folder: str, name: str) -> str:
    """Say it started, then wait for ``<name>.go`` (bounded); return ``name``."""
    started(folder, name)
    go = Path(folder) / f"{name}.go"
    end = time.monotonic() + BOUND
    while not go.exists():
        if time.monotonic() > end:
            raise TimeoutError(f"{go} never came")
        time.sleep(_POLL)
    return name


def run_away(folder: str, name: str) -> None:
    """Say it started, then spin and ignore every stop (bounded)."""
    started(folder, name)
    end = time.monotonic() + BOUND
    while time.monotonic() < end:
        time.sleep(_POLL)


def until_stopped(folder: str, name: str) -> str:
    """Say it started, then wait for the executor's stop through the call's context."""
    started(folder, name)
    ctx = sv.Executor.context()
    end = time.monotonic() + BOUND
    while not ctx.cancelled:
        if time.monotonic() > end:
            raise TimeoutError("no stop came")
        time.sleep(_POLL)
    return "saw the stop"


def flaky(folder: str, fails: int) -> int:
    """Fail ``fails`` times (counted in a file), then return the attempt number."""
    log = Path(folder) / "flaky.log"
    with log.open("a") as f:
        f.write(f"{os.getpid()}\n")
    calls = len(log.read_text().splitlines())
    if calls <= fails:
        raise ConnectionError(f"call {calls} fails")
    return calls


async def add_async(x: int, y: int) -> int:
    return x + y
