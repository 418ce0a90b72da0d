"""A drop-in for code written against an asyncio ``ParallelStepExecutor``.

Why this exists: many programs already run their steps with a small asyncio
executor (a semaphore, ``asyncio.wait_for`` and a retry loop) and call it as
``await executor.execute_parallel(steps, execute_fn, state=state)``, driven
by a loop over ``executor.find_ready_steps(...)``.  This package keeps that
call shape, its records (``state.step_executions``) and its readiness rule,
but runs the steps on stepvisor: the bound, per-attempt deadlines, retries
with backoff that does not hold a slot, and cancellation that always ends
every record in a terminal status all come from the engine.

``execute_fn`` runs on the *caller's* event loop, not on stepvisor's loop
thread, so it may use what belongs to that loop and sees the caller's
context variables, as it did under the asyncio executor.  The call's run
itself is hosted on that loop too (:mod:`stepvisor.compat._host`): no thread
waits for a step and a call makes no thread hand-off; the loop stays free
throughout, since the run only ever handles a message at a time.
"""

from __future__ import annotations

from stepvisor.compat._executor import ExecuteFn, ParallelStepExecutor
from stepvisor.compat._ready import find_ready_steps
from stepvisor.compat._records import (
    StateLike,
    Status,
    StepExecution,
    StepExecutionResult,
    StepLike,
)
from stepvisor.compat._retry import RetryConfig

__all__ = [
    "ExecuteFn",
    "ParallelStepExecutor",
    "RetryConfig",
    "StateLike",
    "Status",
    "StepExecution",
    "StepExecutionResult",
    "StepLike",
    "find_ready_steps",
]
