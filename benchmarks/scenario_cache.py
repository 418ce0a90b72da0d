"""The cache (issue 24): what a reused step costs, beside joblib.Memory and an uncached run.

Three shapes, each measured side by side in the same run:

* **a cache hit on a 200 MB array** (4 MB with ``--quick``): a one-step
  workflow whose step returns a NumPy array, run once to fill the cache, then
  timed on a fully cached rerun (the whole run: lookup, checksum, unpickling,
  the run's own records).  Beside it, ``joblib.Memory``'s hit on a cached
  function returning the same array (its ``.npy`` file read back).  Target:
  no slower than joblib.Memory's hit.
* **a fully cached rerun of 10,000 no-op steps** (1,000 with ``--quick``),
  independent, every step cached, on the SQLite store: the rerun against the
  uncached run of the same workflow on the same kind of store.  Target: at
  most 1.5x the uncached run.
* **the demo** (``examples/demo.yaml``, its sleeps and prime sieves) with the
  run-wide ``cache`` setting: its first run (filling the cache) against its
  fully cached rerun.  Target: the rerun at most 10% of the first run.

Each figure is the best of a few runs, each on a fresh store.  The hashing
figures (a 200 MB array against ``joblib.hash``) belong to the key's own
functions and are not here.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import stepvisor as sv
from benchmarks.common import Measured, probe, scratch_dir
from benchmarks.harness import Row, Target
from benchmarks.steps import noop

NAME = "cache"
TITLE = "the cache: reused steps against joblib.Memory and an uncached run"
ORDER = 47

ROOT = Path(__file__).resolve().parents[1]


def make_array(ctx: sv.StepContext) -> dict[str, Any]:
    """The step whose result is cached: a float64 array of ``ctx.params["mb"]`` MB."""
    import numpy as np  # noqa: PLC0415 - an optional extra

    return {"array": np.full(int(ctx.params["mb"] * 1e6) // 8, 1.5)}


def _array_hit(tmp: Path, mb: float, repeat: int) -> Measured:
    """stepvisor: the rerun of a one-step workflow whose step is reused from the cache."""
    wf = sv.Workflow("bench-array", [sv.Step("array", make_array, params={"mb": mb}, cache=True)])
    times = []
    for i in range(repeat):
        store = tmp / f"array-{i}.db"
        with sv.SQLiteStore(store, codec="pickle") as kept:
            sv.run(wf, store=kept)
            started = time.perf_counter()
            result = sv.run(wf, store=kept)
            times.append(time.perf_counter() - started)
        if result.steps["array"].reused_from is None or result.artifacts["array"].size * 8 < mb:
            raise RuntimeError(f"the rerun did not reuse the array: {result.steps['array']}")
        store.unlink()
    return Measured(min(times), "best of " + ", ".join(f"{t:.3f}" for t in times))


def _joblib_hit(tmp: Path, mb: float, repeat: int) -> Measured:
    import numpy as np  # noqa: PLC0415
    from joblib import Memory  # noqa: PLC0415

    def make(size_mb: float) -> Any:
        return np.full(int(size_mb * 1e6) // 8, 1.5)

    times = []
    for i in range(repeat):
        memory = Memory(tmp / f"joblib-{i}", verbose=0)
        cached = memory.cache(make)
        cached(mb)
        started = time.perf_counter()
        value = cached(mb)
        times.append(time.perf_counter() - started)
        if value.size * 8 < mb:
            raise RuntimeError("joblib.Memory returned the wrong array")
        memory.clear(warn=False)
    return Measured(min(times), "best of " + ", ".join(f"{t:.3f}" for t in times))


def _noops(n: int, *, cache: bool) -> sv.Workflow:
    return sv.Workflow(
        "bench-noops",
        [sv.Step(f"s{i:05d}", noop) for i in range(n)],
        settings=sv.Settings(cache=cache),
    )


def _noop_runs(tmp: Path, n: int, repeat: int) -> tuple[Measured, Measured]:
    """(fully cached rerun, uncached run), alternated, each on a fresh SQLite store."""
    cached, uncached = [], []
    for i in range(repeat):
        store = tmp / f"noop-{i}.db"
        started = time.perf_counter()
        sv.run(_noops(n, cache=False), store=str(store))
        uncached.append(time.perf_counter() - started)
        sv.run(_noops(n, cache=True), store=str(store))  # fills the cache
        started = time.perf_counter()
        result = sv.run(_noops(n, cache=True), store=str(store))
        cached.append(time.perf_counter() - started)
        reused = sum(1 for r in result.steps.values() if r.reused_from is not None)
        if reused != n:
            raise RuntimeError(f"the rerun reused {reused} of {n} steps")
        store.unlink()
    return (
        Measured(min(cached), "best of " + ", ".join(f"{t:.2f}" for t in cached)),
        Measured(min(uncached), "best of " + ", ".join(f"{t:.2f}" for t in uncached)),
    )


def _demo_runs(tmp: Path, repeat: int) -> tuple[Measured, Measured]:
    """(the cached rerun, the first run) of examples/demo.yaml with cache on."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        wf = sv.load_workflow(ROOT / "examples" / "demo.yaml")
        first, rerun = [], []
        for i in range(repeat):
            store = tmp / f"demo-{i}.db"
            started = time.perf_counter()
            done = sv.run(wf, store=str(store), cache=True)
            first.append(time.perf_counter() - started)
            started = time.perf_counter()
            again = sv.run(wf, store=str(store), cache=True)
            rerun.append(time.perf_counter() - started)
            if not done.ok or not again.ok or dict(again.artifacts) != dict(done.artifacts):
                raise RuntimeError("the demo's cached rerun did not give the first run's result")
            store.unlink()
    finally:
        sys.path.remove(str(ROOT / "examples"))
    return (
        Measured(min(rerun), "best of " + ", ".join(f"{t:.2f}" for t in rerun)),
        Measured(min(first), "best of " + ", ".join(f"{t:.2f}" for t in first)),
    )


