"""Step functions that run in stepvisor's process workers, kept in a light module.

A process step travels by import reference, so each fresh worker process
imports the module that defines it.  Defined in a scenario module, a step
would make every child import the harness, ``concurrent.futures.process``,
asyncio and the rest (about 60 ms per child here), a cost the baselines,
which fork, never pay; that would measure this package rather than
stepvisor.  So this module imports only the standard library modules it
needs, and ``stepvisor`` for type checking only.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stepvisor import StepContext

__all__ = [
    "busy",
    "ignore",
    "lines_to_file",
    "make_array",
    "make_array_step",
    "noop",
    "nothing",
    "print_lines",
    "ready",
    "spin",
    "spin_step",
    "spin_until",
    "total",
    "total_step",
    "write_pid",
]

#: How long a "never ends" step runs if nothing stops it.
RUNAWAY_SECONDS = 60.0


def nothing() -> None:
    """A plain function that does nothing: a no-op call for the executors."""


def noop(ctx: StepContext) -> None:
    """A step that does nothing."""
    del ctx


def ignore(item: object) -> None:
    """A plain function of one item that does nothing: the no-op the pools map."""
    del item


def ready(ctx: StepContext) -> None:
    """A quick step, run first so that the next step on that worker finds it started."""
    del ctx


def write_pid(path: str) -> None:
    """Write this process's pid to ``path`` atomically (readers never see half of it)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        fh.write(str(os.getpid()))
    os.replace(tmp, path)


def spin_until(deadline: float) -> int:
    """Busy-loop until ``time.monotonic()`` reaches ``deadline``; the number of rounds."""
    rounds = 0
    while time.monotonic() < deadline:
        rounds += 1
    return rounds


def busy(ctx: StepContext) -> None:
    """A step that writes its pid to ``params["pidfile"]``, then spins until killed."""
    write_pid(str(ctx.params["pidfile"]))
    spin_until(time.monotonic() + RUNAWAY_SECONDS)


def spin(iterations: int) -> float:
    """Burn ``iterations`` rounds of pure-Python arithmetic; return the seconds it took."""
    started = time.perf_counter()
    total = 0
    for i in range(iterations):
        total += i * i % 7
    if total < 0:  # never true; keeps the loop from being an obvious no-op
        raise AssertionError(total)
    return time.perf_counter() - started


def spin_step(ctx: StepContext) -> dict[str, float]:
    """Spin ``params["iterations"]`` rounds; report the busy time as an artifact."""
    return {f"busy_{ctx.step_id}": spin(int(ctx.params["iterations"]))}


# -- data (numpy imported only by the steps that make or read arrays) -------------------------


def make_array(megabytes: float) -> object:
    """A float64 array of about ``megabytes`` MB (every page written)."""
    import numpy as np  # noqa: PLC0415 - only the data scenario needs it

    return np.ones(int(megabytes * 1e6) // 8, dtype=np.float64)


def total(array: object) -> float:
    """Read every element (a sum), as a reader step would."""
    return float(array.sum())  # type: ignore[attr-defined]


def make_array_step(ctx: StepContext) -> dict[str, object]:
    return {"array": make_array(ctx.params["megabytes"])}


def total_step(ctx: StepContext) -> dict[str, float]:
    return {f"total_{ctx.step_id}": total(ctx.inputs["array"])}


def print_lines(ctx: StepContext) -> dict[str, float]:
    """Print ``n`` short lines to stdout (captured, or not, as the run says); the loop's time."""
    started = time.perf_counter()
    for i in range(int(ctx.params["n"])):
        print(f"line {i}")
    return {"seconds": time.perf_counter() - started}


def lines_to_file(ctx: StepContext) -> dict[str, float]:
    """The same loop, writing to a file: what printing costs without capture."""
    with open(ctx.params["path"], "w") as fh:
        started = time.perf_counter()
        for i in range(int(ctx.params["n"])):
            print(f"line {i}", file=fh)
        return {"seconds": time.perf_counter() - started}
