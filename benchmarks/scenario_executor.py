"""Executor: what ``sv.Executor`` costs per no-op call beside ``concurrent.futures``.

Two figures per backend, each in microseconds per call:

* **one at a time**: ``submit(f).result()`` in a loop, the latency of a call
  through the whole path (submit, the call hub on the caller's thread, a
  Worker, the hub on the Worker's thread, the future); the targets of the
  issue are on this row: within 3x of ``ThreadPoolExecutor`` on threads and
  within 1.5x of ``ProcessPoolExecutor`` on processes;
* **many in flight**: ``wait([submit(f) for ...])``, the cost per call when
  the executor is kept busy; the targets of issue 26 are on this row: within
  2x of ``ThreadPoolExecutor`` and 1.3x of ``ProcessPoolExecutor``.

Every executor is started and warmed (a first batch of calls run) before the
timed part, as a program that keeps one would have it: stepvisor with
``max_workers=8`` threads or one process per core, beside
``ThreadPoolExecutor(8)`` and ``ProcessPoolExecutor(cores)``.  Each figure is
the best of a few rounds.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor, wait

import stepvisor as sv
from benchmarks.common import Measured, best_of, cores, probe
from benchmarks.harness import Row, Target
from benchmarks.steps import nothing

NAME = "executor"
TITLE = "sv.Executor: submit -> result of a no-op call"
ORDER = 15

_WARM = 200


def _one_at_a_time(pool: Executor, n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        pool.submit(nothing).result()
    return time.perf_counter() - started


def _in_flight(pool: Executor, n: int) -> float:
    started = time.perf_counter()
    wait([pool.submit(nothing) for _ in range(n)])
    return time.perf_counter() - started


def _measure(make: Callable[[], Executor], n: int, repeat: int) -> list[Measured]:
    with make() as pool:
        wait([pool.submit(nothing) for _ in range(_WARM)])
        figures = []
        for timed in (_one_at_a_time, _in_flight):
            best, times = best_of(repeat, functools.partial(timed, pool, n))
            spread = ", ".join(f"{t / n * 1e6:.0f}" for t in times)
            note = f"{n} calls; best of {len(times)} ({spread})" if len(times) > 1 else f"{n} calls"
            figures.append(Measured(best / n * 1e6, note))
        return figures


def _rows(
    system: str,
    backend: str,
    make: Callable[[], Executor],
    *,
    n: int,
    repeat: int,
    target: Target | None = None,
    in_flight_target: Target | None = None,
) -> list[Row]:
    templates = [
        Row(
            scenario=NAME,
            system=system,
            metric=f"{backend}: {how}",
            value=None,
            unit="µs",
            target=goal,
        )
        for how, goal in (("one at a time", target), ("many in flight", in_flight_target))
    ]
    return probe(templates, lambda: _measure(make, n, repeat))


def run(*, quick: bool) -> list[Row]:
    """Time no-op calls through sv.Executor and the standard library's executors."""
    n_threads, n_procs, repeat = (500, 300, 1) if quick else (5_000, 2_000, 3)
    workers = cores()
    rows = _rows(
        "stepvisor",
        "threads",
        lambda: sv.Executor(max_workers=8),
        n=n_threads,
        repeat=repeat,
    )
    rows += _rows(
        "ThreadPoolExecutor(8)",
        "threads",
        lambda: ThreadPoolExecutor(8),
        n=n_threads,
        repeat=repeat,
        target=Target(on="ratio", op="<=", limit=3.0, text="within 3x"),
        in_flight_target=Target(on="ratio", op="<=", limit=2.0, text="within 2x"),
    )
    rows += _rows(
        "stepvisor",
        "processes",
        lambda: sv.Executor(max_workers=workers, executor="process"),
        n=n_procs,
        repeat=repeat,
    )
    rows += _rows(
        f"ProcessPoolExecutor({workers})",
        "processes",
        lambda: ProcessPoolExecutor(workers),
        n=n_procs,
        repeat=repeat,
        target=Target(on="ratio", op="<=", limit=1.5, text="within 1.5x"),
        in_flight_target=Target(on="ratio", op="<=", limit=1.3, text="within 1.3x"),
    )
    return rows
