"""Per-call overhead of ``execute_parallel``: the median of 100 calls of 4 no-op steps.

Why a script and not a test: the figure depends on the machine and its load,
so it is measured and reported (issue 13, the README's list of changes), not
asserted.  Run ``.venv/bin/python -m tests.client.overhead`` for stepvisor's
facade, ``.venv-client/bin/python -m tests.client.overhead --original`` for
tapps-agents' own executor.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from stepvisor.compat import ParallelStepExecutor


@dataclass
class _Step:
    id: str
    agent: str = "a"
    action: str = "b"
    requires: list[str] = field(default_factory=list)
    creates: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    next: str | None = None


@dataclass
class _State:
    workflow_id: str = "w"
    step_executions: list[Any] = field(default_factory=list)


async def _noop(step: Any) -> dict[str, Any]:
    return {}


async def measure(*, original: bool, calls: int = 100, warmup: int = 5) -> list[float]:
    """Seconds per call, ``calls`` of them after ``warmup`` unmeasured ones."""
    if original:
        models = importlib.import_module("tapps_agents.workflow.models")
        module = importlib.import_module("tapps_agents.workflow.parallel_executor")
        executor: Any = module.ParallelStepExecutor(max_parallel=8)
        steps: list[Any] = [models.WorkflowStep(f"s{i}", "a", "b") for i in range(4)]

        def state() -> Any:
            return models.WorkflowState(workflow_id="w", started_at=datetime.now())
    else:
        executor = ParallelStepExecutor(max_parallel=8)
        steps = [_Step(f"s{i}") for i in range(4)]

        def state() -> Any:
            return _State()

    times = []
    for n in range(warmup + calls):
        start = time.perf_counter()
        await executor.execute_parallel(steps, _noop, state=state())
        if n >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--original", action="store_true", help="tapps-agents' own executor")
    args = parser.parse_args()
    times = asyncio.run(measure(original=args.original))
    ms = sorted(t * 1000 for t in times)
    which = "tapps-agents ParallelStepExecutor" if args.original else "stepvisor.compat"
    print(
        f"{which}: median {statistics.median(ms):.3f} ms, p90 {ms[int(len(ms) * 0.9)]:.3f} ms, "
        f"min {ms[0]:.3f} ms over {len(ms)} calls of 4 no-op steps"
    )


if __name__ == "__main__":
    main()
