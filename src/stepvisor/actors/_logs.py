"""One run's captured output: what its attempts wrote, kept in its store and its result.

The shell gives each attempt an :class:`~stepvisor.backends._capture.AttemptLog`
on its control when the run captures (``capture`` is ``tee`` or ``store``); the
backend fills it while the attempt runs.  :class:`RunLogs` keeps it when the
attempt's outcome arrives, before the machine records the outcome, so a step
record that says an attempt ended is never ahead of its log::

    AttemptDone(s) ──▶ RunLogs.keep, then .save: one transaction ──▶ machine
    heartbeat   ──▶ RunLogs.save_running: running attempts' logs, as they grow
    Finish      ──▶ RunLogs.finish: logs of attempts that never reported (abandoned,
                    killed with the run), then the result carries every log

A run given no store keeps its logs only in its result.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from stepvisor._log import log as _log
from stepvisor.backends._capture import DEFAULT_LOG_LIMIT, Capture, install, log_of
from stepvisor.backends._stacks import HEADER
from stepvisor.context import AttemptControl
from stepvisor.core.result import RunResult
from stepvisor.errors import StoreError
from stepvisor.store._unkept import Unkept
from stepvisor.store.base import LogStore

__all__ = ["RunLogs"]


class RunLogs:
    """The logs of one run's attempts; used on the Supervisor's thread only."""

    def __init__(self, run_id: str, settings: Any, store: object) -> None:
        self._run_id = run_id
        mode = getattr(settings, "capture", "tee")
        #: ``None`` when nothing is captured (``capture="off"``).
        self.capture: Capture | None = None
        if mode in ("tee", "store"):
            limit = getattr(settings, "log_limit", DEFAULT_LOG_LIMIT)
            self.capture = Capture("tee" if mode == "tee" else "store", limit)
        if self.capture is not None:
            install()
        self._store: LogStore | None = (
            store if isinstance(store, LogStore) and not isinstance(store, Unkept) else None
        )
        self._kept: dict[tuple[str, int], str] = {}
        #: How much a running attempt had written when its log was last saved.
        self._saved: dict[tuple[str, int], int] = {}
        #: Logs kept and not saved yet: :meth:`save` writes them in one transaction.
        self._unsaved: list[tuple[str, int, str, int]] = []

    def keep(self, step_id: str, attempt: int, control: AttemptControl, *, ended: bool) -> None:
        """Keep one attempt's log (``ended``: its backend closed it)."""
        if not ended and control.stack and control.capture is not None:
            # Abandoned, or stopped with the run: its backend never closed the log.  The
            # stack goes through it, so that log_limit holds for it too.  (Its thread may
            # still write: a line of its own could be lost at a chunk's end, never mixed.)
            log_of(control, step_id, attempt).note(HEADER + control.stack)
            control.stack = None
        log = control.log
        if log is None or log.written == 0:
            return
        text, cut = log.render()
        self._kept[(step_id, attempt)] = text
        if self._store is not None:
            self._unsaved.append((step_id, attempt, text, cut))

    def save_running(self, controls: Mapping[str, tuple[int, AttemptControl]]) -> None:
        """Save the logs of running attempts that grew since the last heartbeat."""
        if self._store is None or self.capture is None:
            return
        for step_id, (attempt, control) in list(controls.items()):
            log = control.log
            if log is None or log.written == self._saved.get((step_id, attempt), 0):
                continue
            self._saved[(step_id, attempt)] = log.written
            text, cut = log.render()
            self._unsaved.append((step_id, attempt, text, cut))
        self.save()

    def finish(
        self, result: RunResult, controls: Mapping[str, tuple[int, AttemptControl]]
    ) -> RunResult:
        """The result with every log; attempts that never reported are kept as they are."""
        for step_id, (attempt, control) in list(controls.items()):
            self.keep(step_id, attempt, control, ended=False)
        self.save()
        if not self._kept:
            return result
        return dataclasses.replace(result, captured=MappingProxyType(dict(self._kept)))

    def save(self) -> None:
        """Write the logs kept since the last call, in one transaction (outcomes that
        arrive together are saved together)."""
        if not self._unsaved or self._store is None:
            return
        unsaved, self._unsaved = self._unsaved, []
        try:
            save_logs = getattr(self._store, "save_logs", None)
            if save_logs is not None:
                save_logs(self._run_id, unsaved)
            else:
                for step_id, attempt, text, cut in unsaved:
                    self._store.save_log(self._run_id, step_id, attempt, text, cut=cut)
        except StoreError:  # the run's records matter more: they are written next
            _log.warning("could not keep the logs of %d attempts", len(unsaved), exc_info=True)
