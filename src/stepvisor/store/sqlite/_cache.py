"""The SQLite store's cache tables (schema v5): entries beside the runs, by key.

A mixin of :class:`~stepvisor.store.sqlite._store.SQLiteStore`: each method is
one transaction of the store's, so a killed program leaves an entry whole or
absent, and two programs sharing the file see each other's entries (an entry
another program writes under the same key replaces ours: both are results of
the same key, and readers check the checksum anyway).  An entry's payload is
a row of ``cache_payloads``, apart from its description in ``cache_entries``.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Final

from stepvisor.cache._entry import CacheEntry, EntryInfo

__all__ = ["CacheTable", "entry_rows"]

_COLUMNS: Final = (
    "key, workflow_id, step_id, parts, run_id, checksum, digests, size, created, last_used"
)
PUT: Final = (
    f"INSERT OR REPLACE INTO cache_entries ({_COLUMNS})"  # noqa: S608 - constant
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
PUT_PAYLOAD: Final = "INSERT OR REPLACE INTO cache_payloads (key, payload) VALUES (?, ?)"
#: Lookups go by this many keys at a time (well under SQLite's limit on parameters).
_CHUNK: Final = 400
NEWEST_PARTS: Final = (
    "SELECT parts FROM cache_entries WHERE workflow_id = ? AND step_id = ?"
    " ORDER BY created DESC LIMIT 1"
)
TOUCH: Final = "UPDATE cache_entries SET last_used = max(last_used, ?) WHERE key = ?"
LIST: Final = (
    "SELECT key, workflow_id, step_id, run_id, size, created, last_used FROM cache_entries"
    " ORDER BY created DESC, rowid"
)
DELETE: Final = "DELETE FROM cache_entries WHERE key = ?"
DELETE_PAYLOAD: Final = "DELETE FROM cache_payloads WHERE key = ?"


def _select(count: int) -> str:
    marks = ", ".join("?" * count)
    return (
        "SELECT e.key, e.workflow_id, e.step_id, e.parts, e.run_id, p.payload, e.checksum,"  # noqa: S608 - constant
        f" e.digests, e.created, e.last_used FROM cache_entries e LEFT JOIN cache_payloads p"
        f" ON p.key = e.key WHERE e.key IN ({marks})"
    )


class CacheTable:
    """The :class:`~stepvisor.store.base.CacheStore` methods of the SQLite store."""

    if TYPE_CHECKING:
        _lock: threading.Lock

        def _connection(self) -> sqlite3.Connection: ...

        def _transaction(
            self, what: str, run_id: str, *, write: bool
        ) -> AbstractContextManager[sqlite3.Connection]: ...

    def cache_get(self, key: str) -> CacheEntry | None:
        return self.cache_get_many([key]).get(key)

    def cache_get_many(self, keys: Sequence[str]) -> dict[str, CacheEntry]:
        found: dict[str, CacheEntry] = {}
        with self._transaction("read the cache of", "", write=False) as conn:
            for at in range(0, len(keys), _CHUNK):
                chunk = keys[at : at + _CHUNK]
                for row in conn.execute(_select(len(chunk)), chunk):
                    found[row[0]] = _entry(row)
        return found

    def cache_parts(self, workflow_id: str, step_id: str) -> Mapping[str, str] | None:
        with self._transaction("read the cache of", "", write=False) as conn:
            row = conn.execute(NEWEST_PARTS, (workflow_id, step_id)).fetchone()
        if row is None:
            return None
        return _json_map(row[0])  # damaged: every part "differs"

    def cache_put(self, entry: CacheEntry) -> None:
        row, payload = entry_rows(entry)
        with self._transaction("write to the cache of", entry.run_id, write=True) as conn:
            conn.execute(PUT, row)
            conn.execute(PUT_PAYLOAD, payload)

    def cache_touch(self, keys: Sequence[str], when: float) -> None:
        with self._transaction("write to the cache of", "", write=True) as conn:
            conn.executemany(TOUCH, [(when, key) for key in keys])

    def cache_list(self) -> list[EntryInfo]:
        with self._transaction("list the cache of", "", write=False) as conn:
            rows = conn.execute(LIST).fetchall()
        return [EntryInfo(*row) for row in rows]

    def cache_delete(self, keys: Sequence[str]) -> int:
        with self._transaction("prune the cache of", "", write=True) as conn:
            conn.executemany(DELETE_PAYLOAD, [(key,) for key in keys])
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


def entry_rows(entry: CacheEntry) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """The ``cache_entries`` row of ``entry`` (for ``PUT``) and its payload's (``PUT_PAYLOAD``)."""
    row = (
        entry.key, entry.workflow_id, entry.step_id, json.dumps(dict(entry.parts)),
        entry.run_id, entry.checksum, json.dumps(dict(entry.digests)), entry.size,
        entry.created, entry.last_used,
    )  # fmt: skip
    return row, (entry.key, entry.payload)


def _entry(row: tuple[Any, ...]) -> CacheEntry:
    """A row as an entry; a missing payload or damaged JSON reads so (the checksum fails)."""
    key, workflow_id, step_id, parts, run_id, payload, checksum, digests, created, used = row
    return CacheEntry(
        key, workflow_id, step_id, _json_map(parts), run_id,
        b"" if payload is None else bytes(payload), str(checksum), _json_map(digests),
        float(created), float(used),
    )  # fmt: skip


def _json_map(text: object) -> dict[str, str]:
    try:
        value = json.loads(str(text))
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
