"""A mailbox handled by whichever thread delivers to it: an actor without a thread of its own.

An actor's guarantees (one message at a time, in the order they arrive, each
handled to its end before the next) do not need a thread that sleeps until a
message comes; waking one costs two thread switches per request and reply.
Here the thread that delivers a message to an idle mailbox handles it, and
every message delivered meanwhile (by other threads, or re-entrantly by the
handler itself) is queued and handled by that same thread before it leaves::

    thread A: tell(m1) ── idle: A drains ── handle(m1) ── handle(m2) ── handle(m3) ── idle
    thread B:      tell(m2) ── queued, returns at once ──┘            │
    A's handler:               tell(m3) ── queued ────────────────────┘

The lock is held only to queue or take a message, never while handling one.
What must not run while the mailbox is being drained (settling futures, whose
done-callbacks are user code that may deliver and wait) is handed to
:meth:`after`: it runs on the draining thread once it has left the role.
The pattern is that of a serializing executor (a trampoline): the handler
must not block, or every thread that delivers waits on it in turn.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from stepvisor._log import log

__all__ = ["Mailbox"]


class Mailbox:
    """Serializes ``handle(message)`` across the threads that :meth:`tell`; thread-safe."""

    __slots__ = ("_after", "_draining", "_handle", "_lock", "_mail")

    def __init__(self, handle: Callable[[Any], None]) -> None:
        self._handle = handle
        self._lock = threading.Lock()
        self._mail: deque[Any] = deque()
        self._draining = False
        self._after: list[Callable[[], None]] = []

    def tell(self, message: Any) -> None:
        """Handle ``message`` now on this thread, or after those before it; never raises.

        ``handle`` must not raise: an exception it lets out is logged and the
        message dropped (a Worker calls this; it must not fail for a bug here).
        """
        with self._lock:
            if self._draining:
                self._mail.append(message)
                return
            self._draining = True
        try:
            while True:
                try:
                    self._handle(message)
                except Exception:
                    log.exception("a mailbox handler failed on %r (a bug)", message)
                with self._lock:
                    if not self._mail:
                        self._draining = False
                        after, self._after = self._after, []
                        break
                    message = self._mail.popleft()
        except BaseException:  # KeyboardInterrupt and the like: give the role up first
            with self._lock:
                self._draining = False
            raise
        for action in after:
            try:
                action()
            except Exception:
                log.exception("an action after a mailbox drain failed (a bug)")

    def after(self, action: Callable[[], None]) -> None:
        """Run ``action`` once the current drain is over; only from within ``handle``."""
        self._after.append(action)
