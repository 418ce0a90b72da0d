"""A warm engine: Workers, their process children, the event loop and Ray, kept across runs.

``sv.run(wf)`` starts everything a run needs and stops it at the end: Worker
threads, a child process per process Worker (fork+exec, tens of ms each), the
asyncio loop, the Ray connection.  A program that runs many workflows pays
that every time.  An :class:`Engine` keeps them::

    with sv.Engine(max_parallel=4) as engine:
        for wf in workflows:
            result = engine.run(wf)        # or sv.run(wf, engine=engine)

* **One bound for every run on it.**  The engine has ``max_parallel`` Workers
  at most; each run leases Workers for its slots (up to its own
  ``max_parallel``) and gives idle ones back while it has nothing ready, so
  concurrent runs share the engine's bound, first come, first served.
* **Faults do not break it.**  A run that crashed a child, timed out or was
  cancelled leaves the engine usable: a killed child is replaced by its Worker,
  an abandoned Worker stops counting and a fresh one takes its place.
* **Closing leaves nothing.**  :meth:`close` cancels runs still going, waits for
  them, stops every Worker (each closes its child) and the loop and Ray; no
  thread, process or segment of the engine outlives it (an abandoned Worker's
  thread is a daemon and holds no process).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pykka

from stepvisor._closing import Closing
from stepvisor._log import log
from stepvisor.actors.runs import WorkerPool
from stepvisor.actors.supervisor import Supervisor
from stepvisor.actors.worker import RunBackends, check_backends
from stepvisor.backends import _shm
from stepvisor.backends.asyncio import LOOP_THREAD_NAME
from stepvisor.core.model import check_max_parallel
from stepvisor.errors import InvalidSettingError

if TYPE_CHECKING:
    from stepvisor._runtime import RunHandle
    from stepvisor.backends.base import Backend
    from stepvisor.core.model import Workflow
    from stepvisor.core.result import RunResult

__all__ = ["Engine"]


class _Threads:
    """The threads an engine starts (Workers, the loop), so ``close`` can join them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def add(self, thread: threading.Thread) -> None:
        with self._lock:
            self._threads.append(thread)

    def join(self, *, timeout: float, skip: set[str]) -> None:
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            if thread.name not in skip and thread is not threading.current_thread():
                thread.join(timeout)


class Engine(Closing):
    """Workers and backends kept warm for many runs; a context manager.

    ``max_parallel`` bounds the attempts running at once across every run on
    the engine (default: the configured ``max_parallel``, 8 unless set).
    ``ray_address`` is where Ray steps go; ``backends`` replaces built-in
    backends by executor name (see :mod:`stepvisor.testing`).
    """

    def __init__(
        self,
        *,
        max_parallel: int | None = None,
        ray_address: str | None = None,
        backends: Mapping[str, Backend] | None = None,
    ) -> None:
        if max_parallel is None:
            from stepvisor.config import resolve  # noqa: PLC0415 - reads the environment

            max_parallel = resolve().max_parallel
        self.max_parallel = check_max_parallel(max_parallel)
        check_backends(backends)
        self._threads = _Threads()
        self._backends = RunBackends(
            given=backends, ray_address=ray_address, register_thread=self._threads.add
        )
        self._pool = WorkerPool(capacity=self.max_parallel, services=self._backends.services())
        self._lock = threading.Lock()
        self._runs: set[RunHandle] = set()
        self._supervisor: pykka.ActorRef[Any] | None = None
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._runs)} runs"
        return f"<stepvisor.Engine max_parallel={self.max_parallel} {state}>"

    @property
    def closed(self) -> bool:
        return self._closed

    # -- running -----------------------------------------------------------------

    def run(self, wf: Workflow, **kwargs: Any) -> RunResult:
        """``sv.run(wf, engine=self, ...)``."""
        from stepvisor._runtime import run  # noqa: PLC0415 - the runtime imports this module

        return run(wf, engine=self, **kwargs)

    def start(self, wf: Workflow, **kwargs: Any) -> RunHandle:
        """``sv.start(wf, engine=self, ...)``."""
        from stepvisor._runtime import start  # noqa: PLC0415

        return start(wf, engine=self, **kwargs)

    async def run_async(self, wf: Workflow, **kwargs: Any) -> RunResult:
        """``await sv.run_async(wf, engine=self, ...)``."""
        from stepvisor._runtime import run_async  # noqa: PLC0415

        return await run_async(wf, engine=self, **kwargs)

    # -- what the runtime uses --------------------------------------------------------

    @property
    def pool(self) -> WorkerPool:
        return self._pool

    @property
    def backends(self) -> RunBackends:
        return self._backends

    def _supervisor_ref(self) -> pykka.ActorRef[Any]:
        """The engine's one Supervisor actor, which hosts every run's shell."""
        with self._lock:
            if self._supervisor is None:
                self._supervisor = Supervisor.start(
                    pool=self._pool, register_thread=self._threads.add
                )
            return self._supervisor

    def _admit(self, handle: RunHandle, executors: tuple[str, ...]) -> None:
        """A run starts on this engine: connect what its steps need first."""
        with self._lock:
            if self._closed:
                raise InvalidSettingError(
                    "this Engine is closed; start runs on an open one (or without engine=)"
                )
            if any(other.run_id == handle.run_id for other in self._runs):
                raise InvalidSettingError(
                    f"a run with id {handle.run_id!r} is already going on this engine; "
                    "give each run its own run_id (or none: one is made up)"
                )
            self._runs.add(handle)
        _shm.open_run(handle.run_id)  # large values of its process steps kept for the run
        try:
            self._backends.connect(executors)
        except BaseException:
            self._dismiss(handle)
            raise

    def _dismiss(self, handle: RunHandle) -> None:
        with self._lock:
            self._runs.discard(handle)
        _shm.release_run(handle.run_id)  # values in its result keep their own mappings

    # -- closing -----------------------------------------------------------------------

    def close(self, *, timeout: float = 30.0) -> None:
        """Cancel the runs still going, wait for them, then stop every Worker and backend."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            runs = list(self._runs)
        for handle in runs:
            handle.cancel()
        for handle in runs:
            try:
                handle.wait(timeout)
            except TimeoutError:
                log.warning("run %s did not stop within %g s of close()", handle.run_id, timeout)
        if self._supervisor is not None:
            with contextlib.suppress(pykka.ActorDeadError, pykka.Timeout):
                self._supervisor.stop(block=True, timeout=timeout)
        for handle in runs:  # a run that did not stop in time: its segments go now
            _shm.release_run(handle.run_id)
        self._pool.close(timeout=timeout)
        skip = self._pool.abandoned_threads | {LOOP_THREAD_NAME}
        self._threads.join(timeout=timeout, skip=skip)
        self._backends.close()
        self._threads.join(timeout=timeout, skip=self._pool.abandoned_threads)
