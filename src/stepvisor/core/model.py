"""The workflow model: ``Step``, ``Settings`` and ``Workflow``.

All three are frozen values, checked when created, so that a workflow which
exists can run: bad ids, uncallable functions, unknown dependencies, missing
artifacts, cycles and bad settings are rejected here with a message that names
the problem and the fix, before any step is dispatched or any store touched.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import FunctionType
from typing import Any, Final, Literal, cast

from pyrsistent import PMap, pmap

from stepvisor._validate import duplicates, is_int, is_number, name_list, seconds
from stepvisor.cache._spec import Cache, cache_option
from stepvisor.core.graph import Graph
from stepvisor.errors import (
    InvalidCacheError,
    InvalidMaxParallelError,
    InvalidSettingError,
    InvalidStepIdError,
    InvalidTimeoutError,
    StepFunctionError,
)
from stepvisor.policies.retry import RetryPolicy

__all__ = [
    "EXECUTORS",
    "ON_FAILURE",
    "Executor",
    "OnFailure",
    "Settings",
    "Step",
    "StepFn",
    "Workflow",
    "check_max_parallel",
    "check_positive_seconds",
]

Executor = Literal["thread", "async", "process", "ray"]
EXECUTORS: Final = ("thread", "async", "process", "ray")
OnFailure = Literal["fail_fast", "continue"]
ON_FAILURE: Final = ("fail_fast", "continue")

#: A step function takes a :class:`~stepvisor.context.StepContext` and returns a
#: mapping of artifacts (or ``None``); it may be ``async def``.
StepFn = Callable[..., Any]

#: The metadata and params of every step that has none (one shared empty map).
_NO_DATA: Final[PMap[str, Any]] = pmap()


def check_max_parallel(value: object, *, what: str = "max_parallel") -> int:
    """Return ``value`` if it is an int >= 1, else raise a clear error."""
    if not is_int(value):
        raise InvalidMaxParallelError(
            f"{what} must be an integer >= 1, got {value!r} ({type(value).__name__}); "
            f"pass a whole number such as {what}=4"
        )
    if value < 1:
        raise InvalidMaxParallelError(
            f"{what} must be an integer >= 1, got {value}; use 1 to run one step at a time"
        )
    return value


def check_positive_seconds(value: object, *, what: str) -> float:
    """Return ``value`` as a float if it is a positive finite number of seconds."""
    return seconds(value, what=what, fail=InvalidTimeoutError, fix="use None for no limit")


def _names(value: Iterable[str] | str, *, step_id: str, what: str) -> tuple[str, ...]:
    # A list or tuple is the common case, and a million steps are built one by
    # one: it skips the ABC checks of name_list (isinstance of Iterable).
    names = tuple(value) if type(value) is list or type(value) is tuple else name_list(value)
    if names is None:
        raise InvalidSettingError(
            f"step {step_id!r}: {what} must be a list of names, got {value!r}; "
            f'write e.g. {what}=["extract"]'
        )
    if not names:
        return ()
    for name in names:
        if not isinstance(name, str) or not name:
            raise InvalidSettingError(
                f"step {step_id!r}: {what} must be non-empty strings, got {name!r}"
            )
    dup = duplicates(cast("tuple[str, ...]", names)) if len(set(names)) < len(names) else None
    if dup:
        raise InvalidSettingError(
            f"step {step_id!r}: {what} lists {', '.join(map(repr, dup))} more than once; "
            "list each name once"
        )
    return cast("tuple[str, ...]", names)


def _is_coroutine_fn(fn: object) -> bool:
    """``async def`` functions, and objects whose ``__call__`` is one."""
    if type(fn) is FunctionType:  # a function's own __call__ is never a coroutine function
        return inspect.iscoroutinefunction(fn)
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - async callable objects count too
    )


@dataclass(frozen=True, slots=True, init=False)
class Step:
    """One unit of work in a workflow.

    ``needs`` names steps that must succeed first; ``requires``/``creates`` name
    artifacts, and requiring an artifact depends on the step that creates it.
    ``timeout``, ``retry``, ``executor`` and ``pool`` override the run's
    settings for this step, and ``cache`` the run's ``cache`` setting (``True``
    or ``Cache(version=...)``: reuse a stored result; ``False``: never).
    ``params`` are the ``with:`` values of a workflow file, handed to the
    function through ``ctx.params``.  ``resources`` is the
    resource request of a Ray step (default ``{"CPU": 1}``).
    """

    id: str
    fn: StepFn
    needs: tuple[str, ...]
    requires: tuple[str, ...]
    creates: tuple[str, ...]
    timeout: float | None
    retry: RetryPolicy | None
    executor: Executor | None
    pool: str | None
    metadata: Mapping[str, Any]
    params: Mapping[str, Any]
    resources: Mapping[str, float] | None
    #: The artifact name or the fixed items the step is mapped over, or ``None``.
    map_over: str | tuple[Any, ...] | range | None
    #: ``None`` (the run's ``cache`` setting decides), ``False``, or a :class:`Cache`.
    cache: Cache | bool | None
    #: Whether ``fn`` is ``async def``; computed once, read on every dispatch.
    is_async: bool = field(compare=False, repr=False)

    def __init__(
        self,
        id: str,
        fn: StepFn,
        *,
        needs: Iterable[str] | str = (),
        requires: Iterable[str] | str = (),
        creates: Iterable[str] | str = (),
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        executor: Executor | None = None,
        pool: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        resources: Mapping[str, float] | None = None,
        map_over: str | Sequence[Any] | None = None,
        cache: Cache | bool | None = None,
    ) -> None:
        set_ = object.__setattr__
        set_(self, "id", id)
        set_(self, "fn", fn)
        set_(self, "needs", needs)
        set_(self, "requires", requires)
        set_(self, "creates", creates)
        set_(self, "timeout", timeout)
        set_(self, "retry", retry)
        set_(self, "executor", executor)
        set_(self, "pool", pool)
        set_(self, "metadata", _NO_DATA if metadata is None else metadata)
        set_(self, "params", _NO_DATA if params is None else params)
        set_(self, "resources", resources)
        set_(self, "map_over", map_over)
        set_(self, "cache", cache)
        set_(self, "is_async", False)
        self.__post_init__()

    def __post_init__(self) -> None:
        # One check after another, in this order: the first problem is the one reported.
        self._check_identity()
        self._check_options()
        self._check_data()
        if self.map_over is not None:
            self._check_map()

    def _check_identity(self) -> None:
        """The id, the function and the names it depends on and makes."""
        if not isinstance(self.id, str) or not self.id.strip():
            raise InvalidStepIdError(
                f"a step id must be a non-empty string, got {self.id!r}; "
                'name the step, e.g. Step("extract", fn)'
            )
        if not callable(self.fn):
            raise StepFunctionError(
                f"step {self.id!r}: fn must be callable (a function or async function), "
                f"got {self.fn!r} ({type(self.fn).__name__})"
            )
        set_ = object.__setattr__
        set_(self, "is_async", _is_coroutine_fn(self.fn))
        set_(self, "needs", _names(self.needs, step_id=self.id, what="needs"))
        set_(self, "requires", _names(self.requires, step_id=self.id, what="requires"))
        set_(self, "creates", _names(self.creates, step_id=self.id, what="creates"))
        if self.id in self.needs:
            raise InvalidSettingError(f"step {self.id!r} lists itself in needs; remove it")

    def _check_options(self) -> None:
        """The run settings this step overrides: timeout, retry, executor, pool."""
        if self.timeout is not None:
            timeout = check_positive_seconds(self.timeout, what=f"step {self.id!r}: timeout")
            object.__setattr__(self, "timeout", timeout)
        if self.retry is not None and not isinstance(self.retry, RetryPolicy):
            raise InvalidSettingError(
                f"step {self.id!r}: retry must be a stepvisor.RetryPolicy, got "
                f"{type(self.retry).__name__}"
            )
        if self.executor is not None and self.executor not in EXECUTORS:
            raise InvalidSettingError(
                f"step {self.id!r}: executor must be one of {', '.join(EXECUTORS)}, "
                f"got {self.executor!r}"
            )
        if self.executor == "async" and not self.is_async:
            raise InvalidSettingError(
                f"step {self.id!r}: executor='async' needs an 'async def' function; "
                "use executor='thread' for a plain function"
            )
        if self.pool is not None and (not isinstance(self.pool, str) or not self.pool):
            raise InvalidSettingError(
                f"step {self.id!r}: pool must be a non-empty string, got {self.pool!r}"
            )
        if self.cache is not None:
            object.__setattr__(self, "cache", cache_option(self.cache, where=f"step {self.id!r}"))

    def _check_data(self) -> None:
        """Metadata (with its ``cost`` hint), params and Ray resources, made immutable.

        Empty mappings are all one shared empty map, and a persistent map is
        kept as it is: a big workflow is mostly steps with neither, and two
        fresh maps per step were a fifth of its memory.
        """
        set_ = object.__setattr__
        for name in ("metadata", "params"):
            value = getattr(self, name)
            if value is _NO_DATA:
                continue
            if not isinstance(value, Mapping):
                raise InvalidSettingError(
                    f"step {self.id!r}: {name} must be a mapping, got {type(value).__name__}"
                )
            if not value:
                set_(self, name, _NO_DATA)
            elif not isinstance(value, PMap):
                set_(self, name, pmap(value))
        cost = self.metadata.get("cost", 1.0) if self.metadata else 1.0
        if self.metadata and (not is_number(cost) or not cost >= 0):
            raise InvalidSettingError(
                f"step {self.id!r}: metadata['cost'] must be a number of seconds >= 0, got {cost!r}"
            )
        if self.resources is None:
            return
        if not isinstance(self.resources, Mapping):
            raise InvalidSettingError(
                f"step {self.id!r}: resources must be a mapping such as "
                f'{{"CPU": 2}}, got {type(self.resources).__name__}'
            )
        for key, amount in self.resources.items():
            if not isinstance(key, str) or not is_number(amount) or not amount >= 0:
                raise InvalidSettingError(
                    f"step {self.id!r}: resources[{key!r}] must be a number >= 0, got {amount!r}"
                )
        set_(self, "resources", pmap(self.resources))

    def _check_map(self) -> None:
        """``map_over``: an artifact's name, or the items themselves: a list, tuple or range.

        A list is copied into a tuple (the step is immutable); a tuple or a range is
        kept as it is, so a step over a million fixed items costs the same to make
        as one over ten.
        """
        over: object = self.map_over  # as given: any type
        if isinstance(over, str):
            if not over:
                raise InvalidSettingError(
                    f"step {self.id!r}: map_over must name an artifact, got an empty string; "
                    'write e.g. map_over="chunks"'
                )
            if over in self.creates:
                raise InvalidSettingError(
                    f"step {self.id!r} maps over {over!r}, an artifact it creates itself; "
                    "map over an artifact another step creates (add a step that makes the list)"
                )
            return
        if isinstance(over, range | tuple):
            return
        if isinstance(over, list):
            object.__setattr__(self, "map_over", tuple(over))
            return
        raise InvalidSettingError(
            f"step {self.id!r}: map_over must be an artifact's name or a list of items, "
            f'got {type(over).__name__}; write map_over="chunks" or map_over=[0, 1, 2]'
        )

    @property
    def mapped(self) -> bool:
        """Whether the step runs once per item of a list (see ``map_over``)."""
        return self.map_over is not None

    @property
    def cost(self) -> float:
        """The estimated duration used for critical-path priority (default 1)."""
        return float(self.metadata.get("cost", 1.0)) if self.metadata else 1.0


#: The values of the ``capture`` setting.
CAPTURE_MODES: Final = ("tee", "store", "off")

#: Setting names that :class:`Settings` holds, in the order ``stepvisor config`` shows.
SETTING_NAMES: Final = (
    "max_parallel",
    "on_failure",
    "pools",
    "executor",
    "step_timeout",
    "deadline",
    "kill_grace",
    "retry",
    "seed",
    "max_worker_crashes",
    "max_retries_total",
    "codec",
    "ray_address",
    "capture",
    "log_limit",
    "cache",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Run-wide settings.  ``None`` means "not set here": the next source decides.

    The resolution order, highest first, is: explicit argument > environment
    (``STEPVISOR_<NAME>``) > these workflow settings > the project's
    ``[tool.stepvisor]`` / ``[stepvisor]`` > built-in defaults.
    """

    max_parallel: int | None = None
    on_failure: OnFailure | None = None
    pools: Mapping[str, int] | None = None
    executor: Executor | None = None
    step_timeout: float | None = None
    deadline: float | None = None
    kill_grace: float | None = None
    retry: RetryPolicy | None = None
    seed: int | None = None
    max_worker_crashes: int | None = None
    max_retries_total: int | None = None
    codec: str | None = None
    ray_address: str | None = None
    #: What steps write: ``tee`` (kept and shown live), ``store`` (kept), ``off``.
    capture: str | None = None
    #: Bytes of output kept per attempt (head and tail past it, the cut marked).
    log_limit: int | None = None
    #: Reuse stored results of every step that does not say ``cache=False`` (off by default).
    cache: bool | None = None

    def __post_init__(self) -> None:
        self._check_scheduling()
        self._check_limits()
        self._check_capture()
        if self.cache is not None and not isinstance(self.cache, bool):
            raise InvalidCacheError(
                f"cache must be true or false, got {self.cache!r}; per step, write "
                'Step(..., cache=stepvisor.Cache(version="2")) for a version'
            )

    def _check_capture(self) -> None:
        """The output capture settings (see ``stepvisor.backends._capture``)."""
        if self.capture is not None and self.capture not in CAPTURE_MODES:
            raise InvalidSettingError(
                f"capture must be 'tee' (keep and show), 'store' (keep quietly) or 'off', "
                f"got {self.capture!r}"
            )
        if self.log_limit is not None and (not is_int(self.log_limit) or self.log_limit < 1024):
            raise InvalidSettingError(
                f"log_limit must be a whole number of bytes >= 1024 (default 1048576), "
                f"got {self.log_limit!r}"
            )

    def _check_scheduling(self) -> None:
        """How many steps run at once, on what, and what a failure does."""
        set_ = object.__setattr__
        if self.max_parallel is not None:
            check_max_parallel(self.max_parallel)
        if self.on_failure is not None and self.on_failure not in ON_FAILURE:
            raise InvalidSettingError(
                f"on_failure must be 'fail_fast' or 'continue', got {self.on_failure!r}"
            )
        if self.pools is not None:
            if not isinstance(self.pools, Mapping):
                raise InvalidSettingError(
                    f'pools must be a mapping of pool name to size, such as {{"db": 2}}, '
                    f"got {type(self.pools).__name__}"
                )
            for name, size in self.pools.items():
                if not isinstance(name, str) or not name:
                    raise InvalidSettingError(f"pool names must be non-empty strings, got {name!r}")
                check_max_parallel(size, what=f"pools[{name!r}]")
            set_(self, "pools", pmap(self.pools))
        if self.executor is not None and self.executor not in EXECUTORS:
            raise InvalidSettingError(
                f"executor must be one of {', '.join(EXECUTORS)}, got {self.executor!r}"
            )
        if self.executor == "async":
            raise InvalidSettingError(
                "executor='async' cannot be a run default: async steps are chosen by "
                "writing them as 'async def'; use 'thread', 'process' or 'ray'"
            )

    def _check_limits(self) -> None:
        """Time limits, retries, crash and retry budgets, and the store and Ray options."""
        set_ = object.__setattr__
        for name in ("step_timeout", "deadline", "kill_grace"):
            value = getattr(self, name)
            if value is not None:
                set_(self, name, check_positive_seconds(value, what=name))
        if self.retry is not None and not isinstance(self.retry, RetryPolicy):
            raise InvalidSettingError(
                f"retry must be a stepvisor.RetryPolicy, got {type(self.retry).__name__}"
            )
        if self.seed is not None and not is_int(self.seed):
            raise InvalidSettingError(f"seed must be an integer, got {self.seed!r}")
        if self.max_worker_crashes is not None:
            check_max_parallel(self.max_worker_crashes, what="max_worker_crashes")
        if self.max_retries_total is not None and (
            not is_int(self.max_retries_total) or self.max_retries_total < 0
        ):
            raise InvalidSettingError(
                f"max_retries_total must be an integer >= 0, got {self.max_retries_total!r}"
            )
        if self.codec is not None and self.codec not in ("json", "pickle"):
            raise InvalidSettingError(f"codec must be 'json' or 'pickle', got {self.codec!r}")
        if self.ray_address is not None and not isinstance(self.ray_address, str):
            raise InvalidSettingError(
                f"ray_address must be a string such as 'ray://host:10001' or 'auto', "
                f"got {self.ray_address!r}"
            )

    def as_dict(self) -> dict[str, Any]:
        """The settings that are set here (not ``None``), by name."""
        return {
            name: getattr(self, name) for name in SETTING_NAMES if getattr(self, name) is not None
        }


