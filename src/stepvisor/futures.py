"""``stepvisor.Executor``: a ``concurrent.futures.Executor`` whose timeouts stop the work.

Code written against ``ThreadPoolExecutor`` or ``ProcessPoolExecutor`` keeps
working (``submit``, ``map``, ``wait``, ``as_completed``, ``with``), and each
call gets what a step gets: a timeout that stops it by its backend's means (a
process call's process group is killed), retries with backoff, a crash that
fails that call alone, and ``shutdown(stop_running=True)`` that stops what is
running.  What the standard library's pools do, it does too: every call
submitted finishes before the interpreter exits, ``shutdown(cancel_futures=True)``
cancels only the calls not yet started, and ``map`` checks ``chunksize`` as
they do::

    with sv.Executor(max_workers=4, executor="process") as ex:
        fut = ex.options(timeout=5, retry=sv.RetryPolicy(max_attempts=3)).submit(fn, x)
        fut.result()        # fn's value, or its exception, StepTimeoutError, WorkerCrashedError

How a call runs::

    submit(fn, *args) ── a one-step plan (cached per function and options)
                      ── HubCall ──▶ CallHub (actors/_hub.py), on the caller's thread:
                                      ├── a lease of the engine's pool, its Worker
                                      └── attempt 1 ──▶ the Worker runs Invoke(fn)(ctx)
    Worker thread: AttemptDone ──▶ CallHub: ok ──▶ the Future settles
                                   anything else ──▶ the call's RunMachine decides

Each call is a one-step run of the machine, so a deadline, retry, cancel and
crash mean exactly what they mean for a step.  What makes it cheap: settings
are resolved once per Executor, the one-step workflow is built once per
function and options (a call's arguments travel in its spec, not its plan),
a process call's function is pickled once, the hub has no thread (a message
is handled by the thread that brings it: two thread hand-offs per call, as in
``ThreadPoolExecutor``), and a call's machine is made only if its first
attempt does not simply succeed (what the machine does until then is the
same for every call: see :mod:`stepvisor.actors._call`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import secrets
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final, NamedTuple, cast

from stepvisor._calls import UNSET, Calls, Link, Options, Settled, checked, name_of, replaced
from stepvisor._invoke import ARGS, CURRENT, KWARGS, AsyncInvoke, Invoke
from stepvisor._validate import is_int
from stepvisor.actors.calls import CallHub, CancelAll, CancelCall, HubCall
from stepvisor.clock import RealClock
from stepvisor.config import resolve
from stepvisor.context import StepContext
from stepvisor.core.model import _is_coroutine_fn, check_max_parallel
from stepvisor.engine import Engine
from stepvisor.errors import (
    ExecutorShutdownError,
    InvalidMaxParallelError,
    InvalidSettingError,
    StepFunctionError,
    StepNotSerializableError,
)
from stepvisor.policies.retry import RetryPolicy

__all__ = ["CallOptions", "Executor"]

#: At most this many functions' pickles and plans are kept (a map uses one).
_CACHE_SIZE: Final = 256

#: The executors not closed yet, held until they are (as the standard library's
#: are, by their threads): one the program dropped with calls queued still
#: finishes them at exit, and its processes go with it.
_live: set[Executor] = set()
_exit_lock = threading.Lock()
#: Set once the interpreter has begun to exit: no call is taken after that.
_exiting = False


def _finish_at_exit() -> None:
    """Finish every call submitted before exit, then close the executors.

    Run by ``threading._register_atexit``, as the standard library's pools do:
    before the interpreter joins its threads and runs ``atexit``'s handlers,
    while a Worker and a process child still run.  From here on a submit
    raises the standard library's ``RuntimeError``.
    """
    global _exiting  # noqa: PLW0603 - the interpreter's one exit
    with _exit_lock:
        _exiting = True
        executors = list(_live)
    for executor in executors:
        executor._exit()


def _register_exit_hook() -> None:
    register = getattr(threading, "_register_atexit", None)
    if register is None:  # pragma: no cover - CPython has it from 3.9
        import atexit  # noqa: PLC0415

        atexit.register(_finish_at_exit)
    else:
        register(_finish_at_exit)


_register_exit_hook()


class _Last(NamedTuple):
    """What the last call's function and options came to (weak: the function may go)."""

    fn: weakref.ReferenceType[Any]
    opts: Options
    invoke_type: type[Invoke]
    calls: Calls
    payload: bytes | None


