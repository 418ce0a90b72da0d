"""The capacity of an engine, and its Workers: at most ``capacity`` slots leased at once.

A run's shell leases a :class:`Lease` for each slot its machine asks for, and
gives it back when the machine lends the slot back or the run ends.  A lease
is a unit of the engine's bound; a Worker (a thread) is attached to it only
when an attempt that needs one is dispatched on it (thread, process, Ray
steps).  An ``async def`` step runs on the event loop and needs no Worker, so
thousands of async attempts in flight hold thousands of leases and no threads.

A Worker keeps what it owns between leases (a process backend's child stays
booted), so the next run does not pay for it again.  When every lease is
taken, a request waits its turn (first come, first served) and is delivered
when a lease is given back::

    shell A ── lease ──▶ a Lease (taken < capacity), or None: queued, and
                         delivered later by give_back or abandon
    shell A ── attach(lease) ──▶ an idle Worker, or a new one
    shell B ── give_back(lease) ──▶ its Worker idles; the lease goes to the first waiter

An abandoned lease (its attempt ignored a stop) stops counting at once, so a
fresh one can be leased; its Worker is stopped when the attempt returns
(``retire``), or left to die as a daemon thread when the engine closes.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import pykka

from stepvisor._log import log
from stepvisor.actors.messages import Warm
from stepvisor.actors.worker import Worker, WorkerServices, worker_thread_name

__all__ = ["Lease", "WorkerPool"]


class Lease:
    """One unit of the engine's bound, with the Worker attached to it, if any."""

    __slots__ = ("holds_values", "worker", "worker_id")

    def __init__(self) -> None:
        self.worker: pykka.ActorRef[Any] | None = None
        self.worker_id: str | None = None
        #: The Worker's last message may hold a run's values (an attempt's inputs):
        #: it is sent a no-op when the lease is given back, so they can go.  The
        #: holder clears it when it knows better (a run's shell, per dispatch).
        self.holds_values = True


Deliver = Callable[[Lease], None]


class _Waiter:
    """A request for a lease, queued; ``deliver`` is ``None`` once its owner withdrew it."""

    __slots__ = ("deliver", "owner")

    def __init__(self, owner: object, deliver: Deliver) -> None:
        self.owner = owner
        self.deliver: Deliver | None = deliver


