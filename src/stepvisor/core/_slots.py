"""The machine's view of its Workers: slots, their load, and which are abandoned.

A slot is the right to run one attempt at a time.  The machine asks for one
(``AddSlot``) when ready work outnumbers the slots it holds, and may use it
once the shell says it is there (``SlotReady``): a slot stands for a Worker,
and on an engine shared by several runs a Worker may have to be waited for.
A slot is *free* when nothing is queued on it.  A run that lends its slots
gives free ones back (``ReleaseSlot``) while it has nothing ready, so other
runs on the same engine can use them.  An abandoned slot (its attempt ignored
a stop past the grace period) no longer counts; it is retired when its attempt
returns, and a fresh one is asked for if work is waiting.
"""

from __future__ import annotations

__all__ = ["Slots"]


class Slots:
    """Slot names ``w1``, ``w2``, ..., with the attempts queued on each."""

    __slots__ = ("_abandoned", "_active", "_pending", "_seq", "free", "load")

    def __init__(self) -> None:
        self.free: list[str] = []
        self.load: dict[str, int] = {}
        self._active: set[str] = set()
        self._pending: set[str] = set()
        self._abandoned: set[str] = set()
        self._seq = 0

    @property
    def held(self) -> int:
        """Slots asked for and not given back or abandoned (pending, free or busy)."""
        return len(self._active)

    @property
    def pending(self) -> int:
        """Slots asked for that the shell has not yet said are there."""
        return len(self._pending)

    @property
    def abandoned(self) -> frozenset[str]:
        """Slots abandoned and not yet retired."""
        return frozenset(self._abandoned)

    def add(self) -> str:
        """A new slot, pending until :meth:`ready`."""
        self._seq += 1
        slot = f"w{self._seq}"
        self.load[slot] = 0
        self._active.add(slot)
        self._pending.add(slot)
        return slot

    def ready(self, slot: str) -> None:
        """The shell has a Worker for ``slot``: it is free to use."""
        if slot in self._pending:
            self._pending.discard(slot)
            self.free.append(slot)

    def release(self, slot: str) -> None:
        """Give a free slot back."""
        if self.free[-1] == slot:  # the machine lends the last free one: no O(n) search
            self.free.pop()
        else:
            self.free.remove(slot)
        self._active.discard(slot)
        del self.load[slot]

    def returned(self, slot: str) -> bool:
        """One attempt on ``slot`` ended; True if the slot is now to be retired."""
        load = self.load[slot] = self.load[slot] - 1
        if slot in self._abandoned:
            if load == 0:
                self._abandoned.discard(slot)
                del self.load[slot]
                return True
        elif load == 0 and slot in self._active:
            self.free.append(slot)
        return False

    def abandon(self, slot: str) -> bool:
        """Stop counting ``slot``: its attempt ignored a stop.  True if it counted."""
        if slot not in self._active:
            return False
        self._active.discard(slot)
        self._abandoned.add(slot)
        return True

    def snapshot(self) -> tuple[object, ...]:
        """The whole pool as a comparable value."""
        return (
            tuple(sorted(self.free)),
            tuple(sorted(self.load.items())),
            tuple(sorted(self._pending)),
            tuple(sorted(self._abandoned)),
        )