def _check_tasks_per_child(value: int | None) -> None:
    if value is None:
        return
    if not is_int(value):
        raise InvalidSettingError(f"max_tasks_per_child must be an integer, got {value!r}")
    if value < 1:
        raise InvalidSettingError(
            f"max_tasks_per_child must be >= 1, got {value}; give how many calls a "
            "process child runs before it is replaced, or None: never"
        )


class Executor(concurrent.futures.Executor):
    """A ``concurrent.futures.Executor`` on a warm stepvisor engine; see the module docstring.

    ``max_workers`` bounds the calls running at once (the engine's bound;
    default: the configured ``max_parallel``).  ``executor`` (``"thread"``,
    ``"process"``, ``"async"`` or ``"ray"``), ``timeout`` (seconds per
    attempt) and ``retry`` (a :class:`~stepvisor.RetryPolicy`; default: no
    retries) are the defaults of every call; :meth:`options` changes them for
    some calls.  ``engine=`` runs the calls on an engine you own and close.
    ``max_tasks_per_child`` (process calls), as ``ProcessPoolExecutor``'s:
    a child process runs that many calls, then a fresh one takes its place.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        executor: str = "thread",
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        kill_grace: float | None = None,
        ray_address: str | None = None,
        engine: Engine | None = None,
        max_tasks_per_child: int | None = None,
    ) -> None:
        if max_workers is not None:
            if is_int(max_workers) and max_workers <= 0:
                raise InvalidMaxParallelError(
                    f"max_workers must be greater than 0, got {max_workers}; give the number "
                    "of calls to run at once, such as max_workers=4, or None for the default"
                )
            check_max_parallel(max_workers, what="max_workers")
            if engine is not None:
                raise InvalidSettingError(
                    "give max_workers= or engine=, not both: the calls share the engine's "
                    "bound (sv.Engine(max_parallel=...))"
                )
        _check_tasks_per_child(max_tasks_per_child)
        self._defaults = checked(timeout, retry, executor)
        self._cfg = Settled.of(
            resolve(
                None,
                {"max_parallel": max_workers, "kill_grace": kill_grace, "ray_address": ray_address},
            )
        )
        self._seed = self._cfg.seed if self._cfg.seed is not None else secrets.randbits(32)
        self._owns_engine = engine is None
        self._engine = engine or Engine(
            max_parallel=self._cfg.max_parallel, ray_address=self._cfg.ray_address
        )
        self._max_workers = self._engine.max_parallel
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._seq = 0
        self._outstanding = 0
        #: Made once: a bound method per call is one more object for the cyclic GC.
        self._ended = self._call_ended
        self._shutdown = False
        self._closed = threading.Event()
        self._connected: set[str] = set()
        self._plans: dict[tuple[Any, ...], Calls] = {}
        # Weak: an executor must not keep a call's function alive after the call.
        self._payloads: weakref.WeakKeyDictionary[Any, bytes] = weakref.WeakKeyDictionary()
        self._last: _Last | None = None
        try:
            self._connect(self._defaults.executor)
        except BaseException:
            if self._owns_engine:
                self._engine.close()
            raise
        self._hub = CallHub(
            pool=self._engine.pool,
            clock=RealClock(),
            exclusive=self._owns_engine,
            child_calls=max_tasks_per_child,
        )
        with _exit_lock:
            _live.add(self)  # made once the exit began, it only refuses calls (as the stdlib's)

    def __repr__(self) -> str:
        state = "shut down" if self._shutdown else f"{self._outstanding} calls"
        return (
            f"<stepvisor.Executor max_workers={self._max_workers} "
            f"executor={self._defaults.executor!r} {state}>"
        )

    @staticmethod
    def context() -> StepContext:
        """The context of the call running in this thread, task or process.

        A call is a plain function with no ``ctx`` argument; one that runs long
        can still see a timeout or a cancel coming (``Executor.context().cancelled``,
        ``.remaining()``) and stop in time: a thread call cannot be stopped from
        outside, and one that ignores a stop is abandoned after the grace period.
        Raises ``LookupError`` outside a call.
        """
        try:
            return CURRENT.get()
        except LookupError:
            raise LookupError(
                "Executor.context() is only available inside a call run by a stepvisor.Executor"
            ) from None

    @property
    def max_workers(self) -> int:
        """The most calls running at once."""
        return self._max_workers

    # -- submitting --------------------------------------------------------------------

    def submit(
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Any]:
        """Schedule ``fn(*args, **kwargs)``; return a Future of its value."""
        return self._submit(self._defaults, fn, args, kwargs)

    def options(
        self,
        *,
        timeout: float | None = UNSET,
        retry: RetryPolicy | None = UNSET,
        executor: str = UNSET,
    ) -> CallOptions:
        """A view of this executor whose calls use these options (the rest as they are).

        ``ex.options(timeout=5).submit(fn, x)``: the options never mix with
        ``fn``'s own keyword arguments.  ``timeout=None`` means no timeout.
        """
        return CallOptions(self, replaced(self._defaults, timeout, retry, executor))

    def _submit(
        self, opts: Options, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> concurrent.futures.Future[Any]:
        if not callable(fn):
            raise StepFunctionError(
                f"submit() needs a callable, got {fn!r} ({type(fn).__name__}); pass the "
                "function and its arguments apart: submit(fn, x), not submit(fn(x))"
            )
        future = CallFuture()
        last = self._last
        if last is not None and last.opts is opts and last.fn() is fn:
            # The same function as the last call (a loop of submits, a map).
            invoke = last.invoke_type(fn)
            calls, payload = last.calls, last.payload
        else:
            invoke = AsyncInvoke(fn) if _is_coroutine_fn(fn) else Invoke(fn)
            calls = self._calls_for(invoke, opts)
            payload = None
            if calls.executors[0] in ("process", "ray"):
                try:
                    payload = self._payload(calls, invoke)
                except StepNotSerializableError as exc:  # as ProcessPoolExecutor: in the future
                    future.set_exception(exc)
                    return future
            with contextlib.suppress(TypeError):  # a callable that takes no weak reference
                self._last = _Last(weakref.ref(fn), opts, type(invoke), calls, payload)
        executor = calls.executors[0]
        with self._lock:
            if _exiting:  # the standard library's error, word for word: code checks for it
                raise RuntimeError("cannot schedule new futures after interpreter shutdown")
            if self._shutdown:
                raise ExecutorShutdownError(
                    "cannot schedule new futures after shutdown(); submit before shutting "
                    "the executor down, or make a new one"
                )
            self._seq += 1
            self._outstanding += 1
            seq = self._seq
        key = str(seq)
        if executor not in self._connected:
            self._connect(executor)
        params = {ARGS: args, KWARGS: kwargs}
        call = HubCall(
            key,
            plan=calls,
            seed=(self._seed + seq) & 0xFFFFFFFF,
            executor=executor,
            fn=invoke,
            fn_payload=payload,
            params=params,
            link=Link(future, invoke, params, ended=self._ended),
        )
        future.sv_tell, future.sv_key = self._hub.tell, key
        self._hub.tell(call)  # (CallHub.submit, without its frame)
        return future

    def _calls_for(self, invoke: Invoke, opts: Options) -> Calls:
        key = (name_of(invoke.fn), type(invoke), opts)
        try:
            calls = self._plans.get(key)
        except TypeError:  # an option that cannot be hashed: no sharing
            return Calls(invoke, opts, self._cfg)
        if calls is None:
            calls = Calls(invoke, opts, self._cfg)
            if len(self._plans) >= _CACHE_SIZE:
                self._plans.clear()
            self._plans[key] = calls
        return calls

    def _payload(self, calls: Calls, invoke: Invoke) -> bytes:
        from stepvisor.backends.process import prepare_payload  # noqa: PLC0415 - process only

        fn = invoke.fn
        try:
            payload = self._payloads.get(fn)
        except TypeError:  # an unhashable callable: pickled every time
            return prepare_payload(calls.workflow.steps[0].id, invoke)
        if payload is None:
            payload = prepare_payload(calls.workflow.steps[0].id, invoke)
            with contextlib.suppress(TypeError):  # a callable that takes no weak reference
                self._payloads[fn] = payload
        return payload

    def _connect(self, executor: str) -> None:
        """Start what ``executor``'s calls need (the loop, Ray) before the first one runs."""
        self._engine.backends.connect((executor,))
        self._connected.add(executor)

    # -- shutting down ------------------------------------------------------------------

    def shutdown(
        self, wait: bool = True, *, cancel_futures: bool = False, stop_running: bool = False
    ) -> None:
        """Refuse new calls; free the workers once every call has ended.

        As the standard library's: ``cancel_futures=True`` cancels the calls
        that have not started (their futures are cancelled) and lets the
        running ones finish.  ``stop_running=True`` stops the running calls
        by their backend's means, as a timeout does (a process call's group is
        killed; a thread call is told through its context and abandoned after
        the grace period if it ignores it); their futures raise
        ``StepCancelledError``.  Give both to stop everything at once.
        ``wait=True`` returns once every call has ended and every worker,
        process and thread of the executor is gone.
        """
        with self._lock:
            first = not self._shutdown
            self._shutdown = True
        if cancel_futures or stop_running:
            reason = (
                "the executor was shut down with stop_running=True"
                if stop_running
                else "the executor was shut down with cancel_futures=True"
            )
            self._hub.tell(CancelAll(reason, queued=cancel_futures, running=stop_running))
        if first:
            if wait:
                self._close()
            else:
                threading.Thread(target=self._close, name="stepvisor-executor-close").start()
        if wait:
            self._closed.wait()

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[Any]:
        """``concurrent.futures.Executor.map``: every call submitted now, results in order.

        ``chunksize`` is checked as the standard library checks it (process
        and Ray calls: at least 1; thread calls: not at all) and otherwise
        unused: each call travels alone (a no-op process call costs tens of
        microseconds, see the benchmarks).
        """
        return _map(self, self._defaults, fn, iterables, timeout=timeout, chunksize=chunksize)

    def _exit(self) -> None:
        """The interpreter exits: finish every call, then close (see :func:`_finish_at_exit`)."""
        with self._lock:
            first = not self._shutdown
            self._shutdown = True
        if first:
            self._close()
        else:
            self._closed.wait()

    def _call_ended(self) -> None:
        with self._lock:  # the lock of self._idle
            self._outstanding -= 1
            # Only _close waits on it, once _shutdown is set (under this lock).
            if self._outstanding == 0 and self._shutdown:
                self._idle.notify_all()

    def _close(self) -> None:
        try:
            with self._idle:
                while self._outstanding:
                    self._idle.wait()
            self._hub.close()
            if self._owns_engine:
                self._engine.close()
        finally:
            self._closed.set()
            with _exit_lock:
                _live.discard(self)


