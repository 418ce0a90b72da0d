"""The leases a call hub keeps for itself when its pool serves it alone.

An Executor on its own engine is the only user of that engine's pool, so its
call hub (:mod:`stepvisor.actors._hub`) can do without the pool's queue: a
lease a call is done with goes straight to the next call waiting, its Worker
still attached, with no lock, no message and no Worker swap per call.  What
it keeps here, all touched only by the hub's one decision maker at a time:

* **spare** leases, kept while nobody waits (the next call takes one);
* the **queue** of slots waiting for a lease, oldest first;
* **trains**: queued process calls handed to one Worker together (the hub's
  ``_train``), and how many of a train's calls still hold its lease.
"""

from __future__ import annotations

from collections import deque
from typing import Final

from stepvisor.actors._call import HubCall
from stepvisor.actors._pool import Lease

__all__ = ["TRAIN", "HubLeases", "trainable"]

#: At most this many queued process calls are handed to one Worker at once.
TRAIN: Final = 4


def trainable(call: HubCall) -> bool:
    """A call whose first attempt may wait in a Worker's batch.

    Its first attempt, not yet begun, of a process call with no timeout (its
    deadline would start while it waits behind the others).
    """
    first = call.first
    return (
        first is not None
        and call.machine is None
        and call.go is None
        and call.executor == "process"
        and first.order.budget is None
    )


class HubLeases:
    """Spare leases, the slots waiting for one, and the trains riding one."""

    __slots__ = ("_queued", "_riding", "spare")

    def __init__(self) -> None:
        self.spare: list[Lease] = []
        self._queued: deque[tuple[HubCall, str]] = deque()
        self._riding: dict[Lease, int] = {}

    def wait(self, entry: tuple[HubCall, str]) -> None:
        """A call's slot, ``(call, slot)``, waits for a lease behind those before it."""
        self._queued.append(entry)

    def next(self) -> tuple[HubCall, str] | None:
        """The oldest slot still waiting, taken off the queue (a call that ended waits no more)."""
        queued = self._queued
        while queued:
            entry = queued.popleft()
            call, slot = entry
            if not call.done and slot not in call.workers:
                return entry
        return None

    def put_back(self, call: HubCall, slot: str) -> None:
        """A slot :meth:`next` or :meth:`train_behind` gave out waits again, first in line."""
        self._queued.appendleft((call, slot))

    def train_behind(self, head: HubCall) -> list[tuple[HubCall, str]]:
        """The slots that go with ``head`` in a train, taken off the queue; none if it may not."""
        queued = self._queued
        if not trainable(head) or not queued or not trainable(queued[0][0]):
            return []
        members: list[tuple[HubCall, str]] = []
        while queued and len(members) < TRAIN - 1:
            call, slot = queued[0]
            if call.done or slot in call.workers:
                queued.popleft()
                continue
            if not trainable(call):
                break
            members.append(queued.popleft())
        return members

    def ride(self, lease: Lease, calls: int) -> None:
        """``calls`` calls of a train share ``lease`` now."""
        self._riding[lease] = calls

    def off(self, lease: Lease) -> bool:
        """A call gives ``lease`` back: True if it is free (no call of its train holds it)."""
        riding = self._riding.get(lease)
        if riding is None:
            return True
        if riding > 1:
            self._riding[lease] = riding - 1
            return False
        del self._riding[lease]
        return True
