"""Attempts a run submits to a backend with no thread, and their outcomes coming back.

Outcomes go to the run's shell, several in one message where they end together.

A message costs the Supervisor more than settling a tiny attempt, so outcomes
that are ready at the same moment travel together as one ``AttemptsDone``:

* a Worker running a prefetched batch sends what it held (``send_outcomes``);
* the attempts a run submitted to an event loop (async steps) that end in the
  same loop iteration go out at the end of that iteration (``Outbox``).

The machine settles the outcomes of an ``AttemptsDone`` one by one, in order,
exactly as if they had come separately.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pykka

from stepvisor.actors.messages import ReplyTo
from stepvisor.backends.base import AttemptResult, AttemptSpec, backend_bug, not_started
from stepvisor.context import AttemptControl
from stepvisor.core.messages import AttemptDone, AttemptsDone

__all__ = ["Outbox", "send_outcomes"]


def send_outcomes(reply_to: ReplyTo, outcomes: list[AttemptDone]) -> bool:
    """Send ``outcomes`` (of one run) as one message; False if the receiver is gone."""
    message: AttemptDone | AttemptsDone = (
        outcomes[0] if len(outcomes) == 1 else AttemptsDone(tuple(outcomes), outcomes[0].run_id)
    )
    try:
        reply_to.tell(message)
    except pykka.ActorDeadError:
        return False
    return True


class _Report:
    """``done`` for one submitted attempt: its outcome, timed as a Worker would time it.

    An object with slots rather than a closure: thousands are alive at once
    (one per async attempt in flight), and a closure's cells cost more.
    """

    __slots__ = ("_outbox", "_slot", "_spec", "_started", "_started_wall")

    def __init__(self, outbox: Outbox, spec: AttemptSpec, slot: str) -> None:
        self._outbox = outbox
        self._spec = spec
        self._slot = slot
        self._started_wall = time.time()
        self._started = time.monotonic()

    def __call__(self, result: AttemptResult) -> None:
        spec = self._spec
        self._outbox.post(
            AttemptDone(
                spec.step_id,
                spec.attempt,
                self._slot,
                result,
                self._started_wall,
                time.time(),
                time.monotonic() - self._started,
                spec.run_id,
            )
        )


class Outbox:
    """Outcomes of one run's submitted attempts, flushed once per event-loop iteration.

    ``post`` is called where the attempt ended, normally on an event loop's
    thread: the first outcome of an iteration schedules a flush at its end
    (``call_soon``), and the outcomes of tasks that end in the same iteration
    join it.  Without a running loop (an attempt that never started) the
    outcome goes at once.  Thread-safe: runs may submit to more than one loop.
    """

    __slots__ = ("_lock", "_pending", "_reply_to")

    def __init__(self, reply_to: ReplyTo) -> None:
        self._reply_to = reply_to
        self._pending: list[AttemptDone] = []
        self._lock = threading.Lock()

    def submit(self, backend: Any, slot: str, spec: AttemptSpec, control: AttemptControl) -> None:
        """Hand an attempt to a backend that ``submit``s (no thread waits for it).

        Its outcome comes back through :meth:`post`, timed as a Worker would
        time it; one that may not start, or a backend that is gone, still ends.
        """
        done = _Report(self, spec, slot)
        stopped = not_started(spec, control)
        if stopped is not None:
            done(stopped)
            return
        try:
            backend.submit(spec, control, done)
        except Exception as exc:  # the loop is gone (a bug): the attempt still ends
            done(backend_bug(spec, exc))

    def post(self, outcome: AttemptDone) -> None:
        with self._lock:
            first = not self._pending
            self._pending.append(outcome)
        if not first:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        loop.call_soon(self.flush)

    def flush(self) -> None:
        with self._lock:
            outcomes, self._pending = self._pending, []
        if outcomes:  # a receiver that is gone has nothing left to hear
            send_outcomes(self._reply_to, outcomes)
