"""Cancel latency: from ``handle.cancel()`` to nothing left running.

Eight busy process steps are in flight (``max_parallel=8``, the SQLite
store); once each has written its pid, the run is cancelled.  The latency
ends when every one of those processes is gone *and* the store says the run
is ``cancelled`` (read through a separate ``SQLiteStore``, as another
process would see it).

The baseline is ``ProcessPoolExecutor(8)``: ``shutdown(wait=False,
cancel_futures=True)`` drops queued jobs but cannot stop running ones, so its
processes live on until their jobs end by themselves (2 s jobs here).
"""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import stepvisor as sv
from benchmarks.common import (
    Measured,
    pid_gone,
    probe,
    read_pids,
    scratch_dir,
    spin_until,
    summary,
    wait_until,
    write_pid,
)
from benchmarks.harness import Row, Target
from benchmarks.steps import busy

NAME = "cancel"
TITLE = "cancel latency with 8 busy process steps in flight"
ORDER = 50

PARALLEL = 8
METRIC_MEDIAN = "until processes gone + stored cancelled, median"
METRIC_WORST = "until processes gone + stored cancelled, worst"


def busy_job(pidfile: str, seconds: float) -> None:
    """The baseline's job: write the pid, spin for ``seconds``."""
    write_pid(pidfile)
    spin_until(time.monotonic() + seconds)


def _stored_status(store_path: Path, run_id: str) -> str | None:
    from stepvisor.store.sqlite import SQLiteStore  # noqa: PLC0415

    with SQLiteStore(store_path) as store:
        try:
            return store.load(run_id).info.status.value
        except sv.RunNotFoundError:
            return None


def _one_cancel(tmp: Path, index: int) -> tuple[float, float, float]:
    """(total latency, processes gone after, stored cancelled after) for one run."""
    pid_dir = tmp / f"pids-{index}"
    pid_dir.mkdir()
    store_path = tmp / f"runs-{index}.db"
    steps = [
        sv.Step(
            f"busy{i}",
            busy,
            executor="process",
            params={"pidfile": str(pid_dir / f"busy{i}.pid")},
        )
        for i in range(PARALLEL)
    ]
    handle = sv.start(sv.Workflow("cancel", steps), store=str(store_path), max_parallel=PARALLEL)
    try:
        wait_until(
            lambda: len(read_pids(pid_dir)) == PARALLEL,
            timeout=60,
            what=f"{PARALLEL} busy process steps to start",
            interval=0.01,
        )
        pids = list(read_pids(pid_dir).values())
        started = time.time()
        handle.cancel()
        gone = wait_until(
            lambda: all(pid_gone(p) for p in pids), timeout=30, what="the processes to go"
        )
        stored = wait_until(
            lambda: _stored_status(store_path, handle.run_id) == "cancelled",
            timeout=30,
            what="the store to say cancelled",
        )
    finally:
        handle.cancel()
        result = handle.wait(timeout=60)
    if result.status is not sv.RunStatus.CANCELLED:
        raise RuntimeError(f"the run ended {result.status.value}, expected cancelled")
    return max(gone, stored) - started, gone - started, stored - started


def _stepvisor(n: int, tmp: Path) -> list[Measured]:
    runs = [_one_cancel(tmp, i) for i in range(n)]
    median, worst = summary([r[0] for r in runs])
    gone_median, _ = summary([r[1] for r in runs])
    stored_median, _ = summary([r[2] for r in runs])
    note = (
        f"{n} runs; processes gone after {gone_median * 1000:.0f} ms, "
        f"stored cancelled after {stored_median * 1000:.0f} ms (medians)"
    )
    return [Measured(median * 1000, note), Measured(worst * 1000)]


def _pool(tmp: Path, seconds: float) -> list[Measured]:
    pid_dir = tmp / "pids-pool"
    pid_dir.mkdir()
    pool = ProcessPoolExecutor(PARALLEL)
    futures = [
        pool.submit(busy_job, str(pid_dir / f"job{i}.pid"), seconds) for i in range(PARALLEL * 2)
    ]
    wait_until(
        lambda: len(read_pids(pid_dir)) >= PARALLEL,
        timeout=60,
        what=f"{PARALLEL} jobs to start",
        interval=0.01,
    )
    pids = list(read_pids(pid_dir).values())
    started = time.time()
    pool.shutdown(wait=False, cancel_futures=True)
    gone = wait_until(
        lambda: all(pid_gone(p) for p in pids), timeout=seconds + 30, what="the pool's processes"
    )
    pool.shutdown(wait=True)
    dropped = sum(f.cancelled() for f in futures)
    note = (
        f"shutdown(cancel_futures=True) dropped {dropped} queued jobs; the running ones "
        f"went on until they ended by themselves ({seconds:g} s jobs)"
    )
    latency = (gone - started) * 1000
    return [Measured(latency, note), Measured(latency)]


def _rows(system: str, *, target: Target | None = None) -> list[Row]:
    return [
        Row(scenario=NAME, system=system, metric=METRIC_MEDIAN, value=None, unit="ms"),
        Row(
            scenario=NAME,
            system=system,
            metric=METRIC_WORST,
            value=None,
            unit="ms",
            target=target,
        ),
    ]


def run(*, quick: bool) -> list[Row]:
    """Measure how long cancelling 8 busy process steps takes, and the pool baseline."""
    n, job_seconds = (2, 1.0) if quick else (5, 2.0)
    with scratch_dir() as tmp:
        rows = probe(
            _rows("stepvisor", target=Target(on="value", op="<", limit=250.0, text="< 250 ms")),
            lambda: _stepvisor(n, tmp),
            requires=("stepvisor.backends.process", "stepvisor.store.sqlite"),
        )
        rows += probe(
            _rows(f"ProcessPoolExecutor({PARALLEL}) shutdown(cancel_futures=True)"),
            lambda: _pool(tmp, job_seconds),
        )
    return rows