class WorkerPool:
    """Leases capacity and attaches Worker actors to leases; thread-safe."""

    def __init__(self, *, capacity: int, services: WorkerServices) -> None:
        self.capacity = capacity
        self._services = services
        self._lock = threading.Lock()
        self._taken = 0
        self._idle: list[tuple[str, pykka.ActorRef[Any]]] = []
        self._seq = 0
        #: Requests in arrival order (first come, first served), withdrawn ones included
        #: until they reach the front; and each owner's live ones, so that withdrawing
        #: them (every run does as it ends) does not search the whole queue.
        self._waiting: deque[_Waiter] = deque()
        self._waiting_of: dict[int, deque[_Waiter]] = {}
        self._workers: dict[str, pykka.ActorRef[Any]] = {}
        self._abandoned: set[str] = set()
        self._closed = False

    @property
    def services(self) -> WorkerServices:
        """What the Workers are given: the engine's backends."""
        return self._services

    @property
    def taken(self) -> int:
        """Leases held now (abandoned ones do not count)."""
        return self._taken

    def lease(self, owner: object, deliver: Deliver) -> Lease | None:
        """A lease now, or ``None``: then ``deliver(lease)`` is called once one is free."""
        with self._lock:
            if self._closed:
                raise RuntimeError("this engine is closed")
            if self._taken >= self.capacity:
                waiter = _Waiter(owner, deliver)
                self._waiting.append(waiter)
                self._waiting_of.setdefault(id(owner), deque()).append(waiter)
                return None
            self._taken += 1
        return Lease()

    def attach(self, lease: Lease) -> pykka.ActorRef[Any]:
        """The Worker of ``lease``: an idle one, or a new one, attached on first need."""
        if lease.worker is not None:
            return lease.worker
        with self._lock:
            if self._idle:
                lease.worker_id, lease.worker = self._idle.pop()
                return lease.worker
            self._seq += 1
            worker_id = f"e{self._seq}"
        ref = Worker.start(worker_id, self._services)
        with self._lock:
            self._workers[worker_id] = ref
        lease.worker_id, lease.worker = worker_id, ref
        return ref

    def give_back(self, lease: Lease) -> None:
        """``lease`` is no longer needed: its Worker idles; the lease may go to a waiter."""
        idle = None
        with self._lock:
            if lease.worker is not None and lease.worker_id is not None:
                if lease.holds_values:
                    idle = lease.worker
                self._idle.append((lease.worker_id, lease.worker))
                lease.worker = lease.worker_id = None
                lease.holds_values = True
            deliver = self._next_waiter()
            if deliver is None:
                self._taken -= 1
        if idle is not None:
            # An idle actor's loop keeps its last message (the attempt, its inputs)
            # until the next: a no-op one lets a run's large values, and the shared
            # memory they map, go when the run does.
            with contextlib.suppress(pykka.ActorDeadError):
                idle.tell(Warm(()))
        if deliver is not None:
            deliver(lease)  # the capacity unit passes on as it is: still taken

    def abandon(self, lease: Lease) -> None:
        """Stop counting ``lease`` (its attempt ignored a stop): its capacity is free again."""
        with self._lock:
            if lease.worker_id is not None:
                self._abandoned.add(lease.worker_id)
            deliver = self._next_waiter()
            if deliver is None:
                self._taken -= 1
        if deliver is not None:
            deliver(Lease())

    def retire(self, lease: Lease) -> None:
        """An abandoned lease's attempt returned: stop its Worker."""
        ref, worker_id = lease.worker, lease.worker_id
        if ref is None or worker_id is None:
            return
        with self._lock:
            self._workers.pop(worker_id, None)
            self._abandoned.discard(worker_id)
        with contextlib.suppress(pykka.ActorDeadError):
            ref.stop(block=False)

    def cancel_waiting(self, owner: object) -> None:
        """``owner`` no longer wants the leases it is waiting for.

        Its requests are marked withdrawn, found through the owner's index, and
        dropped when they reach the front of the queue: a rebuild of the queue
        per owner made ``Executor.shutdown(cancel_futures=True)`` with many
        queued calls, or many runs ending on a busy engine, quadratic.
        """
        with self._lock:
            for waiter in self._waiting_of.pop(id(owner), ()):
                waiter.deliver = None

    def _next_waiter(self) -> Deliver | None:
        """The oldest live request, taken off the queue (the lock is held)."""
        while self._waiting:
            waiter = self._waiting.popleft()
            deliver = waiter.deliver
            if deliver is None:
                continue  # withdrawn
            key = id(waiter.owner)
            mine = self._waiting_of[key]
            mine.popleft()  # the owner's oldest: requests leave in the order they came
            if not mine:
                del self._waiting_of[key]
            return deliver
        return None

    @property
    def abandoned_threads(self) -> set[str]:
        """Thread names of Workers left running an abandoned attempt (not to be joined)."""
        with self._lock:
            return {worker_thread_name(w) for w in self._abandoned}

    def close(self, *, timeout: float) -> None:
        """Stop every Worker (each closes what it owns); abandoned ones are not waited for."""
        with self._lock:
            self._closed = True
            workers = dict(self._workers)
            abandoned = set(self._abandoned)
            self._idle.clear()
            self._waiting.clear()
            self._waiting_of.clear()
        for worker_id, ref in workers.items():
            with contextlib.suppress(pykka.ActorDeadError):
                if worker_id in abandoned:
                    ref.stop(block=False)
                    continue
                try:
                    ref.stop(block=True, timeout=timeout)
                except pykka.Timeout:
                    log.warning("worker %s did not stop within %g s", worker_id, timeout)
