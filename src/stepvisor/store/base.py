"""The run store port: what the Supervisor needs from wherever state is kept.

Every method that changes the store is one transaction: a step transition is
written whole or not at all, so a crash leaves a state the program could have
been in.  The Supervisor calls the store from its own thread only; a store may
also be read from other threads or programs (``stepvisor status``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

from stepvisor.cache._entry import CacheEntry, EntryInfo
from stepvisor.core.state import RunStatus, StepRecord

__all__ = [
    "CacheStore",
    "ClaimingStore",
    "LogEntry",
    "LogStore",
    "RunInfo",
    "RunOwner",
    "RunStore",
    "StoredRun",
    "save_step_batch",
]


@dataclass(frozen=True, slots=True)
class RunOwner:
    """The program that owns a run: the only one allowed to run its steps.

    ``started`` (the process's start time, in clock ticks since boot) and
    ``boot_id`` tell a live owner from a process that merely got its pid after
    it died or after a reboot.  ``token`` tells two claims of one process apart.
    """

    host: str
    pid: int
    since: float
    started: int | None = None
    boot_id: str | None = None
    token: str = ""

    def describe(self) -> str:
        """``pid 123 on host h since 2024-05-01 10:00:00``, for messages."""
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"pid {self.pid} on host {self.host} since {when}"


@dataclass(frozen=True, slots=True)
class RunInfo:
    """A run's header: identity, configuration used, status and times."""

    run_id: str
    workflow_id: str
    fingerprint: str
    settings: Mapping[str, Any]
    seed: int
    status: RunStatus
    started: float
    ended: float | None = None
    heartbeat: float | None = None
    error: str | None = None
    #: Where the workflow came from (a file path), when known; used by ``resume``.
    source: str | None = None
    #: Who owns the run while it runs (a store that records owners); not part
    #: of the run's identity, so two reads of one run compare equal across owners.
    owner: RunOwner | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class StoredRun:
    """Everything a store holds about one run."""

    info: RunInfo
    steps: Mapping[str, StepRecord]
    #: step id -> the artifacts that step created (only for succeeded steps).
    outputs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


class RunStore(Protocol):
    """Where run state is kept.  Implementations: memory and SQLite."""

    def begin_run(self, info: RunInfo, steps: Sequence[StepRecord]) -> None:
        """Create the run and its step rows, or mark a resumed run running again."""
        ...

    def save_step(
        self, run_id: str, record: StepRecord, outputs: Mapping[str, Any] | None = None
    ) -> None:
        """Write one step transition; ``outputs`` go with a ``succeeded`` record."""
        ...

    def save_steps(self, run_id: str, records: Sequence[StepRecord]) -> None:
        """Write several step transitions in one transaction (e.g. cancel all)."""
        ...

    def finish_run(
        self, run_id: str, status: RunStatus, *, ended: float, error: str | None = None
    ) -> None:
        """Record the run's final status."""

    def heartbeat(self, run_id: str, now: float) -> None:
        """Say the program running ``run_id`` is alive."""

    def cancel_requested(self, run_id: str) -> bool:
        """Whether someone asked (e.g. ``stepvisor cancel``) for the run to stop."""

    def request_cancel(self, run_id: str) -> None:
        """Ask the program running ``run_id`` to cancel it."""

    def exists(self, run_id: str) -> bool:
        """Whether the store holds a run with this id (reads none of its data)."""

    def load(self, run_id: str) -> StoredRun:
        """Everything about one run; ``RunNotFoundError`` if there is none."""

    def list_runs(self) -> list[RunInfo]:
        """Every run, newest first."""

    def close(self) -> None:
        """Release what the store holds open."""


@runtime_checkable
class ClaimingStore(Protocol):
    """A store that gives a run to one program at a time (both built-in stores).

    The runtime claims a run before its Supervisor starts, so a run that
    another program owns is refused with ``RunOwnedError`` before anything
    runs.  ``begin_run`` of a claimed run writes it; ``finish_run`` (or
    ``release_run``) gives it up.  A store without these methods is used as is.
    """

    def claim_run(self, run_id: str, *, new: bool) -> None:
        """Own ``run_id``: a new run (``new=True``: the id must be unused) or a resumed one."""
        ...

    def release_run(self, run_id: str) -> None:
        """Give up ``run_id`` if this store owns it (idempotent)."""
        ...


def save_step_batch(
    store: RunStore, run_id: str, items: Sequence[tuple[StepRecord, Mapping[str, Any] | None]]
) -> None:
    """Write several ``save_step`` transitions, in one transaction where the store can.

    The stores of this package have a ``save_step_batch`` method; a store of
    the caller's own that lacks it gets one ``save_step`` per item, in order.
    """
    batch = getattr(store, "save_step_batch", None)
    if batch is not None:
        batch(run_id, items)
        return
    for record, outputs in items:
        store.save_step(run_id, record, outputs)


class LogEntry(NamedTuple):
    """One attempt's kept log, as listed: which attempt, its size, how much was cut."""

    step_id: str
    attempt: int
    chars: int
    cut: int


@runtime_checkable
class LogStore(Protocol):
    """A store that keeps each attempt's captured output (both built-in stores).

    Logs live beside the step records, never inside them: records stay small
    and are read whole, a log is read when someone asks for it.  ``save_log``
    replaces what was kept for the attempt (a running attempt's log is saved
    again as it grows).  A store without these methods keeps no logs.
    """

    def save_log(self, run_id: str, step_id: str, attempt: int, text: str, *, cut: int) -> None:
        """Keep (or replace) one attempt's log."""
        ...

    def save_logs(self, run_id: str, logs: Sequence[tuple[str, int, str, int]]) -> None:
        """Keep several logs, ``(step id, attempt, text, cut)`` each, in one transaction."""
        ...

    def load_log(self, run_id: str, step_id: str, attempt: int) -> str | None:
        """One attempt's log, or ``None`` if none was kept."""
        ...

    def list_logs(self, run_id: str) -> list[LogEntry]:
        """The logs kept for ``run_id``, by step id then attempt."""
        ...


@runtime_checkable
class CacheStore(Protocol):
    """A store that keeps a cache of step results (both built-in stores).

    Entries live beside the runs, keyed by :class:`~stepvisor.cache._key.Key`
    digests; the run that made an entry may be gone.  A store without these
    methods caches nothing (a run says so once in its log).  Readers check
    each entry's checksum: a store returns what it holds, damaged or not.
    """

    def cache_get(self, key: str) -> CacheEntry | None:
        """The entry stored under ``key``, or ``None``."""
        ...

    def cache_get_many(self, keys: Sequence[str]) -> Mapping[str, CacheEntry]:
        """The entries stored under these keys (those there are), in one read."""
        ...

    def cache_parts(self, workflow_id: str, step_id: str) -> Mapping[str, str] | None:
        """The key parts of the step's newest entry (to say why a key missed), or ``None``."""
        ...

    def cache_put(self, entry: CacheEntry) -> None:
        """Keep ``entry`` (replacing one under the same key), in one transaction."""
        ...

    def cache_touch(self, keys: Sequence[str], when: float) -> None:
        """Record that the entries under ``keys`` were reused at ``when`` (one transaction)."""
        ...

    def cache_list(self) -> list[EntryInfo]:
        """Every entry, newest first, without its payload."""
        ...

    def cache_delete(self, keys: Sequence[str]) -> int:
        """Remove these entries; return how many there were."""
        ...
