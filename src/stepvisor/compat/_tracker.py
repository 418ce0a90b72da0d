"""The live records: moved along by the run's events, settled by its result.

Why on events: callers watch ``state.step_executions`` while a batch runs
(progress displays, health checks), so each record goes ``pending`` →
``running`` → terminal as the run reports, not only at the end.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from datetime import tzinfo
from typing import Any, Final

import stepvisor as sv
from stepvisor.compat._records import Status, stamp

#: Engine step status -> record status.  A timed-out step is "failed"; a step
#: skipped because a step it depends on did not complete is "cancelled".
_STATUS: Final[Mapping[str, Status]] = {
    "pending": "pending",
    "running": "running",
    "waiting_retry": "running",
    "succeeded": "completed",
    "failed": "failed",
    "timed_out": "failed",
    "cancelled": "cancelled",
    "skipped": "cancelled",
}
_TERMINAL: Final = frozenset({"completed", "failed", "cancelled"})
CANCELLED: Final = "execute_parallel was cancelled"


class Slot:
    """What the facade keeps about one step during a call.

    ``record`` is a :class:`StepExecution` or one of the caller's
    ``record_type``: only its attributes are read and set.
    """

    def __init__(self, step: Any, record: Any, *, timeout: float | None) -> None:
        self.step = step
        self.record = record
        self.timeout = timeout
        self.started = False
        self.deps: tuple[str, ...] = ()
        self.artifacts: Mapping[str, Any] = {}
        self.attempt_started: float | None = None
        self.running_seconds = 0.0


class Tracker:
    """The ``on_event`` hook: moves each record along as the run reports.

    It runs on the Supervisor thread, so it only sets attributes.  ``status``
    is written last, so a reader that sees a terminal status sees its times.
    A record that is terminal never changes status again.
    """

    def __init__(self, slots: Mapping[str, Slot], *, tz: tzinfo | None) -> None:
        self._slots = slots
        self._tz = tz
        self._lock = threading.Lock()

    def __call__(self, event: sv.Event) -> None:
        with self._lock:
            if isinstance(event, sv.StepDispatched):
                self._dispatched(self._slots[event.step_id], event.time)
            elif isinstance(event, sv.StepRetrying):
                self._attempt_ended(self._slots[event.step_id], event.time)
            elif isinstance(event, sv.StepFinished):
                slot = self._slots[event.step_id]
                message = self._message(slot, event.status, event.attempts, event)
                self._end(slot, _STATUS[event.status], event.time, message)
            elif isinstance(event, sv.StepCommitted):
                slot = self._slots[event.step_id]
                message = self._message(slot, event.status, event.attempts, None)
                self._end(slot, _STATUS[event.status], time.time(), message)
            elif isinstance(event, sv.RunFinished):
                self._end_all(event.time, why=CANCELLED)

    def end_all(self, *, why: str) -> None:
        """End every record still open as cancelled, because the call did not finish."""
        with self._lock:
            self._end_all(time.time(), why=why)

    def settle(self, result: sv.RunResult) -> None:
        """Take the run's own statuses and times, the authority once it has ended."""
        with self._lock:
            for sid, slot in self._slots.items():
                record = result.steps[sid]
                message = self._message(slot, record.status.value, record.attempt_count, None)
                self._end(slot, _STATUS[record.status.value], result.ended, message)
                if record.attempts:
                    slot.started = True
                    first, last = record.attempts[0], record.attempts[-1]
                    slot.record.started_at = stamp(first.started, self._tz)
                    slot.record.completed_at = stamp(last.ended or result.ended, self._tz)
                    slot.record.duration_seconds = sum(a.duration or 0.0 for a in record.attempts)

    # -- under the lock ----------------------------------------------------------------

    def _dispatched(self, slot: Slot, wall: float) -> None:
        slot.attempt_started = wall
        if not slot.started:
            slot.started = True
            slot.record.started_at = stamp(wall, self._tz)
        if slot.record.status == "pending":
            slot.record.duration_seconds = 0.0
            slot.record.status = "running"

    def _attempt_ended(self, slot: Slot, wall: float) -> None:
        if slot.attempt_started is not None:
            slot.running_seconds += max(0.0, wall - slot.attempt_started)
            slot.attempt_started = None
            slot.record.duration_seconds = slot.running_seconds

    def _end(self, slot: Slot, status: Status, wall: float, message: str | None) -> None:
        record = slot.record
        if record.status in _TERMINAL:
            return
        self._attempt_ended(slot, wall)
        record.completed_at = stamp(wall, self._tz)
        record.error = message
        record.status = status

    def _end_all(self, wall: float, *, why: str) -> None:
        for slot in self._slots.values():
            if slot.record.status not in _TERMINAL:
                self._end(slot, "cancelled", wall, self._cancel_message(slot, why=why))

    def _message(
        self, slot: Slot, status: str, attempts: int, finished: sv.StepFinished | None
    ) -> str | None:
        sid = slot.record.step_id
        if status == "succeeded":
            return None
        if status == "timed_out":
            limit = f"its {slot.timeout:g} s timeout" if slot.timeout is not None else "a deadline"
            return (
                f"step {sid!r} timed out: it ran past {limit} (attempt {attempts}); "
                "execute_fn's task was cancelled"
            )
        if status == "failed":
            if finished is not None and finished.error_message:
                return finished.error_message
            if finished is not None and finished.error_type:
                return finished.error_type
            return slot.record.error or f"step {sid!r} failed"
        if status == "skipped":
            failed = [d for d in slot.deps if self._slots[d].record.status != "completed"]
            which = ", ".join(map(repr, failed)) or "a step it depends on"
            return f"step {sid!r} was not run: it depends on {which}, which did not complete"
        return self._cancel_message(slot, why=CANCELLED)

    @staticmethod
    def _cancel_message(slot: Slot, *, why: str) -> str:
        sid = slot.record.step_id
        when = "while it ran" if slot.started else "before it started"
        return f"step {sid!r} was cancelled {when}: {why}"
