"""The Worker actor: runs one attempt at a time and tells the outcome back.

A Worker is one slot of the run's parallelism.  It knows no executor: it looks
the attempt's backend up by the executor name in what the runtime gave it
(:class:`WorkerServices`) and calls it through the guard
(:func:`~stepvisor.backends.base.run_guarded`).  A backend is either shared by
the run (thread, the asyncio loop, Ray) or this Worker's own (a process slot,
one child process per Worker, started on first use or when the Worker starts,
closed when it stops).  Whatever the step does, the Worker reports an
:class:`~stepvisor.actors.messages.AttemptDone`; it never raises.
"""

from __future__ import annotations

import collections
import functools
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, ClassVar, Final

import pykka

from stepvisor._log import log
from stepvisor.actors._inbox import simple_inbox
from stepvisor.actors._outbox import send_outcomes
from stepvisor.actors.messages import AttemptDone, ReplyTo, RunAttempt, RunBatch, Warm
from stepvisor.backends.base import AttemptResult, AttemptSpec, Backend, Following, run_guarded
from stepvisor.backends.thread import ThreadBackend
from stepvisor.context import AttemptControl
from stepvisor.errors import InvalidSettingError

_new: Final = tuple.__new__

__all__ = ["RunBackends", "Worker", "WorkerServices", "check_backends", "worker_thread_name"]

#: The executor names a step may give (``Step.executor``), each with a backend.
EXECUTORS: Final = frozenset({"thread", "async", "process", "ray"})

#: The longest a Worker holds the outcome of an attempt of a prefetched batch
#: before it reports it (with the others held): see ``Worker._batch``.
REPORT_WITHIN: Final = 0.001
#: The most attempts of a batch a Worker offers a backend that sends them ahead
#: (a process child), topped up when half are left: the child's pipe never runs
#: dry between attempts, it is written once per two or three of them, and the
#: rest stays where an idle slot can take it back (``Reclaim``).  Measured on
#: 2,000 no-op process steps, max_parallel=2, 2 loaded cores: parent CPU 45-47
#: us per step at 4, 39-49 at 2 to 15, against 42-54 for the whole batch.
AHEAD: Final = 4


def worker_thread_name(worker_id: str) -> str:
    """The name of a Worker's thread, so abandoned ones can be told apart."""
    return f"stepvisor-worker-{worker_id}"


class WorkerServices:
    """What Workers share within one run: the backends by executor name, the thread registry.

    ``shared[name]()`` gives the run's one backend for that executor (made on
    first use; the runtime closes it).  ``per_worker[name](worker_id)`` makes a
    Worker its own (the Worker closes it).  ``prestart`` names the per-Worker
    backends a Worker opens as it starts, so a process step's deadline is not
    spent booting an interpreter.
    """

    def __init__(
        self,
        *,
        shared: Mapping[str, Callable[[], Backend]],
        per_worker: Mapping[str, Callable[[str], Backend]] | None = None,
        register_thread: Callable[[threading.Thread], None],
        prestart: Collection[str] = (),
    ) -> None:
        self.shared = shared
        self.per_worker = per_worker or {}
        self.register_thread = register_thread
        self.prestart = tuple(prestart)


class RunBackends:
    """The backends of an engine: which are shared, which each Worker owns, and closing them.

    Thread steps share one :class:`ThreadBackend`; the asyncio loop and the Ray
    connection are made once per engine, on first use (or by :meth:`connect`);
    each Worker gets its own process slot, kept across the runs it serves.
    Backends the caller gave (``given``: executor name -> Backend, such as a
    test's ``FakeBackend``) replace the built-in ones and are shared; the caller
    closes them.
    """

    def __init__(
        self,
        *,
        given: Mapping[str, Backend] | None,
        ray_address: str | None,
        register_thread: Callable[[threading.Thread], None],
    ) -> None:
        self._given = dict(given or {})
        self.ray_address = ray_address
        self._register_thread = register_thread
        self._lock = threading.Lock()
        self._made: dict[str, Backend] = {}
        thread = ThreadBackend()
        self.shared: dict[str, Callable[[], Backend]] = {
            "thread": functools.partial(_itself, thread),
            "async": functools.partial(self._once, "async", self._loop),
            "ray": functools.partial(self._once, "ray", self._ray),
        }
        self.per_worker: dict[str, Callable[[str], Backend]] = {"process": _open_slot}
        for executor, backend in self._given.items():
            self.shared[executor] = functools.partial(_itself, backend)
            self.per_worker.pop(executor, None)

    @property
    def given(self) -> Mapping[str, Backend]:
        """The backends the caller gave, by executor name."""
        return self._given

    def connect(self, executors: Collection[str]) -> None:
        """Make the shared backends a run's steps need, before any of them runs.

        An unreachable Ray cluster fails here, and no attempt's deadline is
        spent starting the event loop.
        """
        for executor in ("ray", "async"):
            if executor in executors and executor not in self._given:
                self.shared[executor]()

    def services(self) -> WorkerServices:
        return WorkerServices(
            shared=self.shared, per_worker=self.per_worker, register_thread=self._register_thread
        )

    def close(self) -> None:
        """Close the shared backends this engine made (not the caller's)."""
        with self._lock:
            made, self._made = list(self._made.values()), {}
        for backend in made:
            backend.close()

    def _once(self, executor: str, make: Callable[[], Backend]) -> Backend:
        with self._lock:
            backend = self._made.get(executor)
            if backend is None:
                backend = self._made[executor] = make()
            return backend

    def _loop(self) -> Backend:
        from stepvisor.backends.asyncio import LoopThread  # noqa: PLC0415

        return LoopThread(on_thread=self._register_thread)

    def _ray(self) -> Backend:
        from stepvisor.backends.ray import RayBackend  # noqa: PLC0415

        return RayBackend.connect(address=self.ray_address)


