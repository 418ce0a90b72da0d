"""Map: a no-op step mapped over a list, per item, beside static steps and the pools' ``map``.

What a mapped step costs per instance when the instance does nothing, so the
figure is pure engine cost (issue 23, "Performance"):

* **per item, threads**: one no-op step mapped over N items (100,000) with
  ``max_parallel=8``, beside the same number of *static* no-op steps (the
  target: an instance costs at most 1.1x a step), ``ThreadPoolExecutor(8).map``,
  joblib ``Parallel(n_jobs=8, prefer="threads")`` and Dask's threaded
  scheduler (8 workers);
* **per item, processes**: the same on the process executor with one worker
  per core (10,000 items), beside ``ProcessPoolExecutor(cores).map``, joblib
  ``Parallel(n_jobs=cores)`` (loky), Dask's multiprocessing scheduler and Ray
  tasks (which run in Ray's worker processes, so they are compared here);
* **building the workflow**: ``Workflow(...)`` with one step mapped over 10
  items, then over 1,000,000 (a list, and a tuple): the target is that a
  million items cost no more to build than ten.

Conventions are the overhead scenario's: building the workflow (or the task
graph) is not timed, starting the threads or processes is, except for Ray
(``ray.init`` and warm-up are not timed: a Ray user keeps a cluster up) and
joblib's loky workers, which joblib keeps for reuse between calls, so only
its first round starts them.  stepvisor runs a small map untimed first, so
that no figure includes the imports a fresh interpreter's first run makes.
Each figure is the best of a few runs.

Dask runs the graph ``dask.delayed`` would build, handed to its scheduler
directly: ``dask.compute`` over a list of delayed calls costs more per item
the longer the list in this Dask (0.5 ms per item at 2,000, 4.6 ms at
20,000, measured here), which would measure that rather than the scheduler.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

import stepvisor as sv
from benchmarks.common import Measured, best_of, cores, probe
from benchmarks.harness import Row, Target
from benchmarks.steps import ignore, noop
from stepvisor.core.model import Executor

NAME = "map"
TITLE = "a no-op step mapped over a list, per item, beside static steps and the pools' map"
ORDER = 12

THREAD_METRIC = "per item, threads"
PROCESS_METRIC = "per item, processes"
BUILD_METRIC = "building Workflow(...)"
THREADS = 8
#: Items of the map whose build time is compared with a map over ``FEW``.
MANY = 1_000_000
FEW = 10
#: Items of a run made untimed before the timed ones (see ``_stepvisor_rows``).
WARM_UP = 20


def _row(system: str, metric: str, *, unit: str = "µs", **kw: Any) -> Row:
    return Row(scenario=NAME, system=system, metric=metric, value=None, unit=unit, **kw)


def _per_item(repeat: int, n: int, timer: Callable[[], float]) -> list[Measured]:
    best, times = best_of(repeat, timer)
    spread = ", ".join(f"{t / n * 1e6:.1f}" for t in times)
    note = f"best of {len(times)} ({spread})" if len(times) > 1 else ""
    return [Measured(best / n * 1e6, note)]


# -- stepvisor ------------------------------------------------------------------------------


def mapped_workflow(items: Sequence[int], executor: Executor = "thread") -> sv.Workflow:
    """One no-op step mapped over ``items``."""
    return sv.Workflow("map", [sv.Step("each", noop, map_over=items, executor=executor)])


def static_workflow(n: int, executor: Executor = "thread") -> sv.Workflow:
    """``n`` independent no-op steps: what a map replaces."""
    steps = [sv.Step(f"s{i:06d}", noop, executor=executor) for i in range(n)]
    return sv.Workflow("static", steps)


def _sv_timer(wf: sv.Workflow, parallel: int) -> Callable[[], float]:
    def timer() -> float:
        started = time.perf_counter()
        result = sv.run(wf, max_parallel=parallel, on_failure="fail_fast")
        elapsed = time.perf_counter() - started
        if result.status is not sv.RunStatus.SUCCEEDED:
            raise RuntimeError(f"the stepvisor run ended {result.status.value}: {result.error}")
        return elapsed

    return timer


def _stepvisor_rows(
    metric: str, n: int, executor: Executor, parallel: int, repeat: int, *, static_target: bool
) -> list[Row]:
    backend = ("stepvisor.backends.process",) if executor == "process" else ()
    # Untimed first: a fresh interpreter's first run pays for imports and first threads.
    _sv_timer(mapped_workflow(list(range(WARM_UP)), executor), parallel)()
    started = time.perf_counter()
    mapped = mapped_workflow(list(range(n)), executor)
    mapped_build = time.perf_counter() - started
    started = time.perf_counter()
    static = static_workflow(n, executor)
    static_build = (time.perf_counter() - started) / n * 1e6
    within = Target(on="ratio", op="<=", limit=1.1, text="mapped within 1.1x")
    rows = probe(
        [
            _row(
                "stepvisor",
                metric,
                note=f"one step mapped over {n:,} items, max_parallel={parallel}; "
                f"building the workflow (not timed): {mapped_build * 1e3:.1f} ms",
            )
        ],
        lambda: _per_item(repeat, n, _sv_timer(mapped, parallel)),
        requires=backend,
    )
    rows += probe(
        [
            _row(
                f"stepvisor, {n:,} static steps",
                metric,
                target=within if static_target else None,
                note=f"building the workflow (not timed): {static_build:.1f} µs/step",
            )
        ],
        lambda: _per_item(repeat, n, _sv_timer(static, parallel)),
        requires=backend,
    )
    return rows


# -- the pools --------------------------------------------------------------------------------


def _time_thread_pool(items: list[int]) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(THREADS) as pool:
        for _ in pool.map(ignore, items):
            pass
    return time.perf_counter() - started


def _time_process_pool(items: list[int], workers: int) -> float:
    started = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        for _ in pool.map(ignore, items):
            pass
    return time.perf_counter() - started


def _joblib_timer(items: list[int], **options: Any) -> Callable[[], float]:
    import joblib  # noqa: PLC0415 - an optional baseline

    def timer() -> float:
        started = time.perf_counter()
        joblib.Parallel(**options)(joblib.delayed(ignore)(x) for x in items)
        return time.perf_counter() - started

    return timer


def _dask_timer(items: list[int], workers: int, *, processes: bool) -> Callable[[], float]:
    import dask.multiprocessing  # noqa: PLC0415 - an optional baseline
    import dask.threaded  # noqa: PLC0415

    dsk: dict[Any, Any] = {("ignore", i): (ignore, x) for i, x in enumerate(items)}
    keys = list(dsk)
    get = dask.multiprocessing.get if processes else dask.threaded.get

    def timer() -> float:
        started = time.perf_counter()
        get(dsk, keys, num_workers=workers)
        return time.perf_counter() - started

    return timer


def _ray_figures(items: list[int], repeat: int) -> list[Measured]:
    from benchmarks.scenario_ray import local_ray  # noqa: PLC0415 - imports Ray lazily

    with local_ray() as ray:
        remote = ray.remote(ignore)

        def timer() -> float:
            started = time.perf_counter()
            ray.get([remote.remote(x) for x in items])
            return time.perf_counter() - started

        return _per_item(repeat, len(items), timer)


def _thread_rows(n: int, repeat: int) -> list[Row]:
    items = list(range(n))
    rows = _stepvisor_rows(THREAD_METRIC, n, "thread", THREADS, repeat, static_target=True)
    rows += probe(
        [
            _row(
                f"ThreadPoolExecutor({THREADS}).map",
                THREAD_METRIC,
                target=Target(on="ratio", op="<=", limit=2.0, text="within 2x"),
            )
        ],
        lambda: _per_item(repeat, n, lambda: _time_thread_pool(items)),
    )
    rows += probe(
        [
            _row(
                f'joblib Parallel(n_jobs={THREADS}, prefer="threads")',
                THREAD_METRIC,
                note="joblib sends the calls in batches it sizes itself (batch_size='auto')",
            )
        ],
        lambda: _per_item(repeat, n, _joblib_timer(items, n_jobs=THREADS, prefer="threads")),
        requires=("joblib",),
    )
    rows += probe(
        [
            _row(
                f"Dask threaded scheduler ({THREADS} workers)",
                THREAD_METRIC,
                target=Target(on="ratio", op="<", limit=1.0, text="stepvisor ahead"),
                note="the graph dask.delayed builds, given to dask.threaded.get",
            )
        ],
        lambda: _per_item(repeat, n, _dask_timer(items, THREADS, processes=False)),
        requires=("dask",),
    )
    return rows


def _process_rows(n: int, repeat: int) -> list[Row]:
    items = list(range(n))
    workers = cores()
    rows = _stepvisor_rows(PROCESS_METRIC, n, "process", workers, repeat, static_target=False)
    rows += probe(
        [
            _row(
                f"ProcessPoolExecutor({workers}).map",
                PROCESS_METRIC,
                target=Target(on="ratio", op="<=", limit=2.0, text="within 2x"),
                note="default start method, chunksize=1; pool start-up timed",
            )
        ],
        lambda: _per_item(repeat, n, lambda: _time_process_pool(items, workers)),
    )
    rows += probe(
        [
            _row(
                f"joblib Parallel(n_jobs={workers}) (loky)",
                PROCESS_METRIC,
                note="calls sent in batches (batch_size='auto'); loky workers are kept "
                "between calls: only the first round starts them",
            )
        ],
        lambda: _per_item(repeat, n, _joblib_timer(items, n_jobs=workers)),
        requires=("joblib",),
    )
    rows += probe(
        [
            _row(
                f"Dask multiprocessing scheduler ({workers} workers)",
                PROCESS_METRIC,
                target=Target(on="ratio", op="<", limit=1.0, text="stepvisor ahead"),
                note="the graph dask.delayed builds; pool start-up timed",
            )
        ],
        lambda: _per_item(repeat, n, _dask_timer(items, workers, processes=True)),
        requires=("dask",),
    )
    rows += probe(
        [
            _row(
                "Ray tasks (local)",
                PROCESS_METRIC,
                target=Target(on="ratio", op="<", limit=1.0, text="stepvisor ahead"),
                note="one task per item; ray.init and warm-up not timed",
            )
        ],
        lambda: _ray_figures(items, repeat),
        requires=("ray",),
    )
    return rows


# -- building ---------------------------------------------------------------------------------


def build_seconds(items: Sequence[int], repeat: int) -> tuple[float, list[float]]:
    """The best and all times of ``repeat`` builds of :func:`mapped_workflow` over ``items``."""

    def timer() -> float:
        started = time.perf_counter()
        mapped_workflow(items)
        return time.perf_counter() - started

    return best_of(repeat, timer)


def _build_figure(items: Sequence[int], repeat: int) -> list[Measured]:
    best, times = build_seconds(items, repeat)
    spread = ", ".join(f"{t * 1e6:.0f}" for t in times) if len(times) <= 5 else ""
    return [Measured(best * 1e6, f"best of {len(times)}" + (f" ({spread})" if spread else ""))]


def _build_rows(repeat: int) -> list[Row]:
    same = Target(on="ratio", op=">=", limit=0.5, text="as fast as 10 items (within 2x)")
    rows = probe(
        [_row("stepvisor", BUILD_METRIC, note=f"one step mapped over {FEW} items (a list)")],
        functools.partial(_build_figure, list(range(FEW)), 50 * repeat),
    )
    for kind, many in (("list", list(range(MANY))), ("tuple", tuple(range(MANY)))):
        rows += probe(
            [_row(f"stepvisor, mapped over {MANY:,} items (a {kind})", BUILD_METRIC, target=same)],
            functools.partial(_build_figure, many, max(3, repeat)),
        )
    return rows


def run(*, quick: bool) -> list[Row]:
    """Per-item cost of a mapped no-op on threads and processes, and the cost of building it."""
    n_threads, n_procs, repeat = (2_000, 200, 1) if quick else (100_000, 10_000, 3)
    rows = _thread_rows(n_threads, repeat)
    rows += _process_rows(n_procs, repeat)
    return rows + _build_rows(repeat)