@dataclass(frozen=True, slots=True, init=False)
class Workflow:
    """A named DAG of steps with its run-wide settings, validated on creation.

    Creating a ``Workflow`` checks the graph (duplicate ids, unknown ``needs``,
    ``requires`` nobody ``creates``, cycles) and computes the canonical order
    that outcomes are applied in.
    """

    id: str
    steps: tuple[Step, ...]
    settings: Settings
    #: Precomputed DAG facts; built on creation, not passed in.
    graph: Graph = field(compare=False, repr=False)

    def __init__(
        self,
        id: str,
        steps: Iterable[Step],
        *,
        settings: Settings | None = None,
    ) -> None:
        set_ = object.__setattr__
        set_(self, "id", id)
        set_(self, "steps", steps)
        set_(self, "settings", Settings() if settings is None else settings)
        self.__post_init__()

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id.strip():
            raise InvalidStepIdError(f"a workflow id must be a non-empty string, got {self.id!r}")
        steps = tuple(self.steps)
        for step in steps:
            if not isinstance(step, Step):
                raise InvalidSettingError(
                    f"workflow {self.id!r}: steps must be stepvisor.Step values, got "
                    f"{type(step).__name__}"
                )
        if not isinstance(self.settings, Settings):
            raise InvalidSettingError(
                f"workflow {self.id!r}: settings must be stepvisor.Settings, got "
                f"{type(self.settings).__name__}"
            )
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "graph", Graph.build(steps))

    def step(self, step_id: str) -> Step:
        """The step with this id (``KeyError`` if none)."""
        return self.steps[self.graph.index[step_id]]

    @property
    def step_ids(self) -> tuple[str, ...]:
        """Step ids in canonical order."""
        return self.graph.order


def to_pmap(mapping: Mapping[str, Any] | None) -> PMap[str, Any]:
    """An immutable copy of ``mapping`` (empty for ``None``)."""
    return pmap(mapping or {})
