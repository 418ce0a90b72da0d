"""What a call's run machine does up to its first attempt: learnt once per plan, from the machine.

A call of :class:`stepvisor.Executor` is a one-step run.  Until that step's
first attempt returns, its machine does the same for every call of a plan:
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

from typing import Final, NamedTuple

from stepvisor.core import effects as fx
from stepvisor.core.effects import AddSlot, AttemptOrder, Dispatch, SetTimer
from stepvisor.core.machine import RunMachine
from stepvisor.core.messages import Message, SlotReady, Start

__all__ = ["CARRIED_OUT", "FirstAttempt", "first_attempt"]

#: The effects the call hub carries out; the rest are store writes and events,
#: which an Executor's calls do not have.
CARRIED_OUT: Final = frozenset(
    {fx.AbandonSlot, fx.AddSlot, fx.CancelTimer, fx.Dispatch, fx.Finish, fx.ReleaseSlot}
    | {fx.RetireSlot, fx.SaveOutputs, fx.SetTimer, fx.StopAttempt}
)


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
