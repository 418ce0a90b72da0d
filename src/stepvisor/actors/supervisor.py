"""The Supervisor actor: one thread that hosts the shells of every run on an engine.

::

    StartRun(plan, complete) ──▶ a RunShell for the run; it feeds the machine Start
    ForRun(run_id, message)  ──▶ that run's shell   (timers, cancels, granted Workers)
    AttemptDone(s)           ──▶ the shell of its run_id            (from a Worker)
    a retry come due         ──▶ its shell, ahead of what is queued (from the clock)

A run is a :class:`~stepvisor.actors._shell.RunShell` (its machine, leased
Workers, timers, store and hook) living on this actor's thread.  Hosting many
runs on one thread, rather than an actor per run, makes a run cost no thread
start: a warm engine runs a small workflow in well under a millisecond of
overhead.  Everything a run does happens on this thread, in the order its
messages arrive, so one run's state never needs a lock.

Retries that come due go ahead of the queue.  In a storm (a thousand steps
failing together) the inbox fills with failures the Supervisor takes in one
by one; a retry's timer queued behind them would start its retry as late as
that queue is long, and every retry due meanwhile would start together when
the queue drains, the bunching jitter exists to prevent.  So the clock puts a
due retry on a separate lane (``_due``) that is looked at before each message.
Letting it overtake is safe: a retry's timer races every Worker's message
anyway, so the machine already takes them in either order.

With a backlog, the Supervisor lets go of the GIL every few messages.  A
thread that has work holds the GIL for CPython's switch interval (5 ms)
before another may run; a Supervisor with hundreds of failures queued would
hold it that long again and again, while the Workers whose steps just
ended wait to record the end and report it.  Their records say those steps
ended later than they did, their unjittered retries (due a backoff after
that end) are pushed back with them, and the steps' own threads stall.  So,
while more than ``BACKLOG`` messages wait, it sleeps for zero seconds after
each one: the waiting threads take their turn, and the backlog is the same
work, taken in finer slices.  (Measured on the retry storm, 1,000 thread
steps: the unjittered peak 496-551 -> 517-572, the jittered one 343-402 ->
217-256; yielding every 2, 4 or 8 messages helped less.  Runs of tiny steps
stay under ``BACKLOG``, so their throughput does not pay for it.)

A run whose shell raises (its store broke, or a bug) is ended alone: its shell
stops what it has in flight and still hands the caller a result; the other
runs go on.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Final, NamedTuple, cast

import pykka

from stepvisor._log import log
from stepvisor.actors._inbox import simple_inbox
from stepvisor.actors._pool import WorkerPool
from stepvisor.actors._shell import HEARTBEAT_INTERVAL, RunObserver, RunPlan, RunShell
from stepvisor.actors.messages import SlotGranted
from stepvisor.core._outcomes import NOT_RETRIED_STOPPING
from stepvisor.core.messages import AttemptDone, AttemptsDone, Start
from stepvisor.core.result import RunResult

__all__ = [
    "HEARTBEAT_INTERVAL",
    "NOT_RETRIED_STOPPING",
    "ForRun",
    "RunObserver",
    "RunPlan",
    "StartRun",
    "Supervisor",
]


class StartRun(NamedTuple):
    """Begin a run on this engine; ``complete`` is called with its result."""

    plan: RunPlan
    complete: Callable[[RunResult], None]
    lend_slots: bool


class ForRun(NamedTuple):
    """A message for one run's shell (a timer, a cancel, a Worker granted, a heartbeat)."""

    run_id: str
    message: object


#: While more messages than this wait in the inbox, the Supervisor yields the GIL
#: after each one.  Workers running batches of tiny chained steps report each one
#: (8 Workers, batches of up to 16: 128 messages); yielding to Workers that would only make
#: more of them halved the throughput of such runs at a threshold of 32, and costs
#: nothing measurable at 256 up to 64 slots (3 % at 256 slots).
BACKLOG: Final = 256


class _Due(NamedTuple):
    """Wakes the Supervisor for what is on its lane of due retries (it carries nothing)."""


_DUE: Final = _Due()


