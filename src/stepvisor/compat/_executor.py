"""The facade's executor: one ``execute_parallel`` call is one stepvisor run.

How a call flows, all of it on the caller's loop (no thread hand-off)::

    execute_parallel(steps, execute_fn, state=...)
      ├─ a record per step, "pending", appended to state.step_executions
      ├─ sv.Workflow: one thread Step per step; fn = OnCallerLoop
      ├─ LoopRun (_host.py): the run's shell, its messages loop callbacks,
      │     its slots leased from the executor's warm engine
      │     Dispatch: CallerLoopBackend.submit ──> execute_fn(step) as a task;
      │       on a deadline or a cancel the shell cancels that task, and the
      │       attempt ends when the task has really ended
      │     Emit: Tracker moves each record to running/completed/...
      └─ StepExecutionResult per step, sorted by id (errors from RunResult.errors)
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import random
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from datetime import datetime, tzinfo
from typing import Any

import stepvisor as sv
from stepvisor._prepare import _run_tracer, fingerprint
from stepvisor.actors.runs import RunPlan
from stepvisor.compat._host import LoopClock, LoopRun
from stepvisor.compat._loop import CallerLoopBackend, OnCallerLoop
from stepvisor.compat._ready import find_ready_steps, names
from stepvisor.compat._records import (
    StateLike,
    StepExecution,
    StepExecutionResult,
    StepLike,
    StepT,
    stamp,
)
from stepvisor.compat._retry import RetryConfig
from stepvisor.compat._tracker import CANCELLED, Slot, Tracker
from stepvisor.config import Resolved, resolve
from stepvisor.core.model import check_max_parallel, check_positive_seconds
from stepvisor.errors import InvalidRetryPolicyError, StepCancelledError
from stepvisor.store._unkept import Unkept

ExecuteFn = Callable[[StepT], Awaitable[Mapping[str, Any] | None]]
"""What ``execute_parallel`` calls for each step: ``async``, on the caller's loop; returns
the step's artifacts (or ``None``)."""


# -- the executor ----------------------------------------------------------------------


async def _until_done(run: LoopRun) -> sv.RunResult:
    """The run's result; cancelled, the run is stopped first, then one ``CancelledError``.

    The run lives on this loop, so stopping it (its tasks cancelled and
    ended, every record terminal) takes a few loop turns; cancels that
    arrive meanwhile are absorbed, not allowed to leave steps running behind
    the caller's back.
    """
    try:
        return await asyncio.shield(run.done)
    except asyncio.CancelledError:
        run.cancel()
        while not run.done.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([run.done])
        raise


#: Executors whose engine is open (tests close them all: ``close_all``).
_OPEN: weakref.WeakSet[ParallelStepExecutor] = weakref.WeakSet()


def close_all() -> None:
    """Close the engine of every executor that has one (for test suites and shutdown hooks)."""
    for executor in list(_OPEN):
        executor.close()


