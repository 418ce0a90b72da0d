"""What keeps a big run linear, checked on structure rather than on time.

A run of a million steps stays linear only if nothing built per step or per
transition grows with the run, and if the graph facts computed on integers
(``Graph.build``) still say what the readable definitions say.  Each test
here would catch a change that slows big runs down without failing any
behavioural test.
"""

from __future__ import annotations

import gc
import heapq
import random

from hypothesis import given, settings
from hypothesis import strategies as st

import stepvisor as sv
from stepvisor.core._inputs import Inputs
from stepvisor.core.graph import Graph
from stepvisor.policies.concurrency import Scheduler


def noop(ctx: sv.StepContext) -> None:
    return None


def _random_steps(seed: int, n: int) -> list[sv.Step]:
    """A random DAG of ``n`` steps, listed in a shuffled order, some edges through artifacts."""
    rng = random.Random(seed)
    ids = [f"s{rng.randrange(10**6):06d}-{i}" for i in range(n)]  # id order != list order
    steps = []
    for i, sid in enumerate(ids):
        earlier = ids[:i]
        needs = rng.sample(earlier, min(len(earlier), rng.randrange(3)))
        requires = [f"art-{ids[j]}" for j in rng.sample(range(i), min(i, rng.randrange(2)))]
        cost = rng.choice([1.0, 1.0, 0.5, 3.0])
        steps.append(
            sv.Step(
                sid,
                noop,
                needs=needs,
                requires=requires,
                creates=[f"art-{sid}"],
                metadata={"cost": cost} if cost != 1.0 else None,
            )
        )
    rng.shuffle(steps)
    return steps


def _reference(steps: list[sv.Step]) -> tuple[tuple[str, ...], dict[str, float]]:
    """Canonical order and priority by their definitions, on ids (as Graph.build once did)."""
    makers = {f"art-{s.id}": s.id for s in steps}
    deps = {s.id: set(s.needs) | {makers[a] for a in s.requires} for s in steps}
    waiting = {sid: len(ds) for sid, ds in deps.items()}
    users: dict[str, list[str]] = {sid: [] for sid in deps}
    for sid, ds in deps.items():
        for d in ds:
            users[d].append(sid)
    ready = [sid for sid, k in waiting.items() if k == 0]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        sid = heapq.heappop(ready)
        order.append(sid)
        for user in users[sid]:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, user)
    cost = {s.id: s.cost for s in steps}
    priority: dict[str, float] = {}
    for sid in reversed(order):
        priority[sid] = cost[sid] + max((priority[u] for u in users[sid]), default=0.0)
    return tuple(order), priority


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(1, 60))
def test_graph_facts_match_their_definitions(seed: int, n: int) -> None:
    steps = _random_steps(seed, n)
    graph = Graph.build(steps)
    order, priority = _reference(steps)
    assert graph.order == order
    assert graph.rank == {sid: r for r, sid in enumerate(order)}
    assert graph.index == {s.id: i for i, s in enumerate(steps)}
    assert [steps[i].id for i in graph.step_at_rank] == list(order)
    assert graph.priority == tuple(priority[sid] for sid in order)
    for r, ds in enumerate(graph.deps):
        assert list(ds) == sorted(ds)
        assert all(r in graph.dependents[d] for d in ds)
    assert sum(map(len, graph.deps)) == sum(map(len, graph.dependents))
    for d, users in enumerate(graph.dependents):
        assert list(users) == [r for r, ds in enumerate(graph.deps) if d in ds]  # sorted
    # The scheduler's preference: highest priority first, ties to the smaller id.
    preferred = sorted(range(n), key=lambda r: (-graph.priority[r], graph.order[r]))
    assert list(graph.urgency) == preferred
    assert [graph.urgency_of[r] for r in graph.urgency] == list(range(n))


def test_scheduler_takes_in_urgency_order_and_its_heaps_hold_no_containers() -> None:
    """A heap of (priority, id, rank) tuples made one GC-tracked object per ready step."""
    steps = [sv.Step(f"s{i:04d}", noop, metadata={"cost": float(i % 7)}) for i in range(500)]
    wf = sv.Workflow("wide", steps)
    sched = Scheduler(wf.graph, max_parallel=500, pool_of=[None] * 500, pool_limits={})
    sched.initial_ready()
    held = [item for heap in sched._heaps.values() for item in heap]
    assert len(held) == 500
    assert not any(gc.is_tracked(item) for item in held)
    taken = [sched.take() for _ in range(500)]
    assert taken == list(wf.graph.urgency)
    ids = [wf.graph.order[r] for r in taken if r is not None]
    assert ids[:3] == ["s0006", "s0013", "s0020"]  # cost 6, ties by id


def test_a_step_nobody_depends_on_keeps_no_view() -> None:
    """Views are dropped when their last dependant reads them; a leaf's never would be."""
    wf = sv.Workflow(
        "fan",
        [sv.Step("root", noop), *(sv.Step(f"leaf{i}", noop, needs=["root"]) for i in range(5))],
    )
    graph = wf.graph
    inputs = Inputs(graph)
    inputs.publish(graph.rank["root"], {"x": 1})
    for i in range(5):
        r = graph.rank[f"leaf{i}"]
        assert dict(inputs.of(r)) == {"x": (graph.rank["root"], 1)}
        inputs.publish(r, {f"y{i}": i})
    assert inputs._visible == {}  # root's view went with its last reader, and no leaf kept one
    assert inputs._inputs == {}


def test_steps_without_metadata_or_params_share_one_empty_map() -> None:
    a, b = sv.Step("a", noop), sv.Step("b", noop, metadata={}, params={})
    assert a.metadata is b.metadata is a.params is b.params
    assert dict(a.metadata) == {}
    given_map = sv.Step("c", noop, metadata={"cost": 2}).metadata
    assert sv.Step("d", noop, metadata=given_map).metadata is given_map  # already immutable
    assert sv.Step("e", noop, metadata={"cost": 2}).cost == 2.0
