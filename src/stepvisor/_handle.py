"""The handle of a run in progress: wait for it, cancel it, ask whether it is done.

``wait()`` returns once the run has ended and everything of it is closed: on
a private engine (a run without ``engine=``) that engine, its Workers and
their process children; the store the run opened.  A thread abandoned because
its step ignored cancellation is the one exception (it is recorded as such).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

import pykka

from stepvisor._log import log
from stepvisor.actors.messages import CancelRun
from stepvisor.actors.supervisor import ForRun
from stepvisor.core.result import RunResult

__all__ = ["RunHandle"]


class RunHandle:
    """A run in progress: wait for it, cancel it, or ask whether it is done."""

    def __init__(self, run_id: str, grace: float) -> None:
        self.run_id = run_id
        self._grace = grace
        self._done = threading.Event()
        self._result: RunResult | None = None
        self._callbacks: list[Callable[[RunResult], None]] = []
        self._lock = threading.Lock()
        self._supervisor: pykka.ActorRef[Any] | None = None
        self._cleanup: list[Callable[[], None]] = []
        #: Whether finalizing only joins the Supervisor (the run is on a shared engine).
        self._quick_finalize = False
        self._joined = False

    # -- called by the runtime ---------------------------------------------------

    def _complete(self, result: RunResult) -> None:
        with self._lock:
            self._result = result
            callbacks = list(self._callbacks)
        self._done.set()
        for cb in callbacks:
            try:
                cb(result)
            except Exception:
                log.exception("a run completion callback failed")

    def _add_done_callback(self, cb: Callable[[RunResult], None]) -> None:
        with self._lock:
            if self._result is None:
                self._callbacks.append(cb)
                return
            result = self._result
        cb(result)

    # -- public ------------------------------------------------------------------

    def cancel(self) -> None:
        """Stop the run: nothing new starts, every attempt in flight is stopped."""
        ref = self._supervisor
        if ref is not None and not self._done.is_set():
            with contextlib.suppress(pykka.ActorDeadError):
                ref.tell(ForRun(self.run_id, CancelRun("cancel() was called")))

    def done(self) -> bool:
        """Whether the run has finished."""
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> RunResult:
        """Block until the run ends and return its result.

        Raises ``TimeoutError`` if it has not ended within ``timeout`` seconds
        (the run goes on).  Once it returns, the run's threads are gone.
        """
        if not self._wait_interruptibly(timeout):
            raise TimeoutError(f"run {self.run_id} has not finished after {timeout} s")
        self._finalize()
        assert self._result is not None
        return self._result

    def _wait_interruptibly(self, timeout: float | None) -> bool:
        # Wait in short slices so Ctrl-C reaches the main thread promptly.
        end = None if timeout is None else time.monotonic() + timeout
        while not self._done.is_set():
            slice_ = 0.25 if end is None else min(0.25, end - time.monotonic())
            if slice_ <= 0:
                return False
            self._done.wait(slice_)
        return True

    def _finalize(self) -> None:
        with self._lock:
            if self._joined:
                return
            self._joined = True
        # Close what outlives the run: a private engine (its Supervisor, Workers
        # and their process children, the loop, Ray; closing joins them), the store.
        for fn in self._cleanup:
            try:
                fn()
            except Exception:
                log.exception("cleanup after run %s failed", self.run_id)

    @property
    def result(self) -> RunResult | None:
        """The result, once done; ``None`` before."""
        return self._result
