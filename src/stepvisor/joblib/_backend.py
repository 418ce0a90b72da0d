"""``StepvisorBackend``: joblib's backend protocol on a :class:`stepvisor.Executor`.

joblib drives a backend through a few calls: ``configure`` when a
``Parallel`` call starts (it returns the number of workers), ``submit`` per
batch with a callback, ``retrieve_result_callback`` in that callback,
``abort_everything`` when a batch failed, ``terminate`` at the end.  Here::

    configure(n_jobs)  ── lease the warm engine of bound n_jobs (_engines.py)
                       ── a stepvisor.Executor on it for this Parallel call (its options:
                          executor, timeout = min(backend timeout, Parallel timeout), retry)
    submit(batch)      ── process: ex.submit(run_batch, Batch(batch, max_nbytes), threads)
                          thread:  ex.submit(batch)
    abort_everything   ── this call's Executor shut down, its running calls stopped;
                          the engine, and other Parallel calls on it, go on
    terminate          ── the Executor closed, the engine given back (it stays warm)

Each ``Parallel`` call has an Executor of its own so that aborting one stops
only its own calls.  A batch that ran past ``Parallel(timeout=...)`` was
stopped by its deadline; it raises ``multiprocessing.TimeoutError`` (what
joblib raises) chained from the :class:`~stepvisor.StepTimeoutError`.  One
that ran past the backend's own ``timeout`` raises the ``StepTimeoutError``.
"""

from __future__ import annotations

import inspect
import multiprocessing
import os
import uuid
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Final

from joblib import cpu_count
from joblib._parallel_backends import (
    AutoBatchingMixin,
    FallbackToBackend,
    ParallelBackendBase,
    SequentialBackend,
)

from stepvisor._calls import checked
from stepvisor._invoke import CURRENT
from stepvisor.core.model import check_positive_seconds
from stepvisor.errors import InvalidSettingError, StepTimeoutError
from stepvisor.futures import Executor
from stepvisor.joblib._child import THREAD_VARS, Batch, Init, run_batch
from stepvisor.joblib._engines import ENGINES
from stepvisor.policies.retry import RetryPolicy

__all__ = ["StepvisorBackend"]

_EXECUTORS: Final = ("process", "thread")
#: What Parallel passes to ``configure`` that has no meaning here (shared memory needs no folder).
_IGNORED: Final = frozenset({"temp_folder", "verbose", "context"})
_PARAMETERS: Final = "executor, timeout, retry, kill_grace, initializer and initargs"
_WRITABLE_MMAP_MODES: Final = frozenset({"c", "r+", "w+"})
#: Whether this stepvisor's ``Executor.shutdown`` stops running calls only when asked by name.
_STOP_BY_NAME: Final = "stop_running" in inspect.signature(Executor.shutdown).parameters


