"""Chained maps: does one slow item hold back every item after it?

Two mapped steps over the same 200 items, ``a`` then ``b`` (``b`` maps over
``a``'s list, so ``b[i]`` may start once ``a[i]`` succeeded), at most 8 at a
time.  Each instance sleeps (so the figure is about scheduling rather than
CPU): 10 ms, except 1 item in 20 (indices 0, 20, 40, ...), which takes 50x
longer in both steps, as a big file or a heavy partition would.  No schedule
can beat ``max(critical path, total work / 8)`` (the makespan scenario's
bound); the figure is the run's wall time over it.

Beside it, the same two maps with a barrier, as Prefect and Airflow run them:
``b`` maps over the items again and *requires* ``a``'s whole list, so no
``b[i]`` starts before every ``a[j]`` ended; and Dask's threaded scheduler (8
workers) on the chained graph, ``b[i]`` depending on ``a[i]`` only.  Each
system runs a small chain untimed first; each figure is the median of a few
runs.  The stepvisor row's note gives the floor its own policy sets (a
zero-overhead run of it: the ready instance of the step with the most work
behind it first, then the lowest index), and the ratio against the bound of
the durations as they ran (a sleep overshoots its length).
"""

from __future__ import annotations

import heapq
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import stepvisor as sv
from benchmarks.common import Measured, probe
from benchmarks.harness import Row, Target
from benchmarks.scenario_makespan import Task, lower_bound
from stepvisor.policies.concurrency import upstream_hint

NAME = "map_chain"
TITLE = "two chained maps, 1 item in 20 50x slower: makespan / lower bound (max_parallel=8)"
ORDER = 31

METRIC = "makespan / lower bound"
PARALLEL = 8
EVERY = 20
SLOWER = 50.0
#: Items of the chain each system runs untimed before its timed runs.
WARM_UP = 10


def durations(n: int, fast: float) -> list[float]:
    """Each item's seconds (the same in both maps): ``fast``, or ``SLOWER`` times it 1 in 20."""
    return [fast * SLOWER if i % EVERY == 0 else fast for i in range(n)]


def chain_tasks(seconds: Sequence[float]) -> list[Task]:
    """The chain as tasks, in topological order: every ``a[i]``, then every ``b[i]``."""
    a = [Task(f"a[{i}]", s, ()) for i, s in enumerate(seconds)]
    return a + [Task(f"b[{i}]", s, (f"a[{i}]",)) for i, s in enumerate(seconds)]


def policy_floor(seconds: Sequence[float], *, parallel: int, barrier: bool) -> float:
    """The makespan of a zero-overhead run of stepvisor's policy on the chain.

    Whenever a slot is free, the ready instance of ``a`` with the lowest index
    starts, else that of ``b`` (``a`` has the longer chain of work behind it).
    Instances of ``a`` go in index order; those of ``b``, chained, go longest
    upstream time first (``upstream_hint``), then by index.  ``b[i]`` is ready
    when ``a[i]`` ended, or, with ``barrier``, when every ``a[j]`` did (then
    in index order: a barrier's ``b`` is not chained).
    """
    n = len(seconds)
    plain = upstream_hint(None)
    ready = [(0, plain, i) for i in range(n)]  # (step, hint, index): a is 0, b is 1
    running: list[tuple[float, int, int]] = []
    now = 0.0
    a_left = n
    while ready or running:
        while ready and len(running) < parallel:
            step, _hint, i = heapq.heappop(ready)
            heapq.heappush(running, (now + seconds[i], step, i))
        now, step, i = heapq.heappop(running)
        if step == 0:
            a_left -= 1
            if not barrier:
                heapq.heappush(ready, (1, upstream_hint(seconds[i]), i))
            elif a_left == 0:
                ready.extend((1, plain, j) for j in range(n))
                heapq.heapify(ready)
    return now


# -- the systems ------------------------------------------------------------------------------


def pass_on(ctx: sv.StepContext) -> dict[str, float]:
    """``a``: sleep for the item's seconds, then hand them on to ``b``."""
    time.sleep(float(ctx.item))
    return {"a_out": float(ctx.item)}


def sleep_item(ctx: sv.StepContext) -> None:
    """``b``: sleep for the item's seconds."""
    time.sleep(float(ctx.item))


def chain_workflow(seconds: Sequence[float], *, barrier: bool) -> sv.Workflow:
    """``a`` mapped over ``seconds``, then ``b`` chained to it (or, with ``barrier``, after it)."""
    a = sv.Step("a", pass_on, map_over=list(seconds), creates=["a_out"])
    if barrier:
        b = sv.Step("b", sleep_item, map_over=list(seconds), requires=["a_out"])
    else:
        b = sv.Step("b", sleep_item, map_over="a_out")
    return sv.Workflow("chain", [a, b])


