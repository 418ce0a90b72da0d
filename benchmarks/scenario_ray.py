"""Ray steps: what stepvisor adds on top of plain Ray tasks, measured in the same run.

Three figures, each beside what a Ray user would write instead, on one local
Ray instance started once for the scenario (``ray.init`` and worker warm-up are
not timed; stepvisor reuses the instance, as it does any Ray the program
started):

* **Per-step overhead**: many independent no-op steps, whole run time divided
  by the number of steps.  stepvisor keeps at most ``max_parallel`` (8) attempts
  in flight, each a Ray task a Worker thread waits on; the baselines are plain
  Ray tasks with the same bound (``ray.wait`` keeps 8 in flight) and all
  submitted at once.
* **Deadline overrun**: a busy-looping task with a 0.5 s deadline.  For
  stepvisor, the time from the deadline to the step's ``timed_out`` record (the
  ``StepFinished`` event); for plain Ray, the driver sleeps until the deadline,
  issues ``ray.cancel(ref, force=True)`` and waits for ``ray.get`` to raise.
  Before each trial a no-op task makes sure a worker is up, so the looping task
  is running (not still waiting for a worker) when it is stopped; the trial
  checks that it was.  Median and worst of the trials.
* **Fan-out of a large artifact**: one Ray step makes 16 MiB of bytes, eight
  Ray steps read it.  stepvisor hands the consumers a reference to the
  producer's result (the driver also fetches the value once, for the run's
  state); the same workflow with a 1 KiB artifact shows what of that is the
  run's own overhead.  Plain Ray passes the producer's ObjectRef (the ideal),
  and the naive pattern fetches the value in the driver and passes it to each
  task (one copy per consumer).
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import stepvisor as sv
from benchmarks.common import (
    Measured,
    cores,
    missing,
    pid_gone,
    probe,
    scratch_dir,
    summary,
    wait_until,
)
from benchmarks.harness import Row, Target, replace_row
from stepvisor.core.events import Event, StepDispatched, StepFinished

NAME = "ray"
TITLE = "Ray steps: stepvisor on Ray vs plain Ray tasks"
ORDER = 60

OVERHEAD = "per step, no-op Ray tasks"
OVERRUN_MEDIAN = "deadline overrun, median"
OVERRUN_WORST = "deadline overrun, worst"
FANOUT = "16 MiB artifact to 8 Ray steps"

PARALLEL = 8
TIMEOUT_S = 0.5
FANOUT_BYTES = 16 << 20
FANOUT_READERS = 8


# -- step functions and plain functions (module level: Ray workers import them) -------------


def sv_noop(ctx: sv.StepContext) -> None:
    del ctx


def plain_noop() -> None:
    """A plain function that does nothing."""


def sv_spin(ctx: sv.StepContext) -> None:
    _spin(Path(ctx.params["pid_file"]))


def _spin(pid_file: Path) -> None:
    pid_file.write_text(str(os.getpid()))
    while True:
        pass


def sv_make(ctx: sv.StepContext) -> dict[str, bytes]:
    return {"blob": bytes(int(ctx.params["size"]))}


def sv_read(ctx: sv.StepContext) -> dict[str, int]:
    return {f"n_{ctx.step_id}": len(ctx.inputs["blob"])}


def plain_make(size: int) -> bytes:
    return bytes(size)


def plain_read(blob: bytes) -> int:
    return len(blob)


# -- the Ray instance -----------------------------------------------------------------------


#: Ray's socket paths (``<temp dir>/session_<time>_<pid>/sockets/plasma_store``, about
#: 62 characters after the directory) must stay within the 107 bytes of AF_UNIX.
_MAX_RAY_DIR = 107 - 64


@contextmanager
def local_ray() -> Iterator[Any]:
    """A local Ray instance in a short temporary directory, warmed up (not timed)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray  # noqa: PLC0415

    base = tempfile.gettempdir()
    ray_dir = tempfile.mkdtemp(
        prefix="svray", dir=base if len(base) < _MAX_RAY_DIR - 14 else "/tmp"
    )
    try:
        ray.init(
            include_dashboard=False,
            configure_logging=False,
            log_to_driver=False,
            num_cpus=cores(),
            _temp_dir=ray_dir,
        )
        try:
            _warm(ray)
            yield ray
        finally:
            ray.shutdown()
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)


