"""Which step runs next: eager readiness, the global bound, pools, priority.

The :class:`Scheduler` is deterministic and single-threaded: the Supervisor
drives it from its one thread, and tests drive it directly, without threads.

* A step is *ready* the moment every step it depends on has succeeded; there
  is no wave barrier.
* At most ``max_parallel`` steps run at once, and at most ``pools[name]`` of the
  steps in a named pool.
* Among ready steps that fit, the one with the longest chain of work still
  depending on it (critical path, by ``metadata["cost"]``) goes first; ties go
  to the smaller step id.  Each pool keeps its own heap so a full pool never
  blocks steps of other pools.  The heaps hold each step's place in that
  preference order (``Graph.urgency_of``), computed once per workflow: an
  integer compares faster than a (priority, id) tuple, and a heap of a
  million ready steps holds no tuple for the GC to traverse.
* A mapped step is never queued itself: once its dependencies are met it is
  *expandable* (the machine learns its list and queues its instances).  An
  instance is queued as one integer too, ``urgency << 32 | index``: the step's
  place, then the index, which is the canonical order of instances.  A step
  mapped instance by instance over another map's artifact (a chained map)
  waits for that map's *expansion*, not its success.
* Among the instances of a chained map, the one whose upstream instance took
  longest goes first (longest processing time first, with the upstream
  instance's time as the estimate: an item slow in one map is likely slow in
  the next).  Started in index order instead, a slow item found late runs
  alone at the end while the other slots idle; the chained-map benchmark
  (``--only map_chain``) measures both.  In a workflow with chained maps the
  key is ``urgency << 38 | hint << 32 | index``, ``hint`` being 63 minus the
  bit length of the upstream time in microseconds (63 for everything else).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence

from stepvisor.core.graph import Graph

__all__ = ["Scheduler", "upstream_hint"]

_NO_POOL = ""
#: Bits of a heap key that hold an instance's index (when the workflow has maps).
INDEX_BITS = 32
#: Bits above the index for a chained instance's ordering hint (see the module doc).
HINT_BITS = 6
_NO_HINT = (1 << HINT_BITS) - 1


def upstream_hint(took: float | None) -> int:
    """A chained instance's place among its step's: fewer for a longer upstream time.

    63 minus the bit length of the time in microseconds, so times within a
    power of two tie (and go in index order); 63 when no time is known.
    """
    if took is None or took <= 0:
        return _NO_HINT
    return _NO_HINT - min(_NO_HINT, int(took * 1e6).bit_length())


class Scheduler:
    """Ready queue and running counts for one run, indexed by canonical rank."""

    def __init__(
        self,
        graph: Graph,
        *,
        max_parallel: int,
        pool_of: Sequence[str | None],
        pool_limits: Mapping[str, int],
        hold: frozenset[int] = frozenset(),
    ) -> None:
        self.graph = graph
        self.max_parallel = max_parallel
        self._pool_of = [p or _NO_POOL for p in pool_of]
        self._limits = dict(pool_limits)
        self._waiting = [len(ds) for ds in graph.deps]
        self._urgency = graph.urgency
        self._urgency_of = graph.urgency_of
        self._heaps: dict[str, list[int]] = {}
        self._running_in: dict[str, int] = {}
        self.running = 0
        self.ready_count = 0
        maps = graph.maps
        self._mapped = frozenset(maps)
        #: Bits of a heap key below the step's place: 0 without maps, so that a
        #: workflow without them queues exactly the integers it always did.
        self._pointwise_of: dict[int, list[int]] = {}
        for r, link in maps.items():
            if link.source is not None:
                self._pointwise_of.setdefault(link.source, []).append(r)
        hinted = bool(self._pointwise_of)
        self._shift = (INDEX_BITS + HINT_BITS if hinted else INDEX_BITS) if maps else 0
        self._mask = (1 << INDEX_BITS) - 1 if maps else 0
        #: What every key but a chained instance's carries above its index.
        self._plain = _NO_HINT << INDEX_BITS if hinted else 0
        #: The index of the instance the last ``take`` returned (0 for a step).
        self.taken_index = 0
        #: Mapped steps whose dependencies are met, for the machine to expand.
        self.expandable: list[int] = []
        #: Ranks held back when ready (cached steps): they go to ``lookups``, for the
        #: machine to look up, and are queued with ``push`` only if they must run.
        self._hold = hold
        self.lookups: list[int] = []

    # -- feeding -------------------------------------------------------------------

    def initial_ready(self, done: Iterable[int] = ()) -> None:
        """Mark ``done`` ranks succeeded (a resumed run) and queue every ready step."""
        done_set = set(done)
        for r in done_set:  # done is expanded too: every dependant counts it
            for c in self.graph.dependents[r]:
                self._waiting[c] -= 1
        for r in range(len(self._waiting)):
            if r not in done_set and self._waiting[r] == 0:
                self._became_ready(r)

    def _became_ready(self, r: int) -> None:
        if r in self._mapped:
            self.expandable.append(r)
        elif self._hold and r in self._hold:
            self.lookups.append(r)
        else:
            self.push(r)

    def push(self, r: int, index: int = 0) -> None:
        """Queue rank ``r`` (or instance ``index`` of it) as ready; also for a due retry."""
        pool = self._pool_of[r]
        heap = self._heaps.get(pool)
        if heap is None:
            heap = self._heaps[pool] = []
        heapq.heappush(heap, (self._urgency_of[r] << self._shift) | self._plain | index)
        self.ready_count += 1

    def push_chained(self, r: int, index: int, upstream_took: float | None) -> None:
        """Queue instance ``index`` of the chained map ``r``; its upstream one took that long."""
        hint = upstream_hint(upstream_took)
        pool = self._pool_of[r]
        heap = self._heaps.get(pool)
        if heap is None:
            heap = self._heaps[pool] = []
        key = (self._urgency_of[r] << self._shift) | (hint << INDEX_BITS) | index
        heapq.heappush(heap, key)
        self.ready_count += 1

    def push_all(self, r: int, count: int) -> None:
        """Queue instances ``0 .. count - 1`` of the mapped step ``r`` at once.

        One ``heapify`` instead of a push each: a map's expansion may queue a
        million instances.
        """
        pool = self._pool_of[r]
        heap = self._heaps.get(pool)
        if heap is None:
            heap = self._heaps[pool] = []
        base = (self._urgency_of[r] << self._shift) | self._plain
        heap.extend(range(base, base + count))
        heapq.heapify(heap)
        self.ready_count += count

    def succeeded(self, r: int) -> list[int]:
        """Record that ``r`` succeeded; queue and return the steps it made ready.

        A chained map over ``r`` (see :meth:`expanded`) was counted already.
        """
        made_ready: list[int] = []
        chained = self._pointwise_of.get(r) if self._pointwise_of else None
        for c in self.graph.dependents[r]:
            if chained is not None and c in chained:
                continue
            self._waiting[c] -= 1
            if self._waiting[c] == 0:
                self._became_ready(c)
                made_ready.append(c)
        return made_ready

    def chained_to(self, r: int) -> list[int]:
        """The mapped steps chained instance by instance to the mapped step ``r``."""
        return self._pointwise_of.get(r, [])

    def expanded(self, r: int) -> None:
        """The mapped step ``r`` knows its instances: maps chained to it may expand."""
        for c in self._pointwise_of.get(r, ()):
            self._waiting[c] -= 1
            if self._waiting[c] == 0:
                self._became_ready(c)

    # -- taking --------------------------------------------------------------------

    def _fits(self, pool: str) -> bool:
        limit = self._limits.get(pool)
        return limit is None or self._running_in.get(pool, 0) < limit

    def take(self, *, limit: int | None = None) -> int | None:
        """The next step to start (and count it running), or ``None`` if none fits.

        ``limit`` replaces ``max_parallel`` as the bound on attempts handed out
        (the Supervisor's prefetch hands out up to two per Worker); pool limits
        always hold.
        """
        bound = self.max_parallel if limit is None else limit
        if self.running >= bound or not self.ready_count:
            return None
        limits = self._limits
        best: int | None = None
        best_pool = _NO_POOL
        for pool, heap in self._heaps.items():
            # Without pool limits every pool fits: only urgency decides.
            if heap and (best is None or heap[0] < best) and (not limits or self._fits(pool)):
                best = heap[0]
                best_pool = pool
        if best is None:
            return None
        heapq.heappop(self._heaps[best_pool])
        self.ready_count -= 1
        self.running += 1
        if limits:  # only limits need the count per pool
            self._running_in[best_pool] = self._running_in.get(best_pool, 0) + 1
        if self._shift:
            self.taken_index = best & self._mask
            return self._urgency[best >> self._shift]
        return self._urgency[best]

    def release(self, r: int) -> None:
        """``r`` stopped running (finished, waiting to retry, or abandoned)."""
        self.running -= 1
        if self._limits:  # only limits need the count per pool
            self._running_in[self._pool_of[r]] -= 1

    def drain_ready(self) -> list[int]:
        """Remove and return every queued step (the run is stopping)."""
        shift = self._shift
        out = [self._urgency[u >> shift] for heap in self._heaps.values() for u in heap]
        self._heaps.clear()
        self.ready_count = 0
        return sorted(out)