def _stepvisor(seconds: Sequence[float], *, barrier: bool, as_run: list[float]) -> float:
    wf = chain_workflow(seconds, barrier=barrier)
    started = time.perf_counter()
    result = sv.run(wf, max_parallel=PARALLEL)
    elapsed = time.perf_counter() - started
    if result.status is not sv.RunStatus.SUCCEEDED:
        raise RuntimeError(f"the stepvisor run ended {result.status.value}: {result.error}")
    ran = [
        Task(t.id, result.steps[t.id].attempts[-1].duration or t.seconds, t.needs)
        for t in chain_tasks(seconds)
    ]
    as_run.append(elapsed / lower_bound(ran, parallel=PARALLEL)[0])
    return elapsed


def _hand_on(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def _dask(seconds: Sequence[float]) -> float:
    import dask.threaded  # noqa: PLC0415 - an optional baseline

    dsk: dict[Any, Any] = {}
    for i, s in enumerate(seconds):
        dsk["a", i] = (_hand_on, s)
        dsk["b", i] = (time.sleep, ("a", i))
    started = time.perf_counter()
    dask.threaded.get(dsk, [("b", i) for i in range(len(seconds))], num_workers=PARALLEL)
    return time.perf_counter() - started


# -- the scenario -------------------------------------------------------------------------------


def _ratios(
    seconds: Sequence[float], runner: Callable[[Sequence[float]], float], repeat: int, fast: float
) -> tuple[float, list[float]]:
    runner(durations(WARM_UP, fast))
    bound = lower_bound(chain_tasks(seconds), parallel=PARALLEL)[0]
    ratios = [runner(seconds) / bound for _ in range(repeat)]
    return statistics.median(ratios), ratios


def _measured(
    seconds: Sequence[float],
    runner: Callable[[Sequence[float]], float],
    repeat: int,
    fast: float,
    *,
    floor: float | None = None,
    as_run: list[float] | None = None,
) -> list[Measured]:
    median, ratios = _ratios(seconds, runner, repeat, fast)
    notes = [f"median of {len(ratios)} ({', '.join(f'{r:.3f}' for r in ratios)})"]
    if floor is not None:
        notes.append(f"a zero-overhead run of the same policy: {floor:.3f}")
    if as_run:
        ran = statistics.median(as_run[-len(ratios) :])
        notes.append(f"against the bound of the durations as they ran: {ran:.3f}")
    return [Measured(median, "; ".join(notes))]


def _template(system: str, *, target: Target | None = None, note: str = "") -> Row:
    return Row(
        scenario=NAME, system=system, metric=METRIC, value=None, unit="", target=target, note=note
    )


def run(*, quick: bool) -> list[Row]:
    """Makespan / lower bound of the chained maps, with a barrier, and on Dask."""
    n, fast, repeat = (40, 0.005, 1) if quick else (200, 0.010, 3)
    seconds = durations(n, fast)
    bound, critical, spread = lower_bound(chain_tasks(seconds), parallel=PARALLEL)
    shape = (
        f"{n} items, {fast * 1e3:g} ms each, {fast * SLOWER * 1e3:g} ms 1 in {EVERY}; bound "
        f"{bound * 1e3:.0f} ms (critical path {critical * 1e3:.0f}, work/8 {spread * 1e3:.0f})"
    )

    def floor(barrier: bool) -> float:
        return policy_floor(seconds, parallel=PARALLEL, barrier=barrier) / bound

    chained: list[float] = []
    walled: list[float] = []
    rows = probe(
        [_template("stepvisor", target=Target(on="value", op="<=", limit=1.05), note=shape)],
        lambda: _measured(
            seconds,
            lambda s: _stepvisor(s, barrier=False, as_run=chained),
            repeat,
            fast,
            floor=floor(False),
            as_run=chained,
        ),
    )
    rows += probe(
        [
            _template(
                "stepvisor with a barrier (b requires a's whole list)",
                target=Target(on="ratio", op="<", limit=1.0, text="chained below it"),
            )
        ],
        lambda: _measured(
            seconds,
            lambda s: _stepvisor(s, barrier=True, as_run=walled),
            repeat,
            fast,
            floor=floor(True),
            as_run=walled,
        ),
    )
    rows += probe(
        [_template(f"Dask threaded scheduler ({PARALLEL} workers)", note="b[i] needs a[i] only")],
        lambda: _measured(seconds, _dask, repeat, fast),
        requires=("dask",),
    )
    return rows