class Supervisor(pykka.ThreadingActor):
    """Hosts every run's shell on an engine and routes each message to its run."""

    _create_actor_inbox = staticmethod(simple_inbox)

    use_daemon_thread = True

    def __init__(
        self, *, pool: WorkerPool, register_thread: Callable[[threading.Thread], None]
    ) -> None:
        super().__init__()
        self._pool = pool
        self._register_thread = register_thread
        self._runs: dict[str, RunShell] = {}
        #: (run id, RetryDue) the clock put here, taken before the next message.
        self._due: list[tuple[str, object]] = []
        #: A wake-up is on its way for what is on the lane: a burst of retries come
        #: due together (a storm without jitter) sends one, not one each.
        self._due_woken = False
        self._due_lock = threading.Lock()
        #: The inbox pykka made with ``_create_actor_inbox``: a SimpleQueue (its size is asked).
        self._inbox = cast("queue.SimpleQueue[Any]", self.actor_inbox)

    def on_start(self) -> None:
        thread = threading.current_thread()
        thread.name = "stepvisor-supervisor"
        self._register_thread(thread)

    def on_failure(self, *_: object) -> None:
        # A bug in the routing itself: end every run rather than leave callers waiting.
        log.error("the engine's supervisor failed; ending %d runs", len(self._runs))
        runs, self._runs = dict(self._runs), {}
        for shell in runs.values():
            shell.fail(None)

    def on_stop(self) -> None:
        # The engine closes this actor only once its runs ended; any left get a result.
        runs, self._runs = dict(self._runs), {}
        for shell in runs.values():
            shell.fail(RuntimeError("the engine was closed while the run was still going"))

    def on_receive(self, message: Any) -> None:
        if self._inbox.qsize() > BACKLOG:
            time.sleep(0)  # a backlog: let the waiting threads run (see the docstring)
        if self._due:  # an unlocked look: an item put after it has a wake-up coming
            with self._due_lock:
                due, self._due = self._due, []
                self._due_woken = False
            for run_id, retry in due:
                self._route(run_id, retry)
        kind = type(message)
        if kind is _Due:
            return
        if kind is AttemptDone or kind is AttemptsDone:
            self._route(message.run_id, message)
        elif kind is ForRun:
            self._route(message.run_id, message.message)
        elif kind is StartRun:
            self._start(message)
        else:
            log.warning("the supervisor ignored an unexpected message %r", message)

    def _start(self, message: StartRun) -> None:
        run_id = message.plan.run_id
        ref = self.actor_ref

        def tell(inner: object) -> bool:
            try:
                ref.tell(ForRun(run_id, inner))
            except pykka.ActorDeadError:
                return False
            return True

        def tell_due(inner: object) -> bool:
            return self.tell_due(run_id, inner)

        shell = RunShell(
            message.plan,
            complete=message.complete,
            pool=self._pool,
            tell=tell,
            reply_to=ref,
            lend_slots=message.lend_slots,
            tell_due=tell_due,
        )
        self._runs[run_id] = shell
        self._deliver(run_id, shell, Start())

    def tell_due(self, run_id: str, message: object) -> bool:
        """Put a due retry on the lane, then wake this actor (from the clock's thread).

        Whichever message the Supervisor takes next, it takes the lane first; the
        wake-up itself carries nothing, and one is sent only if none is on its way
        already.  False if the actor is gone.
        """
        with self._due_lock:
            self._due.append((run_id, message))
            if self._due_woken:
                return True
            self._due_woken = True
        try:
            self.actor_ref.tell(_DUE)
        except pykka.ActorDeadError:
            return False
        return True

    def _route(self, run_id: str, message: object) -> None:
        shell = self._runs.get(run_id)
        if shell is None:
            if type(message) is SlotGranted:
                # The pool granted a lease to a run that ended meanwhile: the
                # engine's bound would shrink by one if it were dropped.
                self._pool.give_back(message.lease)
            elif type(message) not in (AttemptDone, AttemptsDone):
                log.debug("dropped %r for run %s, which has ended", message, run_id)
            return
        self._deliver(run_id, shell, message)

    def _deliver(self, run_id: str, shell: RunShell, message: object) -> None:
        """Hand ``message`` to ``shell``; a shell that raises ends its own run only."""
        try:
            shell.receive(message)
        except Exception as exc:
            shell.fail(exc)
        if shell.completed:
            del self._runs[run_id]
