"""The call hub: the one decision maker for every call of an Executor, without a thread.

``sv.Executor`` runs each call as a one-step run, so a call's deadline, retries,
cancel and crash handling are the run machine's own decisions
(:mod:`stepvisor.core.machine`), not a second copy of them.  The hub carries
out the effects of those machines.  It is not an actor: a message is handled
on the thread that delivers it (the caller's for a submit or a cancel, the
Worker's for an outcome, the clock's for a timer), one thread at a time::

    Executor.submit ── submit(call) ────────────▶ hub.tell: call.machine.handle(Start)
    pool ── SlotGranted("17/w1", lease) ─────────▶ SlotReady("w1") to call 17
    Worker ── AttemptDone(worker="17/w1") ───────▶ call 17's machine, as worker "w1"
    clock ── Timed("17", DeadlineReached) ───────▶ call 17's machine
    Executor ── CancelCall("17") / CancelAll ────▶ CancelRun to the machine(s)
    effect Finish(result) ───────────────────────▶ call.link.end(result): the future settles

**One decision maker at a time.**  Messages go through a
:class:`~stepvisor.actors._mailbox.Mailbox`: the thread that finds it idle
handles them until it is empty, so messages are handled in the order they
arrive and a message's effects are carried out in order before the next, as
on an actor's thread.  No lock is held while deciding or carrying out;
futures settle (their done-callbacks run) only after the drain.  Nothing here
blocks: a Worker is *told* its attempt, and replies to the mailbox.

**The first attempt without the machine.**  Up to a call's first attempt its
machine does the same for every call of a plan (:mod:`stepvisor.actors._call`),
so a call carries that out directly and notes when.  If the attempt returns
``ok`` before anything else happened, the call succeeded: what the machine
decides for a lone step's outputs with no stop asked and no store to refuse
them.  Anything else (an error, a crash, its deadline, a cancel, a future
cancelled before it ran) makes the call's machine then, replays ``Start`` and
``SlotReady`` into it at the times they happened (their effects were carried
out already, so they are only matched up: the slot, the deadline timer), and
hands it the message: every decision that can differ between calls is still
the machine's.

**Leases, on the executor's own engine.**  The hub queues the calls waiting for
a Worker itself, hands each the lease a finishing call gives back, and gives
a Worker queued process calls a few at a time, to be sent ahead into its
child's pipe (:mod:`stepvisor.actors._leases`, :meth:`CallHub._train`).

What differs from a Supervisor: there is no store (an Executor's calls are not
durable: ``BeginRun``, ``Save*`` and ``FinishRun`` are skipped), no event hook,
no heartbeat; and the attempt's function and arguments are the call's, put into
the spec the machine built (the plan is shared by every call with the same
options).  A slot's name on the wire is the call's key and the machine's slot
name, so Worker outcomes find their call.
"""

from __future__ import annotations

import functools
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final, NamedTuple, cast

from stepvisor._log import log
from stepvisor.actors._call import (
    CARRIED_OUT,
    NO_TIMERS,
    CancelAll,
    CancelCall,
    FirstAttempt,
    HubCall,
)
from stepvisor.actors._leases import HubLeases
from stepvisor.actors._mailbox import Mailbox
from stepvisor.actors._pool import Lease, WorkerPool
from stepvisor.actors.messages import RunAttempt, RunBatch, SlotGranted
from stepvisor.backends.base import AttemptSpec
from stepvisor.clock import Clock, RealClock
from stepvisor.context import AttemptControl
from stepvisor.core.effects import (
    AbandonSlot,
    AddSlot,
    CancelTimer,
    Dispatch,
    Effect,
    Finish,
    ReleaseSlot,
    RetireSlot,
    SaveOutputs,
    SetTimer,
    StopAttempt,
    TimerKey,
)
from stepvisor.core.machine import RunMachine
from stepvisor.core.messages import AttemptDone, CancelRun, Message, OutputsSaved, SlotReady, Start

__all__ = ["CallHub", "CancelAll", "CancelCall"]

_new: Final = tuple.__new__
#: The key of a first attempt's deadline timer until its call has a machine.
_FIRST_DEADLINE: Final[TimerKey] = ("first attempt", "deadline")


class Timed(NamedTuple):
    """Clock -> hub: a timer one call's machine set has fired."""

    key: str
    message: Message


class _Close(NamedTuple):
    pass


