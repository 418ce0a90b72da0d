"""The Ray backend: one attempt is one Ray task, and every decision stays with the engine.

A Ray step runs on a Ray cluster (a local instance started for the run, or one
named by ``ray_address``) with the same semantics as a process step: the
Supervisor decides deadlines, retries, cancellation, fencing and the order in
which outcomes fold into state; this backend only runs one attempt and says how
it ended::

    Worker thread: RayBackend.run(spec, control)          a Ray worker process
      args: inputs of Ray steps as refs to their results  _attempt_task((meta, fn, params,
            (the worker fetches them from the store);               inline, picks), *sources)
            large driver values put once and shared;        resolve the inputs, build the
            small ones inline                               StepContext, call fn (asyncio.run
      submit: .options(num_cpus, num_gpus, resources,       if async), check outputs can travel
               max_retries=0, retry_exceptions=False) ──▶
      ray.get(ref): done, deadline or cancel  ◀──────────  ("ok", outputs) | ("error", ...)
    Supervisor thread: control.cancel(reason)
      canceller: ray.cancel(ref, force=True)  ──────────▶  the worker process is killed

Why it is built this way:

* **Ray never retries.**  Each attempt is one task with ``max_retries=0`` and
  ``retry_exceptions=False``, so stepvisor's retry policy sees, decides and
  records every attempt, exactly as on threads and processes.
* **The step's exception is caught in the task**, with the same code the other
  backends use (:func:`~stepvisor.backends.thread.call_step`), then pickled
  there and checked to survive the trip; it comes back as itself with the
  remote traceback text, or as :class:`RemoteStepError` when it cannot.  So a
  Ray-level error (``ray.get`` raising) always means the infrastructure failed:
  the worker or its node died (``crash``, :class:`WorkerCrashedError`, retried
  according to ``retry_crashes``), or a value could not be loaded.
* **A stop is a kill.**  ``ray.cancel(force=True)`` kills the worker process
  running the task (Ray starts another), so a step that never looks at its
  context still stops at its deadline.  The task cannot see ``ctx.cancelled``
  turn true; ``ctx.remaining()`` works (the deadline travels as wall time and
  becomes the worker's own monotonic deadline).
* **Artifacts move without the driver where Ray allows it.**  The driver does
  get every output value once (the engine keeps values: the store, the final
  ``RunResult`` and thread or process consumers need them), but it also
  remembers, by object identity, which Ray result each value came from; a later
  Ray step that needs the value gets a reference to that result as a top-level
  task argument, which its worker fetches straight from the object store.  A
  large value made outside Ray (a thread step's output, a restored artifact) is
  put into the object store once and the reference is shared by every Ray step
  that needs it.  Nothing the engine sees is ever a reference, so no engine
  code knows about Ray.
* **Ray is imported only when a Ray step runs**, and started only then; a
  Ray instance stepvisor started is shut down when the last run using it ends,
  and one the program started itself (``ray.is_initialized()``) is reused and
  left running.

``run`` never raises; ``connect`` raises :class:`BackendUnavailableError` when
Ray is not installed or the cluster cannot be reached, before any step runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import logging
import os
import pickle
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import cloudpickle

from stepvisor._log import log as _root_log
from stepvisor.backends.base import AttemptResult, AttemptSpec, stop_error
from stepvisor.backends.thread import call_step, format_error
from stepvisor.context import AttemptControl
from stepvisor.errors import (
    BackendUnavailableError,
    RemoteStepError,
    StepNotSerializableError,
    WorkerCrashedError,
)

__all__ = [
    "CONNECT_TIMEOUT_S",
    "SHARE_THRESHOLD",
    "RayBackend",
    "RayTransfers",
    "check_reachable",
    "task_options",
]

log = _root_log.getChild(__name__.removeprefix("stepvisor."))

#: How long ``connect`` waits for a cluster address to accept a connection.
CONNECT_TIMEOUT_S: Final = 5.0
#: Pickled size (bytes) from which a driver-side value is put into the object
#: store once and shared, rather than sent inside each task's arguments (Ray
#: itself inlines arguments below 100 KiB).
SHARE_THRESHOLD: Final = 100 * 1024
#: The oldest Ray this backend is tested against.
MIN_RAY: Final = (2, 9)
#: The longest a Worker thread blocks in one ``ray.get``; it then looks again
#: at the deadline, a cancel, and whether the backend was closed.
_WAIT_SLICE_S: Final = 0.5
#: The backend's own deadline fires this long after the Supervisor's, so the
#: Supervisor (which records *why* an attempt stopped) normally acts first; it
#: only matters when the engine's clock is not real time.
_SAFETY_MARGIN_S: Final = 0.1
#: After a cancel, how much longer than ``kill_grace`` to wait for Ray to confirm
#: it (kept below the Supervisor's own margin, so the Worker reports before it
#: would be abandoned).
_CONFIRM_MARGIN_S: Final = 1.0
#: Values that are cheaper to send again than to fetch through a reference.
_ATOMS: Final = (type(None), bool, int, float, complex)
_SMALL_TEXT: Final = 4096
#: Types whose values always pickle, checked by exact type.
_PLAIN_TYPES: Final = frozenset({bytes, bytearray, str, int, float, bool, complex, type(None)})
_STOPPED_NOTE: Final = "its Ray task was force-cancelled (worker process killed)"
_PIP_HINT: Final = "pip install 'stepvisor[ray]'"

#: Ray exceptions that mean "the process or node running the attempt died".
_CRASH_ERRORS: Final = (
    "WorkerCrashedError",
    "NodeDiedError",
    "LocalRayletDiedError",
    "RayActorError",
    "OutOfMemoryError",
    "ObjectLostError",  # with OwnerDiedError, ObjectReconstructionFailedError, ...
    "ObjectStoreFullError",
    "OutOfDiskError",
)


# -- importing and connecting ----------------------------------------------------------


def _import_ray() -> Any:
    """The ``ray`` module, or a :class:`BackendUnavailableError` saying how to get it."""
    try:
        ray = importlib.import_module("ray")
    except ImportError as exc:
        raise BackendUnavailableError(
            f"a step uses executor='ray', but Ray cannot be imported here ({exc}); "
            f"install it with {_PIP_HINT}, or run the step with executor='process'"
        ) from exc
    version = _version_tuple(getattr(ray, "__version__", ""))
    if version is not None and version < MIN_RAY:
        wanted = ".".join(map(str, MIN_RAY))
        raise BackendUnavailableError(
            f"stepvisor needs Ray >= {wanted}, but Ray {ray.__version__} is installed; "
            f"upgrade it with {_PIP_HINT}"
        )
    return ray


def _version_tuple(text: str) -> tuple[int, int] | None:
    parts = text.split(".")
    if len(parts) < 2 or not (parts[0].isdigit() and parts[1].isdigit()):
        return None
    return int(parts[0]), int(parts[1])


def _host_port(address: str) -> tuple[str, int] | None:
    """Where ``address`` (``host:port`` or ``ray://host:port``) listens; ``None`` if unknown."""
    rest = address.strip()
    if "://" in rest:
        scheme, _, rest = rest.partition("://")
        if scheme != "ray":
            return None
    rest = rest.split("/", 1)[0]
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def check_reachable(address: str, *, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise :class:`BackendUnavailableError` unless ``address`` accepts a TCP connection.

    Done before ``ray.init``, which can wait a long time for a cluster that
    is not there.  Addresses without a host and port (``auto``) are left to Ray.
    """
    where = _host_port(address)
    if where is None:
        return
    try:
        with socket.create_connection(where, timeout=timeout):
            pass
    except OSError as exc:
        raise BackendUnavailableError(
            f"cannot reach the Ray cluster at {address!r} ({type(exc).__name__}: {exc}; "
            f"waited up to {timeout:g} s): check that it is running (`ray status "
            f"--address {address}`) and reachable from here, fix ray_address / "
            "STEPVISOR_RAY_ADDRESS, or leave both unset to run on a local Ray instance"
        ) from exc


class _Session:
    """This process's use of Ray: who called ``ray.init``, and how many backends use it.

    Two runs may use Ray at once; the Ray instance stepvisor started must stay
    up until the last of them closes, and one the program started must never be
    shut down by stepvisor.
    """

    lock = threading.Lock()
    users = 0
    owned = False

    @classmethod
    def acquire(cls, ray: Any, *, address: str | None, timeout: float) -> None:
        with cls.lock:
            if ray.is_initialized():
                if cls.users == 0:
                    cls.owned = False
                if address is not None and not cls.owned:
                    log.info("Ray is already initialized here; ray_address %r is not used", address)
            else:
                _init(ray, address=address, timeout=timeout)
                cls.owned = True
            cls.users += 1

    @classmethod
    def release(cls, ray: Any) -> None:
        with cls.lock:
            cls.users = max(0, cls.users - 1)
            if cls.users or not cls.owned:
                return
            cls.owned = False
            if ray.is_initialized():
                ray.shutdown()


def _init(ray: Any, *, address: str | None, timeout: float) -> None:
    if address is None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        what = "could not start a local Ray instance"
        kwargs: dict[str, Any] = {"include_dashboard": False}
    else:
        check_reachable(address, timeout=timeout)
        what = f"could not connect to the Ray cluster at {address!r}"
        kwargs = {"address": address}
    try:
        ray.init(logging_level=logging.WARNING, **kwargs)
    except Exception as exc:
        if ray.is_initialized():
            with contextlib.suppress(Exception):
                ray.shutdown()
        raise BackendUnavailableError(
            f"{what} ({type(exc).__name__}: {exc}); check it with `ray status`, or set "
            "ray_address / STEPVISOR_RAY_ADDRESS to a running cluster"
        ) from exc


# -- task options ------------------------------------------------------------------------


def task_options(resources: Mapping[str, float] | None) -> dict[str, Any]:
    """Ray task options for one attempt of a step asking for ``resources``.

    ``CPU``, ``GPU`` and ``memory`` (bytes) map onto ``num_cpus``, ``num_gpus``
    and ``memory``; every other key is a custom resource (a zero amount asks for
    nothing).  Without ``CPU`` a step asks for one CPU.  Ray's own retries are
    always off: the engine retries.
    """
    options: dict[str, Any] = {"num_cpus": 1, "max_retries": 0, "retry_exceptions": False}
    custom: dict[str, float] = {}
    for key, amount in (resources or {}).items():
        if key == "CPU":
            options["num_cpus"] = amount
        elif key == "GPU":
            options["num_gpus"] = amount
        elif key == "memory":
            options["memory"] = amount
        elif amount:
            custom[key] = amount
    if custom:
        options["resources"] = custom
    return options


# -- in the Ray worker ------------------------------------------------------------------


def _attempt_task(packed: tuple[Any, ...], *sources: Any) -> tuple[Any, ...]:
    """Run one attempt in a Ray worker; the reply is a tuple of plain values.

    ``packed`` is ``(meta, fn, params, inline, picks)`` in one argument (each
    argument costs Ray a serialization).  ``sources`` are resolved by Ray before
    this runs: each is either the reply of a Ray step (``("ok", outputs)``) or a
    value the driver put; ``picks`` says which input comes from which (``key`` is
    the artifact's name in a reply, or ``None`` for a put value).  ``fn`` is the
    pickled function, or the index of the source that holds it when it is large.
    """
    meta, fn_arg, params, inline, picks = packed
    run_id, step_id, attempt, max_attempts, wall_deadline, is_async = meta
    deadline = None
    if wall_deadline is not None:
        deadline = time.monotonic() + (wall_deadline - time.time())
    try:
        fn = cloudpickle.loads(sources[fn_arg] if isinstance(fn_arg, int) else fn_arg)
    except BaseException as exc:
        return (
            "unsendable",
            f"step {step_id!r}: its function could not be loaded in the Ray worker "
            f"({type(exc).__name__}: {exc}); make the module that defines it importable on "
            "every node (install it there, or pass runtime_env={'py_modules': [...]} or "
            "{'working_dir': ...} to ray.init), or define the function in the script you run",
            format_error(exc),
        )
    inputs = dict(inline)
    for name, index, key in picks:
        source = sources[index]
        inputs[name] = source if key is None else source[1][key]
    spec = AttemptSpec(
        run_id=run_id,
        step_id=step_id,
        attempt=attempt,
        max_attempts=max_attempts,
        fn=functools.partial(_run_coroutine, fn) if is_async else fn,
        is_async=False,
        inputs=inputs,
        params=params,
        deadline=deadline,
    )
    result = call_step(spec, None)
    if result.kind == "ok":
        return _ok_reply(step_id, result.outputs or {})
    return _error_reply(result.error, result.traceback)


def _run_coroutine(fn: Callable[[Any], Any], ctx: Any) -> Any:
    return asyncio.run(fn(ctx))


def _ok_reply(step_id: str, outputs: Mapping[str, Any]) -> tuple[Any, ...]:
    """``("ok", outputs)``, once the outputs are known to pickle.

    Checked here because a return value Ray cannot serialize takes the worker
    down with it.  Values that surely pickle (plain bytes and text, numbers,
    NumPy arrays of plain numbers) are not pickled twice, and buffers of the
    rest are left out of band, so the check does not copy large data.
    """
    if not outputs:
        return ("ok", {})
    unsure = {k: v for k, v in outputs.items() if not _surely_picklable(v)}
    if unsure:
        try:
            cloudpickle.dumps(unsure, protocol=5, buffer_callback=_discard)
        except Exception as exc:
            return ("unsendable", _unpicklable_output(step_id, unsure, exc), format_error(exc))
    return ("ok", dict(outputs))


def _surely_picklable(value: object) -> bool:
    cls = type(value)
    if cls in _PLAIN_TYPES:  # exact types: a subclass may add what does not pickle
        return True
    if cls.__name__ != "ndarray" or cls.__module__ != "numpy":
        return False
    dtype = getattr(value, "dtype", None)
    return dtype is not None and not dtype.hasobject


def _discard(_: object) -> None:
    """A pickle buffer callback: leave buffers out of band, uncopied."""


def _unpicklable_output(step_id: str, outputs: Mapping[str, Any], exc: Exception) -> str:
    from stepvisor.backends.process import check_sendable  # noqa: PLC0415 - failure path only

    for name, value in outputs.items():
        try:
            check_sendable(step_id, f"artifact {name!r}", value)
        except StepNotSerializableError as found:
            return f"{found} (it was returned from a Ray worker)"
    return (
        f"step {step_id!r} returned artifacts that cannot be sent back from its Ray worker "
        f"({type(exc).__name__}: {exc}); return plain, picklable data"
    )


def _error_reply(error: BaseException | None, text: str | None) -> tuple[Any, ...]:
    if error is None:
        error = RuntimeError("the step failed without an exception")
    cls = type(error)
    qualname = f"{cls.__module__}.{cls.__qualname__}"
    blob: bytes | None = None
    why_not = ""
    try:
        blob = bytes(cloudpickle.dumps(error))
        pickle.loads(blob)  # noqa: S301 - our own bytes: can the class be rebuilt from them?
    except Exception as exc:
        blob, why_not = None, f"{type(exc).__name__}: {exc}"
    where = f"pid {os.getpid()}"
    with contextlib.suppress(Exception):
        ray = importlib.import_module("ray")
        where += f" on node {ray.util.get_node_ip_address()}"
    return ("error", qualname, str(error), text or "", blob, why_not, where)


# -- in the driver: bookkeeping ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RayTransfers:
    """How a backend has sent the inputs of its Ray tasks so far.

    ``refs_passed``: inputs sent as a reference to a Ray step's result (the
    worker fetches them from the object store); ``values_put``: driver-side
    values put into the object store, once each; ``values_reused``: inputs sent
    as a reference to a value put earlier; ``values_inlined``: small inputs sent
    inside the task's arguments.
    """

    refs_passed: int = 0
    values_put: int = 0
    values_reused: int = 0
    values_inlined: int = 0


@dataclass(frozen=True, slots=True)
class _Held:
    """A value the driver holds, and the object-store reference that carries it.

    ``value`` is kept so its ``id`` cannot be reused while the entry lives.
    ``key`` is the artifact's name in a Ray step's reply, or ``None`` when
    ``ref`` is the value itself (put by the driver); a ``ref`` of ``None``
    means "small: send it inline".
    """

    value: Any
    ref: Any
    key: str | None


@dataclass(frozen=True, slots=True)
class _Ended:
    """How waiting for a task ended: its reply, what ``ray.get`` raised, or no answer."""

    reply: Any = None
    raised: Exception | None = None
    confirmed: bool = True


def _is_atom(value: object) -> bool:
    if isinstance(value, _ATOMS):
        return True
    return isinstance(value, str | bytes) and len(value) < _SMALL_TEXT


def _pickled_size(step_id: str, name: str, value: object) -> int:
    """Bytes ``value`` takes pickled (buffers counted, not copied); names what fails."""
    sizes: list[int] = []

    def count(buffer: pickle.PickleBuffer) -> None:
        sizes.append(memoryview(buffer).nbytes)

    try:
        data = cloudpickle.dumps(value, protocol=5, buffer_callback=count)
    except Exception as exc:
        from stepvisor.backends.process import check_sendable  # noqa: PLC0415

        check_sendable(step_id, f"inputs[{name!r}]", value)
        raise StepNotSerializableError(
            f"step {step_id!r}: inputs[{name!r}] cannot be sent to a Ray worker "
            f"({type(exc).__name__}: {exc}); pass plain, picklable data",
            step_id=step_id,
        ) from exc
    return len(data) + sum(sizes)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# -- the backend ------------------------------------------------------------------------


class RayBackend:
    """Runs attempts as Ray tasks, for every Ray step of one run.

    Made with :meth:`connect`; ``run`` may be called from several Worker
    threads at once and never raises; ``close`` cancels what is still running,
    drops this run's object-store references and, if stepvisor started Ray and
    no other run uses it, shuts Ray down.
    """

    def __init__(self, ray: Any) -> None:
        self._ray = ray
        self._task = ray.remote(_attempt_task)
        self._lock = threading.Lock()
        self._closed = False
        self._inflight: set[Any] = set()
        self._remotes: dict[tuple[tuple[str, float], ...], Any] = {}
        #: id(value) -> where that value is in the object store (see ``_Held``).
        self._origins: dict[int, _Held] = {}
        self._shared: dict[int, _Held] = {}
        self._counts = {"refs_passed": 0, "values_put": 0, "values_reused": 0, "values_inlined": 0}
        self._crash_types = tuple(
            t for name in _CRASH_ERRORS if (t := getattr(ray.exceptions, name, None)) is not None
        )

    @classmethod
    def connect(
        cls, *, address: str | None, connect_timeout: float = CONNECT_TIMEOUT_S
    ) -> RayBackend:
        """Import Ray and make sure it is up: reuse, connect to ``address``, or start one.

        Raises :class:`BackendUnavailableError` if Ray is not installed, the
        address does not answer within ``connect_timeout`` seconds, or Ray
        cannot be started.
        """
        ray = _import_ray()
        _Session.acquire(ray, address=address, timeout=connect_timeout)
        try:
            return cls(ray)
        except BaseException:
            _Session.release(ray)
            raise

    @property
    def transfers(self) -> RayTransfers:
        """How inputs were sent so far (a snapshot)."""
        with self._lock:
            return RayTransfers(**self._counts)

    def close(self) -> None:
        """Cancel attempts still running, drop references, release Ray.  Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            inflight = list(self._inflight)
            self._origins.clear()
            self._shared.clear()
        for ref in inflight:
            self._cancel(ref)
        _Session.release(self._ray)

    def run(self, spec: AttemptSpec, control: AttemptControl) -> AttemptResult:
        """Run one attempt as a Ray task; block until it ends; return how it ended."""
        try:
            return self._run(spec, control)
        except Exception as exc:
            log.exception("the Ray backend failed running step %r", spec.step_id)
            error = WorkerCrashedError(
                f"the Ray backend failed while running step {spec.step_id!r} "
                f"({type(exc).__name__}: {exc}); if the Ray cluster is up, please report "
                "this as a stepvisor bug",
                step_id=spec.step_id,
                attempt=spec.attempt,
            )
            error.__cause__ = exc
            return AttemptResult(kind="crash", error=error, traceback=format_error(exc))

    # -- one attempt --

    def _run(self, spec: AttemptSpec, control: AttemptControl) -> AttemptResult:
        late = spec.deadline is not None and time.monotonic() >= spec.deadline
        if late and not control.is_cancelled:
            control.cancel("timeout")
        if self._closed or control.is_cancelled:
            how = "stopped before it started; no Ray task was submitted"
            return AttemptResult(
                kind="cancelled",
                error=stop_error(spec, control.reason, how),
                note=how,
                extra={"reason": control.reason},
            )
        try:
            args = self._task_args(spec)
        except StepNotSerializableError as exc:
            exc.attempt = spec.attempt
            return AttemptResult(kind="unsendable", error=exc, note="nothing was sent")
        submitted = self._submit(spec, args)
        if isinstance(submitted, AttemptResult):
            return submitted
        ref = submitted
        with self._lock:
            self._inflight.add(ref)
        try:
            control.on_cancel(functools.partial(self._cancel, ref))
            return self._outcome(spec, control, ref, sources=args[1:])
        finally:
            with self._lock:
                self._inflight.discard(ref)

    def _submit(self, spec: AttemptSpec, args: tuple[Any, ...]) -> Any:
        """The attempt's ObjectRef, or an AttemptResult saying why it was not submitted."""
        try:
            remote = self._remote(spec)
        except (TypeError, ValueError) as exc:
            error = StepNotSerializableError(
                f"step {spec.step_id!r}: Ray does not accept its resources "
                f"{dict(spec.resources or {})!r} ({exc}); use numbers >= 0, 'CPU', 'GPU', "
                "'memory' (bytes) or the name of a custom resource of your cluster",
                step_id=spec.step_id,
                attempt=spec.attempt,
            )
            return AttemptResult(kind="unsendable", error=error, note="nothing was sent")
        try:
            return remote.remote(*args)
        except Exception as exc:
            return self._submit_failed(spec, exc)

    def _submit_failed(self, spec: AttemptSpec, exc: Exception) -> AttemptResult:
        from stepvisor.backends.process import check_sendable  # noqa: PLC0415

        try:
            for key, value in spec.params.items():
                check_sendable(spec.step_id, f"params[{key!r}]", value)
        except StepNotSerializableError as found:
            found.attempt = spec.attempt
            found.__cause__ = exc
            return AttemptResult(kind="unsendable", error=found, note="nothing was sent")
        error = WorkerCrashedError(
            f"could not submit step {spec.step_id!r} to Ray ({type(exc).__name__}: {exc}); "
            "check that the Ray cluster is still up (`ray status`)",
            step_id=spec.step_id,
            attempt=spec.attempt,
        )
        error.__cause__ = exc
        return AttemptResult(kind="crash", error=error, note="no Ray task was submitted")

    def _remote(self, spec: AttemptSpec) -> Any:
        """The task with this step's options (made once per resource shape)."""
        key = tuple(sorted((spec.resources or {}).items()))
        with self._lock:
            remote = self._remotes.get(key)
        if remote is None:
            options = task_options(spec.resources)
            remote = self._task.options(**options)
            with self._lock:
                self._remotes[key] = remote
            self._warn_if_infeasible(spec.step_id, options)
        return remote

    def _warn_if_infeasible(self, step_id: str, options: Mapping[str, Any]) -> None:
        """Say so when no part of the cluster has what a step asks for: Ray would wait."""
        wanted = {
            "CPU": options.get("num_cpus", 0),
            "GPU": options.get("num_gpus", 0),
            **options.get("resources", {}),
        }
        try:
            total = self._ray.cluster_resources()
        except Exception:
            return
        short = {k: v for k, v in wanted.items() if v and total.get(k, 0) < v}
        if short:
            have = {k: total.get(k, 0) for k in short}
            log.warning(
                "step %r asks Ray for %s, but the whole cluster has %s: its task waits until "
                "the cluster can run it (an autoscaler may add nodes); give the step a "
                "timeout, or ask for less",
                step_id,
                short,
                have,
            )

    def _cancel(self, ref: Any) -> None:
        """The canceller: kill the worker running ``ref``'s task (and tasks it started)."""
        try:
            self._ray.cancel(ref, force=True, recursive=True)
        except Exception:
            log.debug("ray.cancel failed (the task may have ended already)", exc_info=True)

    def _wait(self, ref: Any, spec: AttemptSpec, control: AttemptControl) -> _Ended:
        """Wait for the task's reply, in bounded slices.

        The first slice is a ``ray.get`` with a timeout, so a quick task costs one
        call; after that, ``ray.wait`` (without fetching) watches for the end and
        one ``ray.get`` fetches the reply, so a large reply is never cut off by a
        slice.  Between slices it enforces the deadline itself (a safety net
        behind the engine's) and stops waiting for a cancel that Ray does not
        confirm in time.
        """
        timed_out = self._ray.exceptions.GetTimeoutError
        confirm_by: float | None = None
        first = True
        while True:
            now = time.monotonic()
            if self._closed and not control.is_cancelled:
                control.cancel("cancel")
            if control.is_cancelled:
                if confirm_by is None:
                    confirm_by = now + spec.kill_grace + _CONFIRM_MARGIN_S
                if now >= confirm_by:
                    return _Ended(confirmed=False)
                wait = confirm_by - now
            elif spec.deadline is not None:
                if now >= spec.deadline + _SAFETY_MARGIN_S:
                    control.cancel("timeout")  # runs our canceller, like the engine would
                    continue
                wait = spec.deadline + _SAFETY_MARGIN_S - now
            else:
                wait = _WAIT_SLICE_S
            wait = min(wait, _WAIT_SLICE_S)
            try:
                if first:
                    first = False
                    return _Ended(reply=self._ray.get(ref, timeout=wait))
                ready, _ = self._ray.wait([ref], timeout=wait, fetch_local=False)
                if ready:
                    return _Ended(reply=self._ray.get(ref))
            except timed_out:
                continue
            except Exception as exc:
                return _Ended(raised=exc)

    # -- inputs --

    def _task_args(self, spec: AttemptSpec) -> tuple[Any, ...]:
        wall_deadline = None
        if spec.deadline is not None:
            wall_deadline = time.time() + (spec.deadline - time.monotonic())
        meta = (
            spec.run_id,
            spec.step_id,
            spec.attempt,
            spec.max_attempts,
            wall_deadline,
            spec.is_async,
        )
        inline: dict[str, Any] = {}
        picks: list[tuple[str, int, str | None]] = []
        sources: list[Any] = []
        index_of: dict[Any, int] = {}

        def source_index(ref: Any) -> int:
            index = index_of.get(ref)
            if index is None:
                index = index_of[ref] = len(sources)
                sources.append(ref)
            return index

        for name, value in spec.inputs.items():
            held = self._locate(spec.step_id, name, value)
            if held is None:
                inline[name] = value
            else:
                picks.append((name, source_index(held.ref), held.key))
        fn_arg = self._function(spec)
        if not isinstance(fn_arg, bytes):  # a shared reference: Ray resolves it as a source
            fn_arg = source_index(fn_arg)
        packed = (meta, fn_arg, dict(spec.params), inline, tuple(picks))
        return (packed, *sources)

    def _function(self, spec: AttemptSpec) -> Any:
        """The pickled step function, or a shared reference to it when it is large."""
        if spec.fn_payload is None:
            from stepvisor.backends.process import prepare_payload  # noqa: PLC0415

            return prepare_payload(spec.step_id, spec.fn)
        payload = spec.fn_payload
        if len(payload) < SHARE_THRESHOLD:
            return payload
        with self._lock:
            held = self._shared.get(id(payload))
        if held is None or held.value is not payload:
            held = _Held(payload, self._ray.put(payload), None)
            with self._lock:
                held = self._shared.setdefault(id(payload), held)
        return held.ref

    def _locate(self, step_id: str, name: str, value: object) -> _Held | None:
        """Where a Ray task should take input ``name`` from; ``None``: send it inline."""
        key = id(value)
        with self._lock:
            held = self._known(key, value)
            if held is not None:
                self._count(held)
                return held if held.ref is not None else None
        if _is_atom(value):
            with self._lock:
                self._counts["values_inlined"] += 1
            return None
        ref = None
        if _pickled_size(step_id, name, value) >= SHARE_THRESHOLD:
            ref = self._ray.put(value)
            with self._lock:
                self._counts["values_put"] += 1
        with self._lock:
            held = self._shared.setdefault(key, _Held(value, ref, None))
            if ref is None:
                self._counts["values_inlined"] += 1
        return held if held.ref is not None else None

    def _known(self, key: int, value: object) -> _Held | None:
        """What is known about ``value`` (the caller holds the lock)."""
        for table in (self._origins, self._shared):
            held = table.get(key)
            if held is not None and held.value is value:
                return held
        return None

    def _count(self, held: _Held) -> None:
        """Count one more use of a known value (the caller holds the lock)."""
        if held.ref is None:
            self._counts["values_inlined"] += 1
        elif held.key is None:
            self._counts["values_reused"] += 1
        else:
            self._counts["refs_passed"] += 1

    def _remember(self, ref: Any, outputs: Mapping[str, Any]) -> None:
        """Note where each output of a Ray step lives, for Ray steps that need it later."""
        with self._lock:
            if self._closed:
                return
            for name, value in outputs.items():
                if not _is_atom(value):
                    self._origins[id(value)] = _Held(value, ref, name)

    def _forget(self, refs: tuple[Any, ...]) -> None:
        """After a crash: stop handing out references that may be lost with a node.

        The driver still holds every value, so the next attempt sends fresh copies.
        """
        if not refs:
            return
        gone = set(refs)
        with self._lock:
            for table in (self._origins, self._shared):
                for key in [k for k, held in table.items() if held.ref in gone]:
                    del table[key]

    # -- outcomes --

    def _outcome(
        self, spec: AttemptSpec, control: AttemptControl, ref: Any, *, sources: tuple[Any, ...]
    ) -> AttemptResult:
        ended = self._wait(ref, spec, control)
        if not ended.confirmed:
            how = (
                f"{_STOPPED_NOTE}, but Ray did not confirm it within "
                f"{spec.kill_grace + _CONFIRM_MARGIN_S:g} s"
            )
            return AttemptResult(
                kind="cancelled",
                error=stop_error(spec, control.reason, how),
                note=how,
                extra={"reason": control.reason, "confirmed": False},
            )
        if ended.raised is None:
            # A reply counts even after a cancel: the task finished before the kill.
            return self._decode(spec, ref, ended.reply)
        if control.is_cancelled:
            return AttemptResult(
                kind="cancelled",
                error=stop_error(spec, control.reason, _STOPPED_NOTE),
                note=_STOPPED_NOTE,
                extra={"reason": control.reason, "ray_error": type(ended.raised).__name__},
            )
        result = self._failure(spec, ended.raised)
        if result.kind == "crash":
            self._forget(sources)
        return result

    def _decode(self, spec: AttemptSpec, ref: Any, reply: tuple[Any, ...]) -> AttemptResult:
        kind = reply[0]
        if kind == "ok":
            outputs: Mapping[str, Any] = reply[1]
            self._remember(ref, outputs)
            return AttemptResult(kind="ok", outputs=outputs)
        if kind == "unsendable":
            _, message, text = reply
            error = StepNotSerializableError(message, step_id=spec.step_id, attempt=spec.attempt)
            return AttemptResult(kind="unsendable", error=error, traceback=text)
        _, qualname, message, text, blob, why_not, where = reply
        return AttemptResult(
            kind="error",
            error=_load_error(
                spec,
                qualname=qualname,
                message=message,
                text=text,
                blob=blob,
                why_not=why_not,
                where=where,
            ),
            traceback=text,
        )

    def _failure(self, spec: AttemptSpec, exc: Exception) -> AttemptResult:
        """Turn what ``ray.get`` raised (not after a cancel of ours) into a result."""
        errors = self._ray.exceptions
        if isinstance(exc, errors.RayTaskError):
            cause = getattr(exc, "cause", None)
            if isinstance(cause, self._crash_types):
                return self._crash(spec, cause)
            if isinstance(cause, ModuleNotFoundError) and _is_ours(cause.name):
                return _not_installed_remotely(spec, exc)
            if isinstance(cause, BaseException):
                with contextlib.suppress(Exception):
                    cause.add_note(f"Raised in the Ray worker, outside the step function:\n{exc}")
                return AttemptResult(
                    kind="error",
                    error=cause,
                    traceback=getattr(exc, "traceback_str", None) or str(exc),
                    note="it failed in the Ray worker outside the step function",
                )
        if isinstance(exc, errors.RaySystemError) and "deserializ" in str(
            getattr(exc, "traceback_str", "") or exc
        ):
            error = StepNotSerializableError(
                f"step {spec.step_id!r} (attempt {spec.attempt}) returned artifacts that "
                f"could not be loaded here ({_first_line(exc)}); return values whose classes "
                "this process can import, or plain data",
                step_id=spec.step_id,
                attempt=spec.attempt,
            )
            error.__cause__ = exc
            return AttemptResult(kind="unsendable", error=error)
        if isinstance(exc, errors.TaskCancelledError):
            return self._crash(spec, exc, how="was cancelled outside stepvisor (ray.cancel?)")
        if isinstance(exc, (*self._crash_types, errors.RayError)):
            return self._crash(spec, exc)
        return AttemptResult(kind="error", error=exc, traceback=format_error(exc))

    def _crash(
        self, spec: AttemptSpec, exc: BaseException, *, how: str = "died, or its node did"
    ) -> AttemptResult:
        name = type(exc).__name__
        error = WorkerCrashedError(
            f"the Ray worker running step {spec.step_id!r} (attempt {spec.attempt}) {how} "
            f"({name}: {_first_line(exc)}); Ray does not retry it: stepvisor retries it if "
            "the step's retry policy allows (retry_crashes)",
            step_id=spec.step_id,
            attempt=spec.attempt,
        )
        error.__cause__ = exc
        return AttemptResult(
            kind="crash",
            error=error,
            note=f"the Ray worker {how} ({name})",
            extra={"ray_error": name},
        )


def _is_ours(module: str | None) -> bool:
    return bool(module) and str(module).split(".")[0] == "stepvisor"


def _not_installed_remotely(spec: AttemptSpec, exc: BaseException) -> AttemptResult:
    error = StepNotSerializableError(
        f"step {spec.step_id!r} could not run: stepvisor cannot be imported in the Ray "
        f"workers ({_first_line(exc)}); install the same stepvisor on every node of the "
        "cluster, or call ray.init(address=..., runtime_env={'py_modules': [stepvisor]}) "
        "before sv.run",
        step_id=spec.step_id,
        attempt=spec.attempt,
    )
    error.__cause__ = exc
    return AttemptResult(kind="unsendable", error=error)


def _load_error(
    spec: AttemptSpec,
    *,
    qualname: str,
    message: str,
    text: str,
    blob: bytes | None,
    why_not: str,
    where: str,
) -> BaseException:
    """The step's exception as itself, else a RemoteStepError carrying its type and text."""
    error: object = None
    if blob is not None:
        try:
            error = pickle.loads(blob)  # noqa: S301 - from our own task's reply
        except Exception as exc:
            why_not = f"{type(exc).__name__}: {exc} (while loading it here)"
    if not isinstance(error, BaseException):
        error = RemoteStepError(
            f"step {spec.step_id!r} raised {qualname}: {message}; that exception could not "
            f"be sent back from its Ray worker ({why_not}), so its type and traceback are in "
            "remote_type and remote_traceback; make the exception class picklable (pass "
            "every __init__ argument on to Exception.__init__) to get it back as itself",
            step_id=spec.step_id,
            attempt=spec.attempt,
            remote_type=qualname,
            remote_traceback=text,
        )
    with contextlib.suppress(Exception):
        error.add_note(f"Traceback in Ray worker ({where}):\n{text.rstrip()}")
    return error
