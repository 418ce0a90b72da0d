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
from stepvisor.core.state import RunState, StepRecord, StepStatus

if TYPE_CHECKING:
    from stepvisor.core._inputs import Inputs
    from stepvisor.core.graph import Graph
    from stepvisor.policies.concurrency import Scheduler

__all__ = ["Caching"]


class Caching:
    """Lookups of cached steps and their answers (a base of ``RunMachine``)."""

    graph: Graph
    state: RunState
    sched: Scheduler
    stopping: bool
    _inputs: Inputs
    _fx: list[Effect]
    #: Cached steps being looked up: step id -> rank.
    _looking: dict[str, int]
    #: Cached steps computed because of a miss whose result may enter the cache.
    _to_cache: set[int]

    if TYPE_CHECKING:

        def _succeeded(self, r: int, record: StepRecord, outputs: Mapping[str, Any]) -> None: ...

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
            self._looking[sid] = r
            inputs = self._inputs.of(r)  # kept until the step ends, as for a dispatch
            self._fx.append(LookUpCache(sid, r, inputs))

    def _on_cache_answer(self, msg: CacheAnswer) -> None:
        r = self._looking.pop(msg.step_id, None)
        if r is None or self.stopping:
            return  # unknown, or the run stops: the step ends cancelled with the rest
        record = self.state.record_at(r)
        if record.terminal:
            return
        if msg.outputs is not None:
            reused = StepRecord(
                msg.step_id, StepStatus.SUCCEEDED, (), record.note, False, msg.reused_from,
                msg.note,
            )  # fmt: skip
            self._fx.append(SaveStep(reused, msg.outputs))
            self._succeeded(r, reused, msg.outputs)
            return
        self.state = self.state.set_step_at(r, record._replace(cache_note=msg.note))
        if msg.storable:
            self._to_cache.add(r)
        self.sched.push(r)

    def _cache_result(self, r: int, outputs: Mapping[str, Any]) -> None:
        """``r`` succeeded and its outputs were stored: if it was a cache miss, keep them."""
        self._to_cache.discard(r)
        self._fx.append(PutInCache(self.graph.order[r], r, outputs))
