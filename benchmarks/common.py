"""Helpers the scenarios share: measuring safely, timing, processes, temp dirs.

The one rule they enforce: a baseline that is missing or breaks is *reported*
("not installed", "not available", "failed: <error>"), never hidden, and never
takes the other figures of its scenario down with it.  :func:`probe` turns a
measurement into rows that way.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from benchmarks.harness import Row, replace_row
from benchmarks.steps import spin_until, write_pid
from tests.procfs import pid_gone

if TYPE_CHECKING:
    from stepvisor import RunResult

__all__ = [
    "Measured",
    "best_of",
    "cores",
    "missing",
    "optional",
    "pid_gone",
    "probe",
    "read_pids",
    "scratch_dir",
    "spin_until",
    "summary",
    "timed_run",
    "wait_until",
    "write_pid",
]


@dataclass(frozen=True, slots=True)
class Measured:
    """One measured figure, with an optional note for the table."""

    value: float
    note: str = ""


def cores() -> int:
    """The number of CPUs this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def missing(module: str) -> str | None:
    """Why ``module`` cannot be imported (``None`` if it can)."""
    try:
        importlib.import_module(module)
    except ImportError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def optional(module: str) -> ModuleType | None:
    """``module`` if it imports, else ``None``."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def _unavailable(rows: Sequence[Row], requires: Sequence[str]) -> list[Row] | None:
    for module in requires:
        why = missing(module)
        if why is None:
            continue
        ours = module.split(".")[0] == "stepvisor"
        status = "not available" if ours else "not installed"
        hint = (
            f"{module} is not importable yet ({why})"
            if ours
            else f"install it to compare: pip install {module.split('.')[0]}"
        )
        return [replace_row(r, value=None, status=status, note=hint) for r in rows]
    return None


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= 300 else text[:297] + "..."


def probe(
    rows: Sequence[Row],
    measure: Callable[[], Sequence[Measured]],
    *,
    requires: Sequence[str] = (),
) -> list[Row]:
    """Fill ``rows`` (templates whose ``value`` is ``None``) from ``measure()``.

    ``measure`` returns one :class:`Measured` per template, in order.  If a
    module in ``requires`` is missing, the rows say "not installed" (or "not
    available" for a part of stepvisor); if ``measure`` raises, they say
    "failed" with the error.  A note the template already has is kept, before
    the measured one.
    """
    skipped = _unavailable(rows, requires)
    if skipped is not None:
        return skipped
    try:
        figures = list(measure())
    except Exception as exc:
        return [replace_row(r, value=None, status="failed", note=_error_text(exc)) for r in rows]
    if len(figures) != len(rows):
        raise ValueError(f"measure() gave {len(figures)} figures for {len(rows)} rows")
    out: list[Row] = []
    for row, fig in zip(rows, figures, strict=True):
        note = "; ".join(n for n in (row.note, fig.note) if n)
        out.append(replace_row(row, value=fig.value, note=note))
    return out


def best_of(repeat: int, fn: Callable[[], float]) -> tuple[float, list[float]]:
    """Run ``fn`` (which returns a time) ``repeat`` times; the smallest and all of them.

    The minimum is the figure least disturbed by whatever else the machine
    was doing; the full list goes into notes so the spread stays visible.
    """
    times = [fn() for _ in range(max(1, repeat))]
    return min(times), times


def timed_run(run: Callable[[], RunResult]) -> tuple[float, RunResult]:
    """Seconds ``run()`` took, and its result; a run that did not succeed fails the figure."""
    started = time.perf_counter()
    result = run()
    elapsed = time.perf_counter() - started
    if not result.ok:
        raise RuntimeError(f"the stepvisor run ended {result.status.value}: {result.error}")
    return elapsed, result


def summary(values: Sequence[float]) -> tuple[float, float]:
    """Median and worst (largest) of ``values``."""
    return statistics.median(values), max(values)


def wait_until(
    predicate: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.001
) -> float:
    """Poll until ``predicate()``; return the ``time.time()`` it first held.

    Raises ``TimeoutError`` naming ``what`` after ``timeout`` seconds, so a
    scenario that would hang fails instead.
    """
    end = time.monotonic() + timeout
    while True:
        if predicate():
            return time.time()
        if time.monotonic() > end:
            raise TimeoutError(f"gave up after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def read_pids(directory: Path) -> dict[str, int]:
    """``{file stem: pid}`` for every ``*.pid`` file in ``directory``."""
    return {p.stem: int(p.read_text()) for p in directory.glob("*.pid")}


@contextlib.contextmanager
def scratch_dir(prefix: str = "stepvisor-bench-") -> Iterator[Path]:
    """A fresh temporary directory, removed afterwards whatever happened."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
