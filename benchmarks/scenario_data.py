"""Data between process steps: one step makes a large array, four steps read it.

The shape of issue 14: one process step makes a float64 array (50 MB and
200 MB; a few MB with ``--quick``), four process steps read it (a sum each),
two at a time (``max_parallel=2``).  The figure is the wall time of the whole
thing.  Side by side, in the same run:

* stepvisor, process steps: the array goes into shared memory once, in the
  maker's child; the readers map it read-only (:mod:`stepvisor.backends._shm`);
* stepvisor, thread steps: one address space, nothing moves at all;
* ``ProcessPoolExecutor(2)``: the array pickled back from the maker, and again
  to each of the four readers;
* joblib with loky: returned through its pipe, then memory-mapped (it dumps
  arrays over 1 MB to a file once, readers map it);
* Ray: the maker's result goes into the object store, readers read it there.

Every system is started and runs the whole thing once before the timed part
(workers booted, NumPy imported in them): a warm :class:`stepvisor.Engine`, a
started pool, a warm loky executor, a local Ray.  Each figure is the best of a
few runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import stepvisor as sv
from benchmarks.common import Measured, best_of, probe, timed_run
from benchmarks.harness import Row, Target
from benchmarks.steps import make_array, make_array_step, total, total_step

NAME = "data"
TITLE = "a large array made by one process step, read by four (max_parallel=2)"
ORDER = 25

READERS = 4
PARALLEL = 2


def _metric(megabytes: float) -> str:
    return f"{megabytes:g} MB, {READERS} readers"


def _workflow(megabytes: float, executor: Any) -> sv.Workflow:
    steps = [sv.Step("make", make_array_step, executor=executor, params={"megabytes": megabytes})]
    steps += [
        sv.Step(f"read{i}", total_step, needs=["make"], executor=executor) for i in range(READERS)
    ]
    return sv.Workflow("data", steps, settings=sv.Settings(max_parallel=PARALLEL))


def _check(totals: list[float], megabytes: float) -> None:
    expected = float(int(megabytes * 1e6) // 8)
    if len(totals) != READERS or any(t != expected for t in totals):
        raise RuntimeError(f"the readers summed {totals}, not {READERS} x {expected}")


def _stepvisor(megabytes: float, executor: Any, repeat: int) -> Measured:
    wf = _workflow(megabytes, executor)
    with sv.Engine(max_parallel=PARALLEL) as engine:

        def once() -> float:
            elapsed, result = timed_run(lambda: engine.run(wf))
            _check([v for k, v in result.artifacts.items() if k.startswith("total_")], megabytes)
            return elapsed

        return _best(repeat, once)


def _best(repeat: int, once: Callable[[], float]) -> Measured:
    once()  # warm-up, not timed: workers booted, numpy imported, the code paths run once
    best, times = best_of(repeat, once)
    note = f"best of {len(times)} ({', '.join(f'{t:.3f}' for t in times)})" if repeat > 1 else ""
    return Measured(best, note)


def _process_pool(megabytes: float, repeat: int) -> Measured:
    with ProcessPoolExecutor(PARALLEL) as pool:

        def once() -> float:
            started = time.perf_counter()
            array = pool.submit(make_array, megabytes).result()
            totals = list(pool.map(total, [array] * READERS))
            elapsed = time.perf_counter() - started
            _check(totals, megabytes)
            return elapsed

        return _best(repeat, once)


def _joblib(megabytes: float, repeat: int) -> Measured:
    from joblib import Parallel, delayed  # noqa: PLC0415 - an optional baseline

    with Parallel(n_jobs=PARALLEL, backend="loky") as parallel:

        def once() -> float:
            started = time.perf_counter()
            (array,) = parallel([delayed(make_array)(megabytes)])
            totals = parallel(delayed(total)(array) for _ in range(READERS))
            elapsed = time.perf_counter() - started
            _check(list(totals), megabytes)
            return elapsed

        return _best(repeat, once)


def _ray(megabytes: float, repeat: int) -> Measured:
    from benchmarks.scenario_ray import local_ray  # noqa: PLC0415 - imports Ray lazily

    with local_ray() as ray:
        maker = ray.remote(make_array)
        reader = ray.remote(total)

        def once() -> float:
            started = time.perf_counter()
            ref = maker.remote(megabytes)
            totals = ray.get([reader.remote(ref) for _ in range(READERS)])
            elapsed = time.perf_counter() - started
            _check(totals, megabytes)
            return elapsed

        return _best(repeat, once)


def _rows(megabytes: float, repeat: int) -> list[Row]:
    metric = _metric(megabytes)

    def template(system: str, note: str = "", target: Target | None = None) -> Row:
        return Row(
            scenario=NAME,
            system=system,
            metric=metric,
            value=None,
            unit="s",
            note=note,
            target=target,
        )

    big = megabytes >= 200
    rows = probe(
        [template("stepvisor", "process steps, warm engine; the array in shared memory")],
        lambda: [_stepvisor(megabytes, "process", repeat)],
        requires=("numpy",),
    )
    rows += probe(
        [template("stepvisor, thread steps", "one address space: nothing moves")],
        lambda: [_stepvisor(megabytes, "thread", repeat)],
        requires=("numpy",),
    )
    rows += probe(
        [
            template(
                f"ProcessPoolExecutor({PARALLEL})",
                "the array pickled back, then to each reader",
                Target(on="ratio", op="<=", limit=0.2, text="stepvisor >= 5x faster")
                if big
                else None,
            )
        ],
        lambda: [_process_pool(megabytes, repeat)],
        requires=("numpy",),
    )
    rows += probe(
        [
            template(
                "joblib (loky)",
                "returned by pipe, then memory-mapped to the readers",
                Target(on="ratio", op="<=", limit=1.0, text="stepvisor <= 1.0x") if big else None,
            )
        ],
        lambda: [_joblib(megabytes, repeat)],
        requires=("numpy", "joblib"),
    )
    rows += probe(
        [template("Ray (object store)", "ray.init and warm-up not timed")],
        lambda: [_ray(megabytes, repeat)],
        requires=("numpy", "ray"),
    )
    return rows


def run(*, quick: bool) -> list[Row]:
    """Time the data shape at each size, on every system."""
    sizes, repeat = ((4.0,), 1) if quick else ((50.0, 200.0), 3)
    rows: list[Row] = []
    for megabytes in sizes:
        rows += _rows(megabytes, repeat)
    return rows
