"""CPU-bound efficiency: how much of the machine pure-Python steps get.

Steps that spin in pure Python for about 50 ms each run on process workers,
as many as there are cores.  Each step measures its own running time; the
efficiency is the sum of those times divided by (wall time x cores), so 1.0
means every core did step work for the whole run and nothing else: the
cost of starting workers, shipping steps and collecting results is what
brings it below 1.  ``ProcessPoolExecutor(cores)`` does the same work in the
same run, so the ratio between the two is fair even on a busy machine.  A
second pair of rows does it warm: a :class:`stepvisor.Engine` and a pool both
started (and used once) before the timed runs, so the figure is the cost of
shipping steps and collecting results alone.

The amount of work per step is a fixed number of loop iterations, calibrated
once to the target duration, so a step that is starved of CPU takes longer
(rather than doing less) and the figure stays honest.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

import stepvisor as sv
from benchmarks.common import Measured, cores, probe, timed_run
from benchmarks.harness import Row, Target
from benchmarks.steps import spin, spin_step

NAME = "cpu"
TITLE = "CPU-bound efficiency on process workers"
ORDER = 20

METRIC = "efficiency"
WARM_METRIC = "efficiency, warm"


def calibrate(seconds: float) -> int:
    """How many iterations of :func:`spin` take about ``seconds`` here (best of 3)."""
    probe_n = 200_000
    per_iteration = min(spin(probe_n) for _ in range(3)) / probe_n
    return max(1, round(seconds / per_iteration))


def _cpu_workflow(n: int, iterations: int) -> sv.Workflow:
    return sv.Workflow(
        "cpu",
        [
            sv.Step(f"s{i:03d}", spin_step, executor="process", params={"iterations": iterations})
            for i in range(n)
        ],
    )


def _busy(result: sv.RunResult) -> float:
    return sum(float(v) for k, v in result.artifacts.items() if k.startswith("busy_"))


def _stepvisor_run(n: int, iterations: int, workers: int) -> tuple[float, float]:
    wf = _cpu_workflow(n, iterations)
    wall, result = timed_run(lambda: sv.run(wf, max_parallel=workers, executor="process"))
    return _busy(result), wall


def _pool_run(n: int, iterations: int, workers: int) -> tuple[float, float]:
    started = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        busy = sum(pool.map(spin, [iterations] * n))
    return busy, time.perf_counter() - started


def _warm_stepvisor(engine: sv.Engine) -> Runner:
    """The stepvisor run on a warm engine: its children started before the timer."""

    def runner(n: int, iterations: int, workers: int) -> tuple[float, float]:
        wf = _cpu_workflow(n, iterations)
        wall, result = timed_run(lambda: engine.run(wf, max_parallel=workers, executor="process"))
        return _busy(result), wall

    return runner


def _warm_pool(pool: ProcessPoolExecutor) -> Runner:
    def runner(n: int, iterations: int, workers: int) -> tuple[float, float]:
        started = time.perf_counter()
        busy = sum(pool.map(spin, [iterations] * n))
        return busy, time.perf_counter() - started

    return runner


def _warm_figures(n: int, iterations: int, workers: int, repeat: int) -> tuple[Measured, Measured]:
    """Both systems warm: each started, and run once, before the timed runs."""
    with sv.Engine(max_parallel=workers) as engine, ProcessPoolExecutor(workers) as pool:
        ours, theirs = _warm_stepvisor(engine), _warm_pool(pool)
        ours(workers, 1, workers)
        theirs(workers, 1, workers)
        return (
            _efficiency(ours, n, iterations, workers, repeat),
            _efficiency(theirs, n, iterations, workers, repeat),
        )


Runner = Callable[[int, int, int], tuple[float, float]]


def _efficiency(runner: Runner, n: int, iterations: int, workers: int, repeat: int) -> Measured:
    """The best efficiency of ``repeat`` runs, with the wall time and spread as a note."""
    runs = [runner(n, iterations, workers) for _ in range(repeat)]
    effs = [busy / (wall * workers) for busy, wall in runs]
    best = max(range(len(runs)), key=effs.__getitem__)
    note = f"wall {runs[best][1]:.2f} s for {n} steps"
    if len(runs) > 1:
        note += f"; best of {len(runs)} ({', '.join(f'{e:.3f}' for e in effs)})"
    return Measured(effs[best], note)


def run(*, quick: bool) -> list[Row]:
    """Measure the efficiency of stepvisor's process workers and of ProcessPoolExecutor."""
    n, seconds, repeat = (16, 0.02, 1) if quick else (64, 0.05, 3)
    workers = cores()
    iterations = calibrate(seconds)
    desc = f"{n} steps of ~{seconds * 1000:.0f} ms ({iterations:,} iterations)"
    rows = probe(
        [
            Row(
                scenario=NAME,
                system="stepvisor",
                metric=METRIC,
                value=None,
                unit="",
                note=f"{desc}; max_parallel={workers}, process workers started in the run",
            )
        ],
        lambda: [_efficiency(_stepvisor_run, n, iterations, workers, repeat)],
        requires=("stepvisor.backends.process",),
    )
    rows += probe(
        [
            Row(
                scenario=NAME,
                system=f"ProcessPoolExecutor({workers})",
                metric=METRIC,
                value=None,
                unit="",
                target=Target(on="ratio", op=">=", limit=0.97, text="stepvisor >= 0.97 of it"),
            )
        ],
        lambda: [_efficiency(_pool_run, n, iterations, workers, repeat)],
    )
    rows += probe(
        [
            Row(
                scenario=NAME,
                system="stepvisor",
                metric=WARM_METRIC,
                value=None,
                unit="",
                note=f"{desc}; a warm sv.Engine(max_parallel={workers}): children started "
                "and used once before the timed runs",
            ),
            Row(
                scenario=NAME,
                system=f"ProcessPoolExecutor({workers}), reused",
                metric=WARM_METRIC,
                value=None,
                unit="",
                target=Target(on="ratio", op=">=", limit=0.99, text="stepvisor >= 0.99 of it"),
            ),
        ],
        lambda: _warm_figures(n, iterations, workers, repeat),
        requires=("stepvisor.backends.process",),
    )
    return rows
