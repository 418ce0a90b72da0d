"""What a step function receives: ``StepContext``.

A step learns who it is (run, step, attempt), reads the artifacts of its
ancestors (``inputs``) and its own parameters (``params``), and cooperates
with deadlines and cancellation through ``remaining()``, ``cancelled`` and
``raise_if_cancelled()``.  Thread steps *must* cooperate to be stopped early:
Python cannot stop a thread from outside.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from stepvisor.errors import stop_error

if TYPE_CHECKING:
    import logging

__all__ = ["AttemptControl", "StepContext"]

# stepvisor.core._mapping's ITEM_KEY and INDEX_KEY (not imported: a process
# child imports this module as it boots, and must not load the core for it).
_ITEM_KEY = "\x00item"
_INDEX_KEY = "\x00index"


class AttemptControl:
    """The cancel signal of one attempt, shared by the Supervisor and the Worker.

    ``cancel(reason)`` sets the flag the step sees and calls the canceller its
    backend registered (kill a process group, cancel an asyncio task).  It is
    safe to call from any thread, more than once; only the first reason counts.

    One is made per attempt, so it is kept cheap: the ``threading.Event`` that
    :meth:`wait` needs is only created if a step waits, and all controls share
    one lock (cancelling is rare and brief).
    """

    __slots__ = ("_cancellers", "_event", "_flag", "reason")

    _lock = threading.Lock()

    def __init__(self) -> None:
        self._flag = False
        self._event: threading.Event | None = None
        self._cancellers: list[Callable[[], None]] | None = None
        self.reason: str | None = None

    @property
    def is_cancelled(self) -> bool:
        return self._flag

    def wait(self, timeout: float | None = None) -> bool:
        """Block until cancelled (or ``timeout``); returns whether it was cancelled."""
        with AttemptControl._lock:
            if self._flag:
                return True
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        return event.wait(timeout)

    def cancel(self, reason: str) -> None:
        """Ask the attempt to stop.  ``reason`` is ``"timeout"`` or ``"cancel"``."""
        with AttemptControl._lock:
            if self._flag:
                return
            self.reason = reason
            self._flag = True
            event = self._event
            cancellers = self._cancellers or []
            self._cancellers = None
        if event is not None:
            event.set()
        for fn in cancellers:
            fn()

    def on_cancel(self, fn: Callable[[], None]) -> None:
        """Register ``fn()`` to run on cancel (at once if already cancelled)."""
        with AttemptControl._lock:
            if not self._flag:
                if self._cancellers is None:
                    self._cancellers = []
                self._cancellers.append(fn)
                return
        fn()

    def clear_cancellers(self) -> None:
        with AttemptControl._lock:
            self._cancellers = None


class StepContext:
    """The view a step function has of its run.  Read-only for the step."""

    __slots__ = (
        "_control",
        "attempt",
        "deadline",
        "index",
        "inputs",
        "item",
        "max_attempts",
        "params",
        "run_id",
        "step_id",
    )

    def __init__(
        self,
        *,
        run_id: str,
        step_id: str,
        attempt: int,
        max_attempts: int,
        inputs: Mapping[str, Any],
        params: Mapping[str, Any],
        deadline: float | None,
        control: AttemptControl | None = None,
    ) -> None:
        self.run_id = run_id
        self.step_id = step_id
        #: 1-based number of this attempt.
        self.attempt = attempt
        self.max_attempts = max_attempts
        #: Artifacts created by this step's ancestors, merged in canonical order.
        #: (A read-only view: the runtime hands each attempt a dict of its own.)
        #: For an instance of a mapped step, its item and its index (from 0);
        #: ``None`` for a step that is not mapped.
        self.item: Any = None
        self.index: int | None = None
        self.inputs: Mapping[str, Any]
        if _ITEM_KEY in inputs:  # an instance: its item travelled with its inputs
            own = dict(inputs)
            self.item = own.pop(_ITEM_KEY)
            self.index = own.pop(_INDEX_KEY)
            self.inputs = MappingProxyType(own)
        elif isinstance(inputs, MappingProxyType):
            self.inputs = inputs
        else:
            self.inputs = MappingProxyType(dict(inputs))
        #: The step's parameters (``with:`` in a workflow file); immutable already.
        self.params: Mapping[str, Any] = params
        #: ``time.monotonic()`` value at which this attempt is stopped, or ``None``.
        self.deadline = deadline
        self._control = control or AttemptControl()

    @property
    def log(self) -> logging.Logger:
        """A logger named ``stepvisor.step.<step id>`` (made on first use).

        ``logging`` is imported here, not at the top: a process child imports
        this module when it boots, and most steps never log.
        """
        import logging  # noqa: PLC0415

        return logging.getLogger(f"stepvisor.step.{self.step_id}")

    def remaining(self) -> float | None:
        """Seconds left before the deadline (never negative), or ``None`` if unbounded."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    @property
    def cancelled(self) -> bool:
        """True once the attempt has been asked to stop (deadline or cancel)."""
        return self._control.is_cancelled

    def raise_if_cancelled(self) -> None:
        """Raise if the attempt was asked to stop; call it often in long loops."""
        if self._control.is_cancelled:
            reason = self._control.reason
            raise stop_error(reason or "cancel", step_id=self.step_id, attempt=self.attempt)

    def on_cancel(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (from another thread) when the attempt is asked to stop.

        Called at once if that already happened.  Useful to stop work that
        blocks outside Python's reach (close a socket, cancel a future).
        """
        self._control.on_cancel(callback)

    def wait_cancelled(self, timeout: float | None = None) -> bool:
        """Sleep up to ``timeout`` seconds, waking early if cancelled; returns ``cancelled``."""
        return self._control.wait(timeout)

    def __repr__(self) -> str:
        return (
            f"StepContext(run_id={self.run_id!r}, step_id={self.step_id!r}, attempt={self.attempt})"
        )
