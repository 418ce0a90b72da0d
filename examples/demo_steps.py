"""Step functions of the demo workflow (``demo.yaml``).

Each takes the step context and returns the artifacts it creates.  They stand
for the three kinds of work a workflow mixes: waiting on I/O (thread steps that
sleep, cooperatively), CPU-bound work (process steps, which run in parallel
despite the GIL), and a flaky call that succeeds when retried.
"""

from __future__ import annotations

import math
from typing import Any

import stepvisor as sv


def fetch(ctx: sv.StepContext) -> dict[str, Any]:
    """Pretend to download ``with.rows`` records, taking ``with.seconds``."""
    # wait_cancelled sleeps but wakes at once if the run is cancelled or times out.
    ctx.wait_cancelled(float(ctx.params["seconds"]))
    ctx.raise_if_cancelled()
    name = str(ctx.params["name"])
    return {name: [f"{name}-{i}" for i in range(int(ctx.params["rows"]))]}


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    factor, limit = 3, math.isqrt(n)
    while factor <= limit:
        if n % factor == 0:
            return False
        factor += 2
    return True


def crunch(ctx: sv.StepContext) -> dict[str, Any]:
    """Count the primes in shard ``ctx.item`` of ``with.size`` numbers (pure Python CPU).

    The step is mapped over the shard numbers: each instance gets one as its item.
    """
    shard, size = int(ctx.item), int(ctx.params["size"])
    low = shard * size
    return {"primes": sum(1 for n in range(low, low + size) if _is_prime(n))}


def flaky(ctx: sv.StepContext) -> dict[str, Any]:
    """Fail the first attempt, as a busy upstream service would; succeed on a retry."""
    if ctx.attempt == 1:
        raise ConnectionError("upstream answered 503 Service Unavailable")
    return {"rates": {"EUR": 1.0, "USD": 1.08}}


def combine(ctx: sv.StepContext) -> dict[str, Any]:
    """Fan in: everything above, summed into one summary."""
    inputs = ctx.inputs
    primes = sum(inputs["primes"])  # one count per instance of crunch, in shard order
    return {
        "summary": {
            "users": len(inputs["users"]),
            "orders": len(inputs["orders"]),
            "prices": len(inputs["prices"]),
            "primes": primes,
            "currencies": sorted(inputs["rates"]),
        }
    }