class ParallelStepExecutor:
    """Run a set of steps in parallel on stepvisor, with the asyncio executor's call shape.

    At most ``max_parallel`` steps run at once.  A step's timeout (per
    attempt) is the ``timeout_seconds`` given to :meth:`execute_parallel`,
    else ``step.metadata["timeout_seconds"]``, else
    ``default_timeout_seconds`` (``None``: no limit).  Its retries are
    ``step.metadata["retry"]`` (a :class:`RetryConfig` or a dict of its
    fields), else ``default_retry_config``, else none.

    The records are :class:`StepExecution` values, or built by
    ``record_type`` (called with ``step_id``, ``agent``, ``action``,
    ``started_at`` and ``status`` as keywords) when the caller wants its own
    class.  Their times are naive local ``datetime`` values, as the asyncio
    executor wrote them; give ``tz`` (e.g. ``datetime.UTC``) for aware ones.
    """

    def __init__(
        self,
        # Positional too: existing call sites write ParallelStepExecutor(4).
        max_parallel: int = 8,
        default_timeout_seconds: float | None = 3600.0,
        default_retry_config: RetryConfig | None = None,
        *,
        record_type: Callable[..., Any] | None = None,
        tz: tzinfo | None = None,
    ) -> None:
        self.max_parallel = check_max_parallel(max_parallel)
        self.default_timeout_seconds = (
            None
            if default_timeout_seconds is None
            else check_positive_seconds(default_timeout_seconds, what="default_timeout_seconds")
        )
        if default_retry_config is not None and not isinstance(default_retry_config, RetryConfig):
            raise InvalidRetryPolicyError(
                f"default_retry_config must be a stepvisor.compat.RetryConfig, got "
                f"{type(default_retry_config).__name__}; build one with RetryConfig(max_attempts=3)"
            )
        self.default_retry_config = default_retry_config or RetryConfig()
        if record_type is not None and not callable(record_type):
            raise TypeError(
                f"record_type must be a class (or callable) that builds a step record, got "
                f"{record_type!r}; pass e.g. record_type=StepExecution"
            )
        if tz is not None and not isinstance(tz, tzinfo):
            raise TypeError(f"tz must be a datetime.tzinfo such as datetime.UTC, got {tz!r}")
        self.record_type = record_type
        self.tz = tz
        self._engine: sv.Engine | None = None
        self._settings: Resolved | None = None
        self._ids = uuid.uuid4().hex[:8]
        #: The calls going now (each on its caller's loop), so close() can cancel them.
        self._live: set[LoopRun] = set()
        self._calls = itertools.count(1)
        self._closer: weakref.finalize[..., Any] | None = None

    @property
    def engine(self) -> sv.Engine:
        """The warm engine behind this executor: made on first use, reused by every call.

        Its Worker threads are kept between ``execute_parallel`` calls, so a
        call does not pay for starting them.  :meth:`close` (or the executor
        being garbage-collected, or the interpreter exiting) closes it.
        """
        if self._engine is None or self._engine.closed:
            # Its thread steps are execute_fn's tasks on the caller's loop, started
            # and reported by the engine's Supervisor: no Worker thread in between.
            self._engine = sv.Engine(
                max_parallel=self.max_parallel, backends={"thread": CallerLoopBackend()}
            )
            self._closer = weakref.finalize(self, self._engine.close)
            _OPEN.add(self)
        return self._engine

    def close(self) -> None:
        """Close the engine behind this executor (a later call makes a new one).

        Calls still going are cancelled first (without waiting: they stop on
        their own loops); they return with every record ``cancelled``.
        """
        for run in list(self._live):
            run.cancel()
        if self._closer is not None:
            self._closer()
        _OPEN.discard(self)

    def find_ready_steps(
        self,
        workflow_steps: Iterable[StepT],
        completed_step_ids: Collection[str],
        running_step_ids: Collection[str],
        available_artifacts: Collection[str] | None = None,
    ) -> list[StepT]:
        """The steps that may start now; see :func:`stepvisor.compat.find_ready_steps`."""
        return find_ready_steps(
            workflow_steps, completed_step_ids, running_step_ids, available_artifacts
        )

    async def execute_parallel(
        self,
        steps: Iterable[StepT],
        execute_fn: ExecuteFn[StepT],
        *,
        state: StateLike,
        timeout_seconds: float | None = None,
    ) -> list[StepExecutionResult[StepT]]:
        """Run ``execute_fn(step)`` for every step; return one result per step, by id.

        Steps wait for the steps among them that create what they require;
        a required artifact that none of them creates is taken as available.
        A step that fails does not stop the others, but the steps that
        depend on it are not run (``cancelled``).  Each record is appended
        to ``state.step_executions`` before anything runs and is terminal
        when this returns or raises.  Cancelling the awaiting task cancels
        every step in flight and ends their records ``cancelled``.
        """
        given = list(steps)
        if not given:
            return []
        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()
        queued = stamp(time.time(), self.tz)
        slots = {step.id: self._slot(step, timeout_seconds, queued) for step in given}
        workflow = self._workflow(given, slots, execute_fn, loop=loop, context=context)
        for sid in sorted(slots):
            state.step_executions.append(slots[sid].record)
        tracker = Tracker(slots, tz=self.tz)
        run = LoopRun(self._plan(workflow, tracker, loop), pool=self.engine.pool, loop=loop)
        self._live.add(run)
        run.start()
        try:
            result = await _until_done(run)
        except asyncio.CancelledError:
            tracker.end_all(why=CANCELLED)  # normally done already, by the run's own events
            raise
        except BaseException as exc:
            tracker.end_all(why=f"the run stopped on {type(exc).__name__}: {exc}")
            raise
        finally:
            self._live.discard(run)
        tracker.settle(result)
        return [self._result(slots[sid], result) for sid in sorted(slots)]

    # -- building the run -----------------------------------------------------------------

    def _plan(
        self, workflow: sv.Workflow, tracker: Tracker, loop: asyncio.AbstractEventLoop
    ) -> RunPlan:
        """What ``sv.run_async`` would prepare for this call, without a store to open.

        The settings are resolved once per executor (they read the environment
        and look for a project file, which cost more than a whole call): every
        call has the same two overrides and a workflow without settings.
        """
        if self._settings is None:
            self._settings = resolve(
                None, {"max_parallel": self.max_parallel, "on_failure": "continue"}
            )
        # A run id per call, unique in the process (logs, traces), without a uuid
        # each; the seed only spreads retry jitter, so it need not be a secret.
        run_id = f"{self._ids}-{next(self._calls)}"
        executors = ("thread",) * len(workflow.steps)
        return RunPlan(
            workflow=workflow,
            settings=self._settings,
            run_id=run_id,
            seed=random.getrandbits(32),
            clock=LoopClock(loop),
            store=Unkept(),
            fingerprint=fingerprint(workflow),
            executors=executors,
            on_event=tracker,
            observer=_run_tracer(workflow, run_id, executors),
        )

    def _slot(self, step: StepLike, timeout_seconds: float | None, queued: datetime) -> Slot:
        metadata = getattr(step, "metadata", None) or {}
        timeout = timeout_seconds
        if timeout is None:
            timeout = metadata.get("timeout_seconds")
        if timeout is None:
            timeout = self.default_timeout_seconds
        record = (self.record_type or StepExecution)(
            step_id=step.id,
            agent=getattr(step, "agent", None) or "",
            action=getattr(step, "action", None) or "",
            started_at=queued,
            status="pending",
        )
        return Slot(step, record, timeout=timeout)

    def _retry(self, step: StepLike) -> RetryConfig:
        metadata = getattr(step, "metadata", None) or {}
        value = metadata.get("retry")
        if not value:  # absent, None or {}: the default, as the asyncio executor did
            return self.default_retry_config
        if isinstance(value, RetryConfig):
            return value
        return RetryConfig.from_mapping(value, where=f"step {step.id!r}: metadata['retry']")

    def _workflow(
        self,
        given: list[StepT],
        slots: Mapping[str, Slot],
        execute_fn: ExecuteFn[StepT],
        *,
        loop: asyncio.AbstractEventLoop,
        context: contextvars.Context,
    ) -> sv.Workflow:
        created = {name for step in given for name in names(getattr(step, "creates", None))}
        sv_steps = []
        for step in given:
            requires = names(getattr(step, "requires", None))
            sv_steps.append(
                sv.Step(
                    step.id,
                    OnCallerLoop(slots[step.id], execute_fn, loop=loop, context=context),
                    # Only artifacts one of these steps creates make an edge;
                    # the rest are taken as available already.
                    requires=[name for name in requires if name in created],
                    creates=names(getattr(step, "creates", None)),
                    timeout=slots[step.id].timeout,
                    retry=self._retry(step).to_policy(),
                    executor="thread",
                )
            )
        workflow = sv.Workflow("execute_parallel", sv_steps)
        for sid, slot in slots.items():
            rank = workflow.graph.rank[sid]
            slot.deps = tuple(workflow.graph.order[d] for d in workflow.graph.deps[rank])
        return workflow

    # -- results ------------------------------------------------------------------------

    @staticmethod
    def _result(slot: Slot, result: sv.RunResult) -> StepExecutionResult[Any]:
        record = slot.record
        error = result.errors.get(record.step_id)
        if error is None and record.status == "cancelled":
            error = StepCancelledError(record.error or "not run", step_id=record.step_id)
        completed = record.status == "completed"
        return StepExecutionResult(
            step=slot.step,
            step_execution=record,
            artifacts=slot.artifacts if completed else {},
            error=None if completed else error,
            attempts=result.steps[record.step_id].attempt_count,
        )
