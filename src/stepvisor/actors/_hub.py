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

**One decision maker at a time.**  ``tell`` appends to a mailbox under a lock;
the thread that finds no one draining it becomes the drainer and handles
messages until the mailbox is empty (a message that arrives meanwhile, even
from an effect of its own such as a lease passed on, waits its turn).  So
messages are handled in the order they arrive and a message's effects are
carried out in order before the next, as on an actor's thread; the lock is
held only to take a message, never while deciding or carrying out, and
futures are settled (their done-callbacks run) only after the drainer has
given up its role.  Nothing here blocks: a Worker is *told* its attempt.

**The first attempt without the machine.**  What a one-step machine does
until its first attempt returns never depends on the call: ask for one slot,
dispatch attempt 1 on it, set its deadline timer.  That is learnt once per
plan from the machine itself (:func:`first_attempt`), and a call carries it
out directly, recording the messages the machine would have had.  If the
attempt returns ``ok`` before anything else happened, the call succeeded
(what the machine would decide: a lone step's outputs with no stop asked,
and no store to refuse them).  Anything else (an error, a crash, its
deadline, a cancel, a future cancelled before it ran) makes the call's
machine at that moment, replays the recorded messages into it (their effects
were carried out already, so they are only matched up: the slot, the
deadline timer), and hands it the message: every decision that can differ
between calls is still the machine's.

What differs from a Supervisor: there is no store (an Executor's calls are not
durable: ``BeginRun``, ``Save*`` and ``FinishRun`` are skipped), no event hook,
no heartbeat; and the attempt's function and arguments are the call's, put into
the spec the machine built (the plan is shared by every call with the same
options).  A slot's name on the wire is the call's key and the machine's slot
name, so Worker outcomes find their call.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Final, NamedTuple, Protocol, cast

