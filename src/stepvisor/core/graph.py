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
from typing import TYPE_CHECKING

from stepvisor.errors import (
    CycleError,
    DuplicateStepError,
    MissingArtifactError,
    UnknownDependencyError,
)

if TYPE_CHECKING:
    from stepvisor.core.model import Step

__all__ = ["Graph"]


@dataclass(frozen=True, slots=True)
class Graph:
    """The validated DAG, indexed by canonical rank.

    ``order[r]`` is the id of the step of rank ``r``; ``index`` maps an id to
    the position of the step in the workflow's ``steps`` tuple and ``rank`` to
    its canonical rank.  ``deps[r]`` / ``dependents[r]`` are sorted ranks.
    ``priority[r]`` is the length (by cost) of the longest chain of work that
    starts at ``r``: the critical-path priority used to pick the next step.
    """

    order: tuple[str, ...]
    index: dict[str, int]
    rank: dict[str, int]
    step_at_rank: tuple[int, ...]
    deps: tuple[tuple[int, ...], ...]
    dependents: tuple[tuple[int, ...], ...]
    priority: tuple[float, ...]

    @classmethod
    def build(cls, steps: Sequence[Step]) -> Graph:
        """Validate ``steps`` as a DAG and compute its canonical order."""
        index = _unique_index(steps)
        edges = _edges(steps, index)
        order = _canonical_order(edges)
        rank = {sid: r for r, sid in enumerate(order)}
        deps = tuple(tuple(sorted(rank[d] for d in edges[sid])) for sid in order)
        dependents_lists: list[list[int]] = [[] for _ in order]
        for r, ds in enumerate(deps):
            for d in ds:
                dependents_lists[d].append(r)
        dependents = tuple(tuple(sorted(ds)) for ds in dependents_lists)

        step_at_rank = tuple(index[sid] for sid in order)
        costs = [steps[i].cost for i in step_at_rank]
        priority = [0.0] * len(order)
        for r in range(len(order) - 1, -1, -1):
            below = max((priority[c] for c in dependents[r]), default=0.0)
            priority[r] = costs[r] + below
        return cls(
            order=order,
            index=index,
            rank=rank,
            step_at_rank=step_at_rank,
            deps=deps,
            dependents=dependents,
            priority=tuple(priority),
        )

    def ancestors(self, r: int) -> set[int]:
        """Every rank that ``r`` depends on, directly or not."""
        return _reachable(self.deps, r)

    def descendants(self, r: int) -> set[int]:
        """Every rank that depends on ``r``, directly or not."""
        return _reachable(self.dependents, r)


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


def _unique_index(steps: Sequence[Step]) -> dict[str, int]:
    """Step id -> position; two steps with one id are refused."""
    index: dict[str, int] = {}
    for i, step in enumerate(steps):
        if step.id in index:
            raise DuplicateStepError(
                f"two steps have the id {step.id!r} (positions {index[step.id]} and {i}); "
                "step ids must be unique: rename one of them"
            )
        index[step.id] = i
    return index


def _edges(steps: Sequence[Step], index: Mapping[str, int]) -> dict[str, set[str]]:
    """Step id -> the ids it waits for: its ``needs``, and the creators of what it ``requires``."""
    creators: dict[str, list[str]] = {}
    for step in steps:
        for name in step.creates:
            creators.setdefault(name, []).append(step.id)
    edges: dict[str, set[str]] = {step.id: set() for step in steps}
    for step in steps:
        for need in step.needs:
            if need not in index:
                hint = _closest(need, index)
                raise UnknownDependencyError(
                    f"step {step.id!r} needs {need!r}, but there is no step with that id"
                    + (f" (did you mean {hint!r}?)" if hint else "")
                    + "; add that step or remove it from needs"
                )
            edges[step.id].add(need)
        for name in step.requires:
            makers = creators.get(name)
            if not makers:
                raise MissingArtifactError(
                    f"step {step.id!r} requires the artifact {name!r}, but no step "
                    "creates it; add it to some step's creates, or remove it from requires"
                )
            edges[step.id].update(maker for maker in makers if maker != step.id)
    return edges


def _canonical_order(edges: dict[str, set[str]]) -> tuple[str, ...]:
    """Kahn's algorithm, always taking the smallest ready id; raises on a cycle."""
    waiting = {sid: len(ds) for sid, ds in edges.items()}
    users: dict[str, list[str]] = {sid: [] for sid in edges}
    for sid, ds in edges.items():
        for d in ds:
            users[d].append(sid)
    ready = [sid for sid, n in waiting.items() if n == 0]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        sid = heapq.heappop(ready)
        order.append(sid)
        for user in users[sid]:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, user)
    if len(order) != len(edges):
        stuck = {sid for sid, n in waiting.items() if n > 0}
        cycle = _find_cycle(edges, stuck)
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
