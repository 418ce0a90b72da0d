"""The in-memory store: the library default when no store is given.

It keeps the same records as the SQLite store, so a run's result and its
history read the same whichever store held them; it just does not survive the
program.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import replace
from types import MappingProxyType
from typing import Any, Final

from stepvisor.cache._entry import CacheEntry, EntryInfo
from stepvisor.core.state import RunStatus, StepRecord
from stepvisor.errors import RunNotFoundError, RunOwnedError, StoreError
from stepvisor.store.base import LogEntry, RunInfo, StoredRun

#: What a step that created nothing stored: one shared read-only mapping rather
#: than an empty dict per step (a million-step run made a million of them).
_NOTHING: Mapping[str, Any] = MappingProxyType({})

__all__ = ["MemoryStore"]

#: What a "no such run" message adds where a user may be looking for a run.
_LIST_RUNS_HINT: Final = "; list runs with `stepvisor status`"


class MemoryStore:
    """Runs kept in dictionaries, guarded by a lock for readers on other threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[str, RunInfo] = {}
        self._steps: dict[str, dict[str, StepRecord]] = {}
        self._outputs: dict[str, dict[str, Mapping[str, Any]]] = {}
        self._cancel: set[str] = set()
        #: (run id, step id, attempt) -> (log text, bytes cut): beside the records.
        self._logs: dict[tuple[str, str, int], tuple[str, int]] = {}
        #: Runs being run now: one program only ever sees its own memory store,
        #: so ownership is "claimed or not" (two threads resuming one run).
        self._claimed: set[str] = set()
        #: The cache: key -> entry (see stepvisor.store.base.CacheStore).
        self._cache: dict[str, CacheEntry] = {}

    def claim_run(self, run_id: str, *, new: bool) -> None:
        with self._lock:
            if run_id in self._claimed:
                raise RunOwnedError(
                    f"run {run_id!r} is already running in this program; wait for it to end",
                    run_id=run_id,
                )
            if new and run_id in self._runs:
                raise StoreError(
                    f"run id {run_id!r} is already used by a run in this store; choose another "
                    f"run_id, or continue that run with resume({run_id!r}, ...)"
                )
            if not new:
                self._known(run_id, hint=_LIST_RUNS_HINT)
            self._claimed.add(run_id)

    def release_run(self, run_id: str) -> None:
        with self._lock:
            self._claimed.discard(run_id)

    def begin_run(self, info: RunInfo, steps: Sequence[StepRecord]) -> None:
        with self._lock:
            self._runs[info.run_id] = info
            table = self._steps.setdefault(info.run_id, {})
            for record in steps:
                table[record.step_id] = record
            self._outputs.setdefault(info.run_id, {})
            self._cancel.discard(info.run_id)

    def save_step(
        self, run_id: str, record: StepRecord, outputs: Mapping[str, Any] | None = None
    ) -> None:
        self.save_step_batch(run_id, ((record, outputs),))

    def save_step_batch(
        self, run_id: str, items: Sequence[tuple[StepRecord, Mapping[str, Any] | None]]
    ) -> None:
        """Several :meth:`save_step` at once (see ``SQLiteStore.save_step_batch``)."""
        with self._lock:
            table = self._steps[run_id]
            for record, outputs in items:
                table[record.step_id] = record
                if outputs is not None:
                    self._outputs[run_id][record.step_id] = _kept(outputs)

    def save_steps(self, run_id: str, records: Sequence[StepRecord]) -> None:
        with self._lock:
            table = self._steps[run_id]
            for record in records:
                table[record.step_id] = record

    def finish_run(
        self, run_id: str, status: RunStatus, *, ended: float, error: str | None = None
    ) -> None:
        with self._lock:
            self._runs[run_id] = replace(
                self._runs[run_id], status=status, ended=ended, error=error
            )
            self._claimed.discard(run_id)

    def heartbeat(self, run_id: str, now: float) -> None:
        with self._lock:
            self._runs[run_id] = replace(self._runs[run_id], heartbeat=now)

    def cancel_requested(self, run_id: str) -> bool:
        with self._lock:
            return run_id in self._cancel

    def request_cancel(self, run_id: str) -> None:
        with self._lock:
            self._known(run_id)
            self._cancel.add(run_id)

    def exists(self, run_id: str) -> bool:
        with self._lock:
            return run_id in self._runs

    def _known(self, run_id: str, *, hint: str = "") -> None:
        """Raise ``RunNotFoundError`` unless ``run_id`` is stored; the caller holds the lock."""
        if run_id not in self._runs:
            raise RunNotFoundError(f"no run with id {run_id!r} in this store{hint}")

    def load(self, run_id: str) -> StoredRun:
        with self._lock:
            self._known(run_id, hint=_LIST_RUNS_HINT)
            return StoredRun(
                info=self._runs[run_id],
                steps=dict(self._steps[run_id]),
                outputs=dict(self._outputs[run_id]),
            )

    def list_runs(self) -> list[RunInfo]:
        with self._lock:
            return sorted(self._runs.values(), key=lambda r: r.started, reverse=True)

    def save_log(self, run_id: str, step_id: str, attempt: int, text: str, *, cut: int) -> None:
        with self._lock:
            self._known(run_id)
            self._logs[(run_id, step_id, attempt)] = (text, cut)

    def save_logs(self, run_id: str, logs: Sequence[tuple[str, int, str, int]]) -> None:
        with self._lock:
            self._known(run_id)
            for step_id, attempt, text, cut in logs:
                self._logs[(run_id, step_id, attempt)] = (text, cut)

    def load_log(self, run_id: str, step_id: str, attempt: int) -> str | None:
        with self._lock:
            kept = self._logs.get((run_id, step_id, attempt))
        return None if kept is None else kept[0]

    def list_logs(self, run_id: str) -> list[LogEntry]:
        with self._lock:
            self._known(run_id, hint=_LIST_RUNS_HINT)
            found = [
                LogEntry(step, attempt, len(text), cut)
                for (run, step, attempt), (text, cut) in self._logs.items()
                if run == run_id
            ]
        return sorted(found, key=lambda entry: (entry.step_id, entry.attempt))

    # -- the cache ---------------------------------------------------------------------

    def cache_get(self, key: str) -> CacheEntry | None:
        with self._lock:
            return self._cache.get(key)

    def cache_get_many(self, keys: Sequence[str]) -> dict[str, CacheEntry]:
        with self._lock:
            return {key: self._cache[key] for key in keys if key in self._cache}

    def cache_parts(self, workflow_id: str, step_id: str) -> Mapping[str, str] | None:
        with self._lock:
            newest: CacheEntry | None = None
            for entry in self._cache.values():
                mine = entry.workflow_id == workflow_id and entry.step_id == step_id
                if mine and (newest is None or entry.created >= newest.created):
                    newest = entry
            return None if newest is None else newest.parts

    def cache_put(self, entry: CacheEntry) -> None:
        with self._lock:
            self._cache.pop(entry.key, None)  # a replaced entry counts as new: dicts keep order
            self._cache[entry.key] = entry

    def cache_touch(self, keys: Sequence[str], when: float) -> None:
        with self._lock:
            for key in keys:
                entry = self._cache.get(key)
                if entry is not None and entry.last_used < when:
                    self._cache[key] = replace(entry, last_used=when)

    def cache_list(self) -> list[EntryInfo]:
        with self._lock:
            entries = list(self._cache.values())
        entries.sort(key=lambda e: -e.created)
        return [
            EntryInfo(e.key, e.workflow_id, e.step_id, e.run_id, e.size, e.created, e.last_used)
            for e in entries
        ]

    def cache_delete(self, keys: Sequence[str]) -> int:
        with self._lock:
            return sum(self._cache.pop(key, None) is not None for key in keys)

    def close(self) -> None:
        """Nothing to release."""


def _kept(outputs: Mapping[str, Any]) -> Mapping[str, Any]:
    """A copy of a step's outputs to keep (the caller's dict may change later)."""
    return dict(outputs) if outputs else _NOTHING
