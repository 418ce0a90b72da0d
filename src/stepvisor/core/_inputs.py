"""What each step sees: its ancestors' artifacts, merged in canonical order.

Every step that succeeded publishes a *view*: the merged view of its
dependencies, overlaid with its own outputs, each value tagged with the
canonical rank of the step that made it.  A step's inputs are the merge of its
dependencies' views, where a name made twice takes the value of the later
rank.  Views are persistent maps, so publishing shares structure instead of
copying, and a view is dropped once every dependant has read it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pyrsistent import pmap
from pyrsistent.typing import PMap

from stepvisor.core.graph import Graph

__all__ = ["Inputs", "Visible"]

#: A merged view of artifacts: name -> (canonical rank of its creator, value).
Visible = PMap[str, tuple[int, Any]]
_EMPTY: Visible = pmap()


def _merge(maps: list[Visible]) -> Visible:
    maps = [m for m in maps if m]
    if not maps:
        return _EMPTY
    base = max(maps, key=len)
    if len(maps) == 1:
        return base
    ev = base.evolver()
    for m in maps:
        if m is base:
            continue
        for name, entry in m.items():
            try:
                current = ev[name]
            except KeyError:
                ev[name] = entry
                continue
            if current[0] < entry[0]:
                ev[name] = entry
    return ev.persistent()


class Inputs:
    """The views of one run, by canonical rank."""

    __slots__ = ("_graph", "_inputs", "_users_left", "_visible")

    def __init__(self, graph: Graph) -> None:
        self._graph = graph
        self._visible: dict[int, Visible] = {}
        self._inputs: dict[int, Visible] = {}
        self._users_left = [len(ds) for ds in graph.dependents]

    def of(self, r: int) -> Visible:
        """The merged view ``r`` sees (computed once, kept until ``r`` ends)."""
        deps = self._graph.deps[r]
        if not deps:  # a root sees nothing: no view to compute, keep or drop
            return _EMPTY
        cached = self._inputs.get(r)
        if cached is not None:
            return cached
        merged = _merge([self._visible[d] for d in deps])
        self._inputs[r] = merged
        for d in deps:
            self._users_left[d] -= 1
            if self._users_left[d] == 0:
                self._visible.pop(d, None)
        return merged

    def partial(self, r: int, skip: int) -> Visible:
        """What ``r`` sees of its dependencies but ``skip``, which has not ended yet.

        For a map chained to the map ``skip``: its instances start before
        ``skip`` has ended, and see its output as their item, not as an input.
        Nothing is cached or dropped: :meth:`of` does that when ``r`` ends.
        """
        return _merge([self._visible[d] for d in self._graph.deps[r] if d != skip])

    def publish(self, r: int, outputs: Mapping[str, Any]) -> None:
        """``r`` succeeded with ``outputs``: its dependants will see them.

        A step nobody depends on keeps no view: nothing would ever read or
        drop it, and in a wide run those views were most of what stayed alive.
        """
        if not self._users_left[r]:
            self._inputs.pop(r, None)
            return
        base = self.of(r) if self._graph.deps[r] else _EMPTY
        if outputs:
            ev = base.evolver()
            for name, value in outputs.items():
                ev[name] = (r, value)
            base = ev.persistent()
        self._visible[r] = base
        self._inputs.pop(r, None)

    def forget(self, r: int) -> None:
        """``r`` ended without success: drop its merged inputs."""
        self._inputs.pop(r, None)
