"""The warm engines of the joblib backend: one per ``n_jobs``, kept across ``Parallel`` calls.

An engine's bound is fixed when it starts, and ``n_jobs`` is the bound of a
``Parallel`` call, so each ``n_jobs`` in use has its engine.  A ``Parallel``
call leases it (:meth:`Engines.acquire`) and gives it back at its end; the
engines no call holds stay warm, the most recently used first, up to
:data:`KEEP_IDLE`, so that a program alternating two ``n_jobs`` (a search
whose inner estimator uses its own) starts no worker twice.  They are private
to this backend: their process children run nothing but joblib batches, so
each may set its own thread limits (see :mod:`stepvisor.joblib._child`).
"""

from __future__ import annotations

import atexit
import threading
from collections import OrderedDict
from typing import Final

from stepvisor.engine import Engine

__all__ = ["ENGINES", "KEEP_IDLE", "Engines"]

#: Engines no ``Parallel`` call holds that are kept warm (per distinct ``n_jobs``).
KEEP_IDLE: Final = 2


class Engines:
    """Engines by bound, leased by ``Parallel`` calls; the idle ones kept, up to a limit."""

    def __init__(self, *, keep_idle: int = KEEP_IDLE) -> None:
        self._lock = threading.Lock()
        self._keep_idle = keep_idle
        #: bound -> engine, least recently used first.
        self._engines: OrderedDict[int, Engine] = OrderedDict()
        self._leases: dict[int, int] = {}

    def acquire(self, bound: int) -> Engine:
        """The warm engine of this bound (started if there is none); give it back with release."""
        with self._lock:
            engine = self._engines.get(bound)
            if engine is None or engine.closed:
                engine = self._engines[bound] = Engine(max_parallel=bound)
            self._engines.move_to_end(bound)
            self._leases[bound] = self._leases.get(bound, 0) + 1
            idle = self._evict()
        for old in idle:
            old.close()
        return engine

    def release(self, bound: int) -> None:
        """A ``Parallel`` call is done with its engine (it stays warm unless too many are)."""
        with self._lock:
            left = self._leases.get(bound, 0) - 1
            if left > 0:
                self._leases[bound] = left
            else:
                self._leases.pop(bound, None)
            idle = self._evict()
        for old in idle:
            old.close()

    def _evict(self) -> list[Engine]:
        """Take out the least recently used idle engines beyond the limit (lock held)."""
        idle = [bound for bound in self._engines if bound not in self._leases]
        surplus = idle[: max(len(idle) - self._keep_idle, 0)]
        return [self._engines.pop(bound) for bound in surplus]

    def running(self) -> dict[int, int]:
        """Bound -> leases, for every engine kept (for tests and ``repr``)."""
        with self._lock:
            return {bound: self._leases.get(bound, 0) for bound in self._engines}

    def close_all(self) -> None:
        """Close every engine, leased or not (their calls are stopped)."""
        with self._lock:
            engines = list(self._engines.values())
            self._engines.clear()
            self._leases.clear()
        for engine in engines:
            engine.close()


ENGINES: Final = Engines()
atexit.register(ENGINES.close_all)
