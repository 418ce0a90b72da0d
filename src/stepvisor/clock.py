"""Time, passed in.

Everything in stepvisor that waits or measures (deadlines, backoff delays,
heartbeats, attempt durations) goes through a :class:`Clock`, so that policy can
be tested with :class:`FakeClock` without real time passing.

``RealClock`` runs its timers on one daemon thread with a heap, rather than one
``threading.Timer`` thread per timer: a run with thousands of steps would
otherwise start thousands of threads just to watch deadlines.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from typing import Protocol

from stepvisor._log import log

__all__ = ["Clock", "FakeClock", "RealClock", "TimerHandle"]


class TimerHandle(Protocol):
    """What ``call_later`` returns: a way to cancel a timer that has not fired."""

    def cancel(self) -> None: ...


class Clock(Protocol):
    """Monotonic time, wall time, sleeping and timers."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back; only differences mean anything."""
        ...

    def wall(self) -> float:
        """Seconds since the epoch, for records people read."""
        ...

    def sleep(self, seconds: float) -> None:
        """Block the calling thread for ``seconds`` of this clock's time."""
        ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        """Call ``callback`` (on a clock thread) once ``delay`` seconds have passed."""
        ...


class _Timer:
    __slots__ = ("callback", "cancelled", "on_cancel", "when")

    def __init__(
        self,
        when: float,
        callback: Callable[[], None],
        on_cancel: Callable[[_Timer], None] | None = None,
    ) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False
        self.on_cancel = on_cancel

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            if self.on_cancel is not None:
                self.on_cancel(self)


class _TimerQueue:
    """A heap of timers ordered by due time, ties by insertion order."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _Timer]] = []
        self._seq = itertools.count()

    def push(self, timer: _Timer) -> None:
        heapq.heappush(self._heap, (timer.when, next(self._seq), timer))

    def is_head(self, timer: _Timer) -> bool:
        """``timer`` is the one due first (cancelled ones not yet dropped count)."""
        return bool(self._heap) and self._heap[0][2] is timer

    def next_due(self) -> float | None:
        while self._heap and self._heap[0][2].cancelled:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> list[_Timer]:
        due: list[_Timer] = []
        while self._heap and self._heap[0][0] <= now:
            timer = heapq.heappop(self._heap)[2]
            if not timer.cancelled:
                due.append(timer)
        return due

    def __len__(self) -> int:
        return sum(1 for _, _, t in self._heap if not t.cancelled)


class RealClock:
    """The system's clocks, with timers on one lazily started daemon thread."""

    def __init__(self) -> None:
        self._queue = _TimerQueue()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        timer = _Timer(time.monotonic() + max(0.0, delay), callback, self._wake)
        with self._cond:
            head = self._queue.next_due()
            self._queue.push(timer)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="stepvisor-clock", daemon=True
                )
                self._thread.start()
            elif head is None or timer.when < head:
                # Wake the thread only if it sleeps for a later timer: a burst
                # of retries or deadlines would otherwise wake it once per timer.
                self._cond.notify()
        return timer

    def _wake(self, timer: _Timer) -> None:
        # A cancelled timer may have been the one the thread sleeps for: let it
        # look again, so it can end as soon as nothing is left to watch.  Any
        # other cancelled timer is dropped when the thread reaches it.
        with self._cond:
            if self._queue.is_head(timer):
                self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                due_at = self._queue.next_due()
                if due_at is None:
                    # Nothing to watch: let the thread end; the next timer starts one.
                    self._thread = None
                    return
                wait = due_at - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                due = self._queue.pop_due(time.monotonic())
            for timer in due:
                try:
                    timer.callback()
                except Exception:
                    log.exception("a timer callback failed")


class FakeClock:
    """A clock whose time moves only when told to, for tests of time-based policy.

    Timers fire synchronously, in due order, on the thread that calls
    :meth:`advance`.  ``sleep`` advances the clock by the amount slept, so code
    that sleeps (like tenacity's ``nap``) runs instantly and its waits are
    recorded in :attr:`sleeps`.
    """

    def __init__(self, start: float = 0.0, *, wall_start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._wall_offset = wall_start - start
        self._queue = _TimerQueue()
        self._lock = threading.RLock()
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        with self._lock:
            return self._now

    def wall(self) -> float:
        with self._lock:
            return self._now + self._wall_offset

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.advance(seconds)

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        with self._lock:
            timer = _Timer(self._now + max(0.0, delay), callback)
            self._queue.push(timer)
            return timer

    def pending(self) -> int:
        """How many timers are waiting to fire."""
        with self._lock:
            return len(self._queue)

    def next_due(self) -> float | None:
        """When the next timer fires, or ``None``."""
        with self._lock:
            return self._queue.next_due()

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, firing every timer that comes due."""
        with self._lock:
            target = self._now + max(0.0, seconds)
        while True:
            with self._lock:
                due_at = self._queue.next_due()
                if due_at is None or due_at > target:
                    self._now = target
                    return
                self._now = max(self._now, due_at)
                due = self._queue.pop_due(self._now)
            for timer in due:
                timer.callback()

    def advance_to_next(self) -> bool:
        """Jump to the next timer and fire it; ``False`` when none is waiting."""
        with self._lock:
            due_at = self._queue.next_due()
            if due_at is None:
                return False
            step = max(0.0, due_at - self._now)
        self.advance(step)
        return True
