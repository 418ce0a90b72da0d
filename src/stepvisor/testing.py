"""Tools for testing code that runs stepvisor workflows (like ``trio.testing``).

* :class:`FakeClock`: time that moves only when the test says (``advance``).
* :class:`FakeBackend`: a backend whose results the test scripts, the way
  httpx's ``MockTransport`` answers requests.  Hand it to a run in place of
  a built-in one::

      fake = FakeBackend(lambda spec: ok({"rows": [1, 2]}), hold={"slow"})
      handle = sv.start(wf, backends={"thread": fake})
      assert fake.wait_started("slow")      # the attempt is in the backend now
      handle.cancel()                       # ends it as "cancelled"
      result = handle.wait(10)
      assert [spec.step_id for spec in fake.calls] == [...]

  The engine around it is the real one: scheduling, retries, deadlines,
  cancellation, the store; only what a step does is scripted.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Mapping
from typing import Any, ClassVar, Final

from stepvisor.backends.base import AttemptResult, AttemptSpec, Following, stop_error
from stepvisor.clock import FakeClock
from stepvisor.context import AttemptControl
from stepvisor.errors import WorkerCrashedError

__all__ = ["AttemptResult", "AttemptSpec", "FakeBackend", "FakeClock", "crash", "error", "ok"]

#: What a :class:`FakeBackend` answers for one attempt.
Handler = Callable[[AttemptSpec], AttemptResult]

_HELD_NOTE: Final = "it was held by the test's FakeBackend and cancelled there"


def ok(outputs: Mapping[str, Any] | None = None) -> AttemptResult:
    """An attempt that returned ``outputs``."""
    return AttemptResult(kind="ok", outputs=outputs)


def error(exc: BaseException) -> AttemptResult:
    """An attempt whose step raised ``exc``."""
    return AttemptResult(kind="error", error=exc)


def crash(spec: AttemptSpec, how: str = "was killed by the test") -> AttemptResult:
    """An attempt whose process died under it."""
    exc = WorkerCrashedError(
        f"the fake worker running step {spec.step_id!r} (attempt {spec.attempt}) {how}",
        step_id=spec.step_id,
        attempt=spec.attempt,
    )
    return AttemptResult(kind="crash", error=exc, note=f"the fake worker {how}")


class FakeBackend:
    """A backend that answers each attempt with ``handler(spec)`` and records it.

    ``handler`` defaults to "returned nothing".  An attempt of a step named
    in ``hold`` waits, once it has been recorded, until the test calls
    :meth:`release` for that step (it then gets the handler's answer) or the
    engine cancels it (it then ends as ``"cancelled"``, as a real backend
    would).  A handler that raises stands for a backend bug: the run records
    the attempt as an error saying so.  Safe to use from every Worker at once.
    """

    sends_ahead: ClassVar[bool] = False

    def __init__(self, handler: Handler | None = None, *, hold: Collection[str] = ()) -> None:
        self._handler = handler or _returned_nothing
        self._hold = frozenset(hold)
        self._lock = threading.Lock()
        self._calls: list[AttemptSpec] = []
        self._started: dict[str, threading.Event] = {}
        self._released: dict[str, threading.Event] = {}
        self.closed = False

    @property
    def calls(self) -> tuple[AttemptSpec, ...]:
        """Every attempt this backend was asked to run, in the order they came."""
        with self._lock:
            return tuple(self._calls)

    def wait_started(self, step_id: str, timeout: float = 10.0) -> bool:
        """Block until an attempt of ``step_id`` (in ``hold``) is held; whether it is."""
        return self._event(self._started, step_id).wait(timeout)

    def release(self, step_id: str) -> None:
        """Let the held attempt(s) of ``step_id``, and any to come, get their answer."""
        self._event(self._released, step_id).set()

    def run(
        self, spec: AttemptSpec, control: AttemptControl, ahead: Following | None = None
    ) -> AttemptResult:
        del ahead
        with self._lock:
            self._calls.append(spec)
        if spec.step_id in self._hold:
            released = self._event(self._released, spec.step_id)
            control.on_cancel(released.set)
            self._event(self._started, spec.step_id).set()
            released.wait()
            if control.is_cancelled:
                return AttemptResult(
                    kind="cancelled",
                    error=stop_error(spec, control.reason, _HELD_NOTE),
                    note=_HELD_NOTE,
                )
        return self._handler(spec)

    def close(self) -> None:
        """Mark it closed (the caller that made it closes it; a run does not)."""
        self.closed = True

    def _event(self, table: dict[str, threading.Event], step_id: str) -> threading.Event:
        with self._lock:
            event = table.get(step_id)
            if event is None:
                event = table[step_id] = threading.Event()
            return event


def _returned_nothing(spec: AttemptSpec) -> AttemptResult:
    del spec
    return AttemptResult(kind="ok")
