"""The Supervisor actor: the thin shell that carries out what the run machine decides.

::

    message (Worker outcome, timer, cancel) ──▶ RunMachine.handle(msg, now, wall)
                                                        │ effects, in order
      AddSlot/RetireSlot ── start/stop a Worker actor ◀─┤
      Dispatch ─────────── RunAttempt/RunBatch to it  ◀─┤
      StopAttempt ──────── control.cancel(reason)     ◀─┤
      SetTimer/CancelTimer ── clock.call_later         ◀─┤
      BeginRun/Save*/FinishRun ── the store            ◀─┤
      Emit ─────────────── the caller's on_event hook  ◀─┤
      Finish ───────────── stop Workers, hand over the result

Every decision is the machine's (:mod:`stepvisor.core.machine`); this actor
owns only what cannot be a value: the Worker actors, the attempts' cancel
controls, the timers, the store and the hook.  Two things come back from
carrying out an effect and are fed to the machine as messages: a store that
refuses a step's outputs (``OutputsSaved``), and a cancel requested through the
store, found by the heartbeat.  Effects are carried out strictly in order;
those of a message fed back go after the rest.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import pykka

from stepvisor._log import log
from stepvisor.actors._pool import WorkerPool
from stepvisor.actors.messages import Heartbeat, RunAttempt, RunBatch, SlotGranted, Warm
from stepvisor.clock import Clock, TimerHandle
from stepvisor.config import Resolved
from stepvisor.context import AttemptControl
from stepvisor.core._outcomes import NOT_RETRIED_STOPPING
from stepvisor.core.effects import (
    AbandonSlot,
    AddSlot,
    BeginRun,
    CancelTimer,
    Dispatch,
    Effect,
    Emit,
    Finish,
    FinishRun,
    ReleaseSlot,
    RetireSlot,
    SaveOutputs,
    SaveStep,
    SaveSteps,
    SetTimer,
    StopAttempt,
    TimerKey,
)
from stepvisor.core.events import Event
from stepvisor.core.machine import Plan, RunMachine
from stepvisor.core.messages import AttemptDone, CancelRun, Message, OutputsSaved, SlotReady
from stepvisor.core.model import Workflow
from stepvisor.core.result import RunResult
from stepvisor.core.state import RunState, RunStatus, StepRecord
from stepvisor.errors import ArtifactCodecError, StoreError
from stepvisor.store.base import RunInfo, RunStore
from stepvisor.store.memory import MemoryStore

__all__ = ["HEARTBEAT_INTERVAL", "NOT_RETRIED_STOPPING", "RunObserver", "RunPlan", "Supervisor"]

#: How often the Supervisor writes a heartbeat and looks for cancel requests.
HEARTBEAT_INTERVAL = 0.5


class RunObserver(Protocol):
    """Sees a run's events and records, and gives each attempt a trace carrier.

    The OpenTelemetry tracer (:mod:`stepvisor._otel`) is one; it is called on
    the Supervisor's thread and must never raise.
    """

    def event(self, event: Event, state: RunState) -> None: ...

    def carrier(self, step_id: str, attempt: int) -> Mapping[str, str] | None: ...


@dataclass(frozen=True, slots=True)
class RunPlan:
    """Everything one run needs, prepared and validated by the runtime."""

    workflow: Workflow
    settings: Resolved
    run_id: str
    seed: int
    clock: Clock
    store: RunStore
    fingerprint: str
    executors: tuple[str, ...]  # by canonical rank
    payloads: Mapping[str, bytes] = field(default_factory=dict)
    on_event: Callable[[Event], None] | None = None
    restored: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    restored_records: Mapping[str, StepRecord] = field(default_factory=dict)
    source: str | None = None
    #: Traces the run (OpenTelemetry is set up): it needs the events.
    observer: RunObserver | None = None

    def machine_plan(self, *, lend_slots: bool = False) -> Plan:
        """The part of the plan the machine decides from: values only."""
        return Plan(
            workflow=self.workflow,
            settings=self.settings,
            run_id=self.run_id,
            seed=self.seed,
            executors=self.executors,
            payloads=self.payloads,
            restored=self.restored,
            restored_records=self.restored_records,
            emit_events=self.on_event is not None or self.observer is not None,
            store_may_refuse=not isinstance(self.store, MemoryStore),
            lend_slots=lend_slots,
        )


class Supervisor(pykka.ThreadingActor):
    """Owns one run's machine, Workers, timers, store writes and events."""

    use_daemon_thread = True

    def __init__(
        self,
        plan: RunPlan,
        *,
        complete: Callable[[RunResult], None],
        pool: WorkerPool,
        register_thread: Callable[[threading.Thread], None],
        lend_slots: bool = False,
    ) -> None:
        super().__init__()
        self.plan = plan
        self.clock = plan.clock
        self.store = plan.store
        self.machine = RunMachine(plan.machine_plan(lend_slots=lend_slots))
        self._complete = complete
        self._pool = pool
        self._register_thread = register_thread
        #: The Worker leased for each of the machine's slots.
        self._workers: dict[str, pykka.ActorRef[Any]] = {}
        self._warm = tuple(ex for ex in ("process",) if ex in plan.executors)
        self._controls: dict[str, tuple[int, AttemptControl]] = {}
        self._timers: dict[TimerKey, TimerHandle] = {}
        self._heartbeat: TimerHandle | None = None
        self._completed = False
        self._carry_out: dict[type, Callable[[Any], None]] = {
            Dispatch: self._dispatch,
            SaveStep: self._save_step,
            SaveOutputs: self._save_outputs,
            SaveSteps: self._save_steps,
            SetTimer: self._set_timer,
            CancelTimer: self._cancel_timer,
            StopAttempt: self._stop_attempt,
            Emit: self._emit,
            AddSlot: self._add_slot,
            ReleaseSlot: self._release_slot,
            AbandonSlot: self._abandon_slot,
            RetireSlot: self._retire_slot,
            BeginRun: self._begin_run,
            FinishRun: self._finish_run,
            Finish: self._finish,
        }
        self._pending: deque[Effect] = deque()

    # -- actor hooks -------------------------------------------------------------

    def on_start(self) -> None:
        self._register_thread(threading.current_thread())

    def on_failure(
        self, exception_type: object = None, exception_value: object = None, *_: object
    ) -> None:
        # A store that broke under the run, or a bug in the Supervisor: stop
        # everything, and still give the caller a result (with the store's own
        # error, which names the path and the fault) rather than leave it waiting.
        log.error("the supervisor of run %s failed; cancelling everything", self.plan.run_id)
        for _attempt, control in self._controls.values():
            control.cancel("cancel")
        self._stop_timers()
        self._stop_workers()
        if not self._completed:
            self._completed = True
            error: BaseException = (
                exception_value
                if isinstance(exception_value, StoreError)
                else RuntimeError("stepvisor's supervisor failed (a bug: please report it)")
            )
            if error is not exception_value and isinstance(exception_value, BaseException):
                error.__cause__ = exception_value
            self._complete(self.machine.failed_result(error, wall=self.clock.wall()))

    def on_receive(self, message: Any) -> None:
        if type(message) is AttemptDone:
            entry = self._controls.get(message.step_id)
            if entry is not None and entry[0] == message.attempt:
                del self._controls[message.step_id]
        elif type(message) is Heartbeat:
            self._on_heartbeat()
            return
        elif type(message) is SlotGranted:
            if self.machine.finished or self._completed:
                self._pool.give_back(message.worker)
            else:
                self._bind(message.slot, message.worker)
                self._run_pending()
            return
        self._feed(message)

    def _feed(self, message: Message) -> None:
        """Hand ``message`` to the machine and carry out its effects, in order.

        An effect that feeds a message back (``SaveOutputs``) queues the new
        effects behind the ones already decided, which were decided first.
        """
        self._pending.extend(
            self.machine.handle(message, now=self.clock.monotonic(), wall=self.clock.wall())
        )
        self._run_pending()

    def _run_pending(self) -> None:
        pending, carry_out = self._pending, self._carry_out
        while pending:
            effect = pending.popleft()
            carry_out[type(effect)](effect)

    # -- effects -------------------------------------------------------------------

    def _tell_self(self, message: object) -> Callable[[], None]:
        ref = self.actor_ref

        def tell() -> None:
            with contextlib.suppress(pykka.ActorDeadError):
                ref.tell(message)

        return tell

    def _add_slot(self, effect: AddSlot) -> None:
        slot, tell = effect.slot, self.actor_ref.tell

        def deliver(ref: pykka.ActorRef[Any]) -> None:
            try:
                tell(SlotGranted(slot, ref))
            except pykka.ActorDeadError:  # the run ended meanwhile
                self._pool.give_back(ref)

        ref = self._pool.lease(self, deliver)
        if ref is not None:
            self._bind(slot, ref)

    def _bind(self, slot: str, ref: pykka.ActorRef[Any]) -> None:
        """``ref`` serves ``slot``: tell the machine, which may dispatch at once."""
        self._workers[slot] = ref
        if self._warm:
            ref.tell(Warm(self._warm))
        self._pending.extend(
            self.machine.handle(SlotReady(slot), now=self.clock.monotonic(), wall=self.clock.wall())
        )

    def _release_slot(self, effect: ReleaseSlot) -> None:
        self._pool.give_back(self._workers.pop(effect.slot))

    def _abandon_slot(self, effect: AbandonSlot) -> None:
        self._pool.abandon(self._workers[effect.slot])

    def _retire_slot(self, effect: RetireSlot) -> None:
        ref = self._workers.pop(effect.slot, None)
        if ref is not None:
            self._pool.retire(ref)

    def _dispatch(self, effect: Dispatch) -> None:
        messages: list[RunAttempt] = []
        controls, me, observer = self._controls, self.actor_ref, self.plan.observer
        for order, executor, budget in effect.orders:
            control = AttemptControl()
            # The step reads the real monotonic clock (ctx.remaining()).
            spec = order if budget is None else order._replace(deadline=time.monotonic() + budget)
            if observer is not None:
                spec = spec._replace(trace=observer.carrier(spec.step_id, spec.attempt))
            controls[spec.step_id] = (spec.attempt, control)
            messages.append(RunAttempt(spec, control, executor, effect.slot, me))
        ref = self._workers[effect.slot]
        ref.tell(messages[0] if len(messages) == 1 else RunBatch(tuple(messages)))

    def _stop_attempt(self, effect: StopAttempt) -> None:
        entry = self._controls.get(effect.step_id)
        if entry is not None and entry[0] == effect.attempt:
            entry[1].cancel(effect.reason)

    def _set_timer(self, effect: SetTimer) -> None:
        self._timers[effect.key] = self.clock.call_later(
            effect.delay, self._tell_self(effect.message)
        )

    def _cancel_timer(self, effect: CancelTimer) -> None:
        timer = self._timers.pop(effect.key, None)
        if timer is not None:
            timer.cancel()

    def _begin_run(self, effect: BeginRun) -> None:
        plan = self.plan
        info = RunInfo(
            run_id=plan.run_id,
            workflow_id=plan.workflow.id,
            fingerprint=plan.fingerprint,
            settings=plan.settings.jsonable(),
            seed=plan.seed,
            status=RunStatus.RUNNING,
            started=effect.started,
            heartbeat=effect.started,
            source=plan.source,
        )
        self.store.begin_run(info, list(effect.records))
        self._heartbeat = self.clock.call_later(HEARTBEAT_INTERVAL, self._tell_self(Heartbeat()))

    def _save_step(self, effect: SaveStep) -> None:
        if effect.outputs is None:
            self.store.save_step(self.plan.run_id, effect.record)
        else:
            self.store.save_step(self.plan.run_id, effect.record, effect.outputs)

    def _save_outputs(self, effect: SaveOutputs) -> None:
        error: ArtifactCodecError | None = None
        try:
            self.store.save_step(self.plan.run_id, effect.record, effect.outputs)
        except ArtifactCodecError as exc:
            error = exc
        step_id = effect.record.step_id
        self._pending.extend(
            self.machine.handle(
                OutputsSaved(step_id, effect.attempt, error),
                now=self.clock.monotonic(),
                wall=self.clock.wall(),
            )
        )

    def _save_steps(self, effect: SaveSteps) -> None:
        self.store.save_steps(self.plan.run_id, list(effect.records))

    def _finish_run(self, effect: FinishRun) -> None:
        self.store.finish_run(
            self.plan.run_id, effect.status, ended=effect.ended, error=effect.error
        )

    def _emit(self, effect: Emit) -> None:
        if self.plan.observer is not None:
            self.plan.observer.event(effect.event, self.machine.state)
        hook = self.plan.on_event
        if hook is None:
            return
        try:
            hook(effect.event)
        except Exception:
            log.exception(
                "the on_event hook raised on %r; ignoring it", type(effect.event).__name__
            )

    def _finish(self, effect: Finish) -> None:
        self._stop_timers()
        self._stop_workers()
        self._completed = True
        self._complete(effect.result)
        self.stop()

    # -- heartbeat and teardown ---------------------------------------------------------

    def _on_heartbeat(self) -> None:
        if self.machine.finished:
            return
        self.store.heartbeat(self.plan.run_id, self.clock.wall())
        if not self.machine.stopping and self.store.cancel_requested(self.plan.run_id):
            self._feed(CancelRun("through the store", through_store=True))
        if not self.machine.finished:
            self._heartbeat = self.clock.call_later(
                HEARTBEAT_INTERVAL, self._tell_self(Heartbeat())
            )

    def _stop_timers(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    def _stop_workers(self) -> None:
        """Give every leased Worker back (abandoned ones were given up already)."""
        self._pool.cancel_waiting(self)
        abandoned = set(self.machine.abandoned_slots)
        workers, self._workers = self._workers, {}
        for slot, ref in workers.items():
            if slot not in abandoned:
                self._pool.give_back(ref)
