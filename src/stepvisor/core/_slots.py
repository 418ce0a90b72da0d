"""The machine's view of its Workers: slots, their load, and which are abandoned.

A slot is free when nothing is queued on it.  An abandoned slot (its attempt
ignored a stop past the grace period) no longer counts: a fresh one takes its
place at once, and the abandoned one is retired when its attempt returns.
"""

from __future__ import annotations

__all__ = ["Slots"]


class Slots:
    """Slot names ``w1``, ``w2``, ..., with the attempts queued on each."""

    __slots__ = ("_abandoned", "_active", "_seq", "free", "load")

    def __init__(self) -> None:
        self.free: list[str] = []
        self.load: dict[str, int] = {}
        self._active: set[str] = set()
        self._abandoned: set[str] = set()
        self._seq = 0

    def add(self) -> str:
        """A new, free slot."""
        self._seq += 1
        slot = f"w{self._seq}"
        self.load[slot] = 0
        self._active.add(slot)
        self.free.append(slot)
        return slot

    def returned(self, slot: str) -> bool:
        """One attempt on ``slot`` ended; True if the slot is now to be retired."""
        load = self.load[slot] = self.load[slot] - 1
        if slot in self._abandoned:
            if load == 0:
                self._abandoned.discard(slot)
                return True
        elif load == 0 and slot in self._active:
            self.free.append(slot)
        return False

    def abandon(self, slot: str) -> bool:
        """Stop counting ``slot``; True if it was active (so a replacement is due)."""
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
            tuple(sorted(self._abandoned)),
        )
