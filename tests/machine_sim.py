"""A thread-free simulator around the run machine, for its tests.

It plays every part the actor shell and the Workers play, as plain data: slots
run their queued attempts in order, the head of each queue may end whenever the
test says, timers are a table of due times on a fake clock, and store writes are
a list.  What an attempt does is scripted per ``(step_id, attempt)``:

* ``ok`` (the default) returns ``{step_id: attempt}`` as its artifact;
* ``err`` raises a retryable error, ``fatal`` a ``FatalError`` (never
  retried), ``crash`` kills its worker;
* ``hang`` runs until asked to stop, then ends as a backend would
  (``cancelled``); ``coop`` runs until asked to stop, then *returns normally*
  with an artifact (a cooperative step); ``ignore`` never ends by itself and is
  abandoned at the end of its grace period (it may still return late).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import stepvisor as sv
from stepvisor.backends.base import AttemptResult
from stepvisor.config import resolve
from stepvisor.core.effects import (
    AddSlot,
    CancelTimer,
    Dispatch,
    Effect,
    Finish,
    Reclaim,
    ReleaseSlot,
    RetireSlot,
    SaveOutputs,
    SaveStep,
    SaveSteps,
    SetTimer,
    StopAttempt,
)
from stepvisor.core.machine import Plan, RunMachine
from stepvisor.core.messages import (
    AttemptDone,
    Message,
    OutputsSaved,
    Reclaimed,
    SlotReady,
    Start,
)
from stepvisor.errors import ArtifactCodecError

WALL0 = 1_700_000_000.0


def noop(ctx: sv.StepContext) -> None:
    """Never called: the simulator scripts what attempts do."""


def make_plan(
    wf: sv.Workflow,
    *,
    store_may_refuse: bool = False,
    emit_events: bool = True,
    lend_slots: bool = False,
    **settings: Any,
) -> Plan:
    cfg = resolve(wf.settings, settings, environ={}, cwd=Path("/nonexistent-stepvisor-test"))
    return Plan(
        workflow=wf,
        settings=cfg,
        run_id="run-1",
        seed=7,
        executors=tuple("thread" for _ in wf.graph.order),
        emit_events=emit_events,
        store_may_refuse=store_may_refuse,
        lend_slots=lend_slots,
    )


class Sim:
    """Drives one RunMachine; every effect is recorded in ``effects``."""

    def __init__(
        self,
        plan: Plan,
        script: Mapping[tuple[str, int], str] | None = None,
        *,
        refuse: frozenset[str] = frozenset(),
    ) -> None:
        self.machine = RunMachine(plan)
        self.script = dict(script or {})
        self.refuse = refuse
        self.now = 0.0
        self.effects: list[Effect] = []
        self.queues: dict[str, deque[tuple[str, int]]] = {}
        self.stop_asked: dict[tuple[str, int], str] = {}
        self.timers: dict[tuple[Any, ...], tuple[float, Message]] = {}
        self.cancelled_timers: list[Message] = []
        self.abandoned: list[tuple[str, tuple[str, int]]] = []
        self.writes: list[Any] = []
        self.result: sv.RunResult | None = None
        self.max_running = 0
        self.dispatched_while_stopping = 0
        #: Attempts taken back from a slot's queue unstarted (``Reclaim``).
        self.reclaimed: list[tuple[str, int]] = []

    # -- feeding -------------------------------------------------------------------

    def feed(self, message: Message) -> list[Effect]:
        was_stopping = self.machine.stopping
        out = self.machine.handle(message, now=self.now, wall=WALL0 + self.now)
        for effect in out:
            self._apply(effect, was_stopping)
        self.max_running = max(self.max_running, self.busy_slots())
        return out

    def start(self) -> None:
        self.feed(Start())

    def _apply(self, effect: Effect, was_stopping: bool) -> None:
        self.effects.append(effect)
        if isinstance(effect, AddSlot):
            self.queues[effect.slot] = deque()
            self.feed(SlotReady(effect.slot))
        elif isinstance(effect, ReleaseSlot):
            assert not self.queues.pop(effect.slot), "released a slot with work queued"
        elif isinstance(effect, RetireSlot):
            assert not self.queues.get(effect.slot), "retired a slot with work queued"
            self.queues.pop(effect.slot, None)
        elif isinstance(effect, Dispatch):
            if was_stopping or self.machine.stopping:
                self.dispatched_while_stopping += 1
            assert not self.queues[effect.slot], "dispatched to a busy slot"
            for order in effect.orders:
                self.queues[effect.slot].append((order.spec.step_id, order.spec.attempt))
        elif isinstance(effect, Reclaim):
            # As the shell does: the tail of the slot's queue, never its running head.
            queue = self.queues[effect.slot]
            taken = [queue.pop() for _ in range(min(effect.wanted, len(queue) - 1))]
            self.reclaimed.extend(taken)
            self.feed(Reclaimed(effect.slot, tuple(taken)))
        elif isinstance(effect, StopAttempt):
            self.stop_asked[(effect.step_id, effect.attempt)] = effect.reason
        elif isinstance(effect, SetTimer):
            assert effect.due == self.now + effect.delay
            self.timers[effect.key] = (effect.due, effect.message)
        elif isinstance(effect, CancelTimer):
            entry = self.timers.pop(effect.key, None)
            if entry is not None:
                self.cancelled_timers.append(entry[1])
        elif isinstance(effect, SaveOutputs):
            self.writes.append(effect)
            error = None
            if effect.record.step_id in self.refuse:
                error = ArtifactCodecError(f"cannot encode {effect.record.step_id}")
            self.feed(OutputsSaved(effect.record.step_id, effect.attempt, error))
        elif isinstance(effect, SaveStep | SaveSteps):
            self.writes.append(effect)
        elif isinstance(effect, Finish):
            assert self.result is None, "finished twice"
            self.result = effect.result

    # -- what can happen next --------------------------------------------------------

    def busy_slots(self) -> int:
        """Slots with an attempt running, not counting abandoned ones."""
        abandoned = {slot for slot, _ in self.abandoned}
        return sum(1 for s, q in self.queues.items() if q and s not in abandoned)

    def behaviour(self, key: tuple[str, int]) -> str:
        return self.script.get(key, "ok")

    def endable(self) -> list[tuple[str, tuple[str, int]]]:
        """``(slot, attempt)`` whose attempt may end now (the head of its queue)."""
        out = []
        for slot in sorted(self.queues):
            queue = self.queues[slot]
            if not queue:
                continue
            key = queue[0]
            how = self.behaviour(key)
            if how in ("hang", "coop") and key not in self.stop_asked:
                continue
            if how == "ignore" and (slot, key) not in self.abandoned:
                continue
            out.append((slot, key))
        return out

    def end(self, slot: str, key: tuple[str, int]) -> list[Effect]:
        """Let the attempt at the head of ``slot`` end as scripted."""
        assert self.queues[slot][0] == key
        self.queues[slot].popleft()
        how = self.behaviour(key)
        sid, attempt = key
        if how in ("ok", "coop", "ignore"):
            result = AttemptResult(kind="ok", outputs={sid: attempt})
        elif how == "hang":
            result = AttemptResult(kind="cancelled", note="stopped")
        elif how == "crash":
            result = AttemptResult(kind="crash", error=sv.WorkerCrashedError("died"))
        elif how == "fatal":
            result = AttemptResult(kind="error", error=sv.FatalError(f"{sid} fatal"))
        else:
            result = AttemptResult(kind="error", error=RuntimeError(f"{sid} failed"))
        stale = (slot, key) in self.abandoned
        before = self.machine.snapshot()
        out = self.feed(
            AttemptDone(sid, attempt, slot, result, WALL0 + self.now, WALL0 + self.now, 0.0001)
        )
        if stale:
            # Fenced: the late outcome of an abandoned attempt changes no state;
            # at most its slot, now empty, is retired.
            after = self.machine.snapshot()
            assert after[:3] == before[:3], f"a stale outcome of {key} changed the state"
            assert after[4:] == before[4:]
            assert all(isinstance(e, RetireSlot) for e in out), out
        return out

    def slot_of(self, key: tuple[str, int]) -> str:
        """The slot whose running attempt is ``key``."""
        return next(slot for slot, queue in self.queues.items() if queue and queue[0] == key)

    def end_attempt(self, key: tuple[str, int]) -> list[Effect]:
        """Let attempt ``key`` (running on some slot) end as scripted."""
        return self.end(self.slot_of(key), key)

    def fire(self, key: tuple[Any, ...]) -> None:
        due, message = self.timers.pop(key)
        self.now = max(self.now, due)
        if key[0] == "grace":
            for slot, queue in self.queues.items():
                if queue and queue[0] == (key[1], key[2]) and key[1:] in self.stop_asked:
                    # Still running at the end of its grace: the machine abandons it.
                    self.abandoned.append((slot, queue[0]))
        self.feed(message)

    def step_once(self, choose: Any) -> bool:
        """One thing happens, picked by ``choose(options)``; False once nothing can."""
        options: list[tuple[str, Any]] = [("end", e) for e in self.endable()]
        options += [("fire", k) for k in sorted(self.timers, key=repr)]
        if not options:
            return False
        kind, what = choose(options)
        if kind == "end":
            self.end(*what)
        else:
            self.fire(what)
        return True

    def run_to_end(self, choose: Any, *, limit: int = 10_000) -> sv.RunResult:
        for _ in range(limit):
            if self.result is not None and not self.endable():
                break
            if not self.step_once(choose):
                break
        assert self.result is not None, "the run did not finish"
        return self.result


def first(options: list[tuple[str, Any]]) -> tuple[str, Any]:
    """Always the first option: outcomes before timers, slots in name order."""
    return options[0]
