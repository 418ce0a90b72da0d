"""DAG facts of a workflow: validation, canonical order, dependencies, priorities.

Everything here is computed once when a :class:`~stepvisor.core.model.Workflow` is
created and is pure.  Steps are numbered by their *rank* in the canonical
order (a topological order with ties broken by step id), so the rest of the
engine compares small integers instead of strings::

    steps --(ids, needs, requires/creates)--> edges --Kahn + min-heap on id--> order
          --reverse order, longest path by cost--> priority
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING, NamedTuple, NoReturn

from stepvisor.core.records import parse_instance_id
from stepvisor.errors import (
    CycleError,
    DuplicateStepError,
    MissingArtifactError,
    UnknownDependencyError,
)

if TYPE_CHECKING:
    from stepvisor.core.model import Step

__all__ = ["Graph", "MapLink"]


@dataclass(frozen=True, slots=True)
class Graph:
    """The validated DAG, indexed by canonical rank.

    ``order[r]`` is the id of the step of rank ``r``; ``index`` maps an id to
    the position of the step in the workflow's ``steps`` tuple and ``rank`` to
    its canonical rank.  ``deps[r]`` / ``dependents[r]`` are sorted ranks.
    ``priority[r]`` is the length (by cost) of the longest chain of work that
    starts at ``r``: the critical-path priority used to pick the next step.
    ``urgency`` lists every rank in the order the scheduler prefers them
    (highest priority first, ties to the smaller step id), and ``urgency_of[r]``
    is ``r``'s place in it: the scheduler's heaps hold these small integers.
    ``maps`` holds the mapped steps by rank (see :class:`MapLink`); it is empty
    for a workflow without them.
    """

    order: tuple[str, ...]
    index: dict[str, int]
    rank: dict[str, int]
    step_at_rank: tuple[int, ...]
    deps: tuple[tuple[int, ...], ...]
    dependents: tuple[tuple[int, ...], ...]
    priority: tuple[float, ...]
    urgency: tuple[int, ...]
    urgency_of: tuple[int, ...]
    maps: Mapping[int, MapLink]

    @classmethod
    def build(cls, steps: Sequence[Step]) -> Graph:
        """Validate ``steps`` as a DAG and compute its canonical order.

        Everything is computed on positions (small integers) rather than on
        ids: at a million steps, every lookup in a dict keyed by id is a cache
        miss, and the first version of this, all dicts and sets of ids, cost
        fifteen times more at 1,000,000 steps than at 100,000.  Ids are
        compared once, in one sort, which gives the tie order of both the
        canonical order and the scheduler.
        """
        # One int object per number, shared by every table below (an int
        # above 256 is an object of its own: 28 bytes, per table, per step).
        ranks = list(range(len(steps)))
        ids = [step.id for step in steps]
        index = _unique_index(steps, ids, ranks)
        creators = _creators(steps)
        waits_for = _edges(steps, index, creators)
        links = _map_links(steps, creators)
        by_id = sorted(ranks, key=ids.__getitem__)
        step_at_rank = _canonical_order(waits_for, by_id, ids, ranks)
        n = len(step_at_rank)
        rank_at = [0] * n  # position -> rank
        for r, i in enumerate(step_at_rank):
            rank_at[i] = ranks[r]
        order = tuple([ids[i] for i in step_at_rank])
        deps = tuple([_ranks_of(waits_for[i], rank_at) for i in step_at_rank])
        start, flat = _reverse(deps, ranks)  # filled in increasing r: sorted already
        dependents = tuple([tuple(flat[start[r] : start[r + 1]]) for r in ranks])
        del start, flat
        priority = _priority(dependents, [_work(steps[i]) for i in step_at_rank])
        # Highest priority first, ties to the smaller id: a stable sort of the
        # ranks in id order by priority alone.
        urgency = sorted([rank_at[i] for i in by_id], key=priority.__getitem__, reverse=True)
        return cls(
            order=order,
            index=index,
            rank=dict(zip(order, ranks, strict=True)),
            step_at_rank=step_at_rank,
            deps=deps,
            dependents=dependents,
            priority=priority,
            urgency=tuple(urgency),
            urgency_of=_inverse(urgency, ranks),
            maps={
                rank_at[i]: MapLink(art, None if src is None else rank_at[src])
                for i, (art, src) in links.items()
            },
        )

    def ancestors(self, r: int) -> set[int]:
        """Every rank that ``r`` depends on, directly or not."""
        return _reachable(self.deps, r)

    def descendants(self, r: int) -> set[int]:
        """Every rank that depends on ``r``, directly or not."""
        return _reachable(self.dependents, r)


def _reverse(links: Sequence[Sequence[int]], ints: list[int]) -> tuple[list[int], list[int]]:
    """Who links to each index: ``flat[start[i] : start[i + 1]]``, in increasing order.

    Compressed rows (two flat lists) rather than a list per index: at a
    million steps, a million lists alive at once were promoted to the GC's
    oldest generation, and each 25 % of growth there is a full pass over
    every object of the workflow (making and building a million steps took
    16 full passes with two such lists, 11 without; the build 3.9 -> 2.6 s).
    ``flat`` holds the objects of ``ints``, so no int is made twice.
    """
    counts = [0] * (len(links) + 1)
    for ds in links:
        for d in ds:
            counts[d + 1] += 1
    start = list(accumulate(counts))
    fill = start[:]
    flat = [0] * start[-1]
    for i, ds in zip(ints, links, strict=True):
        for d in ds:
            flat[fill[d]] = i
            fill[d] += 1
    return start, flat


def _ranks_of(positions: Sequence[int], rank_at: list[int]) -> tuple[int, ...]:
    if not positions:
        return ()
    if len(positions) == 1:
        return (rank_at[positions[0]],)
    return tuple(sorted([rank_at[i] for i in positions]))


def _work(step: Step) -> float:
    """A step's cost for critical-path priority: a mapped step's counts its instances.

    A map over fixed items is ``cost`` per item; a map over an artifact has
    an unknown length when the graph is built, so its ``cost`` is taken as
    the whole map's (say so with ``metadata={"cost": ...}``).
    """
    over = step.map_over
    if over is None or type(over) is str:
        return step.cost
    return step.cost * len(over)


def _priority(dependents: Sequence[Sequence[int]], costs: list[float]) -> tuple[float, ...]:
    """Longest chain of work (by cost) from each rank, computed from the last rank back."""
    priority = costs  # filled in place, from the end: the dependents of r are all > r
    for r in range(len(costs) - 1, -1, -1):
        below = dependents[r]
        if below:
            priority[r] = costs[r] + max([priority[c] for c in below])
    return tuple(priority)


def _inverse(permutation: list[int], ranks: list[int]) -> tuple[int, ...]:
    """``out[permutation[k]] == k`` (sharing the int objects of ``ranks``)."""
    out = [0] * len(permutation)
    for k, r in enumerate(permutation):
        out[r] = ranks[k]
    return tuple(out)


def _reachable(links: Sequence[Sequence[int]], r: int) -> set[int]:
    """Every rank reachable from ``r`` along ``links`` (not ``r`` itself, in a DAG)."""
    seen: set[int] = set()
    stack = list(links[r])
    while stack:
        d = stack.pop()
        if d not in seen:
            seen.add(d)
            stack.extend(links[d])
    return seen


def _unique_index(steps: Sequence[Step], ids: list[str], ints: list[int]) -> dict[str, int]:
    """Step id -> position; two steps with one id are refused."""
    index = dict(zip(ids, ints, strict=True))
    if len(index) == len(steps):
        return index
    index.clear()
    for i, step in enumerate(steps):
        if step.id in index:
            raise DuplicateStepError(
                f"two steps have the id {step.id!r} (positions {index[step.id]} and {i}); "
                "step ids must be unique: rename one of them"
            )
        index[step.id] = i
    raise AssertionError("unreachable: a duplicate id was counted but not found")


def _creators(steps: Sequence[Step]) -> dict[str, list[int]]:
    """Artifact name -> the positions of the steps that create it."""
    creators: dict[str, list[int]] = {}
    for i, step in enumerate(steps):
        for name in step.creates:
            creators.setdefault(name, []).append(i)
    return creators


def _edges(
    steps: Sequence[Step], index: Mapping[str, int], creators: Mapping[str, list[int]]
) -> list[tuple[int, ...]]:
    """Position -> the positions it waits for: its needs, and the creators of its requires.

    A step mapped over an artifact waits for that artifact's creators too.
    """
    edges: list[tuple[int, ...]] = []
    for i, step in enumerate(steps):
        try:
            needs = tuple([index[need] for need in step.needs])
        except KeyError:
            _unknown_need(step, index)
        over = step.map_over
        if not step.requires and type(over) is not str:
            edges.append(needs)
            continue
        waits = set(needs)
        names = (*step.requires, over) if type(over) is str else step.requires
        for name in names:
            makers = creators.get(name)
            if not makers:
                what, fix = ("maps over", "map over") if name == over else ("requires", "")
                raise MissingArtifactError(
                    f"step {step.id!r} {what} the artifact {name!r}, but no step creates "
                    "it; add it to some step's creates, or "
                    + (f"{fix} an artifact a step creates" if fix else "remove it from requires")
                )
            waits.update(maker for maker in makers if maker != i)
        edges.append(tuple(waits))
    return edges


class MapLink(NamedTuple):
    """How a mapped step gets its items.

    ``artifact`` is the name it maps over (``None``: the items are fixed, in
    ``Step.map_over``).  ``source`` is set when that artifact's one creator is
    itself mapped and the step does not otherwise wait for all of it: then the
    two maps are chained instance by instance (``b[i]`` waits for ``a[i]``
    alone), with no barrier between them.
    """

    artifact: str | None
    source: int | None


def _map_links(
    steps: Sequence[Step], creators: Mapping[str, list[int]]
) -> dict[int, tuple[str | None, int | None]]:
    """Position -> (artifact, chained source position) of every mapped step.

    Also refuses a step id that an instance of a mapped step would have.
    """
    links: dict[int, tuple[str | None, int | None]] = {}
    for i, step in enumerate(steps):
        over = step.map_over
        if over is None:
            continue
        if type(over) is not str:
            links[i] = (None, None)
            continue
        makers = creators[over]
        source = makers[0] if len(makers) == 1 and steps[makers[0]].mapped else None
        if source is not None and _waits_whole(step, steps[source]):
            source = None
        links[i] = (over, source)
    if links:
        _check_instance_ids(steps, links)
    return links


def _waits_whole(step: Step, source: Step) -> bool:
    """Whether ``step`` waits for all of ``source`` besides mapping over its artifact."""
    return source.id in step.needs or any(name in source.creates for name in step.requires)


def _check_instance_ids(steps: Sequence[Step], links: Mapping[int, object]) -> None:
    """No step may be named like an instance of a mapped step (``score[3]``)."""
    mapped_ids = {steps[i].id for i in links}
    for step in steps:
        sid = step.id
        parsed = parse_instance_id(sid)
        if parsed is not None and parsed[0] in mapped_ids:
            head = parsed[0]
            raise DuplicateStepError(
                f"the step id {sid!r} is the id of an instance of the mapped step {head!r}; "
                f"rename the step (instance ids are {head!r} followed by [index])"
            )


def _unknown_need(step: Step, index: Mapping[str, int]) -> NoReturn:
    need = next(need for need in step.needs if need not in index)
    hint = _closest(need, index)
    raise UnknownDependencyError(
        f"step {step.id!r} needs {need!r}, but there is no step with that id"
        + (f" (did you mean {hint!r}?)" if hint else "")
        + "; add that step or remove it from needs"
    )


def _canonical_order(
    edges: list[tuple[int, ...]], by_id: list[int], ids: list[str], ints: list[int]
) -> tuple[int, ...]:
    """Kahn's algorithm, always taking the smallest ready id; raises on a cycle.

    The heap holds each step's place in id order (``by_id``), so that it
    compares integers, not strings.  Returns positions in canonical order.
    """
    n = len(edges)
    key_of = [0] * n
    for k, i in enumerate(by_id):
        key_of[i] = k
    waiting = [len(ds) for ds in edges]
    start, users = _reverse(edges, ints)
    ready = [key_of[i] for i in range(n) if not waiting[i]]
    heapq.heapify(ready)
    order: list[int] = []
    pop, push = heapq.heappop, heapq.heappush
    while ready:
        i = by_id[pop(ready)]
        order.append(i)
        for user in users[start[i] : start[i + 1]]:
            waiting[user] -= 1
            if not waiting[user]:
                push(ready, key_of[user])
    if len(order) != n:
        stuck = {ids[i] for i in range(n) if waiting[i] > 0}
        by_name = {ids[i]: {ids[d] for d in ds} for i, ds in enumerate(edges) if ids[i] in stuck}
        cycle = _find_cycle(by_name, stuck)
        raise CycleError(
            f"the steps form a cycle: {' -> '.join(cycle)}; "
            "remove one of these dependencies so the workflow is a DAG",
            cycle=cycle,
        )
    return tuple(order)


def _find_cycle(edges: dict[str, set[str]], stuck: set[str]) -> tuple[str, ...]:
    """One cycle among ``stuck`` steps, read in the direction work flows.

    Every stuck step has a stuck dependency, so walking dependencies from the
    smallest id must revisit a step; the loop found is reversed so that it reads
    ``a -> b`` as "b runs after a", and rotated to start at its smallest id.
    """
    start = min(stuck)
    path: list[str] = []
    seen: dict[str, int] = {}
    node = start
    while node not in seen:
        seen[node] = len(path)
        path.append(node)
        node = min(d for d in edges[node] if d in stuck)
    loop = path[seen[node] :]
    loop.reverse()
    first = loop.index(min(loop))
    loop = loop[first:] + loop[:first]
    return (*loop, loop[0])


def _closest(name: str, candidates: Mapping[str, int]) -> str | None:
    import difflib  # noqa: PLC0415 - only on the error path

    matches = difflib.get_close_matches(name, list(candidates), n=1)
    return matches[0] if matches else None
