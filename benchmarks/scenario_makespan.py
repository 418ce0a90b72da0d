"""Makespan on DAGs: how close to the best possible schedule a run finishes.

Seeded random layered DAGs of sleeping steps (5 to 50 ms each, so the
figure is about scheduling rather than CPU) run with at most 8 at a time.
No schedule can beat ``max(critical path, total work / 8)``; the figure is
the run's wall time divided by that lower bound, averaged over the DAGs.

stepvisor runs each DAG twice: with each step's duration given as
``metadata["cost"]`` (its scheduler starts the ready step with the longest
chain of work behind it first) and without (every step costs 1, so the
priority is the longest chain counted in steps).  The baselines are the wave
executor that asyncio code usually grows into (start everything ready, wait
for the whole batch, repeat; ``to_thread`` under a ``Semaphore(8)``) and
Dask's threaded scheduler with 8 workers.  Each system runs a small DAG
untimed first (``WARM_UP``), so that no figure includes a first run's imports.
"""

from __future__ import annotations

import asyncio
import heapq
import random
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import stepvisor as sv
from benchmarks.common import Measured, probe
from benchmarks.harness import Row, Target

NAME = "makespan"
TITLE = "makespan on random DAGs / lower bound (max_parallel=8)"
ORDER = 30

METRIC = "makespan / lower bound"
PARALLEL = 8


@dataclass(frozen=True, slots=True)
class Task:
    """One step of a generated DAG."""

    id: str
    seconds: float
    needs: tuple[str, ...]


def random_dag(n: int, *, seed: int) -> list[Task]:
    """A layered DAG of ``n`` steps: each step needs 1-3 steps of the 3 layers above it.

    At least one of its needs is in the layer right above, so every layer is
    really a level of the DAG.  Durations are uniform in [5, 50] ms.
    """
    rng = random.Random(seed)
    n_layers = max(3, round(n**0.5))
    cuts = sorted(rng.sample(range(1, n), n_layers - 1))
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, n], strict=True)]
    layers: list[list[str]] = []
    tasks: list[Task] = []
    for depth, size in enumerate(sizes):
        layer = [f"L{depth:02d}s{j:03d}" for j in range(size)]
        for sid in layer:
            needs: set[str] = set()
            if layers:
                needs.add(rng.choice(layers[-1]))
                pool = [s for above in layers[-3:] for s in above]
                needs.update(rng.sample(pool, min(len(pool), rng.randint(0, 2))))
            tasks.append(Task(sid, rng.uniform(0.005, 0.05), tuple(sorted(needs))))
        layers.append(layer)
    return tasks


def lower_bound(tasks: Sequence[Task], *, parallel: int) -> tuple[float, float, float]:
    """``(bound, critical path, total work / parallel)`` in seconds."""
    finish: dict[str, float] = {}
    for task in tasks:  # generated in topological order
        finish[task.id] = task.seconds + max((finish[d] for d in task.needs), default=0.0)
    critical = max(finish.values())
    spread = sum(t.seconds for t in tasks) / parallel
    return max(critical, spread), critical, spread


def list_schedule(tasks: Sequence[Task], *, parallel: int) -> float:
    """The makespan of an ideal, zero-overhead run of stepvisor's policy.

    Whenever a slot is free, the ready task with the longest chain of work
    behind it starts (ties by id), as stepvisor's scheduler does with cost
    hints.  A list schedule cannot always keep every slot busy, so this is
    the floor the policy itself sets, above the lower bound; the gap between
    it and a real run is the engine's and the machine's overhead.
    """
    users: dict[str, list[str]] = {t.id: [] for t in tasks}
    for task in tasks:
        for dep in task.needs:
            users[dep].append(task.id)
    seconds = {t.id: t.seconds for t in tasks}
    chain: dict[str, float] = {}
    for task in reversed(tasks):  # generated in topological order
        chain[task.id] = task.seconds + max((chain[u] for u in users[task.id]), default=0.0)
    waiting = {t.id: len(t.needs) for t in tasks}
    ready = [(-chain[t.id], t.id) for t in tasks if not t.needs]
    heapq.heapify(ready)
    running: list[tuple[float, str]] = []
    now = 0.0
    while ready or running:
        while ready and len(running) < parallel:
            _, sid = heapq.heappop(ready)
            heapq.heappush(running, (now + seconds[sid], sid))
        now, sid = heapq.heappop(running)
        for user in users[sid]:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, (-chain[user], user))
    return now


# -- the systems ------------------------------------------------------------------------------


def sv_sleep(ctx: sv.StepContext) -> None:
    """A stepvisor step that sleeps for its ``seconds`` parameter."""
    time.sleep(float(ctx.params["seconds"]))