def _warm(ray: Any) -> None:
    """Make sure Ray's workers are up and have imported stepvisor (not timed).

    A Ray worker imports stepvisor the first time it runs a stepvisor attempt,
    as it imports a plain task's module the first time; a worker that replaces
    one killed by a deadline starts cold again, so each measurement warms up.
    """
    noop = ray.remote(plain_noop)
    ray.get([noop.remote() for _ in range(cores() * 2)])
    _time_stepvisor_noops(cores() * 2)


def _best_per_step(repeat: int, n: int, timer: Callable[[], float]) -> Measured:
    times = [timer() for _ in range(max(1, repeat))]
    spread = ", ".join(f"{t / n * 1e6:.0f}" for t in times)
    note = f"{n} steps; best of {len(times)} ({spread})" if len(times) > 1 else f"{n} steps"
    return Measured(min(times) / n * 1e6, note)


# -- per-step overhead ------------------------------------------------------------------------


def _time_stepvisor_noops(n: int) -> float:
    wf = sv.Workflow(
        "ray-overhead",
        [sv.Step(f"s{i:05d}", sv_noop) for i in range(n)],
        settings=sv.Settings(executor="ray", max_parallel=PARALLEL, on_failure="fail_fast"),
    )
    started = time.perf_counter()
    result = sv.run(wf)
    elapsed = time.perf_counter() - started
    if result.status is not sv.RunStatus.SUCCEEDED:
        raise RuntimeError(f"the stepvisor run ended {result.status.value}: {result.error}")
    return elapsed


def _time_ray_bounded(ray: Any, n: int) -> float:
    noop = ray.remote(max_retries=0)(plain_noop)
    started = time.perf_counter()
    pending: list[Any] = []
    submitted = 0
    while submitted < n or pending:
        while submitted < n and len(pending) < PARALLEL:
            pending.append(noop.remote())
            submitted += 1
        done, pending = ray.wait(pending, num_returns=1)
        ray.get(done)
    return time.perf_counter() - started


def _time_ray_all(ray: Any, n: int) -> float:
    noop = ray.remote(max_retries=0)(plain_noop)
    started = time.perf_counter()
    ray.get([noop.remote() for _ in range(n)])
    return time.perf_counter() - started


def _overhead_rows(ray: Any, n: int, repeat: int) -> list[Row]:
    def template(system: str, note: str = "", target: Target | None = None) -> Row:
        return Row(
            scenario=NAME,
            system=system,
            metric=OVERHEAD,
            value=None,
            unit="µs",
            note=note,
            target=target,
        )

    def measure(timer: Callable[[], float]) -> Callable[[], list[Measured]]:
        return lambda: [_best_per_step(repeat, n, timer)]

    rows = probe(
        [template("stepvisor", f"executor='ray', max_parallel={PARALLEL}")],
        measure(functools.partial(_time_stepvisor_noops, n)),
    )
    rows += probe(
        [
            template(
                f"Ray tasks, {PARALLEL} in flight (ray.wait)",
                target=Target(on="ratio", op="<=", limit=2.0, text="within 2x"),
            )
        ],
        measure(functools.partial(_time_ray_bounded, ray, n)),
    )
    rows += probe(
        [template("Ray tasks, all submitted at once")],
        measure(functools.partial(_time_ray_all, ray, n)),
    )
    return rows


# -- deadline overrun --------------------------------------------------------------------------


def _ready_worker(ray: Any) -> None:
    """Wait until Ray has a worker to run the next task at once."""
    ray.get(ray.remote(plain_noop).remote(), timeout=60)


