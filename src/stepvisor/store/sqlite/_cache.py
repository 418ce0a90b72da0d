"""The SQLite store's cache table (schema v5): entries beside the runs, by key.

A mixin of :class:`~stepvisor.store.sqlite._store.SQLiteStore`: each method is
one transaction of the store's, so a killed program leaves an entry whole or
absent, and two programs sharing the file see each other's entries (an entry
another program writes under the same key replaces ours: both are results of
the same key, and readers check the checksum anyway).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Final

from stepvisor.cache._entry import CacheEntry, EntryInfo

__all__ = ["CacheTable"]

_COLUMNS: Final = (
    "key, workflow_id, step_id, parts, run_id, payload, checksum, digests, size, created, last_used"
)
PUT: Final = (
    f"INSERT OR REPLACE INTO cache_entries ({_COLUMNS})"  # noqa: S608 - constant
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
GET: Final = f"SELECT {_COLUMNS} FROM cache_entries WHERE key = ?"  # noqa: S608 - constant
NEWEST_PARTS: Final = (
    "SELECT parts FROM cache_entries WHERE workflow_id = ? AND step_id = ?"
    " ORDER BY created DESC LIMIT 1"
)
TOUCH: Final = "UPDATE cache_entries SET last_used = ? WHERE key = ?"
LIST: Final = (
    "SELECT key, workflow_id, step_id, run_id, size, created, last_used FROM cache_entries"
    " ORDER BY created DESC, rowid"
)
DELETE: Final = "DELETE FROM cache_entries WHERE key = ?"


class CacheTable:
    """The :class:`~stepvisor.store.base.CacheStore` methods of the SQLite store."""

    if TYPE_CHECKING:
        _lock: threading.Lock

        def _connection(self) -> sqlite3.Connection: ...

        def _transaction(
            self, what: str, run_id: str, *, write: bool
        ) -> AbstractContextManager[sqlite3.Connection]: ...

    def cache_get(self, key: str) -> CacheEntry | None:
        with self._transaction("read the cache of", "", write=False) as conn:
            row = conn.execute(GET, (key,)).fetchone()
        return None if row is None else _entry(row)

    def cache_parts(self, workflow_id: str, step_id: str) -> Mapping[str, str] | None:
        with self._transaction("read the cache of", "", write=False) as conn:
            row = conn.execute(NEWEST_PARTS, (workflow_id, step_id)).fetchone()
        if row is None:
            return None
        try:
            parts = json.loads(row[0])
        except ValueError:
            return {}  # damaged: every part "differs", the note says no more than "no entry"
        return parts if isinstance(parts, dict) else {}

    def cache_put(self, entry: CacheEntry) -> None:
        row = entry_row(entry)
        with self._transaction("write to the cache of", entry.run_id, write=True) as conn:
            conn.execute(PUT, row)

    def cache_touch(self, key: str, when: float) -> None:
        with self._transaction("write to the cache of", "", write=True) as conn:
            conn.execute(TOUCH, (when, key))

    def cache_list(self) -> list[EntryInfo]:
        with self._transaction("list the cache of", "", write=False) as conn:
            rows = conn.execute(LIST).fetchall()
        return [EntryInfo(*row) for row in rows]

    def cache_delete(self, keys: Sequence[str]) -> int:
        with self._transaction("prune the cache of", "", write=True) as conn:
            return sum(conn.execute(DELETE, (key,)).rowcount for key in keys)

    def compact(self) -> bool:
        """Give the space of removed entries back to the disk (``VACUUM``).

        False when another program holds the store (the space is then reused
        by later entries instead); never raises for that.
        """
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("VACUUM")
            except sqlite3.OperationalError:
                return False
        return True


def entry_row(entry: CacheEntry) -> tuple[Any, ...]:
    """The ``cache_entries`` row of ``entry`` (for ``PUT``)."""
    return (
        entry.key, entry.workflow_id, entry.step_id, json.dumps(dict(entry.parts)),
        entry.run_id, entry.payload, entry.checksum, json.dumps(dict(entry.digests)),
        entry.size, entry.created, entry.last_used,
    )  # fmt: skip


def _entry(row: tuple[Any, ...]) -> CacheEntry:
    """A row as an entry; damaged JSON reads as empty (the checksum then fails)."""
    key, workflow_id, step_id, parts, run_id, payload, checksum, digests, _size, created, used = row
    return CacheEntry(
        key, workflow_id, step_id, _json_map(parts), run_id, bytes(payload), str(checksum),
        _json_map(digests), float(created), float(used),
    )  # fmt: skip


def _json_map(text: object) -> dict[str, str]:
    try:
        value = json.loads(str(text))
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
