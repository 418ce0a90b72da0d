"""Deadline precision: how long past its timeout a step goes on.

Steps that never finish by themselves get a timeout of 0.2 s, one at a time:

* process steps spin in a busy loop (they do not cooperate at all); the
  overrun ends when the step is recorded ``timed_out`` *and* its process is
  gone (each step writes its pid to a file; a monitor thread polls it);
* thread steps sleep in a loop of ``ctx.wait_cancelled(0.01)`` (they
  cooperate, as thread steps must);
* async steps ``await asyncio.sleep(10)``.

The overrun is measured from the attempt's start (``StepDispatched``) plus
the timeout to the ``StepFinished`` event (or the process's end, if later).

The baselines are what ``concurrent.futures`` offers: ``future.result(timeout=T)``
returns on time, but the work goes on; their figure is how long the worker
process or thread stays busy past the deadline (until the job, 1 s here,
ends by itself).  For async steps, ``asyncio.wait_for`` really does cancel,
and is measured the same way as stepvisor.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import stepvisor as sv
from benchmarks.common import (
    Measured,
    pid_gone,
    probe,
    scratch_dir,
    spin_until,
    summary,
)
from benchmarks.harness import Row, Target
from benchmarks.steps import busy, ready
from stepvisor.core.events import Event, StepDispatched, StepFinished

NAME = "deadline"
TITLE = "deadline precision: overrun past a 0.2 s timeout"
ORDER = 40

TIMEOUT = 0.2
#: How long a baseline job runs when nothing stops it.
JOB_SECONDS = 1.0
#: A cap on steps that should have been stopped, so a broken deadline cannot hang.
RUNAWAY_SECONDS = 20.0


# -- the steps -----------------------------------------------------------------------------


def sv_cooperative(ctx: sv.StepContext) -> None:
    """A thread step that sleeps in slices, checking for cancellation."""
    end = time.monotonic() + RUNAWAY_SECONDS
    while time.monotonic() < end:
        if ctx.wait_cancelled(0.01):
            ctx.raise_if_cancelled()


async def sv_async(ctx: sv.StepContext) -> None:
    """An async step that sleeps far past its deadline."""
    del ctx
    await asyncio.sleep(10)


# -- stepvisor ---------------------------------------------------------------------------------


class _Watch:
    """Records attempt starts and step ends from events, and when each pid went away."""

    def __init__(self, pid_dir: Path | None) -> None:
        self.started: dict[str, float] = {}
        self.finished: dict[str, tuple[float, str]] = {}
        self.gone: dict[str, float] = {}
        self._pid_dir = pid_dir
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="bench-pid-watch", daemon=True)

    def on_event(self, event: Event) -> None:
        if isinstance(event, StepDispatched):
            self.started[event.step_id] = event.time
        elif isinstance(event, StepFinished):
            self.finished[event.step_id] = (event.time, event.status)

    def __enter__(self) -> _Watch:
        if self._pid_dir is not None:
            self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _poll(self) -> None:
        assert self._pid_dir is not None
        live: dict[str, int] = {}
        give_up = float("inf")
        while (not self._stop.is_set() or live) and time.monotonic() < give_up:
            if self._stop.is_set() and give_up == float("inf"):
                give_up = time.monotonic() + 5.0  # the run is over: its processes must go
            for path in self._pid_dir.glob("*.pid"):
                if path.stem not in live and path.stem not in self.gone:
                    live[path.stem] = int(path.read_text())
            for sid, pid in list(live.items()):
                if pid_gone(pid):
                    self.gone[sid] = time.time()
                    del live[sid]
            time.sleep(0.001)


def _steps(kind: str, ids: list[str], pid_dir: Path | None) -> list[sv.Step]:
    if kind != "process":
        fn = sv_async if kind == "async" else sv_cooperative
        return [sv.Step(sid, fn, timeout=TIMEOUT) for sid in ids]
    assert pid_dir is not None
    warm = [sv.Step(f"warm-{sid}", ready, executor="process") for sid in ids]
    timed = [
        sv.Step(
            sid,
            busy,
            needs=[f"warm-{sid}"],
            timeout=TIMEOUT,
            executor="process",
            params={"pidfile": str(pid_dir / f"{sid}.pid")},
        )
        for sid in ids
    ]
    return warm + timed


def _stepvisor_run(kind: str, ids: list[str], pid_dir: Path | None) -> _Watch:
    wf = sv.Workflow(f"deadline-{kind}", _steps(kind, ids, pid_dir))
    with _Watch(pid_dir) as watch:
        sv.run(
            wf,
            on_event=watch.on_event,
            max_parallel=1,
            on_failure="continue",
            retry=sv.RetryPolicy(max_attempts=1),
        )
    return watch


def _stepvisor_overruns(kind: str, n: int, tmp: Path) -> tuple[list[float], list[float]]:
    """Overruns of ``n`` timed-out steps; for processes, also each worker's start-up time.

    Process steps run one per workflow, after a quick step on the same worker,
    so that the deadline is spent running the step rather than starting the
    worker process (which the start-up figure shows separately).
    """
    ids = [f"s{i:02d}" for i in range(n)]
    pid_dir = tmp / f"pids-{kind}" if kind == "process" else None
    if pid_dir is None:
        watches = [_stepvisor_run(kind, ids, None)]
    else:
        pid_dir.mkdir()
        watches = [_stepvisor_run(kind, [sid], pid_dir) for sid in ids]
    overruns: list[float] = []
    startups: list[float] = []
    for watch in watches:
        for sid in ids:
            if sid not in watch.finished:
                continue
            ended, status = watch.finished[sid]
            if status != "timed_out":
                raise RuntimeError(f"step {sid} ended {status}, expected timed_out")
            if pid_dir is not None:
                if sid not in watch.gone:
                    raise RuntimeError(f"step {sid} never started in its process")
                ended = max(ended, watch.gone[sid])
                startups.append(watch.finished[f"warm-{sid}"][0] - watch.started[f"warm-{sid}"])
            overruns.append(ended - watch.started[sid] - TIMEOUT)
    return overruns, startups


# -- baselines --------------------------------------------------------------------------------


def busy_job(seconds: float) -> float:
    """Spin for ``seconds``; return the wall time it ended (``time.time()``)."""
    spin_until(time.monotonic() + seconds)
    return time.time()


def sleepy_job(seconds: float) -> float:
    """Sleep in 10 ms slices for ``seconds``; return the wall time it ended."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.01)
    return time.time()