def _row(metric: str, system: str, note: str, target: Target | None = None) -> Row:
    return Row(
        scenario=NAME, system=system, metric=metric, value=None, unit="s", note=note, target=target
    )


def run(*, quick: bool) -> list[Row]:
    repeat = 1 if quick else 3
    mb = 4.0 if quick else 200.0
    n = 1_000 if quick else 10_000
    hit = f"cache hit, a step returning a {mb:g} MB array"
    noops = f"{n:,} no-op steps, fully cached rerun vs uncached run"
    demo = "examples/demo.yaml, cached rerun vs first run"
    rows: list[Row] = []
    with scratch_dir() as tmp:
        rows += probe(
            [_row(hit, "stepvisor", "whole rerun, SQLite store (pickle codec)")],
            lambda: [_array_hit(tmp, mb, repeat)],
            requires=("numpy",),
        )
        rows += probe(
            [
                _row(
                    hit,
                    "joblib.Memory",
                    "second call of a cached function",
                    Target(on="ratio", op="<=", limit=1.0, text="stepvisor no slower"),
                )
            ],
            lambda: [_joblib_hit(tmp, mb, repeat)],
            requires=("joblib", "numpy"),
        )
        measured: dict[str, tuple[Measured, Measured]] = {}

        def noop_pair(which: int) -> list[Measured]:
            if "noops" not in measured:
                measured["noops"] = _noop_runs(tmp, n, repeat)
            return [measured["noops"][which]]

        rows += probe(
            [_row(noops, "stepvisor", "cached rerun: every step reused, SQLite store")],
            lambda: noop_pair(0),
        )
        rows += probe(
            [
                _row(
                    noops,
                    "stepvisor (uncached)",
                    "same workflow, cache off, SQLite store",
                    Target(on="ratio", op="<=", limit=1.5, text="rerun <= 1.5x uncached"),
                )
            ],
            lambda: noop_pair(1),
        )

        def demo_pair(which: int) -> list[Measured]:
            if "demo" not in measured:
                measured["demo"] = _demo_runs(tmp, repeat)
            return [measured["demo"][which]]

        rows += probe(
            [_row(demo, "stepvisor", "cached rerun: cache=True, SQLite store")],
            lambda: demo_pair(0),
        )
        rows += probe(
            [
                _row(
                    demo,
                    "stepvisor (first run)",
                    "fills the cache",
                    Target(on="ratio", op="<=", limit=0.1, text="rerun <= 10% of first"),
                )
            ],
            lambda: demo_pair(1),
        )
    return rows
