"""The Worker actor: runs one attempt at a time and tells the outcome back.

A Worker is one slot of the run's parallelism.  It runs thread steps on its own
thread, hands async steps to the runtime's loop and waits for them, and owns at
most one child process for process steps (started on first use, reused after,
replaced when it dies or is killed).  Whatever the step does, the Worker
reports an :class:`~stepvisor.actors.messages.AttemptDone`; it never raises.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pykka

from stepvisor._log import log
from stepvisor.actors.messages import AttemptDone, RunAttempt, RunBatch
from stepvisor.backends.base import AttemptResult
from stepvisor.backends.thread import call_step, format_error

if TYPE_CHECKING:
    from stepvisor.backends.asyncio import LoopThread
    from stepvisor.backends.process import ProcessSlot

__all__ = ["Worker", "WorkerServices", "worker_thread_name"]


def worker_thread_name(worker_id: str) -> str:
    """The name of a Worker's thread, so abandoned ones can be told apart."""
    return f"stepvisor-worker-{worker_id}"


class WorkerServices:
    """What Workers share within one run: the loop, Ray, and the thread registry."""

    def __init__(
        self,
        *,
        loop: Callable[[], LoopThread],
        ray: Callable[[], Any] | None = None,
        register_thread: Callable[[threading.Thread], None],
        prestart_process: bool = False,
    ) -> None:
        self.loop = loop
        self.ray = ray
        self.register_thread = register_thread
        #: Start each Worker's child process as the Worker starts, so a process
        #: step's deadline is not spent booting an interpreter.
        self.prestart_process = prestart_process


class Worker(pykka.ThreadingActor):
    """One slot: a thread that runs attempts one at a time."""

    # An abandoned Worker (its step ignored cancellation) must not block exit.
    use_daemon_thread = True

    def __init__(
        self, worker_id: str, supervisor: pykka.ActorRef[Any], services: WorkerServices
    ) -> None:
        super().__init__()
        self.worker_id = worker_id
        self.supervisor = supervisor
        self.services = services
        self._process: ProcessSlot | None = None

    def on_start(self) -> None:
        thread = threading.current_thread()
        thread.name = worker_thread_name(self.worker_id)
        self.services.register_thread(thread)
        if self.services.prestart_process:
            self._process_slot().start()

    def on_stop(self) -> None:
        if self._process is not None:
            self._process.close()
            self._process = None

    def on_failure(self, *_: object) -> None:
        self.on_stop()

    def on_receive(self, message: Any) -> None:
        if isinstance(message, RunBatch):
            attempts = message.attempts
            for i, attempt in enumerate(attempts):
                self._attempt(attempt, attempts[i + 1] if i + 1 < len(attempts) else None)
        elif isinstance(message, RunAttempt):
            self._attempt(message)
        else:
            log.warning("worker %s ignored an unexpected message %r", self.worker_id, message)

    def _attempt(self, message: RunAttempt, following: RunAttempt | None = None) -> None:
        spec = message.spec
        started_wall = time.time()
        started = time.monotonic()
        try:
            result = self._run(message, following)
        except BaseException as exc:  # a backend bug must still end the attempt
            log.exception("backend failed while running step %r", spec.step_id)
            result = AttemptResult(kind="error", error=exc, traceback=format_error(exc))
        done = AttemptDone(
            step_id=spec.step_id,
            attempt=spec.attempt,
            worker=self.worker_id,
            result=result,
            started_wall=started_wall,
            ended_wall=time.time(),
            duration=time.monotonic() - started,
        )
        try:
            self.supervisor.tell(done)
        except pykka.ActorDeadError:
            log.debug("supervisor gone; dropped the outcome of %s", spec.step_id)

    def _process_slot(self) -> ProcessSlot:
        if self._process is None:
            from stepvisor.backends.process import ProcessSlot  # noqa: PLC0415

            self._process = ProcessSlot(name=self.worker_id)
        return self._process

    def _run(self, message: RunAttempt, following: RunAttempt | None) -> AttemptResult:
        executor = message.executor
        if executor == "process":
            # The slot checks for a cancel itself: it may have sent this attempt
            # to its child already, behind the previous one (``ahead``).
            ahead = None
            if following is not None and following.executor == "process":
                ahead = (following.spec, following.control)
            return self._process_slot().run(message.spec, message.control, ahead)
        if message.control.is_cancelled:
            # Queued behind another attempt and cancelled before its turn.
            return AttemptResult(kind="cancelled", note="it was cancelled before it started")
        if executor == "thread":
            return call_step(message.spec, message.control)
        if executor == "async":
            return self.services.loop().run(message.spec, message.control)
        if executor == "ray":
            if self.services.ray is None:
                raise RuntimeError("no Ray backend was set up for this run")
            result: AttemptResult = self.services.ray().run(message.spec, message.control)
            return result
        raise ValueError(f"unknown executor {executor!r}")