def check_backends(backends: Mapping[str, Backend] | None) -> None:
    """``backends=`` maps executor names to Backend objects (see ``stepvisor.testing``)."""
    for name, backend in (backends or {}).items():
        if name not in EXECUTORS:
            raise InvalidSettingError(
                f"backends={{{name!r}: ...}} names no executor; use one of "
                f"{', '.join(sorted(EXECUTORS))}"
            )
        if not callable(getattr(backend, "run", None)) or not hasattr(backend, "sends_ahead"):
            raise InvalidSettingError(
                f"backends[{name!r}] is a {type(backend).__name__}, not a Backend: give an "
                "object with run(spec, control, ahead), close() and sends_ahead, such as "
                "stepvisor.testing.FakeBackend"
            )


def _itself(backend: Backend) -> Backend:
    return backend


def _open_slot(worker_id: str) -> Backend:
    from stepvisor.backends.process import open_slot  # noqa: PLC0415 - only for process steps

    return open_slot(worker_id)


class _Unavailable:
    """Stands for a backend that could not be had: its ``run`` raises why (a bug)."""

    sends_ahead: ClassVar[bool] = False

    def __init__(self, error: BaseException) -> None:
        self._error = error

    def run(
        self, spec: AttemptSpec, control: AttemptControl, ahead: Following | None = None
    ) -> AttemptResult:
        raise self._error

    def close(self) -> None:
        """Nothing to release."""


