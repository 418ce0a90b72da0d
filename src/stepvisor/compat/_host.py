"""One ``execute_parallel`` call's run, hosted on the caller's own event loop.

Why: a call of four no-op steps did little work but crossed threads four
times (the caller's loop to the engine's Supervisor thread and back, twice),
and on a small, busy machine each hand-off costs a scheduler wake-up.  Every
step of the facade is a task on the caller's loop anyway (``execute_fn``), so
the run's shell lives there too: its messages are loop callbacks, its timers
loop timers, its result an asyncio future.  A call then makes no thread
hand-off at all::

    execute_parallel ──▶ LoopRun: a RunShell whose tell/reply_to post
                         shell.receive(message) to this loop (call_soon)
      shell Dispatch ──▶ CallerLoopBackend.submit: execute_fn(step) as a task
      task ends      ──▶ AttemptDone, posted the same way
      shell Finish   ──▶ the future the call awaits

The engine behind the executor is still what bounds it: the shell leases its
slots from the engine's :class:`~stepvisor.actors._pool.WorkerPool` (which is
thread-safe, so several loops may share one executor), and a lease given back
on another thread reaches this run through ``call_soon_threadsafe``.  No
Worker thread and no Supervisor thread is ever started for the facade's
steps: every one of them submits.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

from stepvisor.actors.messages import SlotGranted
from stepvisor.actors.runs import RunPlan, RunShell, WorkerPool
from stepvisor.core.messages import CancelRun, Start
from stepvisor.core.result import RunResult

__all__ = ["LoopClock", "LoopRun"]

#: What a cancelled call tells its run (the words ``sv.RunHandle.cancel`` uses).
_CANCEL = CancelRun("cancel() was called")


class LoopClock:
    """The real clocks, with timers on an event loop rather than a clock thread.

    ``call_later`` must be called on the loop's own thread; the run's shell
    only sets timers while it handles a message, which is always there.
    """

    __slots__ = ("_loop",)

    #: The system's clocks, as ``RealClock`` reads them.
    monotonic = staticmethod(time.monotonic)
    wall = staticmethod(time.time)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def sleep(self, seconds: float) -> None:
        """Block the calling thread; nothing of a run on the loop sleeps (it sets timers)."""
        time.sleep(max(0.0, seconds))

    def call_later(self, delay: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
        return self._loop.call_later(max(0.0, delay), callback)


class LoopRun:
    """A run's shell on the caller's loop, and the future of its result.

    It is also the shell's ``reply_to``: an attempt's outcome is ``tell``-ed
    here and handled on the loop after the callback that produced it, never
    inside the shell while it carries out effects.
    """

    __slots__ = ("_loop", "_pool", "_thread", "done", "shell")

    def __init__(self, plan: RunPlan, *, pool: WorkerPool, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._pool = pool
        self._thread = threading.get_ident()
        self.done: asyncio.Future[RunResult] = loop.create_future()
        self.shell = RunShell(
            plan,
            complete=self._complete,
            pool=pool,
            tell=self.tell,
            reply_to=self,
            lend_slots=True,
        )

    def start(self) -> None:
        """Begin the run (on the loop's thread, outside any callback of this run)."""
        self._deliver(Start())

    def cancel(self) -> None:
        """Stop the run: nothing new starts, every task in flight is cancelled."""
        if not self.done.done():
            self.tell(_CANCEL)

    def tell(self, message: Any) -> bool:
        """Post ``message`` to this run; ``False`` once the loop is closed.

        Always a callback of its own, even on the loop's thread: the shell
        may be in the middle of carrying out effects when it tells itself.
        """
        try:
            if threading.get_ident() == self._thread:
                self._loop.call_soon(self._deliver, message)
            else:
                self._loop.call_soon_threadsafe(self._deliver, message)
        except RuntimeError:  # the loop is closed: nothing will run here again
            return False
        return True

    def _deliver(self, message: object) -> None:
        shell = self.shell
        if shell.completed:
            # Late news for an ended run: only a lease needs handling, given back.
            if isinstance(message, SlotGranted):
                self._pool.give_back(message.lease)
            return
        try:
            shell.receive(message)
        except Exception as exc:  # a store that broke, or a bug: this run ends alone
            shell.fail(exc)

    def _complete(self, result: RunResult) -> None:
        if not self.done.done():
            self.done.set_result(result)