def _started(pid_file: Path) -> bool:
    return pid_file.exists() and bool(pid_file.read_text())


def _stepvisor_overrun(ray: Any, tmp: Path, trial: int) -> tuple[float, bool]:
    _ready_worker(ray)
    pid_file = tmp / f"sv-{trial}.pid"
    times: dict[str, float] = {}

    def on_event(event: Event) -> None:
        if isinstance(event, StepDispatched):
            times["dispatched"] = event.time
        elif isinstance(event, StepFinished):
            times["finished"] = event.time

    wf = sv.Workflow(
        "ray-overrun",
        [sv.Step("spin", sv_spin, timeout=TIMEOUT_S, params={"pid_file": str(pid_file)})],
        settings=sv.Settings(executor="ray"),
    )
    result = sv.run(wf, on_event=on_event)
    if result.steps["spin"].status is not sv.StepStatus.TIMED_OUT:
        raise RuntimeError(f"the looping step ended {result.steps['spin'].status.value}")
    return times["finished"] - times["dispatched"] - TIMEOUT_S, _started(pid_file)


def _plain_overrun(ray: Any, tmp: Path, trial: int) -> tuple[float, bool]:
    _ready_worker(ray)
    pid_file = tmp / f"ray-{trial}.pid"
    spin = ray.remote(max_retries=0)(_spin)
    started = time.perf_counter()
    ref = spin.remote(pid_file)
    threading.Event().wait(max(0.0, started + TIMEOUT_S - time.perf_counter()))
    ray.cancel(ref, force=True)
    try:
        ray.get(ref, timeout=30)
    except ray.exceptions.GetTimeoutError:
        raise RuntimeError("the looping task was not stopped within 30 s") from None
    except ray.exceptions.RayError:  # TaskCancelledError or WorkerCrashedError: stopped
        pass
    else:
        raise RuntimeError("the looping task returned")
    return time.perf_counter() - started - TIMEOUT_S, _started(pid_file)


def _overrun_figures(
    trials: int, one: Callable[[int], tuple[float, bool]], pids: Path
) -> list[Measured]:
    overruns: list[float] = []
    running = 0
    for trial in range(trials):
        overrun, was_running = one(trial)
        overruns.append(overrun * 1000)
        running += was_running
    for pid_file in pids.glob("*.pid"):
        pid = int(pid_file.read_text())
        wait_until(functools.partial(pid_gone, pid), timeout=10, what=f"worker {pid} killed")
    median, worst = summary(overruns)
    note = (
        f"{trials} trials, {running} caught running; all: "
        + ", ".join(f"{x:.0f}" for x in overruns)
        + " ms"
    )
    return [Measured(median, note), Measured(worst)]


def _overrun_rows(ray: Any, tmp: Path, trials: int) -> list[Row]:
    def templates(system: str, note: str = "") -> list[Row]:
        median_target = (
            Target(on="value", op="<", limit=100.0, text="< 100 ms")
            if system == "stepvisor"
            else None
        )
        return [
            Row(
                scenario=NAME,
                system=system,
                metric=OVERRUN_MEDIAN,
                value=None,
                unit="ms",
                note=note,
                target=median_target,
            ),
            Row(scenario=NAME, system=system, metric=OVERRUN_WORST, value=None, unit="ms"),
        ]

    sv_dir, ray_dir = tmp / "overrun-sv", tmp / "overrun-ray"
    sv_dir.mkdir()
    ray_dir.mkdir()
    rows = probe(
        templates("stepvisor", f"timeout {TIMEOUT_S:g} s; deadline -> timed_out recorded"),
        lambda: _overrun_figures(
            trials, functools.partial(_stepvisor_overrun, ray, sv_dir), sv_dir
        ),
    )
    rows += probe(
        templates(
            "Ray task + ray.cancel(force=True) at the deadline",
            "driver sleeps to the deadline; deadline -> ray.get raises",
        ),
        lambda: _overrun_figures(trials, functools.partial(_plain_overrun, ray, ray_dir), ray_dir),
    )
    return rows


