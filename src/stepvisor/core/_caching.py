"""Cached steps: looked up before they may run, settled without a dispatch when reused.

:class:`Caching` is the part of :class:`~stepvisor.core.machine.RunMachine`
for the steps of ``Plan.cached``::

    dependencies met ─▶ Scheduler.lookups (not the ready queue: no slot is asked for)
      ─▶ LookUpCache(step, inputs)   the shell makes the key, reads the store's cache
      ◀─ CacheAnswer(outputs | None, note)
           reused:   the step succeeds now, with the stored outputs, no attempt,
                     ``reused_from`` and ``cache_note`` on its record
           computed: ``cache_note`` says why; the step is queued like any other,
                     and once it succeeded and its outputs were stored: PutInCache

A cached mapped step is expanded as any other; each of its instances is then
looked up on its own (its item is part of its key) instead of being queued.

The machine reads no store and hashes nothing: keys are the shell's
(:mod:`stepvisor.cache._session`).  Early cutoff needs nothing here: a key
covers the *content* of the step's inputs, so a step below one that ran again
and made equal artifacts finds its entry.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from stepvisor.core.effects import Effect, LookUpCache, PutInCache, SaveStep
from stepvisor.core.messages import CacheAnswer
from stepvisor.core.records import instance_id
from stepvisor.core.state import RunState, StepRecord, StepStatus

if TYPE_CHECKING:
    from stepvisor.core._inputs import Inputs
    from stepvisor.core._mapping import MapRun
    from stepvisor.core.graph import Graph
    from stepvisor.policies.concurrency import Scheduler

__all__ = ["Caching"]


class Caching:
    """Lookups of cached steps and instances, and their answers (a base of ``RunMachine``)."""

    graph: Graph
    state: RunState
    sched: Scheduler
    stopping: bool
    _inputs: Inputs
    _fx: list[Effect]
    _map_runs: dict[int, MapRun]
    #: Cached mapped steps (ranks): their instances are looked up, not queued.
    _cached_maps: frozenset[int]
    #: Steps and instances being looked up: id -> (rank, index; -1 for a step).
    _looking: dict[str, tuple[int, int]]
    #: Steps and instances computed after a miss whose result may enter the cache.
    _to_cache: set[tuple[int, int]]

    if TYPE_CHECKING:

        def _succeeded(self, r: int, record: StepRecord, outputs: Mapping[str, Any]) -> None: ...

        def _instance_succeeded(
            self, r: int, index: int, record: StepRecord, outputs: Mapping[str, Any]
        ) -> None: ...

        def _chained_item(self, r: int, index: int) -> Any: ...

    def _init_caching(self, cached: frozenset[int]) -> None:
        """The working set of the cached steps ``cached`` (ranks; maps among them)."""
        self._looking = {}
        self._to_cache = set()
        self._cached_maps = cached.intersection(self.graph.maps)

    def _look_up(self) -> None:
        """Ask the shell about every cached step that became ready.

        A run that is stopping asks nothing: those steps stay pending and end
        ``cancelled`` with the rest.
        """
        lookups, self.sched.lookups = self.sched.lookups, []
        if self.stopping:
            return
        graph = self.graph
        for r in lookups:
            sid = graph.order[r]
            self._looking[sid] = (r, -1)
            inputs = self._inputs.of(r)  # kept until the step ends, as for a dispatch
            self._fx.append(LookUpCache(sid, r, inputs))

    def _queue_instance(self, r: int, index: int) -> None:
        """Queue instance ``index`` of ``r``, or look it up first if ``r`` is cached."""
        if not self._cached_maps or r not in self._cached_maps:
            self.sched.push(r, index)
            return
        run = self._map_runs[r]
        uid = instance_id(self.graph.order[r], index)
        item = run.items[index] if run.items is not None else self._chained_item(r, index)
        self._looking[uid] = (r, index)
        self._fx.append(LookUpCache(uid, r, run.view, index, item))

    def _on_cache_answer(self, msg: CacheAnswer) -> None:
        found = self._looking.pop(msg.step_id, None)
        if found is None or self.stopping:
            return  # unknown, or the run stops: it ends cancelled with the rest
        r, index = found
        record = self.state.record_at(r) if index < 0 else self.state.instance_record(r, index)
        if record.terminal:
            return
        if msg.outputs is not None:
            reused = StepRecord(
                msg.step_id, StepStatus.SUCCEEDED, (), record.note, False, msg.reused_from,
                msg.note,
            )  # fmt: skip
            self._fx.append(SaveStep(reused, msg.outputs))
            if index < 0:
                self._succeeded(r, reused, msg.outputs)
            else:
                self._instance_succeeded(r, index, reused, msg.outputs)
            return
        noted = record._replace(cache_note=msg.note)
        if index < 0:
            self.state = self.state.set_step_at(r, noted)
        else:
            self.state = self.state.set_instance(r, index, noted)
        if msg.storable:
            self._to_cache.add(found)
        self.sched.push(r, max(index, 0))

    def _cache_result(self, r: int, index: int, outputs: Mapping[str, Any]) -> None:
        """``r`` (or its instance) succeeded and its outputs were stored: keep them."""
        self._to_cache.discard((r, index))
        sid = self.graph.order[r]
        uid = sid if index < 0 else instance_id(sid, index)
        self._fx.append(PutInCache(uid, r, outputs))