class CallFuture(concurrent.futures.Future[Any]):
    """A standard Future whose ``cancel()`` also stops its call.

    Cancelling a call must reach the hub (a queued call is dropped, a running
    one stopped); a done-callback would do, but it would run, and take the
    future's lock, for every call that is not cancelled too.
    """

    sv_tell: Callable[[Any], None] | None = None
    sv_key = ""

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        if self.sv_tell is not None:
            self.sv_tell(CancelCall(self.sv_key, "its future was cancelled"))
        return True


class CallOptions:
    """Calls with options: ``ex.options(timeout=5).submit(fn, x)``; see :meth:`Executor.options`."""

    __slots__ = ("_executor", "_opts")

    def __init__(self, executor: Executor, opts: Options) -> None:
        self._executor = executor
        self._opts = opts

    def __repr__(self) -> str:
        o = self._opts
        return f"<stepvisor.CallOptions timeout={o.timeout} executor={o.executor!r}>"

    def submit(
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Any]:
        """``Executor.submit`` with these options."""
        return self._executor._submit(self._opts, fn, args, kwargs)

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[Any]:
        """``Executor.map`` with these options."""
        return _map(self, self._opts, fn, iterables, timeout=timeout, chunksize=chunksize)

    def options(self, **changes: Any) -> CallOptions:
        """These options, some changed (the keywords of :meth:`Executor.options`)."""
        unknown = set(changes) - set(Options._fields)
        if unknown:
            raise TypeError(
                f"options() got unexpected keyword(s) {', '.join(sorted(unknown))}; "
                f"it takes {', '.join(Options._fields)}"
            )
        merged = {name: changes.get(name, UNSET) for name in Options._fields}
        return CallOptions(self._executor, replaced(self._opts, **merged))


def _map(
    submitter: Executor | CallOptions,
    opts: Options,
    fn: Callable[..., Any],
    iterables: tuple[Iterable[Any], ...],
    *,
    timeout: float | None,
    chunksize: int,
) -> Iterator[Any]:
    # ProcessPoolExecutor.map refuses a chunksize below 1 (ValueError, at the
    # call); ThreadPoolExecutor.map takes any.  A process or Ray call is the
    # former's kind; an async one the latter's.
    if opts.executor in ("process", "ray") and chunksize < 1:
        raise ValueError("chunksize must be >= 1.")
    as_executor = cast("concurrent.futures.Executor", submitter)
    return concurrent.futures.Executor.map(
        as_executor, fn, *iterables, timeout=timeout, chunksize=chunksize
    )
