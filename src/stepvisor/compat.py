"""A drop-in for code written against an asyncio ``ParallelStepExecutor``.

Why this exists: many programs already run their steps with a small asyncio
executor (a semaphore, ``asyncio.wait_for`` and a retry loop) and call it as
``await executor.execute_parallel(steps, execute_fn, state=state)``.  This
module keeps that call shape and its records (``state.step_executions``) but
runs the steps on stepvisor: the bound, per-attempt deadlines, retries with
backoff that does not hold a slot, and cancellation that always ends every
record in a terminal status all come from the engine.

How a call flows::

    execute_parallel(steps, execute_fn, state=...)       on the caller's loop
      ├─ a StepExecution per step, "pending", appended to state.step_executions
      ├─ sv.Workflow: one thread Step per step; fn = _OnCallerLoop
      ├─ await sv.run_async(wf, on_event=_Tracker, on_failure="continue")
      │     Worker thread: _OnCallerLoop ──call_soon_threadsafe──> execute_fn(step)
      │       as a task on the caller's loop; on a deadline or a cancel it
      │       cancels that task and waits for it to end
      │     Supervisor thread: _Tracker moves each record to running/completed/...
      └─ StepExecutionResult per step, sorted by id (errors from RunResult.errors)

``execute_fn`` runs on the *caller's* event loop, not on stepvisor's loop
thread, so it may use what belongs to that loop (an ``aiohttp`` session, an
``asyncio.Lock``, a queue) and sees the caller's context variables, as it
did under the asyncio executor.  Each running step holds one Worker thread
that waits for its task; the caller's loop stays free throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import math
import threading
import time
from collections.abc import (
    Awaitable,
    Callable,
    Collection,
    Coroutine,
    Iterable,
    Mapping,
    MutableSequence,
)
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Generic, Literal, Protocol, TypeVar

import stepvisor as sv
from stepvisor.core.model import check_max_parallel, check_positive_seconds
from stepvisor.errors import (
    InvalidRetryPolicyError,
    StepCancelledError,
    StepTimeoutError,
)

__all__ = [
    "ParallelStepExecutor",
    "RetryConfig",
    "StateLike",
    "StepExecution",
    "StepExecutionResult",
    "StepLike",
    "find_ready_steps",
]

Status = Literal["pending", "running", "completed", "failed", "cancelled"]

#: How often a Worker thread waiting for ``execute_fn`` checks that the caller's
#: loop is still open (cancellation itself arrives through ``ctx.on_cancel``).
_POLL_SECONDS: Final = 0.02

#: Engine step status -> record status.  A timed-out step is "failed"; a step
#: skipped because a step it depends on did not complete is "cancelled".
_STATUS: Final[Mapping[str, Status]] = {
    "pending": "pending",
    "running": "running",
    "waiting_retry": "running",
    "succeeded": "completed",
    "failed": "failed",
    "timed_out": "failed",
    "cancelled": "cancelled",
    "skipped": "cancelled",
}
_TERMINAL: Final = frozenset({"completed", "failed", "cancelled"})
_CANCELLED: Final = "execute_parallel was cancelled"


class StepLike(Protocol):
    """What a step must have: any class with these attributes will do."""

    @property
    def id(self) -> str: ...

    @property
    def requires(self) -> Iterable[str]: ...

    @property
    def creates(self) -> Iterable[str]: ...

    @property
    def metadata(self) -> Mapping[str, Any]: ...


class StateLike(Protocol):
    """What ``state`` must have: a list the records are appended to."""

    @property
    def step_executions(self) -> MutableSequence[StepExecution]: ...


StepT = TypeVar("StepT", bound=StepLike)
ExecuteFn = Callable[[StepT], Awaitable[Mapping[str, Any] | None]]


# -- records ----------------------------------------------------------------------


@dataclass(slots=True)
class StepExecution:
    """The live record of one step, kept in ``state.step_executions``.

    Mutable on purpose: it is updated in place as the step runs.  ``status``
    is ``pending``, then ``running`` from its first attempt until it ends
    (backoff waits between attempts included), then exactly one of
    ``completed``, ``failed`` (timeouts included) or ``cancelled``.
    ``duration_seconds`` is time spent running attempts, not time queued or
    waiting to retry; it and ``started_at`` stay ``None`` for a step that
    never started.  ``error`` is a readable message.
    """

    step_id: str
    status: Status = "pending"
    started_at: datetime | None = None
    completed_at: datetime | None = None
    duration_seconds: float | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class StepExecutionResult(Generic[StepT]):
    """How one step ended: its record, the artifacts it returned, the exception.

    ``error`` is the exception object: the one ``execute_fn`` raised on its
    last attempt, a ``TimeoutError`` (``StepTimeoutError``) for a timeout, or
    a ``StepCancelledError`` for a step that was not run to the end.
    """

    step: StepT
    step_execution: StepExecution
    artifacts: Mapping[str, Any]
    error: BaseException | None
    attempts: int


# -- retry configuration --------------------------------------------------------------


def _seconds(value: object, *, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
        raise InvalidRetryPolicyError(
            f"RetryConfig.{what} must be a finite number of seconds >= 0, got {value!r}; "
            "use 0 for no delay"
        )
    return float(value)


def _classes(value: object, *, what: str) -> tuple[type[BaseException], ...]:
    items = (value,) if isinstance(value, type) else value
    if not isinstance(items, tuple | list) or not all(
        isinstance(c, type) and issubclass(c, BaseException) for c in items
    ):
        raise InvalidRetryPolicyError(
            f"RetryConfig.{what} must be a tuple of exception classes, got {value!r}; "
            f"write e.g. {what}=(ConnectionError, TimeoutError)"
        )
    return tuple(items)


def _matches(cls: type[BaseException], classes: tuple[type[BaseException], ...]) -> bool:
    return any(issubclass(cls, c) for c in classes)


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryConfig:
    """Retries of one step, in the asyncio executor's terms.

    ``max_attempts`` counts every attempt (1 = no retries).  The delay before
    attempt *n+1* is drawn uniformly from ``[0, d]`` ("full jitter") with
    ``d = min(max_backoff_seconds, initial_backoff_seconds * backoff_multiplier**(n-1))``;
    during that wait the step holds no slot.  An error is retried when it is
    an instance of ``retryable_errors`` and not of ``non_retryable_errors``.
    A timeout counts as a ``TimeoutError`` for that test.
    """

    max_attempts: int = 1
    initial_backoff_seconds: float = 1.0
    max_backoff_seconds: float = 60.0
    backoff_multiplier: float = 2.0
    retryable_errors: tuple[type[BaseException], ...] = (Exception,)
    non_retryable_errors: tuple[type[BaseException], ...] = ()

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if (
            isinstance(self.max_attempts, bool)
            or not isinstance(self.max_attempts, int)
            or self.max_attempts < 1
        ):
            raise InvalidRetryPolicyError(
                f"RetryConfig.max_attempts must be an integer >= 1, got {self.max_attempts!r}; "
                "use 1 for no retries"
            )
        initial = _seconds(self.initial_backoff_seconds, what="initial_backoff_seconds")
        cap = _seconds(self.max_backoff_seconds, what="max_backoff_seconds")
        if cap < initial:
            raise InvalidRetryPolicyError(
                f"RetryConfig.max_backoff_seconds ({cap:g}) is below initial_backoff_seconds "
                f"({initial:g}); raise max_backoff_seconds or lower initial_backoff_seconds"
            )
        multiplier = self.backoff_multiplier
        if isinstance(multiplier, bool) or not isinstance(multiplier, int | float):
            multiplier = math.nan
        if not 1 <= multiplier < math.inf:
            raise InvalidRetryPolicyError(
                f"RetryConfig.backoff_multiplier must be a finite number >= 1, got "
                f"{self.backoff_multiplier!r}; use 1 for a constant delay"
            )
        set_(self, "initial_backoff_seconds", initial)
        set_(self, "max_backoff_seconds", cap)
        set_(self, "backoff_multiplier", float(multiplier))
        set_(self, "retryable_errors", _classes(self.retryable_errors, what="retryable_errors"))
        set_(
            self,
            "non_retryable_errors",
            _classes(self.non_retryable_errors, what="non_retryable_errors"),
        )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, where: str) -> RetryConfig:
        """Build one from a dict of its fields, such as ``step.metadata["retry"]``."""
        if not isinstance(data, Mapping):
            raise InvalidRetryPolicyError(
                f"{where}: retry must be a RetryConfig or a dict of its fields such as "
                f'{{"max_attempts": 3}}, got {type(data).__name__}'
            )
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(str(key) for key in data if key not in names)
        if unknown:
            raise InvalidRetryPolicyError(
                f"{where}: {', '.join(unknown)} is not a RetryConfig field; "
                f"the fields are {', '.join(names)}"
            )
        try:
            return cls(**data)
        except InvalidRetryPolicyError as exc:
            raise InvalidRetryPolicyError(f"{where}: {exc}") from exc

    def to_policy(self) -> sv.RetryPolicy:
        """The same retries as a stepvisor ``RetryPolicy``."""
        timeouts = _matches(StepTimeoutError, self.retryable_errors) and not _matches(
            StepTimeoutError, self.non_retryable_errors
        )
        return sv.RetryPolicy(
            max_attempts=self.max_attempts,
            backoff=sv.Backoff.exponential(
                initial=self.initial_backoff_seconds,
                multiplier=self.backoff_multiplier,
                cap=self.max_backoff_seconds,
                jitter="full",
            ),
            retry_on=self.retryable_errors,
            give_up_on=self.non_retryable_errors,
            retry_timeouts=timeouts,
        )


# -- readiness ----------------------------------------------------------------------


def _names(value: object) -> tuple[str, ...]:
    """Artifact names as a tuple, a bare string counting as one name, duplicates dropped."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, Iterable):
        raise TypeError(f"requires/creates must be a list of artifact names, got {value!r}")
    return tuple(dict.fromkeys(value))


