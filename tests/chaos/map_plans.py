"""Mapped steps in a scenario: which runs get maps, of what shape, with which faults (pure).

:func:`add_maps` takes a scenario of plain steps (what :func:`generate` drew)
and, for some seeds, appends one to three *map groups*.  A group is::

    splitter (a plain step that also returns items_<id>) ─┐
    or fixed items (map_over=[...])                      ├─▶ m (mapped, creates l_m)
                                                         │     │ chained: b[i] after m[i]
                                                         │     ▼
                                                         │    b (maps over l_m) ─▶ c ...
                                                         └─▶ t (requires l_m or l_b: all of it)

Lengths are random, 0 and 1 included; a splitter may return a string, which no
step can map over (the mapped step must fail with a clear error).  A mapped
step's fault strikes only the instances listed in ``bad``, so one run has
failing, crashing, timing-out and succeeding instances of the same step.  Map
runs get more driver kills (``kill_after`` counts instances too, so the kill
lands mid-map) and cancels than plain runs.

Everything here is drawn from a stream of its own (``stepvisor-chaos-map-SEED``):
a seed that gets no map keeps the scenario it had before maps existed.
Store-fault runs get no map (their checks count one store row per step).
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Final

from tests.chaos.scenario import (
    BAD_LIST,
    OWNER_DRIVERS,
    Scenario,
    StepPlan,
    _pick_fault,
    _step_plan,
    _thread_or_async,
    list_name,
    map_size,
)

#: How often a run gets maps, and a map run a driver kill or a cancel of its own.
MAP_RATE: Final = 0.35
MAP_DRIVER_RATE: Final = 0.3
MAP_CANCEL_RATE: Final = 0.15
#: The lengths of lists, 0 and 1 among them.
SIZES: Final = (0, 1, 1, 2, 3, 4, 6, 9, 14)
#: How often a splitter's value is not a list, a map step is faulty, a group chains.
BAD_LIST_RATE: Final = 0.05
MAP_FAULT_RATE: Final = 0.4
CHAIN_RATE: Final = 0.45
CONSUMER_RATE: Final = 0.5


def add_maps(scenario: Scenario) -> Scenario:
    """``scenario`` with map groups appended, for the seeds that draw them."""
    rng = random.Random(f"stepvisor-chaos-map-{scenario.seed}")
    if scenario.store_fault != "none" or rng.random() >= MAP_RATE:
        return scenario
    steps = list(scenario.steps)
    for _ in range(rng.randint(1, 3)):
        _add_group(rng, steps, scenario)
    planned = replace(scenario, steps=tuple(steps))
    driver, store, cancel_at, cancel_via = (
        scenario.driver,
        scenario.store,
        scenario.cancel_at,
        scenario.cancel_via,
    )
    if driver == "none" and cancel_at is None and rng.random() < MAP_DRIVER_RATE:
        driver = rng.choices(["resume-here", "resume-program", "kill-twice"], [4, 3, 2])[0]
        store = "sqlite"
    elif driver == "none" and cancel_at is None and rng.random() < MAP_CANCEL_RATE:
        cancel_at = round(rng.uniform(0.0, 0.2), 3)
        cancel_via = "store" if store == "sqlite" and rng.random() < 0.5 else "handle"
    # Attempts begun before the kill, instances counted: the kill lands mid-map often.
    units = sum(max(1, map_size(planned, p)) if p.mapped else 1 for p in steps)
    kill_after = scenario.kill_after
    if driver != "none":
        kill_after = rng.randint(1 if driver in OWNER_DRIVERS else 0, units)
    return replace(
        planned,
        driver=driver,
        store=store,
        cancel_at=cancel_at,
        cancel_via=cancel_via,
        kill_after=kill_after,
    )


def _add_group(rng: random.Random, steps: list[StepPlan], scenario: Scenario) -> None:
    """Append one map group (a mapped step, maybe chained maps, maybe a consumer) to ``steps``."""
    size = rng.choice(SIZES)
    splitters = [i for i, p in enumerate(steps) if not p.mapped and p.emits == -1]
    if splitters and rng.random() < 0.5:
        at = rng.choice(splitters)
        emits = BAD_LIST if rng.random() < BAD_LIST_RATE else size
        steps[at] = replace(steps[at], emits=emits)
        size = max(emits, 0)  # a string is mapped over by no instance
        head = _mapped(rng, steps, scenario, over=steps[at].id, size=size)
    else:
        head = _mapped(rng, steps, scenario, over="list", size=size)
    steps.append(head)
    last = head
    while rng.random() < CHAIN_RATE and len(steps) < 40:
        chained = _mapped(rng, steps, scenario, over=last.id, size=size)
        if rng.random() < 0.15:  # mapping over it and needing all of it: a barrier
            chained = replace(chained, needs=(*chained.needs, last.id))
        steps.append(chained)
        last = chained
    if rng.random() < CONSUMER_RATE:
        needs = _some_earlier(rng, steps)
        fault = "ok"
        executor = _thread_or_async(rng)
        if rng.random() < 0.15:
            fault = _pick_fault(rng, executor=executor, store=scenario.store)
        consumer = _step_plan(
            rng, _new_id(rng, steps), needs, executor, fault, kill_grace=scenario.kill_grace
        )
        wants = rng.choice([head, last])
        steps.append(replace(consumer, requires=(list_name(wants),)))


def _mapped(
    rng: random.Random, steps: list[StepPlan], scenario: Scenario, *, over: str, size: int
) -> StepPlan:
    """A mapped step over ``over`` (``"list"``: ``size`` fixed items), maybe faulty instances."""
    roll = rng.random()
    executor = "process" if roll < 0.25 else ("async" if roll < 0.45 else "thread")
    fault = "ok"
    bad: tuple[int, ...] = ()
    if size and rng.random() < MAP_FAULT_RATE:
        fault = _pick_fault(rng, executor=executor, store=scenario.store)
        bad = tuple(sorted(rng.sample(range(size), k=rng.randint(1, min(size, 3)))))
    needs = tuple(n for n in _some_earlier(rng, steps) if n != over)
    plan = _step_plan(
        rng, _new_id(rng, steps), needs, executor, fault, kill_grace=scenario.kill_grace
    )
    duration = rng.choice([0.0, 0.0, 0.001, 0.005])
    items = size if over == "list" else 0
    return replace(plan, over=over, items=items, bad=bad, duration=duration)


def _new_id(rng: random.Random, steps: list[StepPlan]) -> str:
    return f"{rng.choice('abcdefgh')}{len(steps):02d}"


def _some_earlier(rng: random.Random, steps: list[StepPlan]) -> tuple[str, ...]:
    earlier = [p.id for p in steps if rng.random() < 0.1]
    return tuple(rng.sample(earlier, k=min(len(earlier), 2)))
