"""The call hub: one actor thread hosts the run machine of every call of an Executor.

``sv.Executor`` runs each call as a one-step run, so a call's deadline, retries,
cancel and crash handling are the run machine's own decisions
(:mod:`stepvisor.core.machine`), not a second copy of them.  A run's usual
shell, the :class:`~stepvisor.actors.supervisor.Supervisor`, is one actor (one
thread) per run plus a store; per call that would cost more than the call.
So one long-lived hub carries out the effects of many machines, routing what
comes back by call::

    Executor.submit ── SubmitCall(call) ─────▶ hub: call.machine.handle(Start)
    pool ── SlotGranted("17/w1", lease) ─────▶ SlotReady("w1") to call 17
    Worker ── AttemptDone(worker="17/w1") ───▶ call 17's machine, as worker "w1"
    clock ── Timed("17", DeadlineReached) ───▶ call 17's machine
    Executor ── CancelCall("17") / CancelAll ▶ CancelRun to the machine(s)
    effect Finish(result) ───────────────────▶ call.end(result): the future settles

What differs from a Supervisor: there is no store (an Executor's calls are not
durable: ``BeginRun``, ``Save*`` and ``FinishRun`` are skipped), no event hook,
no heartbeat; and the attempt's function and arguments are the call's, put into
the spec the machine built (the machine's plan is shared by every call with
the same options, so it is built once).  A slot's name on the wire is the
call's key and the machine's slot name, so Worker outcomes find their machine.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import pykka

from stepvisor._log import log
from stepvisor.actors._pool import Lease, WorkerPool
from stepvisor.actors.messages import RunAttempt, SlotGranted, Warm
from stepvisor.clock import Clock, TimerHandle
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
from stepvisor.core.result import RunResult

__all__ = ["CallHub", "CancelAll", "CancelCall", "HubCall", "SubmitCall"]

#: The hub's thread name (the engine's Workers are ``stepvisor-worker-*``).
HUB_THREAD_NAME = "stepvisor-hub"


class HubCall:
    """One call in the hub: its machine, what it runs, and how its caller learns the end.

    ``begin()`` is asked once, just before the call's first attempt is sent: it
    returns False if the call must not run (its future was cancelled while it
    waited), and the attempt is then stopped before it starts.  ``end(result)``
    is called once, on the hub's thread, when the machine finishes the run.
    ``queued_cancel()`` cancels the call if it has not begun (``shutdown(
    cancel_futures=True)``).
    """

    __slots__ = (
        "begin",
        "begun",
        "controls",
        "done",
        "end",
        "executor",
        "fn",
        "fn_payload",
        "key",
        "machine",
        "params",
        "queued_cancel",
        "slots",
        "timers",
        "workers",
    )

    def __init__(
        self,
        key: str,
        machine: RunMachine,
        *,
        executor: str,
        fn: Callable[..., Any],
        fn_payload: bytes | None,
        params: Mapping[str, Any],
        begin: Callable[[], bool],
        end: Callable[[RunResult], None],
        queued_cancel: Callable[[], None],
    ) -> None:
        self.key = key
        self.machine = machine
        self.executor = executor
        self.fn = fn
        self.fn_payload = fn_payload
        self.params = params
        self.begin = begin
        self.end = end
        self.queued_cancel = queued_cancel
        self.begun = False
        self.done = False
        self.controls: dict[int, AttemptControl] = {}
        #: The machine's slot names, in the order it asked for them.
        self.slots: list[str] = []
        self.timers: dict[TimerKey, TimerHandle] = {}
        self.workers: dict[str, Lease] = {}  # the lease of each slot


class SubmitCall(NamedTuple):
    """Executor -> hub: start this call."""

    call: HubCall


class CancelCall(NamedTuple):
    """Executor -> hub: the call's future was cancelled; stop the call."""

    key: str
    reason: str


class CancelAll(NamedTuple):
    """Executor -> hub: cancel every queued call and stop every running one."""

    reason: str


class Timed(NamedTuple):
    """Clock -> hub: a timer one call's machine set has fired."""

    key: str
    message: Message