def _refuse(lease: Lease) -> None:  # pragma: no cover - see _abandon_slot
    raise RuntimeError("an exclusive pool queued a lease request of its hub")


class CallHub:
    """Carries out the effects of the run machines of many calls, one message at a time."""

    def __init__(
        self,
        *,
        pool: WorkerPool,
        clock: Clock,
        exclusive: bool = False,
        child_calls: int | None = None,
    ) -> None:
        self._pool = pool
        #: Every attempt's ``AttemptSpec.child_calls`` (the executor's ``max_tasks_per_child``).
        self._child_calls = child_calls
        self._clock = clock
        #: The clock's readings: the system's own functions for a RealClock (two calls
        #: per call of the executor each, and a method around each costs a frame).
        real = type(clock) is RealClock
        self._monotonic: Callable[[], float] = time.monotonic if real else clock.monotonic
        self._wall: Callable[[], float] = time.time if real else clock.wall
        self._closed = False
        #: The pool serves this hub alone (the executor's own engine): a lease a
        #: call is done with is kept for the next call rather than given back,
        #: with its Worker, while no one can be waiting for one.
        self._exclusive = exclusive
        #: Exclusive pool only: spare leases, the slots waiting for one (each
        #: handed the lease a call gives back, Worker attached) and the trains.
        self._leases = HubLeases()
        self._mailbox = mailbox = Mailbox(self._handle)
        #: Deliver a message (any thread); the Workers reply to the mailbox too.
        self.tell = mailbox.tell
        #: Run once the current drain is over (settling futures).
        self._after = mailbox.after
        self._calls: dict[str, HubCall] = {}
        #: Wire slot name -> (call, the machine's name for that slot).
        self._slots: dict[str, tuple[HubCall, str]] = {}
        self._pending: deque[tuple[HubCall, Effect]] = deque()
        self._carry_out: dict[type, Callable[[HubCall, Any], None]] = {
            Dispatch: self._dispatch,
            SetTimer: self._set_timer,
            CancelTimer: self._cancel_timer,
            StopAttempt: self._stop_attempt,
            AddSlot: self._add_slot,
            ReleaseSlot: self._release_slot,
            AbandonSlot: self._abandon_slot,
            RetireSlot: self._retire_slot,
            SaveOutputs: self._outputs_kept,
            Finish: self._finish,
        }
        self._receive: dict[type, Callable[[Any], None]] = {
            AttemptDone: self._on_done,
            Timed: self._on_timed,
            SlotGranted: self._on_granted,
            HubCall: self._on_submit,
            CancelCall: self._on_cancel,
            CancelAll: self._on_cancel_all,
            _Close: self._on_close,
        }

    # -- delivering messages ---------------------------------------------------------

    def submit(self, call: HubCall) -> None:
        """Start ``call`` (on this thread, unless another is handling messages)."""
        self.tell(call)

    def close(self) -> None:
        """Take no more leases: what is granted from now on goes back to the pool."""
        self.tell(_Close())

    def _handle(self, message: Any) -> None:
        handler = self._receive.get(type(message))
        if handler is None:
            log.warning("the executor hub ignored an unexpected message %r", message)
            return
        try:
            handler(message)
        except Exception as exc:
            self._pending.clear()
            self._broken(exc)

    def _broken(self, exc: Exception) -> None:
        # A bug in the hub: every call still gets an end, with the error, and
        # nothing keeps running for a caller that will never hear of it.
        log.error("stepvisor's executor hub failed", exc_info=exc)
        error = RuntimeError("stepvisor's executor hub failed (a bug: please report it)")
        error.__cause__ = exc
        for call in list(self._calls.values()):
            for control in call.controls.values():
                control.cancel("cancel")
            if not call.done:
                try:
                    self._close_call(call)
                except Exception:  # pragma: no cover - as broken as it gets
                    log.exception("could not close an executor call after a hub failure")
                    call.done = True
                self._after(functools.partial(call.link.fail, error))

    # -- messages --------------------------------------------------------------------

    def _on_done(self, message: AttemptDone) -> None:
        entry = self._slots.get(message.worker)
        if entry is None:
            log.debug("the hub dropped an outcome for a slot it no longer knows")
            return
        call, slot = entry
        call.controls.pop(message.attempt, None)
        if call.machine is None and message.result.kind == "ok" and not call.done:
            # The first attempt succeeded and nothing else happened: what its
            # machine would decide (see the module docstring).  Its one slot
            # and timer go as _close_call would let them.
            call.done = True
            if call.timers:
                for timer in call.timers.values():
                    timer.cancel()
                call.timers.clear()
            del self._slots[message.worker]
            del self._calls[call.key]
            outputs = message.result.outputs or {}
            self._after(lambda: call.link.end_ok(outputs))
            self._give_back(call.workers.pop(slot))  # may start the next call queued
            self._run_pending()
            return
        self._feed(call, message._replace(worker=slot))

    def _on_timed(self, message: Timed) -> None:
        call = self._calls.get(message.key)
        if call is not None and not call.done:
            self._feed(call, message.message)

    def _on_granted(self, message: SlotGranted) -> None:
        entry = self._slots.get(message.slot)
        if self._closed or entry is None or entry[0].done:
            self._give_back(message.lease)
            return
        call, slot = entry
        self._bind(call, slot, message.lease)
        self._run_pending()

    def _on_submit(self, call: HubCall) -> None:
        self._calls[call.key] = call
        first = call.first
        if first is None:
            self._feed(call, Start())
            return
        call.started_at = (self._monotonic(), self._wall())
        self._add_slot(call, first.add_slot)

    def _on_cancel(self, message: CancelCall) -> None:
        call = self._calls.get(message.key)
        if call is not None and not call.done:
            self._feed(call, CancelRun(message.reason))

    def _on_cancel_all(self, message: CancelAll) -> None:
        # A call has begun once it was given a Worker (``go`` is set then);
        # until then it is queued, as in the standard library's pools.
        for call in list(self._calls.values()):
            if call.done:
                continue
            if call.go is None:
                if message.queued:
                    call.link.queued_cancel()
                    self._feed(call, CancelRun(message.reason))
            elif message.running:
                self._feed(call, CancelRun(message.reason))

    def _on_close(self, _: _Close) -> None:
        self._closed = True
        spare, self._leases.spare = self._leases.spare, []
        for lease in spare:
            self._pool.give_back(lease)

    # -- feeding the machines ----------------------------------------------------------

    def _machine(self, call: HubCall) -> RunMachine:
        """The call's machine; made now, if need be, from what its first attempt did."""
        machine = call.machine
        if machine is not None:
            return machine
        machine = call.machine = call.plan.machine(call.key, call.seed)
        first = call.first
        if first is not None:
            replay = ((Start(), call.started_at), (SlotReady(first.add_slot.slot), call.ready_at))
            for message, at in replay:
                if at is not None:
                    for effect in machine.handle(message, now=at[0], wall=at[1]):
                        self._match(call, effect)
        return machine

    def _match(self, call: HubCall, effect: Effect) -> None:
        """An effect of a replayed message: it was carried out already, as the first attempt."""
        kind = type(effect)
        if kind is SetTimer:
            timer = call.timers.pop(_FIRST_DEADLINE, None)
            if timer is not None:
                call.timers[cast("SetTimer", effect).key] = timer
        elif kind is AddSlot or kind is Dispatch:
            first = cast("FirstAttempt", call.first)
            if cast("AddSlot | Dispatch", effect).slot != first.add_slot.slot:
                raise RuntimeError(f"a call's machine replayed {effect!r}, not {first!r}")
        elif kind in CARRIED_OUT:
            raise RuntimeError(f"a call's machine replayed an effect it did not have: {effect!r}")

    def _feed(self, call: HubCall, message: Message) -> None:
        self._then(call, message)
        self._run_pending()

    def _run_pending(self) -> None:
        pending, carry_out = self._pending, self._carry_out
        while pending:
            call, effect = pending.popleft()
            handler = carry_out.get(type(effect))
            if handler is not None:  # the rest are store writes and events: none here
                handler(call, effect)

    def _then(self, call: HubCall, message: Message) -> None:
        """Feed ``message`` after the effects already decided (which came first)."""
        machine = self._machine(call)
        clock = self._clock
        effects = machine.handle(message, now=clock.monotonic(), wall=clock.wall())
        self._pending.extend((call, effect) for effect in effects)

    # -- slots -----------------------------------------------------------------------

    def _add_slot(self, call: HubCall, effect: AddSlot) -> None:
        wire = f"{call.key}/{effect.slot}"
        entry = self._slots[wire] = (call, effect.slot)
        call.slots.append(effect.slot)
        if self._leases.spare:
            self._bind(call, effect.slot, self._leases.spare.pop())
            return
        if self._exclusive:
            pool = self._pool
            if pool.taken >= pool.capacity:  # only this hub takes leases from it
                self._leases.wait(entry)
                return
        tell = self.tell

        def deliver(lease: Lease) -> None:
            tell(SlotGranted(wire, lease))

        lease = self._pool.lease(call, deliver)
        if lease is not None:
            self._bind(call, effect.slot, lease)

    def _bind(self, call: HubCall, slot: str, lease: Lease) -> None:
        call.workers[slot] = lease
        self._pool.attach(lease)  # a call always needs its Worker: attach now
        if call.machine is not None:
            self._then(call, SlotReady(slot))
        elif self._may_run(call):
            self._first(call, slot, cast("FirstAttempt", call.first))
        else:  # cancelled while it waited: the machine stops it before it starts
            self._feed(call, SlotReady(slot))

    def _release_slot(self, call: HubCall, effect: ReleaseSlot) -> None:
        self._slots.pop(f"{call.key}/{effect.slot}", None)
        self._give_back(call.workers.pop(effect.slot))

    def _give_back(self, lease: Lease) -> None:
        pool = self._pool
        leases = self._leases
        if not leases.off(lease):  # a train's, and some of its calls are not done
            return
        if self._exclusive and not self._closed:
            queued = leases.next()
            if queued is not None:  # the next call waiting takes it, Worker and all
                if not self._train(queued[0], queued[1], lease):
                    self._bind(queued[0], queued[1], lease)
                return
            # Nobody waits for a lease while some are not taken (the pool queues a
            # request only when all are), so keeping this one takes it from no one.
            if pool.taken < pool.capacity:
                leases.spare.append(lease)
                return
        pool.give_back(lease)

    def _abandon_slot(self, call: HubCall, effect: AbandonSlot) -> None:
        self._pool.abandon(call.workers[effect.slot])
        pool = self._pool
        if self._exclusive and not self._closed and pool.taken < pool.capacity:
            # Its capacity is free again: the next slot waiting takes a fresh lease
            # (at once: the pool serves this hub alone, so it has one).
            queued = self._leases.next()
            if queued is not None:
                lease = pool.lease(queued[0], _refuse)
                if lease is not None:
                    self._bind(queued[0], queued[1], lease)

    def _retire_slot(self, call: HubCall, effect: RetireSlot) -> None:
        self._slots.pop(f"{call.key}/{effect.slot}", None)
        ref = call.workers.pop(effect.slot, None)
        if ref is not None:
            self._pool.retire(ref)
        if call.done and not call.workers:
            self._calls.pop(call.key, None)

    # -- attempts and timers --------------------------------------------------------------

    def _may_run(self, call: HubCall) -> bool:
        if call.go is None:
            call.go = call.link.begin()
        return call.go

    def _first(self, call: HubCall, slot: str, first: FirstAttempt) -> None:
        """Send attempt 1 as the machine would have (see :func:`first_attempt`)."""
        now = self._monotonic()
        call.ready_at = (now, self._wall())
        order = first.order
        if first.timer is not None and order.budget is not None:
            self._start_timer(call, _FIRST_DEADLINE, now + order.budget, first.timer)
        self._send(call, slot, order.spec, order.executor, order.budget)

    # -- trains: process calls queued, handed to one Worker together ----------------------

    def _train(self, head: HubCall, slot: str, lease: Lease) -> bool:
        """Start ``head`` and the next calls queued on ``lease`` at once; False if it may not.

        A process Worker sends the attempts of a batch ahead into its child's
        pipe, so the child starts each the moment it replied to the one before,
        instead of idling through a round trip to the hub per call.  Only first
        attempts of process calls with no timeout, not cancelled
        (:func:`~stepvisor.actors._leases.trainable`); their futures say running
        once handed over, as ``ProcessPoolExecutor``'s do once in its call
        queue.  The lease is given back when the last of them is done.
        """
        behind = self._leases.train_behind(head)
        if not behind:
            return False
        messages = []
        for call, member in [(head, slot), *behind]:
            call.workers[member] = lease
            if not self._may_run(call):  # cancelled while it waited: not in the train
                del call.workers[member]
                self._leases.put_back(call, member)
                continue
            call.ready_at = (self._monotonic(), self._wall())
            order = cast("FirstAttempt", call.first).order
            messages.append(self._order(call, member, order.spec, order.executor, None))
        if not messages:  # every one was cancelled: the lease goes on as usual
            return False
        self._leases.ride(lease, len(messages))
        worker = self._pool.attach(lease)
        worker.tell(messages[0] if len(messages) == 1 else RunBatch(tuple(messages)))
        return True

    def _dispatch(self, call: HubCall, effect: Dispatch) -> None:
        for order in effect.orders:
            self._send(call, effect.slot, order.spec, order.executor, order.budget)

    def _send(  # one RunAttempt: its outcome comes back as one AttemptDone
        self, call: HubCall, slot: str, spec: AttemptSpec, executor: str, budget: float | None
    ) -> None:
        worker = self._pool.attach(call.workers[slot])
        # The Worker replies to the mailbox: the outcome is handled on its thread.
        worker.tell(self._order(call, slot, spec, executor, budget))

    def _order(
        self, call: HubCall, slot: str, spec: AttemptSpec, executor: str, budget: float | None
    ) -> RunAttempt:
        """The message of one attempt of ``call`` (its control kept, to stop it)."""
        control = AttemptControl()
        if not self._may_run(call):
            # Cancelled while it waited for a Worker: the guard stops it before
            # it starts, and the machine hears why.
            control.cancel("cancel")
            if not call.refused:
                call.refused = True
                self._then(call, CancelRun("its future was cancelled"))
        # The plan's spec with the call's own run id, function and arguments;
        # tuple.__new__ rather than _replace (a third of the cost): one per call.
        spec = _new(
            AttemptSpec,
            (
                call.key,
                spec.step_id,
                spec.attempt,
                spec.max_attempts,
                call.fn,
                spec.is_async,
                spec.inputs,
                call.params,
                None if budget is None else time.monotonic() + budget,
                spec.kill_grace,
                call.fn_payload,
                spec.resources,
                spec.trace,
                self._child_calls,
            ),
        )
        call.controls[spec.attempt] = control
        message: RunAttempt = _new(
            RunAttempt, (spec, control, executor, f"{call.key}/{slot}", self._mailbox, False)
        )
        return message

    def _stop_attempt(self, call: HubCall, effect: StopAttempt) -> None:
        control = call.controls.get(effect.attempt)
        if control is not None:
            control.cancel(effect.reason)

    def _set_timer(self, call: HubCall, effect: SetTimer) -> None:
        self._start_timer(call, effect.key, effect.due, effect.message)

    def _start_timer(self, call: HubCall, key: TimerKey, due: float, message: Message) -> None:
        tell, timed = self.tell, Timed(call.key, message)

        def fire() -> None:
            tell(timed)

        delay = max(0.0, due - self._clock.monotonic())
        timers = call.timers
        if timers is NO_TIMERS:
            timers = call.timers = {}
        timers[key] = self._clock.call_later(delay, fire)

    def _cancel_timer(self, call: HubCall, effect: CancelTimer) -> None:
        timer = call.timers.pop(effect.key, None)
        if timer is not None:
            timer.cancel()

    def _outputs_kept(self, call: HubCall, effect: SaveOutputs) -> None:
        # Without a store nothing can refuse the outputs (the plan says so, so
        # this does not come); should it, they are kept.
        self._then(call, OutputsSaved(effect.record.step_id, effect.attempt))

    # -- the end of a call ------------------------------------------------------------

    def _finish(self, call: HubCall, effect: Finish) -> None:
        self._close_call(call)
        result = effect.result
        self._after(lambda: call.link.end(result))

    def _close_call(self, call: HubCall) -> None:
        """Stop the call's timers and give its Workers back (abandoned ones excepted)."""
        call.done = True
        for timer in call.timers.values():
            timer.cancel()
        call.timers.clear()
        if len(call.workers) < len(call.slots):  # a lease may still be waiting
            self._pool.cancel_waiting(call)
        abandoned = call.machine.abandoned_slots if call.machine is not None else ()
        for slot in call.slots:
            if slot in abandoned:
                continue  # its attempt may still return: its outcome must find the call
            self._slots.pop(f"{call.key}/{slot}", None)
            lease = call.workers.pop(slot, None)
            if lease is not None:
                self._give_back(lease)
        if not call.workers:
            self._calls.pop(call.key, None)