# -- fan-out of a large artifact ----------------------------------------------------------------


def _time_stepvisor_fanout(size: int = FANOUT_BYTES) -> float:
    steps = [sv.Step("make", sv_make, params={"size": size})]
    steps += [sv.Step(f"r{i}", sv_read, needs=["make"]) for i in range(FANOUT_READERS)]
    wf = sv.Workflow(
        "ray-fanout", steps, settings=sv.Settings(executor="ray", max_parallel=PARALLEL)
    )
    started = time.perf_counter()
    result = sv.run(wf)
    elapsed = time.perf_counter() - started
    if result.status is not sv.RunStatus.SUCCEEDED:
        raise RuntimeError(f"the stepvisor run ended {result.status.value}: {result.error}")
    sizes = {v for k, v in result.artifacts.items() if k.startswith("n_")}
    if sizes != {size}:
        raise RuntimeError(f"the readers saw sizes {sizes}")
    return elapsed


def _time_ray_fanout(ray: Any, *, naive: bool) -> float:
    make = ray.remote(max_retries=0)(plain_make)
    read = ray.remote(max_retries=0)(plain_read)
    started = time.perf_counter()
    made = make.remote(FANOUT_BYTES)
    source = ray.get(made) if naive else made
    sizes = ray.get([read.remote(source) for _ in range(FANOUT_READERS)])
    elapsed = time.perf_counter() - started
    if set(sizes) != {FANOUT_BYTES}:
        raise RuntimeError("a reader saw the wrong size")
    return elapsed


def _fanout_rows(ray: Any, repeat: int) -> list[Row]:
    def template(system: str, note: str = "") -> Row:
        return Row(scenario=NAME, system=system, metric=FANOUT, value=None, unit="ms", note=note)

    def measure(timer: Callable[[], float]) -> Callable[[], list[Measured]]:
        def figures() -> list[Measured]:
            times = [timer() * 1000 for _ in range(max(1, repeat))]
            spread = ", ".join(f"{t:.0f}" for t in times)
            return [Measured(min(times), f"best of {len(times)} ({spread} ms)")]

        return figures

    rows = probe(
        [template("stepvisor", "consumers get a ref to the producer's result")],
        measure(_time_stepvisor_fanout),
    )
    rows += probe(
        [template("stepvisor, 1 KiB instead", "the same run without the data: run overhead")],
        measure(functools.partial(_time_stepvisor_fanout, 1024)),
    )
    rows += probe(
        [template("Ray tasks, ObjectRef passed", "the ideal: no copy through the driver")],
        measure(functools.partial(_time_ray_fanout, ray, naive=False)),
    )
    rows += probe(
        [template("Ray tasks, value fetched and passed", "one copy per consumer")],
        measure(functools.partial(_time_ray_fanout, ray, naive=True)),
    )
    return rows


# -- the scenario --------------------------------------------------------------------------------


def _not_installed(why: str) -> list[Row]:
    rows = [
        Row(scenario=NAME, system=system, metric=metric, value=None, unit=unit)
        for metric, unit in ((OVERHEAD, "µs"), (OVERRUN_MEDIAN, "ms"), (FANOUT, "ms"))
        for system in ("stepvisor", "Ray tasks")
    ]
    hint = f"install it to compare: pip install 'stepvisor[ray]' ({why})"
    return [replace_row(r, status="not installed", note=hint) for r in rows]


def run(*, quick: bool) -> list[Row]:
    """Measure stepvisor on Ray beside plain Ray tasks."""
    why = missing("ray")
    if why is not None:
        return _not_installed(why)
    n, repeat, trials = (50, 1, 3) if quick else (500, 3, 10)
    with scratch_dir() as tmp, local_ray() as ray:
        rows = _overhead_rows(ray, n, repeat)
        _warm(ray)
        rows += _fanout_rows(ray, repeat)
        rows += _overrun_rows(ray, tmp, trials)
    return rows
