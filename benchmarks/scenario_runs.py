"""Many small runs on a warm engine: what one run of four no-op process steps costs.

An embedding program that runs many small workflows keeps one
:class:`stepvisor.Engine`, whose Workers and process children stay up between
runs.  Each run here is four independent no-op process steps (two children,
``max_parallel=2``); the figure is the median wall time of one run, over many
runs, beside what a user would write instead: four calls submitted to a
reused ``ProcessPoolExecutor(2)`` and waited on.  Building the workflow is not
timed (it is built once); the engine and the pool are started, and used once,
before the timed part.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, wait

import stepvisor as sv
from benchmarks.common import Measured, probe, timed_run
from benchmarks.harness import Row, Target
from benchmarks.steps import noop

NAME = "runs"
TITLE = "many small runs: 4 no-op process steps per run, on a warm engine"
ORDER = 15

METRIC = "one run, median"
STEPS = 4
PARALLEL = 2


def plain_noop() -> None:
    """A plain function that does nothing, for the baseline."""


def _median(runs: int, once: Callable[[], float]) -> Measured:
    once()  # warm-up, not timed
    times = sorted(once() for _ in range(runs))
    p90 = times[int(0.9 * (len(times) - 1))]
    return Measured(statistics.median(times) * 1e3, f"{runs} runs; p90 {p90 * 1e3:.2f} ms")


def _stepvisor(runs: int) -> Measured:
    wf = sv.Workflow(
        "small",
        [sv.Step(f"s{i}", noop, executor="process") for i in range(STEPS)],
        settings=sv.Settings(max_parallel=PARALLEL),
    )
    with sv.Engine(max_parallel=PARALLEL) as engine:

        def once() -> float:
            return timed_run(lambda: engine.run(wf))[0]

        return _median(runs, once)


def _pool(runs: int) -> Measured:
    with ProcessPoolExecutor(PARALLEL) as pool:

        def once() -> float:
            started = time.perf_counter()
            wait([pool.submit(plain_noop) for _ in range(STEPS)])
            return time.perf_counter() - started

        return _median(runs, once)


def run(*, quick: bool) -> list[Row]:
    """Time many small runs on a warm engine, and on a reused process pool."""
    runs = 50 if quick else 1_000
    rows = probe(
        [
            Row(
                scenario=NAME,
                system="stepvisor",
                metric=METRIC,
                value=None,
                unit="ms",
                note=f"warm sv.Engine(max_parallel={PARALLEL}), {STEPS} process steps",
                target=Target(on="value", op="<=", limit=2.0, text="<= 2 ms"),
            )
        ],
        lambda: [_stepvisor(runs)],
        requires=("stepvisor.backends.process",),
    )
    rows += probe(
        [
            Row(
                scenario=NAME,
                system=f"ProcessPoolExecutor({PARALLEL}), reused",
                metric=METRIC,
                value=None,
                unit="ms",
                note=f"{STEPS} calls submitted and waited on per run",
            )
        ],
        lambda: [_pool(runs)],
    )
    return rows