class StepvisorBackend(AutoBatchingMixin, ParallelBackendBase):  # type: ignore[misc]
    """The ``"stepvisor"`` joblib backend; see :mod:`stepvisor.joblib`.

    ``executor`` is ``"process"`` (the default) or ``"thread"``; without it,
    ``prefer="threads"`` and ``require="sharedmem"`` choose threads.
    ``timeout`` (seconds) and ``retry`` (a :class:`~stepvisor.RetryPolicy`)
    apply to every batch; ``kill_grace`` is how long a stopped process call
    has between SIGTERM and SIGKILL.
    """

    supports_retrieve_callback = True
    supports_inner_max_num_threads = True
    #: Asked for by ``require="sharedmem"``, such a Parallel call runs on threads.
    supports_sharedmem = True

    def __init__(
        self,
        nesting_level: int | None = None,
        inner_max_num_threads: int | None = None,
        *,
        executor: str | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        kill_grace: float | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        **unknown: Any,
    ) -> None:
        if unknown:
            raise InvalidSettingError(
                "the stepvisor joblib backend got unknown parameter(s) "
                f"{', '.join(sorted(unknown))}; it takes {_PARAMETERS}, e.g. "
                'parallel_config(backend="stepvisor", timeout=30)'
            )
        _init(initializer, initargs)  # checked now, made per Parallel call
        self._initializer = (initializer, initargs)
        super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads)
        self._given = _options(executor, timeout, retry, kill_grace)
        self.uses_threads = executor == "thread"
        self._executor: Executor | None = None
        self._bound: int | None = None
        self._mode = "process"
        self._parallel_timeout: float | None = None
        self._own_timeout: float | None = None
        self._max_nbytes: int | None = None
        self._writable = False
        self._threads: int | None = None
        self._init: Init | None = None
        self._settings: tuple[str, float | None, RetryPolicy | None, float | None] = (
            "process",
            None,
            None,
            None,
        )

    @property
    def _workers(self) -> Executor | None:
        """This Parallel call's Executor (joblib's own tests look for a pool under this name)."""
        return self._executor

    def __repr__(self) -> str:
        return f"<StepvisorBackend executor={self._mode!r} n_jobs={self._bound}>"

    # -- what joblib asks --------------------------------------------------------------

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        """``n_jobs`` as joblib's process backends read it, and 1 where they refuse to nest.

        Inside a stepvisor call (a batch, or any call), in a daemonic process, or
        below threads (a nested call from a thread other than the main one), a
        Parallel call on this backend would start n_jobs more workers for each
        of the outer ones; it runs sequentially instead, with the warning
        joblib's own backends give.
        """
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            return 1
        where = self._nested_where()
        if where is not None:
            if n_jobs != 1:
                warnings.warn(
                    f"stepvisor-backed parallel loops cannot be nested {where}, setting n_jobs=1",
                    stacklevel=3,
                )
            return 1
        if n_jobs < 0:
            return max(int(cpu_count()) + 1 + n_jobs, 1)
        return int(n_jobs)

    def _nested_where(self) -> str | None:
        """Where this call is nested, if it must not start workers of its own."""
        if CURRENT.get(None) is not None:
            return "inside a stepvisor call"
        if multiprocessing.current_process().daemon:
            return "in a daemonic process"
        if not (self.in_main_thread() or self.nesting_level == 0):
            return "below threads"
        return None

    def configure(
        self,
        n_jobs: int | None = 1,
        parallel: Any = None,
        prefer: str | None = None,
        require: str | None = None,
        **kwargs: Any,
    ) -> int:
        """Start (or reuse) the engine for ``n_jobs``; return the number of workers."""
        max_nbytes = kwargs.pop("max_nbytes", None)
        mmap_mode = kwargs.pop("mmap_mode", "r")
        init = _init(
            kwargs.pop("initializer", self._initializer[0]),
            kwargs.pop("initargs", self._initializer[1]),
        )
        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k not in _IGNORED}
        given = _options(**{**self._given, **overrides}) if overrides else self._given
        n_jobs = self.effective_n_jobs(n_jobs)
        parallel_timeout = getattr(parallel, "timeout", None)
        policy = (parallel_timeout, given["timeout"], given["retry"])
        if n_jobs == 1 and policy == (None, None, None):  # no policy to keep: as loky does
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        self._close_executor(stop=False)
        self.parallel = parallel
        executor = _executor_kind(given["executor"], prefer, require)
        if init is not None and executor == "thread":
            raise InvalidSettingError(
                "initializer= runs once in each worker process; with executor='thread' "
                "there is none: run the set-up in the calling thread instead"
            )
        self._init = init
        self._mode = executor
        self._parallel_timeout = parallel_timeout
        self._own_timeout = given["timeout"]
        self._max_nbytes = max_nbytes
        self._writable = mmap_mode in _WRITABLE_MMAP_MODES
        self._threads = self._thread_limit(n_jobs) if executor == "process" else None
        timeout = _earliest(given["timeout"], parallel_timeout)
        self._settings = (executor, timeout, given["retry"], given["kill_grace"])
        self._open(n_jobs)
        return n_jobs

    def _open(self, n_jobs: int) -> None:
        """Lease the engine of bound ``n_jobs``; this call's Executor on it."""
        executor, timeout, retry, kill_grace = self._settings
        engine = ENGINES.acquire(n_jobs)
        try:
            self._executor = Executor(
                engine=engine,
                executor=executor,
                timeout=timeout,
                retry=retry,
                kill_grace=kill_grace,
            )
        except BaseException:
            ENGINES.release(n_jobs)
            raise
        self._bound = n_jobs

    def submit(self, func: Callable[[], Any], callback: Callable[..., Any] | None = None) -> Any:
        """Run one batch; ``callback(future)`` once it has ended."""
        executor = self._executor
        if executor is None:
            raise RuntimeError(
                "this Parallel call's stepvisor executor was shut down; make a new Parallel call"
            )
        if self._mode == "process":
            batch = Batch(
                func, max_nbytes=self._max_nbytes, writable=self._writable, init=self._init
            )
            future = executor.submit(run_batch, batch, self._threads)
        else:
            future = executor.submit(func)
        if callback is not None:
            future.add_done_callback(callback)
        return future

    def retrieve_result_callback(self, out: Future[Any]) -> Any:
        """The batch's results, or its error as joblib raises it."""
        try:
            return out.result()
        except StepTimeoutError as exc:
            limit = self._parallel_timeout
            own = self._own_timeout
            if limit is not None and (own is None or limit <= own):
                raise multiprocessing.TimeoutError(
                    f"a batch of this Parallel call ran past timeout={limit:g} s and was "
                    "stopped; the other batches were stopped with it"
                ) from exc
            raise

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """Stop this call's batches (queued and running); the engine goes on."""
        bound = self._bound
        self._close_executor(stop=True)
        if ensure_ready and bound is not None:
            self._open(bound)  # the same warm engine: given back, leased again

    def terminate(self) -> None:
        """The Parallel call is over: its Executor goes, the engine stays warm for the next."""
        self._close_executor(stop=False)
        self.reset_batch_stats()

    # -- helpers ------------------------------------------------------------------------

    def _close_executor(self, *, stop: bool) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            if not stop:
                executor.shutdown(wait=True)
            elif _STOP_BY_NAME:  # (waits for the stopped calls to end, as loky's abort does)
                executor.shutdown(wait=True, cancel_futures=True, stop_running=True)  # type: ignore[call-arg, unused-ignore]
            else:
                executor.shutdown(wait=True, cancel_futures=True)
        if self._bound is not None:
            bound, self._bound = self._bound, None
            ENGINES.release(bound)

    def _thread_limit(self, n_jobs: int) -> int | None:
        """Threads per native pool in each child, as joblib's process backends set them."""
        if self.inner_max_num_threads is not None:
            return int(self.inner_max_num_threads)
        if any(name in os.environ for name in THREAD_VARS):
            return None  # the children inherit the user's own limits
        return max(int(cpu_count()) // n_jobs, 1)


def _options(
    executor: Any = None, timeout: Any = None, retry: Any = None, kill_grace: Any = None, **bad: Any
) -> dict[str, Any]:
    """The backend parameters, checked (the Executor's own checks, its errors)."""
    if bad:
        raise InvalidSettingError(
            f"Parallel got unknown stepvisor backend parameter(s) {', '.join(sorted(bad))}; "
            f"the stepvisor backend takes {_PARAMETERS}"
        )
    if executor is not None and executor not in _EXECUTORS:
        raise InvalidSettingError(
            f"the stepvisor joblib backend runs batches in processes or threads: "
            f"executor must be 'process' or 'thread', got {executor!r}"
        )
    opts = checked(timeout, retry, executor or "process")
    if kill_grace is not None:
        kill_grace = check_positive_seconds(kill_grace, what="kill_grace")
    return {
        "executor": executor,
        "timeout": opts.timeout,
        "retry": retry,
        "kill_grace": kill_grace,
    }


def _executor_kind(given: str | None, prefer: str | None, require: str | None) -> str:
    """Processes unless asked: by the backend's ``executor``, or joblib's hint or requirement."""
    if require == "sharedmem":
        return "thread"  # a requirement, not a hint: processes share no memory
    if given is not None:
        return given
    return "thread" if prefer == "threads" else "process"


def _init(initializer: Any, initargs: Any) -> Init | None:
    """joblib's worker initializer as a child runs it (once per child and configuration)."""
    if initializer is None:
        return None
    if not callable(initializer):
        raise InvalidSettingError(
            f"initializer must be callable, got {initializer!r}; pass the function, "
            "and its arguments as initargs=(...)"
        )
    return Init(uuid.uuid4().hex, initializer, tuple(initargs))


def _earliest(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)