class CallHub(pykka.ThreadingActor):
    """Carries out the effects of the run machines of many calls, on one thread."""

    use_daemon_thread = True

    def __init__(
        self,
        *,
        pool: WorkerPool,
        clock: Clock,
        on_thread: Callable[[threading.Thread], None],
    ) -> None:
        super().__init__()
        self._pool = pool
        self._clock = clock
        self._on_thread = on_thread
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
            SubmitCall: self._on_submit,
            CancelCall: self._on_cancel,
            CancelAll: self._on_cancel_all,
        }

    # -- actor hooks -------------------------------------------------------------

    def on_start(self) -> None:
        thread = threading.current_thread()
        thread.name = HUB_THREAD_NAME
        self._on_thread(thread)

    def on_failure(self, *_: object) -> None:
        # A bug in the hub: every call still gets an end, with the error, and
        # nothing keeps running for a caller that will never hear of it.
        error = RuntimeError("stepvisor's executor hub failed (a bug: please report it)")
        for call in list(self._calls.values()):
            for control in call.controls.values():
                control.cancel("cancel")
            if not call.done:
                self._close_call(call)
                call.end(call.machine.failed_result(error, wall=self._clock.wall()))

    def on_receive(self, message: Any) -> None:
        handler = self._receive.get(type(message))
        if handler is None:
            log.warning("the executor hub ignored an unexpected message %r", message)
        else:
            handler(message)

    def _on_done(self, message: AttemptDone) -> None:
        entry = self._slots.get(message.worker)
        if entry is None:
            log.debug("the hub dropped an outcome for a slot it no longer knows")
            return
        call, slot = entry
        call.controls.pop(message.attempt, None)
        self._feed(call, message._replace(worker=slot))

    def _on_timed(self, message: Timed) -> None:
        call = self._calls.get(message.key)
        if call is not None and not call.done:
            self._feed(call, message.message)

    def _on_granted(self, message: SlotGranted) -> None:
        entry = self._slots.get(message.slot)
        if entry is None or entry[0].done:
            self._pool.give_back(message.lease)
            return
        call, slot = entry
        self._bind(call, slot, message.lease)
        self._run_pending()

    def _on_submit(self, message: SubmitCall) -> None:
        call = message.call
        self._calls[call.key] = call
        self._feed(call, Start())

    def _on_cancel(self, message: CancelCall) -> None:
        call = self._calls.get(message.key)
        if call is not None and not call.done:
            self._feed(call, CancelRun(message.reason))

    def _on_cancel_all(self, message: CancelAll) -> None:
        for call in list(self._calls.values()):
            if not call.done:
                if not call.begun:
                    call.queued_cancel()
                self._feed(call, CancelRun(message.reason))

    # -- feeding the machines ----------------------------------------------------------

    def _feed(self, call: HubCall, message: Message) -> None:
        clock = self._clock
        effects = call.machine.handle(message, now=clock.monotonic(), wall=clock.wall())
        self._pending.extend((call, effect) for effect in effects)
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
        clock = self._clock
        effects = call.machine.handle(message, now=clock.monotonic(), wall=clock.wall())
        self._pending.extend((call, effect) for effect in effects)

    # -- slots -----------------------------------------------------------------------

    def _add_slot(self, call: HubCall, effect: AddSlot) -> None:
        wire = f"{call.key}/{effect.slot}"
        self._slots[wire] = (call, effect.slot)
        call.slots.append(effect.slot)
        tell = self.actor_ref.tell
        pool = self._pool

        def deliver(lease: Lease) -> None:
            try:
                tell(SlotGranted(wire, lease))
            except pykka.ActorDeadError:  # the executor closed meanwhile
                pool.give_back(lease)

        lease = pool.lease(call, deliver)
        if lease is not None:
            self._bind(call, effect.slot, lease)

    def _bind(self, call: HubCall, slot: str, lease: Lease) -> None:
        call.workers[slot] = lease
        worker = self._pool.attach(lease)  # a call always needs its Worker: attach now
        if call.executor == "process":
            worker.tell(Warm(("process",)))
        self._then(call, SlotReady(slot))

    def _release_slot(self, call: HubCall, effect: ReleaseSlot) -> None:
        self._slots.pop(f"{call.key}/{effect.slot}", None)
        self._pool.give_back(call.workers.pop(effect.slot))

    def _abandon_slot(self, call: HubCall, effect: AbandonSlot) -> None:
        self._pool.abandon(call.workers[effect.slot])

    def _retire_slot(self, call: HubCall, effect: RetireSlot) -> None:
        self._slots.pop(f"{call.key}/{effect.slot}", None)
        ref = call.workers.pop(effect.slot, None)
        if ref is not None:
            self._pool.retire(ref)
        if call.done and not call.workers:
            self._calls.pop(call.key, None)

    # -- attempts and timers --------------------------------------------------------------

    def _dispatch(self, call: HubCall, effect: Dispatch) -> None:
        ref = self._pool.attach(call.workers[effect.slot])
        wire = f"{call.key}/{effect.slot}"
        me = self.actor_ref
        for order in effect.orders:
            control = AttemptControl()
            if not call.begun:
                call.begun = True
                if not call.begin():
                    # Cancelled while it waited for a Worker: the guard stops it
                    # before it starts, and the machine hears why.
                    control.cancel("cancel")
                    self._then(call, CancelRun("its future was cancelled"))
            budget = order.budget
            spec = order.spec._replace(
                fn=call.fn,
                fn_payload=call.fn_payload,
                params=call.params,
                deadline=None if budget is None else time.monotonic() + budget,
            )
            call.controls[spec.attempt] = control
            ref.tell(RunAttempt(spec, control, order.executor, wire, me))

    def _stop_attempt(self, call: HubCall, effect: StopAttempt) -> None:
        control = call.controls.get(effect.attempt)
        if control is not None:
            control.cancel(effect.reason)

    def _set_timer(self, call: HubCall, effect: SetTimer) -> None:
        ref, message = self.actor_ref, Timed(call.key, effect.message)

        def fire() -> None:
            with contextlib.suppress(pykka.ActorDeadError):
                ref.tell(message)

        delay = max(0.0, effect.due - self._clock.monotonic())
        call.timers[effect.key] = self._clock.call_later(delay, fire)

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
        call.end(effect.result)

    def _close_call(self, call: HubCall) -> None:
        """Stop the call's timers and give its Workers back (abandoned ones excepted)."""
        call.done = True
        for timer in call.timers.values():
            timer.cancel()
        call.timers.clear()
        if len(call.workers) < len(call.slots):  # a lease may still be waiting
            self._pool.cancel_waiting(call)
        abandoned = call.machine.abandoned_slots
        for slot in call.slots:
            if slot in abandoned:
                continue  # its attempt may still return: its outcome must find the call
            self._slots.pop(f"{call.key}/{slot}", None)
            ref = call.workers.pop(slot, None)
            if ref is not None:
                self._pool.give_back(ref)
        if not call.workers:
            self._calls.pop(call.key, None)
