"""The scheduler and graph, driven directly without threads."""

from __future__ import annotations

import stepvisor as sv
from stepvisor.policies.concurrency import Scheduler


def noop(ctx: sv.StepContext) -> None:
    return None


def _sched(
    wf: sv.Workflow, max_parallel: int = 8, pools: dict[str, int] | None = None
) -> Scheduler:
    graph = wf.graph
    s = Scheduler(
        graph,
        max_parallel=max_parallel,
        pool_of=[wf.step(sid).pool for sid in graph.order],
        pool_limits=pools or {},
    )
    s.initial_ready()
    return s


def _ids(wf: sv.Workflow, ranks: list[int]) -> list[str]:
    return [wf.graph.order[r] for r in ranks]


def test_canonical_order_is_topological_with_ties_by_id() -> None:
    wf = sv.Workflow(
        "wf",
        steps=[
            sv.Step("z", noop),
            sv.Step("b", noop, needs=["z"]),
            sv.Step("a", noop, needs=["z"]),
            sv.Step("c", noop),
        ],
    )
    assert wf.step_ids == ("c", "z", "a", "b")


def test_critical_path_goes_first() -> None:
    # "short" is alphabetically first, but "long" heads a chain of 3 steps.
    wf = sv.Workflow(
        "wf",
        steps=[
            sv.Step("short", noop),
            sv.Step("long", noop),
            sv.Step("long2", noop, needs=["long"]),
            sv.Step("long3", noop, needs=["long2"]),
        ],
    )
    s = _sched(wf, max_parallel=1)
    first = s.take()
    assert first is not None
    assert _ids(wf, [first]) == ["long"]


def test_cost_metadata_changes_priority() -> None:
    wf = sv.Workflow(
        "wf",
        steps=[
            sv.Step("a", noop, metadata={"cost": 1}),
            sv.Step("b", noop, metadata={"cost": 10}),
            sv.Step("c", noop, metadata={"cost": 5}),
        ],
    )
    s = _sched(wf, max_parallel=3)
    taken = [s.take(), s.take(), s.take()]
    assert _ids(wf, [r for r in taken if r is not None]) == ["b", "c", "a"]


def test_ties_break_by_step_id() -> None:
    wf = sv.Workflow("wf", steps=[sv.Step(x, noop) for x in ("d", "b", "c", "a")])
    s = _sched(wf, max_parallel=4)
    taken = [s.take() for _ in range(4)]
    assert _ids(wf, [r for r in taken if r is not None]) == ["a", "b", "c", "d"]


def test_bound_is_never_exceeded_and_release_frees_a_slot() -> None:
    wf = sv.Workflow("wf", steps=[sv.Step(f"s{i:02d}", noop) for i in range(20)])
    s = _sched(wf, max_parallel=8)
    running = [s.take() for _ in range(8)]
    assert None not in running
    assert s.take() is None
    assert s.running == 8
    first = running[0]
    assert first is not None
    s.release(first)
    assert s.take() is not None
    assert s.take() is None


def test_pool_caps_its_steps_but_not_others() -> None:
    steps = [sv.Step(f"db{i}", noop, pool="db") for i in range(5)]
    steps += [sv.Step(f"x{i}", noop) for i in range(3)]
    wf = sv.Workflow("wf", steps=steps)
    s = _sched(wf, max_parallel=8, pools={"db": 2})
    taken = []
    while (r := s.take()) is not None:
        taken.append(r)
    ids = _ids(wf, taken)
    assert sorted(i for i in ids if i.startswith("db")) == ["db0", "db1"]
    assert sorted(i for i in ids if i.startswith("x")) == ["x0", "x1", "x2"]


def test_step_is_ready_the_moment_its_deps_succeed() -> None:
    wf = sv.Workflow(
        "wf",
        steps=[sv.Step("a", noop), sv.Step("b", noop), sv.Step("c", noop, needs=["b"])],
    )
    s = _sched(wf, max_parallel=8)
    a, b = s.take(), s.take()
    assert a is not None
    assert b is not None
    assert s.take() is None
    made = s.succeeded(wf.graph.rank["b"])
    assert _ids(wf, made) == ["c"]
    assert s.take() == wf.graph.rank["c"]


def test_resumed_steps_count_as_done() -> None:
    wf = sv.Workflow("wf", steps=[sv.Step("a", noop), sv.Step("b", noop, needs=["a"])])
    graph = wf.graph
    s = Scheduler(graph, max_parallel=2, pool_of=[None, None], pool_limits={})
    s.initial_ready([graph.rank["a"]])
    assert s.take() == graph.rank["b"]
    assert s.take() is None


def _chain() -> sv.Workflow:
    def split(ctx: sv.StepContext) -> dict[str, list[int]]:
        return {"xs": [0, 1, 2, 3]}

    return sv.Workflow(
        "chain",
        steps=[
            sv.Step("split", split, creates=["xs"]),
            sv.Step("a", noop, map_over="xs", creates=["ys"]),
            sv.Step("b", noop, map_over="ys"),
        ],
    )


def _chain_sched(wf: sv.Workflow) -> Scheduler:
    s = _sched(wf)
    assert s.take() == wf.graph.rank["split"]  # the root, ready from the start
    return s


def _taken(s: Scheduler, n: int) -> list[tuple[int, int]]:
    out = []
    for _ in range(n):
        r = s.take(limit=100)
        assert r is not None
        out.append((r, s.taken_index))
    return out


def test_a_chained_instance_whose_upstream_took_longest_goes_first() -> None:
    wf = _chain()
    s = _chain_sched(wf)
    b = wf.graph.rank["b"]
    for index, took in [(0, 0.001), (1, 0.050), (2, 0.001), (3, 0.4)]:
        s.push_chained(b, index, took)
    assert _taken(s, 4) == [(b, 3), (b, 1), (b, 0), (b, 2)]  # longest first, ties by index


def test_chained_instances_of_like_times_keep_index_order_and_the_rest_is_unchanged() -> None:
    wf = _chain()
    s = _chain_sched(wf)
    a, b = wf.graph.rank["a"], wf.graph.rank["b"]
    s.push_all(a, 3)
    for index in (2, 0, 1):  # upstream times within one power of two: like times
        s.push_chained(b, index, 0.0011 + index * 0.0001)
    s.push_chained(b, 3, None)  # no time known: after those with one
    # The map before it is more urgent (longer path) and goes in index order.
    assert _taken(s, 7) == [(a, 0), (a, 1), (a, 2), (b, 0), (b, 1), (b, 2), (b, 3)]
