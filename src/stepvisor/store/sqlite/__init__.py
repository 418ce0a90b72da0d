"""The durable run store: one SQLite file that outlives the program.

It holds the same records as :class:`~stepvisor.store.memory.MemoryStore`, so a
run can be resumed, inspected (``stepvisor status``) or cancelled
(``stepvisor cancel``) from another program while it runs.

The package's private modules::

    _schema    schema versions and migrations, SQL statements, rows <-> records
    _files     creating a store whole, checking a file is one, connecting, naming faults
    _opening   opening an existing store: marker, version, codec; migrating
    _owner     who owns a run: lock files, process identity, is the owner alive?
    _records   a run's rows read back as records (a dead run reads interrupted)
    _store     SQLiteStore: the RunStore port over one file

How a store is opened: see :mod:`stepvisor.store.sqlite._files`.  Who may run a
run: see :mod:`stepvisor.store.sqlite._owner`.

How a write goes: values are encoded *before* the transaction (a value the
codec cannot hold fails with nothing written), then ``BEGIN IMMEDIATE``, the
statements, ``COMMIT``.  A ``succeeded`` step and its artifacts are one
transaction, so a step is never stored succeeded without its artifacts.

Durability: the journal is a write-ahead log (WAL) with ``synchronous=NORMAL``.
In WAL mode NORMAL does not fsync at each commit, only at checkpoints, yet a
committed transaction is in the WAL file before ``COMMIT`` returns: it survives
the program crashing or being killed, which is the failure we must handle.  A
power loss or OS crash may lose the last few transactions (never corrupt the
file); a resumed run then redoes those steps.  ``FULL`` would fsync every step
transition and cost more than the steps it records.

Threads: the Supervisor thread writes while other threads (and programs) read.
The store keeps ONE connection, opened with ``check_same_thread=False`` and
guarded by a lock held for one method call.  Readers in other *programs* have
their own connections and, thanks to WAL, never block the writer nor wait for
it.  In-process readers wait at most one short transaction; a connection per
thread would let them read in parallel, but connections of threads that end
would linger until ``close()``, which could then not close them from its own
thread.  One connection keeps ``close()`` exact.

Trust: files are created readable by their owner only (0600, as are SQLite's
``-wal``/``-shm`` files, which copy the database file's mode), and a json store
never holds anything that runs code when read.  See :mod:`stepvisor.store.codec`.
"""

from stepvisor.store.sqlite._schema import APPLICATION_ID, MARKER, MIGRATIONS, SCHEMA_VERSION
from stepvisor.store.sqlite._store import DEFAULT_BUSY_TIMEOUT, DEFAULT_STALE_AFTER, SQLiteStore

__all__ = [
    "APPLICATION_ID",
    "DEFAULT_BUSY_TIMEOUT",
    "DEFAULT_STALE_AFTER",
    "MARKER",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "SQLiteStore",
]
