"""One run's shell: it carries out what the run machine decides.

::

    message (Worker outcome, timer, cancel) ──▶ RunMachine.handle(msg, now, wall)
                                                        │ effects, in order
      AddSlot/ReleaseSlot ── lease/give back a pool Worker ◀─┤
      Dispatch ───────────── RunAttempt/RunBatch to it      ◀─┤
      StopAttempt ────────── control.cancel(reason)         ◀─┤
      SetTimer/CancelTimer ── clock.call_later               ◀─┤
      BeginRun/Save*/FinishRun ── the store                  ◀─┤
      Emit ───────────────── the caller's on_event hook      ◀─┤
      Finish ─────────────── give Workers back, hand over the result

Every decision is the machine's (:mod:`stepvisor.core.machine`); the shell
owns only what cannot be a value: the leased Workers, the attempts' cancel
controls, the timers, the store and the hook.  Two things come back from
carrying out an effect and are fed to the machine as messages: a store that
refuses a step's outputs (``OutputsSaved``) and a Worker for a slot
(``SlotReady``); and the heartbeat finds a cancel requested through the store.
Effects are carried out strictly in order.  Those of ``OutputsSaved`` go after
the rest; those of ``SlotReady`` (the slot's first dispatch) go first, so that a
run asking for many slots starts work on each as it comes up.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from stepvisor._log import log
from stepvisor.actors._logs import RunLogs
from stepvisor.actors._outbox import Outbox
from stepvisor.actors._pool import Lease, WorkerPool
from stepvisor.actors.messages import (
    Heartbeat,
    ReplyTo,
    RunAttempt,
    RunBatch,
    SlotGranted,
    Warm,
)
from stepvisor.cache._session import CacheSession, cached_ranks
from stepvisor.clock import Clock, TimerHandle
from stepvisor.config import Resolved
from stepvisor.context import AttemptControl
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
    LookUpCache,
    PutInCache,
    Reclaim,
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
from stepvisor.core.messages import (
    AttemptDone,
    AttemptsDone,
    CancelRun,
    GraceExpired,
    Message,
    OutputsSaved,
    Reclaimed,
    RetryDue,
    SlotReady,
)
from stepvisor.core.model import Workflow
from stepvisor.core.result import RunResult
from stepvisor.core.state import RunState, RunStatus, StepRecord
from stepvisor.errors import ArtifactCodecError, StoreError
from stepvisor.store._unkept import Unkept
from stepvisor.store.base import RunInfo, RunStore, save_step_batch
from stepvisor.store.memory import MemoryStore

_new: Final = tuple.__new__

__all__ = ["HEARTBEAT_INTERVAL", "ReplyTo", "RunObserver", "RunPlan", "RunShell"]

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

    def machine_plan(
        self,
        *,
        lend_slots: bool = False,
        unqueued: frozenset[str] = frozenset(),
        cached: frozenset[int] = frozenset(),
    ) -> Plan:
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
            store_may_refuse=not isinstance(self.store, MemoryStore | Unkept),
            lend_slots=lend_slots,
            unqueued=unqueued,
            cached=cached,
        )


class RunShell:
    """Carries out one run's effects: its machine, leased Workers, timers, store and hook.

    Not an actor: the engine's :class:`~stepvisor.actors.supervisor.Supervisor`
    hosts every run's shell on its one thread and routes each run its messages;
    ``tell`` sends this run a message through it (timers, granted Workers).
    """

    def __init__(
        self,
        plan: RunPlan,
        *,
        complete: Callable[[RunResult], None],
        pool: WorkerPool,
        tell: Callable[[object], bool],
        reply_to: ReplyTo,
        lend_slots: bool = False,
        tell_due: Callable[[object], bool] | None = None,
    ) -> None:
        self.plan = plan
        self.clock = plan.clock
        self.store = plan.store
        self._complete = complete
        self._pool = pool
        self._tell = tell
        #: How a retry's timer tells this run it is due: the host may let it go
        #: ahead of the messages already queued (see Supervisor.tell_due).
        self._tell_due = tell if tell_due is None else tell_due
        self._reply_to = reply_to
        #: The lease (of the engine's bound, with a Worker once one is needed) of each slot.
        self._leases: dict[str, Lease] = {}
        #: The shared backends of this run's executors that take an attempt without a
        #: thread waiting for it (``submit(spec, control, done)``): the engine's event
        #: loop for async steps, or a backend the caller gave that can.
        self._submitters: dict[str, Any] = {}
        for executor in set(plan.executors):
            make = pool.services.shared.get(executor)
            backend = make() if make is not None else None
            if callable(getattr(backend, "submit", None)):
                self._submitters[executor] = backend
        self._warm = tuple(ex for ex in ("process",) if ex in plan.executors)
        self._needs_workers = any(ex not in self._submitters for ex in plan.executors)
        #: The run's cache, when a step asks for it and the store keeps one.
        self._cache: CacheSession | None = None
        cached = frozenset[int]()
        if plan.settings.cache or any(step.cache for step in plan.workflow.steps):
            cached = cached_ranks(plan.workflow, plan.settings, plan.store, plan.run_id)
            if cached:
                self._cache = CacheSession(
                    plan.workflow, plan.settings, plan.store, plan.run_id,  # type: ignore[arg-type]
                    self.clock.wall,
                )  # fmt: skip
        self.machine = RunMachine(
            plan.machine_plan(
                lend_slots=lend_slots, unqueued=frozenset(self._submitters), cached=cached
            )
        )
        self._controls: dict[str, tuple[int, AttemptControl]] = {}
        #: Each slot's last batch, shared with its Worker (see ``_reclaim``).
        self._queues: dict[str, deque[RunAttempt]] = {}
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
            Reclaim: self._reclaim,
            Emit: self._emit,
            AddSlot: self._add_slot,
            ReleaseSlot: self._release_slot,
            AbandonSlot: self._abandon_slot,
            RetireSlot: self._retire_slot,
            BeginRun: self._begin_run,
            FinishRun: self._finish_run,
            LookUpCache: self._look_up_cache,
            PutInCache: self._put_in_cache,
            Finish: self._finish,
        }
        self._pending: deque[Effect] = deque()
        #: Step transitions go to the store (not to one that keeps nothing).
        self._keeps = not isinstance(self.store, Unkept)
        #: Sends submitted attempts' outcomes, those that end together as one message.
        self._outbox = Outbox(reply_to)
        #: Captured output: the attempts' logs, kept in the store and the result.
        self._logs = RunLogs(plan.run_id, plan.settings, plan.store)

    # -- what the host calls ---------------------------------------------------------

    @property
    def completed(self) -> bool:
        """The result was handed to the caller: the host may forget this run."""
        return self._completed

    def receive(self, message: object) -> None:
        """One message for this run: a Worker's outcome, a timer, a cancel, a Worker granted."""
        kind = type(message)
        if kind is AttemptDone:
            self._forget_control(message)  # type: ignore[arg-type]
            self._logs.save()
        elif kind is AttemptsDone:
            for done in message.outcomes:  # type: ignore[attr-defined]
                self._forget_control(done)
            self._logs.save()
        elif kind is Heartbeat:
            self._on_heartbeat()
            return
        elif kind is GraceExpired:
            message = self._with_stack(message)  # type: ignore[arg-type]
        elif kind is SlotGranted:
            granted: Any = message
            if self.machine.finished or self._completed:
                self._pool.give_back(granted.lease)
            else:
                self._bind(granted.slot, granted.lease)
                self._run_pending()
            return
        self.feed(message)  # type: ignore[arg-type]

    def _with_stack(self, message: GraceExpired) -> GraceExpired:
        """An attempt about to be abandoned: its backend's stack at the deadline goes along."""
        entry = self._controls.get(message.step_id)
        if entry is None or entry[0] != message.attempt or not entry[1].stack:
            return message
        return message._replace(stack=entry[1].stack)

    def _forget_control(self, done: AttemptDone) -> None:
        entry = self._controls.get(done.step_id)
        if entry is not None and entry[0] == done.attempt:
            del self._controls[done.step_id]
            control = entry[1]
            if control.log is not None:
                self._logs.keep(done.step_id, done.attempt, control, ended=True)

    def fail(self, exc: BaseException | None) -> None:
        """Carrying out an effect raised (a store that broke, or a bug): end the run.

        Everything in flight is stopped and the caller still gets a result,
        with the store's own error (it names the path and the fault) when a
        store broke, rather than waiting forever.
        """
        log.error("run %s failed in its supervisor; cancelling everything", self.plan.run_id)
        for _attempt, control in self._controls.values():
            control.cancel("cancel")
        self._stop_timers()
        self._stop_workers()
        if not self._completed:
            self._completed = True
            error: BaseException = (
                exc
                if isinstance(exc, StoreError)
                else RuntimeError("stepvisor's supervisor failed (a bug: please report it)")
            )
            if error is not exc and exc is not None:
                error.__cause__ = exc
            result = self.machine.failed_result(error, wall=self.clock.wall())
            self._complete(self._logs.finish(result, self._controls))

    def feed(self, message: Message) -> None:
        """Hand ``message`` to the machine and carry out its effects, in order.

        An effect that feeds a message back (``SaveOutputs``) queues the new
        effects behind the ones already decided, which were decided first.
        """
        self._pending.extend(
            self.machine.handle(message, now=self.clock.monotonic(), wall=self.clock.wall())
        )
        self._run_pending()

    def _run_pending(self) -> None:
        pending, carry_out, keeps = self._pending, self._carry_out, self._keeps
        while pending:
            effect = pending.popleft()
            if type(effect) is SaveStep:
                if not keeps:
                    continue  # a run given no store: its state is its only copy
                if pending and type(pending[0]) is SaveStep:
                    self._save_adjacent(effect)
                    continue
            carry_out[type(effect)](effect)

    def _save_adjacent(self, first: SaveStep) -> None:
        """Step transitions back to back (a batch dispatched, or its outcomes): one
        store transaction for all of them, still carried out before what follows."""
        batch = [(first.record, first.outputs)]
        pending = self._pending
        while pending and isinstance(pending[0], SaveStep):
            following = pending.popleft()
            batch.append((following.record, following.outputs))  # type: ignore[union-attr]
        save_step_batch(self.store, self.plan.run_id, batch)

    # -- effects -------------------------------------------------------------------

    def _tell_self(self, message: object) -> Callable[[], None]:
        tell = self._tell_due if type(message) is RetryDue else self._tell

        def later() -> None:
            tell(message)

        return later

    def _add_slot(self, effect: AddSlot) -> None:
        slot, tell = effect.slot, self._tell

        def deliver(lease: Lease) -> None:
            if not tell(SlotGranted(slot, lease)):  # the engine is gone
                self._pool.give_back(lease)

        lease = self._pool.lease(self, deliver)
        if lease is not None:
            self._bind(slot, lease)

    def _bind(self, slot: str, lease: Lease) -> None:
        """``lease`` serves ``slot``: tell the machine, which may dispatch at once."""
        self._leases[slot] = lease
        if self._needs_workers:
            # Attach the Worker now, not at the first dispatch: its thread (and,
            # for process steps, its child) is then up before an attempt's
            # deadline starts counting.
            worker = self._pool.attach(lease)
            if self._warm:
                worker.tell(Warm(self._warm))
        # What the slot can start now goes first, before the rest of the effects
        # already queued (more AddSlots, at a run's start): the first attempts
        # start as their Workers come up, not after every slot has been set up.
        self._pending.extendleft(
            reversed(
                self.machine.handle(
                    SlotReady(slot), now=self.clock.monotonic(), wall=self.clock.wall()
                )
            )
        )

    def _release_slot(self, effect: ReleaseSlot) -> None:
        self._pool.give_back(self._leases.pop(effect.slot))

    def _abandon_slot(self, effect: AbandonSlot) -> None:
        self._pool.abandon(self._leases[effect.slot])

    def _retire_slot(self, effect: RetireSlot) -> None:
        lease = self._leases.pop(effect.slot, None)
        if lease is not None:
            self._pool.retire(lease)

    def _dispatch(self, effect: Dispatch) -> None:
        messages: list[RunAttempt] = []
        controls, me, observer = self._controls, self._reply_to, self.plan.observer
        capture = self._logs.capture
        holds_values = False
        for order in effect.orders:
            executor, budget = order.executor, order.budget
            control = AttemptControl()
            control.capture = capture
            # The step reads the real monotonic clock (ctx.remaining()).
            spec = order.spec
            if budget is not None:
                spec = spec._replace(deadline=time.monotonic() + budget)
            if observer is not None:
                spec = spec._replace(trace=observer.carrier(spec.step_id, spec.attempt))
            controls[spec.step_id] = (spec.attempt, control)
            submitter = self._submitters.get(executor)
            if submitter is not None:
                # No Worker: the backend runs the attempt (an async one on the loop)
                # and says when it ends (the machine queues none behind it).
                self._outbox.submit(submitter, effect.slot, spec, control)
                continue
            holds_values = holds_values or bool(spec.inputs or spec.params)
            # tuple.__new__ rather than the NamedTuple's own (half the cost): one per attempt.
            messages.append(
                _new(RunAttempt, (spec, control, executor, effect.slot, me, order.may_hold))
            )
        if messages:
            lease = self._leases[effect.slot]
            # The Worker keeps its last message until its next: only one with values
            # needs the pool's no-op when the lease is given back.
            lease.holds_values = holds_values
            ref = self._pool.attach(lease)
            if len(messages) == 1:
                ref.tell(messages[0])
            else:  # kept, so that what the Worker has not started can be taken back
                queue = self._queues[effect.slot] = deque(messages)
                ref.tell(RunBatch(queue))

    def _reclaim(self, effect: Reclaim) -> None:
        """Take back the unstarted tail of a slot's batch; tell the machine which, at once.

        ``deque.pop`` here and the Worker's ``popleft`` are each atomic, so
        every attempt is either run by the Worker or taken back here.
        """
        queue = self._queues.get(effect.slot)
        taken: list[tuple[str, int]] = []
        while queue and len(taken) < effect.wanted:
            try:
                spec = queue.pop().spec
            except IndexError:  # the Worker took the last one meanwhile
                break
            taken.append((spec.step_id, spec.attempt))
            entry = self._controls.get(spec.step_id)
            if entry is not None and entry[0] == spec.attempt:
                del self._controls[spec.step_id]
        self._pending.extend(
            self.machine.handle(
                Reclaimed(effect.slot, tuple(taken)),
                now=self.clock.monotonic(),
                wall=self.clock.wall(),
            )
        )

    def _stop_attempt(self, effect: StopAttempt) -> None:
        entry = self._controls.get(effect.step_id)
        if entry is not None and entry[0] == effect.attempt:
            entry[1].cancel(effect.reason)

    def _set_timer(self, effect: SetTimer) -> None:
        delay = max(0.0, effect.due - self.clock.monotonic())
        self._timers[effect.key] = self.clock.call_later(delay, self._tell_self(effect.message))

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

    def _look_up_cache(self, first: LookUpCache) -> None:
        """Lookups back to back (every cached step made ready at once): one read of the
        store for all of them, then each answer to the machine, in order."""
        assert self._cache is not None  # the machine looks up only the ranks given to it
        asks = [first]
        pending = self._pending
        while pending and type(pending[0]) is LookUpCache:
            asks.append(pending.popleft())  # type: ignore[arg-type]
        for answer in self._cache.look_up_many(asks):
            pending.extend(
                self.machine.handle(answer, now=self.clock.monotonic(), wall=self.clock.wall())
            )

    def _put_in_cache(self, effect: PutInCache) -> None:
        assert self._cache is not None
        self._cache.put(effect.step_id, effect.rank, effect.outputs)

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
        if self._cache is not None:
            self._cache.flush()
        self._stop_timers()
        self._stop_workers()
        self._completed = True
        self._complete(self._logs.finish(effect.result, self._controls))

    # -- heartbeat and teardown ---------------------------------------------------------

    def _on_heartbeat(self) -> None:
        if self.machine.finished:
            return
        self.store.heartbeat(self.plan.run_id, self.clock.wall())
        self._logs.save_running(self._controls)
        if not self.machine.stopping and self.store.cancel_requested(self.plan.run_id):
            self.feed(CancelRun("through the store", through_store=True))
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
        """Give every lease back (abandoned ones were given up already)."""
        self._pool.cancel_waiting(self)
        abandoned = set(self.machine.abandoned_slots)
        leases, self._leases = self._leases, {}
        for slot, lease in leases.items():
            if slot not in abandoned:
                self._pool.give_back(lease)
