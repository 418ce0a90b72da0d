"""joblib on stepvisor against joblib on loky: scikit-learn, and large array slices.

Two shapes of issue 26, each timed on both backends in the same run:

* **cross-validation**: ``cross_val_score`` of a random forest, 8 folds,
  ``n_jobs=2``, on a generated data set (``make_classification``, 2,000 rows
  of 20 features, 50 trees; 400 rows and 10 trees with ``--quick``).  The
  folds are the batches; each pickles the data set to its worker and a fitted
  forest's scores back.  Target: within 1.1x loky's time.
* **a map of large slices**: ``Parallel(n_jobs=2)`` over four 200 MB slices of
  one array (4 MB with ``--quick``), a sum each.  loky memory-maps each slice:
  its one feeder thread writes it to a file in a temporary folder, which the
  worker maps.  stepvisor's two Workers write their slices into sealed
  shared-memory segments, which the workers map.  Either way each slice is
  copied once (joblib 1.3+ no longer hashes an array to name its file).  Each
  timed run is a new ``Parallel`` call over a new array, as a script makes
  one: nothing is cached from the run before.  Target: at least 2x faster.

Both backends are warm before the timed runs (a first call, not timed: the
workers started, NumPy and scikit-learn imported in them).  Each figure is
the best of a few runs, and the runs of the two backends alternate
(stepvisor, loky, loky, stepvisor, ...): on a machine that other work loads
in bursts, timing one backend's runs and then the other's let one burst
decide the ratio (the cross-validation row read 0.70x and 1.16x of loky in
two runs so).  If one backend fails, each is timed alone, so that the other's
row still has its figure.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from benchmarks.common import Measured, best_of, probe
from benchmarks.harness import Row, Target

NAME = "joblib"
TITLE = "joblib's Parallel and scikit-learn on stepvisor vs loky (n_jobs=2)"
ORDER = 45

N_JOBS = 2
FOLDS = 8
SLICES = 4


def slice_sum(part: Any) -> float:
    """What each call of the map does with its slice (runs in a worker)."""
    return float(part.sum())


def _best(repeat: int, once: Callable[[], float]) -> Measured:
    once()  # warm-up, not timed
    _best_time, times = best_of(repeat, once)
    return _measured(times)


def _measured(times: list[float]) -> Measured:
    note = (
        f"best of {len(times)} ({', '.join(f'{t:.3f}' for t in times)})" if len(times) > 1 else ""
    )
    return Measured(min(times), note)


def _alternated(
    repeat: int, ours: Callable[[], float], theirs: Callable[[], float]
) -> list[Measured]:
    """Both timed ``repeat`` times, in turns (A B B A A B ...), each warm first."""
    ours()
    theirs()  # warm-ups, not timed
    mine: list[float] = []
    other: list[float] = []
    for turn in range(max(1, repeat)):
        if turn % 2 == 0:
            mine.append(ours())
            other.append(theirs())
        else:
            other.append(theirs())
            mine.append(ours())
    return [_measured(mine), _measured(other)]


def _pair(
    rows: list[Row],
    ours: Callable[[], Callable[[], float]],
    theirs: Callable[[], Callable[[], float]],
    *,
    repeat: int,
    requires: tuple[str, ...],
) -> list[Row]:
    """The two rows of one shape, timed alternately; each alone if that fails."""
    paired = probe(rows, lambda: _alternated(repeat, ours(), theirs()), requires=requires)
    if all(row.status != "failed" for row in paired):
        return paired
    return probe(rows[:1], lambda: [_best(repeat, ours())], requires=requires) + probe(
        rows[1:], lambda: [_best(repeat, theirs())], requires=requires
    )


def _cross_validation(backend: str, *, quick: bool) -> Callable[[], float]:
    """One timed ``cross_val_score`` on ``backend`` per call of what it returns."""
    from joblib import parallel_config  # noqa: PLC0415 - optional baselines, imported when run
    from sklearn.datasets import make_classification  # noqa: PLC0415
    from sklearn.ensemble import RandomForestClassifier  # noqa: PLC0415
    from sklearn.model_selection import cross_val_score  # noqa: PLC0415

    rows, trees = (400, 10) if quick else (2000, 50)
    x, y = make_classification(n_samples=rows, n_features=20, random_state=0)
    model = RandomForestClassifier(n_estimators=trees, random_state=0)
    expected: list[Any] = []

    def once() -> float:
        started = time.perf_counter()
        with parallel_config(backend=backend, n_jobs=N_JOBS):
            scores = cross_val_score(model, x, y, cv=FOLDS, n_jobs=N_JOBS)
        elapsed = time.perf_counter() - started
        if expected and list(scores) != expected:
            raise RuntimeError(f"the scores changed between runs: {scores} != {expected}")
        expected[:] = list(scores)
        return elapsed

    return once


def _slices(backend: str, megabytes: float) -> Callable[[], float]:
    """One timed map of the slices on ``backend`` per call of what it returns."""
    import numpy as np  # noqa: PLC0415
    from joblib import Parallel, delayed  # noqa: PLC0415

    per_slice = int(megabytes * 1e6) // 8

    def once() -> float:
        # A new array each run, made before the clock starts: loky keeps the files of
        # the arrays it has dumped, and a program maps over data it has just made.
        data = np.ones(per_slice * SLICES)
        parts = [data[i * per_slice : (i + 1) * per_slice] for i in range(SLICES)]
        started = time.perf_counter()
        totals = Parallel(n_jobs=N_JOBS, backend=backend)(delayed(slice_sum)(p) for p in parts)
        elapsed = time.perf_counter() - started
        if totals != [float(per_slice)] * SLICES:
            raise RuntimeError(f"the slices summed {totals}, not {SLICES} x {per_slice}")
        return elapsed

    return once


def _template(metric: str, system: str, note: str, target: Target | None = None) -> Row:
    return Row(
        scenario=NAME, system=system, metric=metric, value=None, unit="s", note=note, target=target
    )


def run(*, quick: bool) -> list[Row]:
    """Time both shapes on stepvisor and on loky."""
    import stepvisor.joblib  # noqa: PLC0415

    repeat = 1 if quick else 4
    megabytes = 4.0 if quick else 200.0
    cv_metric = f"cross_val_score, random forest, {FOLDS} folds"
    map_metric = f"map of {SLICES} x {megabytes:g} MB slices"
    requires = ("joblib", "sklearn", "numpy")
    with contextlib.suppress(ImportError):  # probe reports the rows as not installed
        stepvisor.joblib.register()
    rows = _pair(
        [
            _template(cv_metric, "stepvisor", "process calls on a warm engine"),
            _template(
                cv_metric,
                "joblib (loky)",
                "warm reusable executor",
                Target(on="ratio", op="<=", limit=1.1, text="stepvisor <= 1.1x loky"),
            ),
        ],
        lambda: _cross_validation("stepvisor", quick=quick),
        lambda: _cross_validation("loky", quick=quick),
        repeat=repeat,
        requires=requires,
    )
    rows += _pair(
        [
            _template(map_metric, "stepvisor", "each slice into a sealed shared-memory segment"),
            _template(
                map_metric,
                "joblib (loky)",
                "each slice dumped to a file and memory-mapped",
                Target(on="ratio", op="<=", limit=0.5, text="stepvisor >= 2x faster")
                if not quick
                else None,
            ),
        ],
        lambda: _slices("stepvisor", megabytes),
        lambda: _slices("loky", megabytes),
        repeat=repeat,
        requires=("joblib", "numpy"),
    )
    stepvisor.joblib.close()
    return rows