def _futures_overruns(
    pool: Executor, job: Callable[[float], float], n: int
) -> tuple[list[float], list[float]]:
    """(caller unblocked past the deadline, work still running past it), per job."""
    returned: list[float] = []
    still_busy: list[float] = []
    pool.submit(time.time).result()  # start the worker first, as a pool in use has
    for _ in range(n):
        started = time.time()
        future = pool.submit(job, JOB_SECONDS)
        try:
            future.result(timeout=TIMEOUT)
        except FutureTimeout:
            returned.append(time.time() - started - TIMEOUT)
        else:
            raise RuntimeError("the job finished before its timeout; make JOB_SECONDS longer")
        future.cancel()  # what a user would try: it cannot stop a running job
        still_busy.append(future.result(timeout=RUNAWAY_SECONDS) - started - TIMEOUT)
    return returned, still_busy


async def _wait_for_overruns(n: int) -> list[float]:
    overruns: list[float] = []
    for _ in range(n):
        started = time.time()
        try:
            await asyncio.wait_for(asyncio.sleep(10), TIMEOUT)
        except TimeoutError:
            overruns.append(time.time() - started - TIMEOUT)
    return overruns


# -- the scenario -------------------------------------------------------------------------------


def _stepvisor_figures(kind: str, n: int, tmp: Path) -> list[Measured]:
    overruns, startups = _stepvisor_overruns(kind, n, tmp)
    note = ""
    if startups:
        median, worst = summary(startups)
        note = (
            f"a quick step ran first on the same worker, so the step found its process "
            f"started (start-up of a fresh process worker: median {median * 1000:.0f} ms, "
            f"worst {worst * 1000:.0f} ms)"
        )
    return _ms(overruns, note)


def _ms(values: list[float], note: str = "") -> list[Measured]:
    median, worst = summary(values)
    return [Measured(median * 1000, note), Measured(worst * 1000)]


def _rows(
    system: str,
    kind: str,
    *,
    worst_target: Target | None = None,
    note: str = "",
) -> list[Row]:
    return [
        Row(
            scenario=NAME,
            system=system,
            metric=f"{kind}: overrun median",
            value=None,
            unit="ms",
            note=note,
        ),
        Row(
            scenario=NAME,
            system=system,
            metric=f"{kind}: overrun worst",
            value=None,
            unit="ms",
            target=worst_target,
        ),
    ]


def _pool_figures(pool: Executor, job: Callable[[float], float], n: int) -> list[Measured]:
    with pool:
        returned, still_busy = _futures_overruns(pool, job, n)
    note = (
        f"result(timeout) raised {max(returned) * 1000:.1f} ms late at worst, but the job "
        f"ran on until it ended by itself ({JOB_SECONDS:g} s); {n} jobs"
    )
    return _ms(still_busy, note)


def run(*, quick: bool) -> list[Row]:
    """Measure deadline overruns for process, thread and async steps, and the baselines."""
    n = 5 if quick else 20
    n_base = 3 if quick else 5
    rows: list[Row] = []
    kinds = (
        ("process", "process steps (busy loop)", "stepvisor.backends.process"),
        ("thread", "thread steps (cooperative)", "stepvisor"),
        ("async", "async steps (asyncio.sleep)", "stepvisor"),
    )
    with scratch_dir() as tmp:
        for kind, label, module in kinds:
            target = (
                Target(on="value", op="<", limit=25.0, text="worst < 25 ms")
                if kind == "process"
                else None
            )
            note = f"{n} steps, one at a time" + (
                "; until recorded timed_out and the process is gone" if kind == "process" else ""
            )
            rows += probe(
                _rows("stepvisor", label, worst_target=target, note=note),
                functools.partial(_stepvisor_figures, kind, n, tmp),
                requires=(module,),
            )
            rows += _baseline_rows(kind, label, n_base, n)
    return rows


def _baseline_rows(kind: str, label: str, n_base: int, n: int) -> list[Row]:
    if kind == "process":
        return probe(
            _rows("ProcessPoolExecutor(1) result(timeout)", label),
            lambda: _pool_figures(ProcessPoolExecutor(1), busy_job, n_base),
        )
    if kind == "thread":
        return probe(
            _rows("ThreadPoolExecutor(1) result(timeout)", label),
            lambda: _pool_figures(ThreadPoolExecutor(1), sleepy_job, n_base),
        )
    return probe(
        _rows("asyncio.wait_for", label),
        lambda: _ms(asyncio.run(_wait_for_overruns(n)), f"{n} sleeps, cancelled by wait_for"),
    )
