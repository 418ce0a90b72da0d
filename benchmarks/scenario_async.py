"""Async concurrency: N async steps that each await 1 s, all in flight at once.

``max_parallel = N``: every step is ready at the start and none depends on
another, so the run's wall time is the sleep plus what it costs to have N
attempts in flight.  The baseline is what an asyncio program writes itself:
``asyncio.gather`` of N coroutines under an ``asyncio.Semaphore(N)``.

Each system runs in a fresh interpreter, so its peak memory (VmHWM less the
resident size before the run) and its thread count are its own; a sampling
thread in that interpreter records the most threads seen (the sampler
itself not counted).  Async steps hold a slot of the bound, not a thread: the
thread count must not grow with N.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from benchmarks.common import Measured, probe
from benchmarks.harness import Row, Target

NAME = "async"
TITLE = "N concurrent async steps, each awaiting 1 s (max_parallel = N)"
ORDER = 75

SLEEP = 1.0


def _vm(field: str) -> float:
    """A ``/proc/self/status`` size field, in MB."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def _stepvisor(n: int, sleep: float) -> None:
    import stepvisor as sv  # noqa: PLC0415 - measured in its own interpreter

    async def wait(ctx: sv.StepContext) -> None:
        await asyncio.sleep(sleep)

    wf = sv.Workflow("many", [sv.Step(f"s{i:05d}", wait) for i in range(n)])
    result = sv.run(wf, max_parallel=n)
    if not result.ok:
        raise RuntimeError(f"the run ended {result.status.value}: {result.error}")


def _gather(n: int, sleep: float) -> None:
    async def main() -> None:
        gate = asyncio.Semaphore(n)

        async def one() -> None:
            async with gate:
                await asyncio.sleep(sleep)

        await asyncio.gather(*(one() for _ in range(n)))

    asyncio.run(main())


SYSTEMS: dict[str, Callable[[int, float], None]] = {"stepvisor": _stepvisor, "gather": _gather}


def child(system: str, n: int, sleep: float) -> dict[str, float]:
    """Run one system here; report wall time, peak RSS growth and peak threads."""
    if system == "stepvisor":  # imports are not the run's cost
        importlib.import_module("stepvisor._runtime")
    peak = [threading.active_count()]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], threading.active_count() - 1)

    sampler = threading.Thread(target=sample, daemon=True)
    rss_before = _vm("VmRSS")
    sampler.start()
    started = time.perf_counter()
    SYSTEMS[system](n, sleep)
    wall = time.perf_counter() - started
    done.set()
    sampler.join()
    return {"wall": wall, "rss_mb": _vm("VmHWM") - rss_before, "threads": float(peak[0])}


def _measure(system: str, n: int, sleep: float) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.scenario_async", system, str(n), str(sleep)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    figures: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return figures


def _rows(system: str, n: int, *, stepvisor: bool) -> list[Row]:
    """The rows of one system; issue 15's targets at 10,000 steps.

    The thread count is stepvisor's own figure; the wall time and the RSS are
    ratios to asyncio's, so their targets sit on asyncio's rows.
    """

    def row(
        metric: str, unit: str, mine: Target | None = None, theirs: Target | None = None
    ) -> Row:
        target = mine if stepvisor else theirs
        return Row(
            scenario=NAME,
            system=system,
            metric=f"{n:,} steps: {metric}",
            value=None,
            unit=unit,
            target=target if n >= 10_000 else None,
        )

    return [
        row("wall time", "s", theirs=Target(on="ratio", op="<=", limit=1.3, text="within 1.3x")),
        row(
            "peak RSS increase",
            "MB",
            theirs=Target(on="ratio", op="<=", limit=3.0, text="within 3x"),
        ),
        row("threads", "threads", Target(on="value", op="<=", limit=16.0, text="<= 16")),
    ]


def _figures(system: str, n: int, sleep: float) -> list[Measured]:
    got = _measure(system, n, sleep)
    return [
        Measured(got["wall"], f"each step awaits {sleep:g} s"),
        Measured(got["rss_mb"], "VmHWM - VmRSS before, in its own interpreter"),
        Measured(got["threads"], "most threads alive at once"),
    ]


def run(*, quick: bool) -> list[Row]:
    """Measure N concurrent async steps on stepvisor and on asyncio.gather."""
    sizes, sleep = ((200,), 0.2) if quick else ((1_000, 10_000), SLEEP)
    rows: list[Row] = []
    for n in sizes:
        for system, label in (
            ("stepvisor", "stepvisor"),
            ("gather", "asyncio gather + Semaphore(N)"),
        ):
            rows += probe(
                _rows(label, n, stepvisor=system == "stepvisor"),
                functools.partial(_figures, system, n, sleep),
            )
    return rows


if __name__ == "__main__":
    print(json.dumps(child(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))))
