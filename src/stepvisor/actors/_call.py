"""One call of the call hub: how it reaches its caller, its plan, and its first attempt.

:class:`HubCall` is what the hub (:mod:`stepvisor.actors._hub`) holds of one
call of :class:`stepvisor.Executor`; :class:`CallLink` is how it settles the
call's future, :class:`CallPlan` what calls with one function and options
share.

**The first attempt.**  A call is a one-step run.  Until that step's first
attempt returns, its machine does the same for every call of a plan:
``Start`` asks for one slot; that slot's ``SlotReady`` dispatches attempt 1
on it (with its deadline timer, if it has a timeout).  Making a machine and
feeding it those messages costs more than a no-op call itself, so the call
hub (:mod:`stepvisor.actors._hub`) carries that part out directly, and makes
the call's machine only when something happens that can differ between calls.

Nothing here is a second copy of a decision: :func:`first_attempt` asks a
fresh machine of the plan what it does, and a plan whose machine does
anything else there (a run deadline, say) gets no :class:`FirstAttempt`, so
its calls run on their machine from the start.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final, NamedTuple, Protocol

from stepvisor.actors._pool import Lease
from stepvisor.clock import TimerHandle
from stepvisor.context import AttemptControl
from stepvisor.core import effects as fx
from stepvisor.core.effects import AddSlot, AttemptOrder, Dispatch, SetTimer, TimerKey
from stepvisor.core.machine import RunMachine
from stepvisor.core.messages import Message, SlotReady, Start
from stepvisor.core.result import RunResult

__all__ = [
    "CARRIED_OUT",
    "NO_TIMERS",
    "CallLink",
    "CallPlan",
    "CancelAll",
    "CancelCall",
    "FirstAttempt",
    "HubCall",
    "first_attempt",
]

#: The effects the call hub carries out; the rest are store writes and events,
#: which an Executor's calls do not have.
CARRIED_OUT: Final = frozenset(
    {fx.AbandonSlot, fx.AddSlot, fx.CancelTimer, fx.Dispatch, fx.Finish, fx.ReleaseSlot}
    | {fx.RetireSlot, fx.SaveOutputs, fx.SetTimer, fx.StopAttempt}
)


#: The ``timers`` of every call that has none (never written to).
NO_TIMERS: Final[dict[TimerKey, TimerHandle]] = {}


class CancelCall(NamedTuple):
    """Executor -> hub: the call's future was cancelled; stop the call."""

    key: str
    reason: str


class CancelAll(NamedTuple):
    """Executor -> hub: cancel the queued calls, stop the running ones, or both.

    One message, so that the slot a stopped call frees cannot start a queued
    call that is being cancelled (both are handled before the slot's grant).
    """

    reason: str
    queued: bool = True
    running: bool = False


class FirstAttempt(NamedTuple):
    """What a plan's machine does from ``Start`` to its first attempt: the same for every call."""

    #: The slot it asks for (the effect itself, so a call need not build one).
    add_slot: AddSlot
    order: AttemptOrder
    #: The message of the attempt's deadline timer (``None``: no deadline).
    timer: Message | None


def first_attempt(machine: RunMachine) -> FirstAttempt | None:
    """Ask a fresh ``machine`` what it does up to its first attempt; ``None`` if not the usual."""
    started = [e for e in machine.handle(Start(), now=0.0, wall=0.0) if type(e) in CARRIED_OUT]
    if len(started) != 1 or type(started[0]) is not AddSlot:
        return None
    add_slot = started[0]
    ready = machine.handle(SlotReady(add_slot.slot), now=0.0, wall=0.0)
    dispatches = [e for e in ready if type(e) is Dispatch]
    timers = [e for e in ready if type(e) is SetTimer]
    if len(dispatches) != 1 or len(timers) > 1:
        return None
    if sum(type(e) in CARRIED_OUT for e in ready) != len(dispatches) + len(timers):
        return None
    dispatch = dispatches[0]
    if dispatch.slot != add_slot.slot or len(dispatch.orders) != 1:
        return None
    order = dispatch.orders[0]
    timer = timers[0].message if timers else None
    if (timer is None) != (order.budget is None):
        return None
    return FirstAttempt(add_slot, order, timer)


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


class CallPlan(Protocol):
    """What calls with the same function and options share (``stepvisor._calls.Calls``)."""

    @property
    def first(self) -> FirstAttempt | None: ...
    def machine(self, run_id: str, seed: int) -> RunMachine: ...


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
        "key",
        "link",
        "machine",
        "params",
        "plan",
        "ready_at",
        "refused",
        "seed",
        "slots",
        "started_at",
        "timers",
        "workers",
    )

    def __init__(
        self,
        key: str,
        *,
        plan: CallPlan,
        seed: int,
        executor: str,
        fn: Callable[..., Any],
        fn_payload: bytes | None,
        params: Mapping[str, Any],
        link: CallLink,
    ) -> None:
        self.key = key
        self.plan = plan
        self.first = plan.first
        self.seed = seed
        self.machine: RunMachine | None = None
        #: When (monotonic, wall) the call had ``Start`` and its slot ``SlotReady``,
        #: while it has no machine: replayed into the machine when it is made.
        self.started_at: tuple[float, float] | None = None
        self.ready_at: tuple[float, float] | None = None
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
        #: Shared and empty until the call's first timer (most calls have none):
        #: one container fewer per call for the cyclic GC; written only by
        #: ``CallHub._start_timer``, which makes the call its own first.
        self.timers: dict[TimerKey, TimerHandle] = NO_TIMERS
        self.workers: dict[str, Lease] = {}  # the lease of each slot
