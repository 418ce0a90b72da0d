"""What one call of a :class:`stepvisor.Executor` is made of, apart from the executor.

Its options (checked once, replaced field by field), the plan that calls of one
function with one set of options share (with what its machine does up to a
call's first attempt), the settings resolved once per executor, and the link
that settles the call's Future from the run's result.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final, NamedTuple, cast

from stepvisor._invoke import RESULT, AsyncInvoke, Invoke
from stepvisor.actors.calls import first_attempt
from stepvisor.config import Resolved
from stepvisor.core.machine import Plan, RunMachine
from stepvisor.core.model import EXECUTORS, Step, Workflow, check_positive_seconds
from stepvisor.core.result import RunResult
from stepvisor.core.state import RunStatus
from stepvisor.errors import InvalidSettingError, StepCancelledError
from stepvisor.policies.retry import RetryPolicy

#: "Not given here": keep the value the options came with.
UNSET: Final[Any] = object()
_NO_RETRY: Final = RetryPolicy(max_attempts=1)


@dataclass(frozen=True, slots=True)
class Settled(Resolved):
    """Settings resolved once for every call of an Executor, their JSON form made once.

    The run machine asks for ``settings.jsonable()`` twice per run (for the
    start event and the result); for a one-step run that was a tenth of its
    cost, and an Executor's settings never change.
    """

    json: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, cfg: Resolved) -> Settled:
        values = {f.name: getattr(cfg, f.name) for f in fields(Resolved)}
        return cls(**values, json=cfg.jsonable())

    def jsonable(self) -> dict[str, Any]:
        return cast("dict[str, Any]", self.json)  # shared: read-only by convention


class Options(NamedTuple):
    timeout: float | None
    retry: RetryPolicy
    executor: str


def checked(timeout: Any, retry: Any, executor: Any) -> Options:
    if timeout is not None:
        timeout = check_positive_seconds(timeout, what="timeout")
    if retry is None:
        retry = _NO_RETRY
    elif not isinstance(retry, RetryPolicy):
        raise InvalidSettingError(
            f"retry must be a stepvisor.RetryPolicy, got {type(retry).__name__}; "
            "write e.g. retry=sv.RetryPolicy(max_attempts=3)"
        )
    if executor not in EXECUTORS:
        raise InvalidSettingError(
            f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}"
        )
    return Options(timeout, retry, executor)


def name_of(fn: Callable[..., Any]) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return name if isinstance(name, str) and name.strip() else type(fn).__name__


class Link:
    """Ties one call's Future to the hub: begin, the end (three ways), cancel while queued."""

    __slots__ = ("begun", "ended", "future", "invoke", "params")

    def __init__(
        self,
        future: concurrent.futures.Future[Any],
        invoke: Invoke,
        params: dict[str, Any],
        *,
        ended: Callable[[], None],
    ) -> None:
        self.ended = ended
        self.future = future
        self.invoke = invoke
        self.params = params
        self.begun = False

    def begin(self) -> bool:
        self.begun = True
        return self.future.set_running_or_notify_cancel()

    def queued_cancel(self) -> None:
        self.future.cancel()

    def end(self, result: RunResult) -> None:
        """The call's machine finished its run with ``result``."""
        if result.status is RunStatus.SUCCEEDED:
            self._settle(result.artifacts.get(RESULT), None)
        else:
            error = result.error or next(iter(result.errors.values()), None)
            if error is None:
                error = StepCancelledError(f"the call ended {result.status.value}")
            self._settle(None, error)

    def end_ok(self, outputs: Mapping[str, Any]) -> None:
        """The call's first attempt succeeded with ``outputs`` (as its run would have)."""
        self._settle(outputs.get(RESULT), None)

    def fail(self, error: BaseException) -> None:
        """The call could not be run to its end (a stepvisor bug): ``error`` says so."""
        self._settle(None, error)

    def _settle(self, value: Any, error: BaseException | None) -> None:
        # What the Workers and the hub may still hold of the call must not
        # keep its function or arguments alive (CPython's executors neither).
        self.invoke.forget()
        self.params.clear()
        future = self.future
        try:
            if error is None:
                future.set_result(value)
            else:
                future.set_exception(error)
        except concurrent.futures.InvalidStateError:  # cancelled (or settled twice: a bug)
            if future.cancelled() and not self.begun:  # tell wait() and as_completed()
                future.set_running_or_notify_cancel()
        finally:
            self.ended()  # after the future settled: shutdown(wait=True) waits for this


def _nothing() -> None:
    """The stand-in function of a shared plan."""


async def _nothing_async() -> None:
    """The stand-in function of a shared plan of ``async def`` calls."""


class Calls:
    """What calls of one function with one set of options share: the plan, its first attempt.

    ``first`` is what the plan's machine does up to a call's first attempt,
    learnt once from a machine here (see :mod:`stepvisor.actors._call`).
    """

    __slots__ = ("executors", "first", "settings", "workflow")

    def __init__(self, fn: Invoke, opts: Options, settings: Resolved) -> None:
        is_async = isinstance(fn, AsyncInvoke)
        executor = opts.executor
        if is_async and executor == "thread":
            executor = "async"
        # The plan's function stands in for every call's own (the hub puts that
        # in each attempt's spec), so the plan keeps no call's function alive.
        step = Step(
            name_of(fn.fn),
            AsyncInvoke(_nothing_async) if is_async else Invoke(_nothing),
            timeout=opts.timeout,
            retry=opts.retry,
            executor=cast("Any", executor),
        )
        self.workflow = Workflow("executor", [step])
        self.executors = (executor,)
        self.settings = settings
        self.first = first_attempt(self.machine("plan", 0))

    def machine(self, run_id: str, seed: int) -> RunMachine:
        """A fresh machine for one call of this plan."""
        return RunMachine(
            Plan(
                workflow=self.workflow,
                settings=self.settings,
                run_id=run_id,
                seed=seed,
                executors=self.executors,
                store_may_refuse=False,
                lend_slots=True,
            )
        )


def replaced(opts: Options, timeout: Any, retry: Any, executor: Any) -> Options:
    return checked(
        opts.timeout if timeout is UNSET else timeout,
        opts.retry if retry is UNSET else retry,
        opts.executor if executor is UNSET else executor,
    )
