"""Async steps hold a slot of the bound, not a thread: thousands in flight on one loop."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import stepvisor as sv

#: The threads a run of async steps may add, however many steps: the engine's
#: Supervisor, its event loop, the clock's timer thread, and slack for one
#: thread stepvisor starts on demand.  Not per step.
THREADS_ALLOWED = 6


def test_two_thousand_concurrent_async_steps_use_a_fixed_number_of_threads(
    chdir_tmp: Path,
) -> None:
    n = 2000
    before = threading.active_count()
    peak = [0]
    in_flight = [0]
    all_started = asyncio.Event()
    loop_box: list[asyncio.AbstractEventLoop] = []

    async def wait_for_everyone(ctx: sv.StepContext) -> dict[str, int]:
        if not loop_box:
            loop_box.append(asyncio.get_running_loop())
        in_flight[0] += 1  # the loop is one thread: no lock needed
        if in_flight[0] == n:
            all_started.set()
            peak[0] = max(peak[0], threading.active_count())
        await asyncio.wait_for(all_started.wait(), timeout=60)
        in_flight[0] -= 1
        return {ctx.step_id: 1}

    steps = [sv.Step(f"s{i:04d}", wait_for_everyone) for i in range(n)]
    result = sv.run(sv.Workflow("many", steps), max_parallel=n)
    assert result.ok, result.error
    assert len(result.artifacts) == n
    # Every step was in flight at once (none could finish before all started),
    # and the process then had at most a fixed handful of threads more.
    assert peak[0] - before <= THREADS_ALLOWED, (peak[0], before)
