"""The Workers of an engine: at most ``capacity`` counted at once, idle ones kept warm.

A run's Supervisor leases a Worker for each slot its machine asks for, and
gives it back when the machine lends the slot back or the run ends.  A Worker
keeps what it owns between leases (a process backend's child stays booted),
so the next run does not pay for it again.  When every counted Worker is
leased, a lease waits its turn (first come, first served) and is delivered
when one is given back::

    Supervisor A ── lease ──▶ idle Worker, or a new one (live < capacity),
                              or None: queued, delivered later by give_back
    Supervisor B ── give_back(w) ──▶ to the first waiter, else idle

An abandoned Worker (its attempt ignored a stop) stops counting at once, so a
fresh one can take its place; it is stopped when its attempt returns
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

__all__ = ["WorkerPool"]

Deliver = Callable[["pykka.ActorRef[Any]"], None]


class WorkerPool:
    """Leases Worker actors to Supervisors; thread-safe."""

    def __init__(self, *, capacity: int, services: WorkerServices) -> None:
        self.capacity = capacity
        self._services = services
        self._lock = threading.Lock()
        self._idle: list[pykka.ActorRef[Any]] = []
        self._live = 0
        self._seq = 0
        self._waiting: deque[tuple[object, Deliver]] = deque()
        self._workers: dict[str, pykka.ActorRef[Any]] = {}
        self._names: dict[str, str] = {}  # actor urn -> worker id
        self._abandoned: set[str] = set()
        self._closed = False

    def lease(self, owner: object, deliver: Deliver) -> pykka.ActorRef[Any] | None:
        """A Worker now, or ``None``: then ``deliver(worker)`` is called once one is free."""
        with self._lock:
            if self._closed:
                raise RuntimeError("this engine is closed")
            if self._idle:
                return self._idle.pop()
            if self._live >= self.capacity:
                self._waiting.append((owner, deliver))
                return None
            self._live += 1
            self._seq += 1
            worker_id = f"e{self._seq}"
        ref = Worker.start(worker_id, self._services)
        with self._lock:
            self._workers[worker_id] = ref
            self._names[ref.actor_urn] = worker_id
        return ref

    def give_back(self, ref: pykka.ActorRef[Any]) -> None:
        """``ref`` is no longer leased: hand it to the first waiter, or keep it idle."""
        with self._lock:
            waiter = self._waiting.popleft() if self._waiting else None
            if waiter is None:
                self._idle.append(ref)
        if waiter is None:
            # An idle actor's loop keeps its last message (the attempt, its inputs)
            # until the next: a no-op one lets a run's large values, and the shared
            # memory they map, go when the run does.
            with contextlib.suppress(pykka.ActorDeadError):
                ref.tell(Warm(()))
            return
        waiter[1](ref)

    def abandon(self, ref: pykka.ActorRef[Any]) -> None:
        """Stop counting ``ref`` (its attempt ignored a stop): a fresh Worker may start."""
        worker_id = self._id_of(ref)
        with self._lock:
            self._abandoned.add(worker_id)
            self._live -= 1
            waiter = self._waiting.popleft() if self._waiting else None
        if waiter is not None:
            fresh = self.lease(waiter[0], waiter[1])
            if fresh is not None:
                waiter[1](fresh)

    def retire(self, ref: pykka.ActorRef[Any]) -> None:
        """An abandoned Worker's attempt returned: stop it."""
        worker_id = self._id_of(ref)
        with self._lock:
            self._workers.pop(worker_id, None)
            self._abandoned.discard(worker_id)
        with contextlib.suppress(pykka.ActorDeadError):
            ref.stop(block=False)

    def cancel_waiting(self, owner: object) -> None:
        """``owner`` no longer wants the Workers it is waiting for."""
        with self._lock:
            self._waiting = deque(w for w in self._waiting if w[0] is not owner)

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
        for worker_id, ref in workers.items():
            with contextlib.suppress(pykka.ActorDeadError):
                if worker_id in abandoned:
                    ref.stop(block=False)
                else:
                    try:
                        ref.stop(block=True, timeout=timeout)
                    except pykka.Timeout:
                        log.warning("worker %s did not stop within %g s", worker_id, timeout)

    def _id_of(self, ref: pykka.ActorRef[Any]) -> str:
        with self._lock:
            return self._names[ref.actor_urn]