def find_ready_steps(
    workflow_steps: Iterable[StepT],
    completed_step_ids: Collection[str],
    running_step_ids: Collection[str],
    available_artifacts: Collection[str],
) -> list[StepT]:
    """The steps, in the given order, that may start now.

    A step is ready when it is neither completed nor running and every
    artifact it ``requires`` is in ``available_artifacts``.
    """
    return [
        step
        for step in workflow_steps
        if step.id not in completed_step_ids
        and step.id not in running_step_ids
        and all(name in available_artifacts for name in _names(step.requires))
    ]


# -- running execute_fn on the caller's loop -----------------------------------------------


class _LoopCall:
    """One call of ``execute_fn`` as a task on another thread's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.done = threading.Event()
        self._task: asyncio.Task[Any] | None = None
        self._value: Any = None
        self._error: BaseException | None = None

    def start(self, make: Callable[[], object], context: contextvars.Context) -> None:
        try:
            self._loop.call_soon_threadsafe(self._start, make, context)
        except RuntimeError as exc:
            raise RuntimeError(
                "the event loop that called execute_parallel is closed, so execute_fn cannot "
                "run; await execute_parallel until it returns instead of leaving it behind"
            ) from exc

    def cancel(self) -> None:
        """Cancel the task (it runs its cleanup on the caller's loop)."""
        try:
            self._loop.call_soon_threadsafe(self._cancel)
        except RuntimeError:  # the loop is closed: the task cannot run any more
            self.done.set()

    def wait_ended(self) -> None:
        """Wait for the task to end, or for its loop to close under it."""
        while not self.done.wait(_POLL_SECONDS):
            if self._loop.is_closed():
                return

    def outcome(self) -> Any:
        """The task's value, or raise its exception."""
        if self._error is not None:
            raise self._error
        return self._value

    # -- on the caller's loop ----------------------------------------------------------

    def _start(self, make: Callable[[], object], context: contextvars.Context) -> None:
        own = context.copy()  # like create_task from the caller: a copy per step
        try:
            coro = _as_coroutine(own.run(make))
            self._task = self._loop.create_task(coro, context=own)
        except BaseException as exc:
            self._error = exc
            self.done.set()
            return
        self._task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            self._error = asyncio.CancelledError(
                "execute_fn's task was cancelled by something other than stepvisor"
            )
        else:
            self._error = task.exception()
            if self._error is None:
                self._value = task.result()
        self.done.set()

    def _cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()


def _as_coroutine(value: object) -> Coroutine[Any, Any, Any]:
    """What ``execute_fn(step)`` returned, as a coroutine a task can run."""
    if asyncio.iscoroutine(value):
        return value
    if isinstance(value, Awaitable):
        return _await(value)
    raise TypeError(
        f"execute_fn returned {type(value).__name__}, not an awaitable; "
        "execute_fn must be an async function (async def) returning the artifacts"
    )


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


class _Slot:
    """What the facade keeps about one step during a call."""

    def __init__(self, step: Any, record: StepExecution, *, timeout: float | None) -> None:
        self.step = step
        self.record = record
        self.timeout = timeout
        self.deps: tuple[str, ...] = ()
        self.artifacts: Mapping[str, Any] = {}
        self.attempt_started: float | None = None
        self.running_seconds = 0.0


class _OnCallerLoop:
    """A thread step function that runs ``execute_fn(step)`` on the caller's loop.

    It waits on its Worker thread; on a deadline or a cancel it cancels the
    task, waits until the task has really ended (so a retry never overlaps
    it), then raises the engine's timeout or cancel error.
    """

    def __init__(
        self,
        slot: _Slot,
        execute_fn: Callable[[Any], object],
        *,
        loop: asyncio.AbstractEventLoop,
        context: contextvars.Context,
    ) -> None:
        self._slot = slot
        self._execute_fn = execute_fn
        self._loop = loop
        self._context = context

    def __call__(self, ctx: sv.StepContext) -> Any:
        step = self._slot.step
        call = _LoopCall(self._loop)
        call.start(lambda: self._execute_fn(step), self._context)
        # A deadline or cancel cancels the task on the caller's loop at once; the
        # step then waits until the task has really ended, so a retry never overlaps it.
        ctx.on_cancel(call.cancel)
        call.wait_ended()
        if ctx.cancelled and call._error is not None:
            ctx.raise_if_cancelled()  # the task was stopped: say why, not CancelledError
        value = call.outcome()
        if isinstance(value, Mapping):
            self._slot.artifacts = dict(value)
        return value


# -- live records --------------------------------------------------------------------


def _utc(wall: float) -> datetime:
    return datetime.fromtimestamp(wall, tz=UTC)


class _Tracker:
    """The ``on_event`` hook: moves each record along as the run reports.

    It runs on the Supervisor thread, so it only sets attributes.  ``status``
    is written last, so a reader that sees a terminal status sees its times.
    A record that is terminal never changes status again.
    """

    def __init__(self, slots: Mapping[str, _Slot]) -> None:
        self._slots = slots
        self._lock = threading.Lock()

    def __call__(self, event: sv.Event) -> None:
        with self._lock:
            if isinstance(event, sv.StepDispatched):
                self._dispatched(self._slots[event.step_id], event.time)
            elif isinstance(event, sv.StepRetrying):
                self._attempt_ended(self._slots[event.step_id], event.time)
            elif isinstance(event, sv.StepFinished):
                slot = self._slots[event.step_id]
                message = self._message(slot, event.status, event.attempts, event)
                self._end(slot, _STATUS[event.status], event.time, message)
            elif isinstance(event, sv.StepCommitted):
                slot = self._slots[event.step_id]
                message = self._message(slot, event.status, event.attempts, None)
                self._end(slot, _STATUS[event.status], time.time(), message)
            elif isinstance(event, sv.RunFinished):
                self._end_all(event.time, why=_CANCELLED)

    def end_all(self, *, why: str) -> None:
        """End every record still open as cancelled, because the call did not finish."""
        with self._lock:
            self._end_all(time.time(), why=why)

    def settle(self, result: sv.RunResult) -> None:
        """Take the run's own statuses and times, the authority once it has ended."""
        with self._lock:
            for sid, slot in self._slots.items():
                record = result.steps[sid]
                message = self._message(slot, record.status.value, record.attempt_count, None)
                self._end(slot, _STATUS[record.status.value], result.ended, message)
                if record.attempts:
                    first, last = record.attempts[0], record.attempts[-1]
                    slot.record.started_at = _utc(first.started)
                    slot.record.completed_at = _utc(last.ended or result.ended)
                    slot.record.duration_seconds = sum(a.duration or 0.0 for a in record.attempts)

    # -- under the lock ----------------------------------------------------------------

    def _dispatched(self, slot: _Slot, wall: float) -> None:
        slot.attempt_started = wall
        if slot.record.started_at is None:
            slot.record.started_at = _utc(wall)
        if slot.record.status == "pending":
            slot.record.duration_seconds = 0.0
            slot.record.status = "running"

    def _attempt_ended(self, slot: _Slot, wall: float) -> None:
        if slot.attempt_started is not None:
            slot.running_seconds += max(0.0, wall - slot.attempt_started)
            slot.attempt_started = None
            slot.record.duration_seconds = slot.running_seconds

    def _end(self, slot: _Slot, status: Status, wall: float, message: str | None) -> None:
        record = slot.record
        if record.status in _TERMINAL:
            return
        self._attempt_ended(slot, wall)
        record.completed_at = _utc(wall)
        record.error = message
        record.status = status

    def _end_all(self, wall: float, *, why: str) -> None:
        for slot in self._slots.values():
            if slot.record.status not in _TERMINAL:
                self._end(slot, "cancelled", wall, self._cancel_message(slot, why=why))

    def _message(
        self, slot: _Slot, status: str, attempts: int, finished: sv.StepFinished | None
    ) -> str | None:
        sid = slot.record.step_id
        if status == "succeeded":
            return None
        if status == "timed_out":
            limit = f"its {slot.timeout:g} s timeout" if slot.timeout is not None else "a deadline"
            return (
                f"step {sid!r} timed out: it ran past {limit} (attempt {attempts}); "
                "execute_fn's task was cancelled"
            )
        if status == "failed":
            if finished is not None and finished.error_message:
                return finished.error_message
            if finished is not None and finished.error_type:
                return finished.error_type
            return slot.record.error or f"step {sid!r} failed"
        if status == "skipped":
            failed = [d for d in slot.deps if self._slots[d].record.status != "completed"]
            which = ", ".join(map(repr, failed)) or "a step it depends on"
            return f"step {sid!r} was not run: it depends on {which}, which did not complete"
        return self._cancel_message(slot, why=_CANCELLED)

    @staticmethod
    def _cancel_message(slot: _Slot, *, why: str) -> str:
        sid = slot.record.step_id
        when = "before it started" if slot.record.started_at is None else "while it ran"
        return f"step {sid!r} was cancelled {when}: {why}"


# -- the executor ----------------------------------------------------------------------


async def _run_once_cancelled(workflow: sv.Workflow, **kwargs: Any) -> sv.RunResult:
    """``sv.run_async``, handed at most one cancellation however many arrive.

    Cancelled, ``sv.run_async`` cancels the run and waits for it to stop; a
    second cancel cuts that wait short and it then joins the run's Worker
    threads synchronously, on this loop.  Our Workers are waiting for this
    loop to cancel ``execute_fn``'s tasks, so the loop would freeze until the
    join gives up (about 11 s).  Here further cancels are absorbed while the
    run stops (bounded by its kill grace) and one ``CancelledError`` is
    raised at the end.
    """
    run = asyncio.ensure_future(sv.run_async(workflow, **kwargs))
    try:
        return await asyncio.shield(run)
    except asyncio.CancelledError:
        run.cancel()
        while not run.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([run])
        if not run.cancelled():
            run.exception()  # retrieved: it is superseded by the cancellation
        raise


class ParallelStepExecutor:
    """Run a set of steps in parallel on stepvisor, with the asyncio executor's call shape.

    At most ``max_parallel`` steps run at once.  A step's timeout (per
    attempt) is the ``timeout_seconds`` given to :meth:`execute_parallel`,
    else ``step.metadata["timeout_seconds"]``, else
    ``default_timeout_seconds`` (``None``: no limit).  Its retries are
    ``step.metadata["retry"]`` (a :class:`RetryConfig` or a dict of its
    fields), else ``default_retry_config``, else none.
    """

    def __init__(
        self,
        # Positional too: existing call sites write ParallelStepExecutor(4).
        max_parallel: int = 8,
        default_timeout_seconds: float | None = 3600.0,
        default_retry_config: RetryConfig | None = None,
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
        slots = {step.id: self._slot(step, timeout_seconds) for step in given}
        workflow = self._workflow(given, slots, execute_fn, loop=loop, context=context)
        for sid in sorted(slots):
            state.step_executions.append(slots[sid].record)
        tracker = _Tracker(slots)
        try:
            result = await _run_once_cancelled(
                workflow,
                on_event=tracker,
                max_parallel=self.max_parallel,
                on_failure="continue",
            )
        except asyncio.CancelledError:
            tracker.end_all(why=_CANCELLED)  # normally done already, by the run's own events
            raise
        except BaseException as exc:
            tracker.end_all(why=f"the run stopped on {type(exc).__name__}: {exc}")
            raise
        tracker.settle(result)
        return [self._result(slots[sid], result) for sid in sorted(slots)]

    # -- building the workflow ------------------------------------------------------------

    def _slot(self, step: StepLike, timeout_seconds: float | None) -> _Slot:
        metadata = getattr(step, "metadata", None) or {}
        timeout = timeout_seconds
        if timeout is None:
            timeout = metadata.get("timeout_seconds")
        if timeout is None:
            timeout = self.default_timeout_seconds
        return _Slot(step, StepExecution(step_id=step.id), timeout=timeout)

    def _retry(self, step: StepLike) -> RetryConfig:
        metadata = getattr(step, "metadata", None) or {}
        value = metadata.get("retry")
        if value is None:
            return self.default_retry_config
        if isinstance(value, RetryConfig):
            return value
        return RetryConfig.from_mapping(value, where=f"step {step.id!r}: metadata['retry']")

    def _workflow(
        self,
        given: list[StepT],
        slots: Mapping[str, _Slot],
        execute_fn: ExecuteFn[StepT],
        *,
        loop: asyncio.AbstractEventLoop,
        context: contextvars.Context,
    ) -> sv.Workflow:
        created = {name for step in given for name in _names(getattr(step, "creates", None))}
        sv_steps = []
        for step in given:
            requires = _names(getattr(step, "requires", None))
            sv_steps.append(
                sv.Step(
                    step.id,
                    _OnCallerLoop(slots[step.id], execute_fn, loop=loop, context=context),
                    # Only artifacts one of these steps creates make an edge;
                    # the rest are taken as available already.
                    requires=[name for name in requires if name in created],
                    creates=_names(getattr(step, "creates", None)),
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
    def _result(slot: _Slot, result: sv.RunResult) -> StepExecutionResult[Any]:
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