def _stepvisor(tasks: Sequence[Task], *, hints: bool, as_run: list[float] | None = None) -> float:
    steps = [
        sv.Step(
            t.id,
            sv_sleep,
            needs=t.needs,
            params={"seconds": t.seconds},
            metadata={"cost": t.seconds} if hints else None,
        )
        for t in tasks
    ]
    wf = sv.Workflow("makespan", steps)
    started = time.perf_counter()
    result = sv.run(wf, max_parallel=PARALLEL)
    elapsed = time.perf_counter() - started
    if result.status is not sv.RunStatus.SUCCEEDED:
        raise RuntimeError(f"the stepvisor run ended {result.status.value}: {result.error}")
    if as_run is not None:
        # The bound again, from each step's duration as it ran: a sleep overshoots
        # its nominal length (about 0.5 ms per call on this VM), for every system.
        ran = [
            Task(t.id, result.steps[t.id].attempts[-1].duration or t.seconds, t.needs)
            for t in tasks
        ]
        as_run.append(elapsed / lower_bound(ran, parallel=PARALLEL)[0])
    return elapsed


async def _waves(tasks: Sequence[Task]) -> None:
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(PARALLEL)
    loop.set_default_executor(pool)  # so the semaphore, not the default pool size, bounds it
    sem = asyncio.Semaphore(PARALLEL)

    async def one(task: Task) -> None:
        async with sem:
            await asyncio.to_thread(time.sleep, task.seconds)

    done: set[str] = set()
    pending = list(tasks)
    while pending:
        ready = [t for t in pending if done.issuperset(t.needs)]
        await asyncio.gather(*(one(t) for t in ready))
        done.update(t.id for t in ready)
        pending = [t for t in pending if t.id not in done]


def _wave_executor(tasks: Sequence[Task]) -> float:
    started = time.perf_counter()
    asyncio.run(_waves(tasks))
    return time.perf_counter() - started


def _dask_task(seconds: float, *_deps: object) -> None:
    time.sleep(seconds)


def _dask(tasks: Sequence[Task]) -> float:
    import dask.threaded  # noqa: PLC0415

    dsk: dict[str, Any] = {t.id: (_dask_task, t.seconds, *t.needs) for t in tasks}
    started = time.perf_counter()
    dask.threaded.get(dsk, [t.id for t in tasks], num_workers=PARALLEL)
    return time.perf_counter() - started


# -- the scenario -------------------------------------------------------------------------------


#: Run untimed by every system before its timed runs: each scenario has a fresh
#: interpreter, and the first run of each system in it pays for its imports
#: and its first threads (stepvisor's first ``sv.run`` ~55 ms, most of it
#: importing the actors and asyncio), which is not scheduling.
WARM_UP = 20


def _ratios(
    dags: Sequence[list[Task]], runner: Callable[[list[Task]], float], *, warm: bool = True
) -> list[Measured]:
    if warm:
        runner(random_dag(WARM_UP, seed=0))
    ratios = [runner(tasks) / lower_bound(tasks, parallel=PARALLEL)[0] for tasks in dags]
    note = f"mean of {len(ratios)} DAGs, worst {max(ratios):.3f}" if len(ratios) > 1 else ""
    return [Measured(statistics.fmean(ratios), note)]


def _hinted(dags: Sequence[list[Task]]) -> list[Measured]:
    """stepvisor with cost hints, with the two floors that explain its figure in the note."""
    as_run: list[float] = []
    _stepvisor(random_dag(WARM_UP, seed=0), hints=True)
    [measured] = _ratios(dags, lambda t: _stepvisor(t, hints=True, as_run=as_run), warm=False)
    ideal = statistics.fmean(
        list_schedule(d, parallel=PARALLEL) / lower_bound(d, parallel=PARALLEL)[0] for d in dags
    )
    note = (
        f"a zero-overhead run of the same policy: {ideal:.3f}; against the bound of the "
        f"durations as they ran (sleep overshoot included): {statistics.fmean(as_run):.3f}"
    )
    return [Measured(measured.value, f"{measured.note}; {note}" if measured.note else note)]


def _template(system: str, *, target: Target | None = None, note: str = "") -> Row:
    return Row(
        scenario=NAME,
        system=system,
        metric=METRIC,
        value=None,
        unit="",
        target=target,
        note=note,
    )


def run(*, quick: bool) -> list[Row]:
    """Measure makespan / lower bound for stepvisor (with and without cost hints) and baselines."""
    n, seeds = (60, (1,)) if quick else (200, (1, 2, 3))
    dags = [random_dag(n, seed=s) for s in seeds]
    bounds = [lower_bound(d, parallel=PARALLEL) for d in dags]
    shape = "; ".join(
        f"seed {s}: bound {b * 1000:.0f} ms (critical path {c * 1000:.0f}, work/8 {w * 1000:.0f})"
        for s, (b, c, w) in zip(seeds, bounds, strict=True)
    )
    rows = probe(
        [
            _template(
                "stepvisor",
                target=Target(on="value", op="<=", limit=1.05),
                note=f"{n} steps, cost hints given; {shape}",
            )
        ],
        lambda: _hinted(dags),
    )
    rows += probe(
        [_template("stepvisor, no cost hints")],
        lambda: _ratios(dags, lambda t: _stepvisor(t, hints=False)),
    )
    rows += probe(
        [
            _template(
                "wave executor (asyncio, to_thread, Semaphore(8))",
                target=Target(on="ratio", op="<", limit=1.0, text="stepvisor below it"),
            )
        ],
        lambda: _ratios(dags, _wave_executor),
    )
    rows += probe(
        [_template("Dask threaded get (8 workers)")],
        lambda: _ratios(dags, _dask),
        requires=("dask",),
    )
    return rows
