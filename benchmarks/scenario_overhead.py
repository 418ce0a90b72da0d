"""Overhead: what stepvisor costs per step when the step itself costs nothing.

Many independent no-op steps, so the figure is pure scheduling cost: the time
of the whole run divided by the number of steps, in microseconds.  stepvisor
runs them on threads (``max_parallel=8``) and on processes (one per core),
with its memory store and with the SQLite store, beside what a user would
write instead: ``ThreadPoolExecutor(8)``, the asyncio ``Semaphore`` +
``gather`` pattern with ``wait_for`` around ``to_thread``, Dask's threaded and
multiprocessing schedulers, Ray tasks, and ``ProcessPoolExecutor(cores)``.

Building the workflow (validation, graph) is outside the timed region, as is
building the Dask graph; starting the worker threads or processes is inside
it for every system (each run starts its own), except Ray, whose
``ray.init`` and worker warm-up are left out because a Ray user keeps a
cluster up.  Each figure is the best of a few runs.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import stepvisor as sv
from benchmarks.common import Measured, best_of, cores, probe, scratch_dir
from benchmarks.harness import Row, Target
from benchmarks.steps import noop
from stepvisor.core.model import Executor

NAME = "overhead"
TITLE = "per-step overhead of independent no-op steps"
ORDER = 10

THREAD_METRIC = "per step, threads"
PROCESS_METRIC = "per step, processes"


def plain_noop() -> None:
    """A plain function that does nothing, for the baselines."""


# -- stepvisor ------------------------------------------------------------------------


def _workflow(n: int, executor: Executor) -> sv.Workflow:
    steps = [sv.Step(f"s{i:06d}", noop, executor=executor) for i in range(n)]
    return sv.Workflow("overhead", steps)


def _time_stepvisor(wf: sv.Workflow, *, parallel: int, store: Path | None) -> float:
    if store is not None and store.exists():
        store.unlink()
    started = time.perf_counter()
    result = sv.run(
        wf,
        store=None if store is None else str(store),
        max_parallel=parallel,
        on_failure="fail_fast",
    )
    elapsed = time.perf_counter() - started
    if result.status is not sv.RunStatus.SUCCEEDED:
        raise RuntimeError(f"the stepvisor run ended {result.status.value}: {result.error}")
    return elapsed


def _stepvisor_rows(
    *, metric: str, n: int, executor: Executor, parallel: int, repeat: int, tmp: Path
) -> list[Row]:
    build_started = time.perf_counter()
    wf = _workflow(n, executor)
    build_us = (time.perf_counter() - build_started) / n * 1e6
    backend = ("stepvisor.backends.process",) if executor == "process" else ()
    rows: list[Row] = []
    for system, store in (
        ("stepvisor", None),
        ("stepvisor + SQLite store", tmp / f"runs-{executor}.db"),
    ):
        note = f"{n} steps, max_parallel={parallel}"
        if store is None:
            note += f"; building the workflow (not timed): {build_us:.0f} µs/step"
        template = Row(
            scenario=NAME, system=system, metric=metric, value=None, unit="µs", note=note
        )
        timer = _stepvisor_timer(wf, parallel, store)
        rows += probe(
            [template],
            functools.partial(_figures, repeat, n, timer),
            requires=backend + (("stepvisor.store.sqlite",) if store else ()),
        )
    return rows


def _stepvisor_timer(wf: sv.Workflow, parallel: int, store: Path | None) -> Callable[[], float]:
    return lambda: _time_stepvisor(wf, parallel=parallel, store=store)


def _figures(repeat: int, n: int, timer: Callable[[], float]) -> list[Measured]:
    return [_per_step(repeat, n, timer)]


def _per_step(repeat: int, n: int, timer: Callable[[], float]) -> Measured:
    best, times = best_of(repeat, timer)
    spread = ", ".join(f"{t / n * 1e6:.0f}" for t in times)
    note = f"best of {len(times)} ({spread})" if len(times) > 1 else ""
    return Measured(best / n * 1e6, note)


# -- baselines: threads -----------------------------------------------------------------


def _time_thread_pool(n: int) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        wait([pool.submit(plain_noop) for _ in range(n)])
    return time.perf_counter() - started


async def _asyncio_pattern(n: int) -> None:
    sem = asyncio.Semaphore(8)

    async def one() -> None:
        async with sem:
            await asyncio.wait_for(asyncio.to_thread(plain_noop), timeout=60.0)

    await asyncio.gather(*(one() for _ in range(n)))


def _time_asyncio(n: int) -> float:
    started = time.perf_counter()
    asyncio.run(_asyncio_pattern(n))
    return time.perf_counter() - started


def _dask_graph(n: int) -> tuple[dict[str, Any], list[str]]:
    keys = [f"s{i:06d}" for i in range(n)]
    return dict.fromkeys(keys, (plain_noop,)), keys


def _time_dask_threads(n: int) -> Callable[[], float]:
    import dask.threaded  # noqa: PLC0415

    dsk, keys = _dask_graph(n)

    def timer() -> float:
        started = time.perf_counter()
        dask.threaded.get(dsk, keys, num_workers=8)
        return time.perf_counter() - started

    return timer


def _time_dask_processes(n: int, workers: int) -> Callable[[], float]:
    import dask.multiprocessing  # noqa: PLC0415

    dsk, keys = _dask_graph(n)

    def timer() -> float:
        started = time.perf_counter()
        dask.multiprocessing.get(dsk, keys, num_workers=workers)
        return time.perf_counter() - started

    return timer


def _measure_ray(n: int, repeat: int, tmp: Path) -> list[Measured]:
    del tmp  # Ray's socket paths must stay short: it gets a short directory of its own
    from benchmarks.scenario_ray import local_ray  # noqa: PLC0415 - imports Ray lazily

    with local_ray() as ray:
        remote = ray.remote(plain_noop)

        def timer() -> float:
            started = time.perf_counter()
            ray.get([remote.remote() for _ in range(n)])
            return time.perf_counter() - started

        return [_per_step(repeat, n, timer)]


# -- baselines: processes -----------------------------------------------------------------


def _time_process_pool(n: int, workers: int) -> float:
    started = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        wait([pool.submit(plain_noop) for _ in range(n)])
    return time.perf_counter() - started


# -- the scenario ---------------------------------------------------------------------------


def _baseline(
    system: str,
    metric: str,
    measure: Callable[[], list[Measured]],
    *,
    target: Target | None = None,
    note: str = "",
    requires: tuple[str, ...] = (),
) -> list[Row]:
    template = Row(
        scenario=NAME,
        system=system,
        metric=metric,
        value=None,
        unit="µs",
        target=target,
        note=note,
    )
    return probe([template], measure, requires=requires)


def _thread_rows(n: int, repeat: int, tmp: Path) -> list[Row]:
    rows = _stepvisor_rows(
        metric=THREAD_METRIC, n=n, executor="thread", parallel=8, repeat=repeat, tmp=tmp
    )
    # The targets of issue 15: within 2.5x of the standard library's pool, ahead of
    # Dask's threaded scheduler, and (a scheduler of local tasks) 10x ahead of Ray's.
    rows += _baseline(
        "ThreadPoolExecutor(8)",
        THREAD_METRIC,
        lambda: [_per_step(repeat, n, lambda: _time_thread_pool(n))],
        target=Target(on="ratio", op="<=", limit=2.5, text="within 2.5x"),
    )
    rows += _baseline(
        "asyncio Semaphore(8)+gather+wait_for(to_thread)",
        THREAD_METRIC,
        lambda: [_per_step(repeat, n, lambda: _time_asyncio(n))],
    )
    rows += _baseline(
        "Dask threaded get (8 workers)",
        THREAD_METRIC,
        lambda: [_per_step(repeat, n, _time_dask_threads(n))],
        target=Target(on="ratio", op="<", limit=1.0, text="stepvisor ahead"),
        requires=("dask",),
    )
    rows += _baseline(
        "Ray tasks (local)",
        THREAD_METRIC,
        lambda: _measure_ray(n, repeat, tmp),
        target=Target(on="ratio", op="<=", limit=0.1, text="stepvisor >= 10x ahead"),
        note="tasks run in Ray's worker processes; ray.init and warm-up not timed",
        requires=("ray",),
    )
    return rows


def _process_rows(n: int, repeat: int, tmp: Path) -> list[Row]:
    workers = cores()
    rows = _stepvisor_rows(
        metric=PROCESS_METRIC, n=n, executor="process", parallel=workers, repeat=repeat, tmp=tmp
    )
    rows += _baseline(
        f"ProcessPoolExecutor({workers})",
        PROCESS_METRIC,
        lambda: [_per_step(repeat, n, lambda: _time_process_pool(n, workers))],
        target=Target(on="ratio", op="<=", limit=1.0, text="no worse"),
        note="default start method; pool start-up timed",
    )
    rows += _baseline(
        f"Dask multiprocessing get ({workers} workers)",
        PROCESS_METRIC,
        lambda: [_per_step(repeat, n, _time_dask_processes(n, workers))],
        note="pool start-up timed",
        requires=("dask",),
    )
    return rows


def run(*, quick: bool) -> list[Row]:
    """Measure per-step overhead on threads and on processes."""
    n_threads, n_procs, repeat = (1_000, 200, 1) if quick else (10_000, 2_000, 3)
    with scratch_dir() as tmp:
        rows = _thread_rows(n_threads, repeat, tmp)
        rows += _process_rows(n_procs, repeat, tmp)
    return rows