from stepvisor._log import log
from stepvisor.actors._pool import Lease, WorkerPool
from stepvisor.actors.messages import RunAttempt, SlotGranted
from stepvisor.backends.base import AttemptSpec
from stepvisor.clock import Clock, TimerHandle
from stepvisor.context import AttemptControl
from stepvisor.core.effects import (
    AbandonSlot,
    AddSlot,
    AttemptOrder,
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

__all__ = ["CallHub", "CallLink", "CancelAll", "CancelCall", "FirstAttempt", "HubCall"]

#: The key of a first attempt's deadline timer until its call has a machine.
_FIRST_DEADLINE: Final[TimerKey] = ("first attempt", "deadline")


class CallLink(Protocol):
    """How the hub reaches a call's caller (``stepvisor._calls.Link``).

    ``begin()`` is asked once, just before the call's first attempt is sent: it
    returns False if the call must not run (its future was cancelled while it
    waited).  Exactly one of ``end``, ``end_ok`` and ``fail`` is called, once,
    with no lock held.  ``queued_cancel()`` cancels a call that has not begun.
    """

    def begin(self) -> bool: ...
    def queued_cancel(self) -> None: ...
    def end(self, result: RunResult) -> None: ...
    def end_ok(self, outputs: Mapping[str, Any]) -> None: ...
    def fail(self, error: BaseException) -> None: ...


class FirstAttempt(NamedTuple):
    """What a plan's machine does from ``Start`` to its first attempt: the same for every call."""

    slot: str
    order: AttemptOrder
    #: The message of the attempt's deadline timer (``None``: no deadline).
    timer: Message | None


def first_attempt(machine: RunMachine) -> FirstAttempt | None:
    """Ask a fresh machine what it does up to its first attempt; ``None`` if not the usual.

    The usual is: ``Start`` asks for one slot, and that slot's ``SlotReady``
    dispatches one attempt on it, with at most its deadline timer set.  A plan
    that does anything else there (a run deadline, say) runs every call on
    its machine from the start.
    """
    carried = CallHub.CARRIED_OUT
    started = [e for e in machine.handle(Start(), now=0.0, wall=0.0) if type(e) in carried]
    if len(started) != 1 or type(started[0]) is not AddSlot:
        return None
    slot = started[0].slot
    ready = [e for e in machine.handle(SlotReady(slot), now=0.0, wall=0.0) if type(e) in carried]
    if not ready or type(ready[0]) is not Dispatch:
        return None
    dispatch, timers = ready[0], ready[1:]
    if dispatch.slot != slot or len(dispatch.orders) != 1:
        return None
    order = dispatch.orders[0]
    if len(timers) > 1 or (timers and type(timers[0]) is not SetTimer):
        return None
    timer = cast("SetTimer", timers[0]).message if timers else None
    if (timer is None) != (order.budget is None):
        return None
    return FirstAttempt(slot, order, timer)


class HubCall:
    """One call in the hub: what it runs, its machine once it needs one, and its link."""

    __slots__ = (
        "controls",
        "done",
        "executor",
        "first",
        "fn",
        "fn_payload",
        "go",
        "history",
        "key",
        "link",
        "machine",
        "make_machine",
        "params",
        "refused",
        "slots",
        "timers",
        "workers",
    )

    def __init__(
        self,
        key: str,
        *,
        first: FirstAttempt | None,
        make_machine: Callable[[], RunMachine],
        executor: str,
        fn: Callable[..., Any],
        fn_payload: bytes | None,
        params: Mapping[str, Any],
        link: CallLink,
    ) -> None:
        self.key = key
        self.first = first
        self.make_machine = make_machine
        self.machine: RunMachine | None = None
        #: The messages the machine would have had so far (while it is not made).
        self.history: list[tuple[Message, float, float]] = []
        self.executor = executor
        self.fn = fn
        self.fn_payload = fn_payload
        self.params = params
        self.link = link
        self.go: bool | None = None  # what link.begin() said, once asked
        self.refused = False
        self.done = False
        self.controls: dict[int, AttemptControl] = {}
        #: The machine's slot names, in the order it asked for them.
        self.slots: list[str] = []
        self.timers: dict[TimerKey, TimerHandle] = {}
        self.workers: dict[str, Lease] = {}  # the lease of each slot


class _Submit(NamedTuple):
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


class _Close(NamedTuple):
    pass


class CallHub:
    """Carries out the effects of the run machines of many calls, one message at a time."""

    #: The effects the hub carries out (the rest are store writes and events: none here).
    CARRIED_OUT: Final = frozenset(
        {
            Dispatch,
            SetTimer,
            CancelTimer,
            StopAttempt,
            AddSlot,
            ReleaseSlot,
            AbandonSlot,
            RetireSlot,
            SaveOutputs,
            Finish,
        }
    )

    def __init__(self, *, pool: WorkerPool, clock: Clock) -> None:
        self._pool = pool
        self._clock = clock
        self._lock = threading.Lock()
        self._mail: deque[Any] = deque()
        self._draining = False
        self._closed = False
        #: What to do once the drainer gives up its role: settle futures.
        self._ends: list[Callable[[], None]] = []
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
            _Submit: self._on_submit,
            CancelCall: self._on_cancel,
            CancelAll: self._on_cancel_all,
            _Close: self._on_close,
        }

    # -- delivering messages ---------------------------------------------------------

    def submit(self, call: HubCall) -> None:
        """Start ``call`` (on this thread, unless another is handling messages)."""
        self.tell(_Submit(call))

    def close(self) -> None:
        """Take no more leases: what is granted from now on goes back to the pool."""
        self.tell(_Close())

    def tell(self, message: Any) -> None:
        """Deliver ``message`` from any thread; never raises (a Worker calls it)."""
        with self._lock:
            if self._draining:
                self._mail.append(message)
                return
            self._draining = True
        ends: list[Callable[[], None]] = []
        try:
            while True:
                self._handle(message)
                with self._lock:
                    if not self._mail:
                        self._draining = False
                        ends, self._ends = self._ends, []
                        break
                    message = self._mail.popleft()
        except BaseException:  # pragma: no cover - KeyboardInterrupt: leave the role
            with self._lock:
                self._draining = False
            raise
        for end in ends:
            try:
                end()
            except Exception:  # pragma: no cover - Link.end catches what it can
                log.exception("settling an executor call's future failed")

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
                self._ends.append(functools.partial(call.link.fail, error))

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
            # machine would decide (see the module docstring).
            self._close_call(call)
            outputs = message.result.outputs or {}
            self._ends.append(lambda: call.link.end_ok(outputs))
            return
        self._feed(call, message._replace(worker=slot))

    def _on_timed(self, message: Timed) -> None:
        call = self._calls.get(message.key)
        if call is not None and not call.done:
            self._feed(call, message.message)

    def _on_granted(self, message: SlotGranted) -> None:
        entry = self._slots.get(message.slot)
        if self._closed or entry is None or entry[0].done:
            self._pool.give_back(message.lease)
            return
        call, slot = entry
        self._bind(call, slot, message.lease)
        self._run_pending()

    def _on_submit(self, message: _Submit) -> None:
        call = message.call
        self._calls[call.key] = call
        first = call.first
        if first is None:
            self._feed(call, Start())
            return
        clock = self._clock
        call.history.append((Start(), clock.monotonic(), clock.wall()))
        self._add_slot(call, AddSlot(first.slot))

    def _on_cancel(self, message: CancelCall) -> None:
        call = self._calls.get(message.key)
        if call is not None and not call.done:
            self._feed(call, CancelRun(message.reason))

    def _on_cancel_all(self, message: CancelAll) -> None:
        for call in list(self._calls.values()):
            if not call.done:
                if call.go is None:
                    call.link.queued_cancel()
                self._feed(call, CancelRun(message.reason))

    def _on_close(self, _: _Close) -> None:
        self._closed = True

    # -- feeding the machines ----------------------------------------------------------

    def _machine(self, call: HubCall) -> RunMachine:
        """The call's machine; made now, if need be, from what its first attempt did."""
        machine = call.machine
        if machine is not None:
            return machine
        machine = call.machine = call.make_machine()
        history, call.history = call.history, []
        for message, now, wall in history:
            for effect in machine.handle(message, now=now, wall=wall):
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
            if cast("AddSlot | Dispatch", effect).slot != first.slot:
                raise RuntimeError(f"a call's machine replayed {effect!r}, not {first!r}")
        elif kind in self.CARRIED_OUT:
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
        self._slots[wire] = (call, effect.slot)
        call.slots.append(effect.slot)
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

    def _may_run(self, call: HubCall) -> bool:
        if call.go is None:
            call.go = call.link.begin()
        return call.go

    def _first(self, call: HubCall, slot: str, first: FirstAttempt) -> None:
        """Send attempt 1 as the machine would have (see :func:`first_attempt`)."""
        clock = self._clock
        now = clock.monotonic()
        call.history.append((SlotReady(slot), now, clock.wall()))
        order = first.order
        self._send(call, slot, order.spec, order.executor, order.budget)
        if first.timer is not None and order.budget is not None:
            self._start_timer(call, _FIRST_DEADLINE, now + order.budget, first.timer)

    def _dispatch(self, call: HubCall, effect: Dispatch) -> None:
        for order in effect.orders:
            self._send(call, effect.slot, order.spec, order.executor, order.budget)

    def _send(
        self, call: HubCall, slot: str, spec: AttemptSpec, executor: str, budget: float | None
    ) -> None:
        control = AttemptControl()
        if not self._may_run(call):
            # Cancelled while it waited for a Worker: the guard stops it before
            # it starts, and the machine hears why.
            control.cancel("cancel")
            if not call.refused:
                call.refused = True
                self._then(call, CancelRun("its future was cancelled"))
        spec = spec._replace(
            run_id=call.key,
            fn=call.fn,
            fn_payload=call.fn_payload,
            params=call.params,
            deadline=None if budget is None else time.monotonic() + budget,
        )
        call.controls[spec.attempt] = control
        worker = self._pool.attach(call.workers[slot])
        # The Worker replies to .tell: this hub (not an actor) takes it on its thread.
        worker.tell(RunAttempt(spec, control, executor, f"{call.key}/{slot}", cast("Any", self)))

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
        call.timers[key] = self._clock.call_later(delay, fire)

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
        self._ends.append(lambda: call.link.end(result))

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
                self._pool.give_back(lease)
        if not call.workers:
            self._calls.pop(call.key, None)