class Worker(pykka.ThreadingActor):
    """One slot's thread: runs attempts one at a time, for whichever run leased it.

    A Worker belongs to an engine's pool and serves one run at a time; each
    attempt says which run's slot it runs in and where the outcome goes
    (``RunAttempt.slot``, ``RunAttempt.reply_to``), so the Worker holds nothing
    of a run between attempts.
    """

    _create_actor_inbox = staticmethod(simple_inbox)

    # An abandoned Worker (its step ignored cancellation) must not block exit.
    use_daemon_thread = True

    def __init__(self, worker_id: str, services: WorkerServices) -> None:
        super().__init__()
        self.worker_id = worker_id
        self.services = services
        self._backends: dict[str, Backend] = {}
        self._owned: list[Backend] = []
        #: The attempts last passed to a backend as ``ahead``: it may have started them.
        self._offered: tuple[RunAttempt, ...] = ()

    def on_start(self) -> None:
        thread = threading.current_thread()
        thread.name = worker_thread_name(self.worker_id)
        self.services.register_thread(thread)
        for executor in self.services.prestart:
            self._backend(executor)

    def on_stop(self) -> None:
        owned, self._owned = self._owned, []
        self._backends.clear()
        for backend in owned:
            try:
                backend.close()
            except Exception:
                log.exception("worker %s could not close its %r", self.worker_id, backend)

    def on_failure(self, *_: object) -> None:
        self.on_stop()

    def on_receive(self, message: Any) -> None:
        if isinstance(message, RunBatch):
            self._batch(message.attempts)
        elif isinstance(message, RunAttempt):
            self._attempt(message)
        elif isinstance(message, Warm):
            for executor in message.executors:
                if executor in self.services.per_worker:
                    self._backend(executor)
        else:
            log.warning("worker %s ignored an unexpected message %r", self.worker_id, message)

    def _backend(self, executor: str) -> Backend:
        """The backend for ``executor``: this Worker's own, or the run's shared one."""
        backend = self._backends.get(executor)
        if backend is not None:
            return backend
        make_own = self.services.per_worker.get(executor)
        shared = self.services.shared.get(executor)
        try:
            if make_own is not None:
                backend = make_own(self.worker_id)
                self._owned.append(backend)
            elif shared is not None:
                backend = shared()
            else:
                return _Unavailable(LookupError(f"no backend was set up for {executor!r}"))
        except Exception as exc:  # reported by the attempt that needed it (not kept)
            return _Unavailable(exc)
        self._backends[executor] = backend
        return backend

    def _batch(self, attempts: tuple[RunAttempt, ...] | collections.deque[RunAttempt]) -> None:
        """Run a prefetched batch in order; report successes nothing waits for together.

        The batch is a deque shared with the run's shell: this Worker takes
        each attempt from its left when it starts it, and the shell may take
        attempts from its right meanwhile (``Reclaim``: an idle slot takes back
        what waits behind a slow attempt), so an attempt is run here or handed
        back, never both.  A backend that sends attempts ahead (a process
        child reads its next ones while it runs one) is offered at most
        ``AHEAD`` of them, taken from the deque first, so that little is out of
        the shell's reach.

        The Supervisor hands a batch only to a slot whose attempts are tiny, and
        a message per outcome would cost it more than the attempts do.  So the
        success of a step with no dependants (``may_hold``) is held, and sent
        with the next outcomes, until the batch ends or an attempt ends
        ``REPORT_WITHIN`` or more after the first one held (a long attempt in
        the batch holds them until it ends).  Anything else (a failure, which may
        stop the run, or a success others wait for) is reported at once, with
        whatever was held.  A held outcome delays no other step; at worst its
        record says ``running`` while the next attempt of the batch runs.
        """
        queue = attempts if type(attempts) is collections.deque else collections.deque(attempts)
        offered: collections.deque[RunAttempt] = collections.deque()
        held: list[AttemptDone] = []
        first_held = 0.0
        reply_to: ReplyTo | None = None
        while True:
            if offered:
                attempt = offered.popleft()
            else:
                try:
                    attempt = queue.popleft()
                except IndexError:
                    break
            following: tuple[RunAttempt, ...] = ()
            if self._backend(attempt.executor).sends_ahead:
                following = self._offer(attempt.executor, queue, offered)
            done = self._run(attempt, following)
            reply_to = attempt.reply_to
            if not held:
                first_held = time.monotonic()
            held.append(done)
            if (
                not attempt.may_hold
                or done.result.kind != "ok"
                or not (offered or queue)
                or time.monotonic() - first_held >= REPORT_WITHIN
            ):
                self._report(attempt.reply_to, held)
                held = []
        if held and reply_to is not None:  # the shell took back the rest meanwhile
            self._report(reply_to, held)

    @staticmethod
    def _offer(
        executor: str, queue: collections.deque[RunAttempt], offered: collections.deque[RunAttempt]
    ) -> tuple[RunAttempt, ...]:
        """Move up to ``AHEAD`` attempts for ``executor`` out of the shell's reach, in order.

        Topped up only once fewer than half are left, so that the backend
        writes several to its child at once rather than one per attempt.
        """
        if len(offered) >= AHEAD // 2:
            return tuple(offered)
        while len(offered) < AHEAD:
            try:
                following = queue.popleft()
            except IndexError:
                break
            if following.executor != executor:
                queue.appendleft(following)  # another backend's: run after these
                break
            offered.append(following)
        return tuple(offered)

    def _attempt(self, message: RunAttempt) -> None:
        self._report(message.reply_to, [self._run(message)])

    def _report(self, reply_to: ReplyTo, outcomes: list[AttemptDone]) -> None:
        if not send_outcomes(reply_to, outcomes):
            log.debug("supervisor gone; dropped the outcomes of %d attempts", len(outcomes))

    def _run(self, message: RunAttempt, following: Sequence[RunAttempt] = ()) -> AttemptDone:
        spec = message.spec
        started_wall = time.time()
        started = time.monotonic()
        backend = self._backend(message.executor)
        offered = bool(self._offered) and any(attempt is message for attempt in self._offered)
        # The attempts after this one on its backend, in order: it may send them ahead.
        self._offered = tuple(following) if backend.sends_ahead else ()
        ahead = (
            tuple((attempt.spec, attempt.control) for attempt in self._offered)
            if self._offered
            else None
        )
        result = run_guarded(backend, spec, message.control, ahead, offered=offered)
        # tuple.__new__ rather than the NamedTuple's own (half the cost): one per attempt.
        return _new(
            AttemptDone,
            (
                spec.step_id,
                spec.attempt,
                message.slot,
                result,
                started_wall,
                time.time(),
                time.monotonic() - started,
                spec.run_id,
            ),
        )
