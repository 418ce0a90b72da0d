"""The Ray backend in the driver: submit one attempt as one Ray task, wait, say how it ended.

Every decision stays with the engine: the Supervisor decides deadlines,
retries, cancellation, fencing and the order in which outcomes fold into
state; this backend only runs one attempt::

    Worker thread: RayBackend.run(spec, control)          a Ray worker process
      args: Placement.task_args (inline, put, or refs)      _task.attempt_task(RayCall,
      submit: .options(num_cpus, num_gpus, resources,                          *sources)
               max_retries=0, retry_exceptions=False) ──▶
      ray.get(ref): done, deadline or cancel  ◀──────────  Returned | Raised | Unsendable
    Supervisor thread: control.cancel(reason)
      canceller: ray.cancel(ref, force=True)  ──────────▶  the worker process is killed

* **Ray never retries.**  Each attempt is one task with ``max_retries=0`` and
  ``retry_exceptions=False``, so stepvisor's retry policy sees, decides and
  records every attempt, exactly as on threads and processes.
* **A Ray-level error is the infrastructure's.**  The step's own exception
  comes back inside the reply; ``ray.get`` raising means the worker or its
  node died (``crash``, :class:`WorkerCrashedError`, retried according to
  ``retry_crashes``), or a value could not be loaded.
* **A stop is a kill.**  ``ray.cancel(force=True)`` kills the worker process
  running the task (Ray starts another), so a step that never looks at its
  context still stops at its deadline.  The task cannot see ``ctx.cancelled``
  turn true; ``ctx.remaining()`` works (the deadline travels as wall time).
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final

from stepvisor._log import log as _root_log
from stepvisor.backends._capture import log_of
from stepvisor.backends._wire import Reply, Returned
from stepvisor.backends.base import (
    Following,
    caused,
    format_error,
    not_started,
    remote_failure,
    stop_error,
)
from stepvisor.backends.process import check_sendable
from stepvisor.backends.ray._placement import Placement, RayTransfers
from stepvisor.backends.ray._session import (
    CONNECT_TIMEOUT_S,
    Session,
    import_ray,
    task_options,
)
from stepvisor.backends.ray._task import attempt_task
from stepvisor.context import AttemptControl
from stepvisor.core.attempt import AttemptResult, AttemptSpec
from stepvisor.errors import StepNotSerializableError, WorkerCrashedError

__all__ = ["RayBackend"]

log = _root_log.getChild("backends.ray")

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
_STOPPED_NOTE: Final = "its Ray task was force-cancelled (worker process killed)"
_NOT_SUBMITTED: Final = "the backend was closed before it started; no Ray task was submitted"

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


@dataclass(frozen=True, slots=True)
class _Ended:
    """How waiting for a task ended: its reply, what ``ray.get`` raised, or no answer."""

    reply: Any = None
    raised: Exception | None = None
    confirmed: bool = True


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class RayBackend:
    """Runs attempts as Ray tasks, for every Ray step of one run.

    Made with :meth:`connect`; ``run`` may be called from several Worker
    threads at once and never raises; ``close`` cancels what is still running,
    drops this run's object-store references and, if stepvisor started Ray and
    no other run uses it, shuts Ray down.
    """

    sends_ahead: ClassVar[bool] = False

    def __init__(self, ray: Any) -> None:
        self._ray = ray
        self._task = ray.remote(attempt_task)
        self._lock = threading.Lock()
        self._closed = False
        self._inflight: set[Any] = set()
        self._remotes: dict[tuple[tuple[str, float], ...], Any] = {}
        self._placement = Placement(ray)
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
        ray = import_ray()
        Session.acquire(ray, address=address, timeout=connect_timeout)
        try:
            return cls(ray)
        except BaseException:
            Session.release(ray)
            raise

    @property
    def transfers(self) -> RayTransfers:
        """How inputs were sent so far (a snapshot)."""
        return self._placement.transfers

    def close(self) -> None:
        """Cancel attempts still running, drop references, release Ray.  Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            inflight = list(self._inflight)
        self._placement.clear()
        for ref in inflight:
            self._cancel(ref)
        Session.release(self._ray)

    def run(
        self, spec: AttemptSpec, control: AttemptControl, ahead: Following | None = None
    ) -> AttemptResult:
        """Run one attempt as a Ray task; block until it ends; return how it ended."""
        del ahead
        stopped = not_started(spec, control)
        if stopped is not None:
            return stopped
        if self._closed:
            return AttemptResult(
                kind="cancelled",
                error=stop_error(spec, "cancel", _NOT_SUBMITTED),
                note=_NOT_SUBMITTED,
                extra={"reason": "cancel"},
            )
        try:
            limit = control.capture.limit if control.capture is not None else None
            args = self._placement.task_args(spec, log_limit=limit)
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
            result = self._outcome(spec, control, ref, sources=args[1:])
            if control.log is not None:
                control.log.finish()
            return result
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
        try:
            for key, value in spec.params.items():
                check_sendable(spec.step_id, f"params[{key!r}]", value)
        except StepNotSerializableError as found:
            found.attempt = spec.attempt
            found.__cause__ = exc
            return AttemptResult(kind="unsendable", error=found, note="nothing was sent")
        return caused(
            spec,
            "crash",
            WorkerCrashedError,
            f"could not submit step {spec.step_id!r} to Ray ({type(exc).__name__}: {exc}); "
            "check that the Ray cluster is still up (`ray status`)",
            exc,
            note="no Ray task was submitted",
        )

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
            wait, confirm_by = self._next_slice(spec, control, confirm_by)
            if wait is None:
                return _Ended(confirmed=False)
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

    def _next_slice(
        self, spec: AttemptSpec, control: AttemptControl, confirm_by: float | None
    ) -> tuple[float | None, float | None]:
        """How long the next slice of ``_wait`` may wait, and when a cancel must be confirmed.

        A wait of ``None``: the cancel was not confirmed in time, stop waiting.  A
        closed backend cancels the attempt; a deadline passed (plus the safety
        margin) cancels it as a timeout, and the cancel's clock starts then.
        """
        while True:
            now = time.monotonic()
            if self._closed and not control.is_cancelled:
                control.cancel("cancel")
            if control.is_cancelled:
                if confirm_by is None:
                    confirm_by = now + spec.kill_grace + _CONFIRM_MARGIN_S
                if now >= confirm_by:
                    return None, confirm_by
                return min(confirm_by - now, _WAIT_SLICE_S), confirm_by
            if spec.deadline is None:
                return _WAIT_SLICE_S, confirm_by
            if now < spec.deadline + _SAFETY_MARGIN_S:
                return min(spec.deadline + _SAFETY_MARGIN_S - now, _WAIT_SLICE_S), confirm_by
            control.cancel("timeout")  # runs our canceller, like the engine would

    # -- inputs --

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
            return self._decode(spec, ref, ended.reply, control)
        if control.is_cancelled:
            return AttemptResult(
                kind="cancelled",
                error=stop_error(spec, control.reason, _STOPPED_NOTE),
                note=_STOPPED_NOTE,
                extra={"reason": control.reason, "ray_error": type(ended.raised).__name__},
            )
        result = self._failure(spec, ended.raised)
        if result.kind == "crash":
            self._placement.forget(sources)
        return result

    def _decode(
        self, spec: AttemptSpec, ref: Any, reply: Reply, control: AttemptControl | None = None
    ) -> AttemptResult:
        written = getattr(reply, "log", None)
        if written and control is not None and control.capture is not None:
            # What the task saw it write, kept with its reply.
            log_of(control, spec.step_id, spec.attempt).write(written, sys.stdout)
        if isinstance(reply, Returned):
            outputs = reply.outputs
            if outputs:
                self._placement.remember(ref, outputs)
            return AttemptResult(kind="ok", outputs=outputs)
        return remote_failure(spec, reply, origin="Ray worker")

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
            return caused(
                spec,
                "unsendable",
                StepNotSerializableError,
                f"step {spec.step_id!r} (attempt {spec.attempt}) returned artifacts that "
                f"could not be loaded here ({_first_line(exc)}); return values whose classes "
                "this process can import, or plain data",
                exc,
            )
        if isinstance(exc, errors.TaskCancelledError):
            return self._crash(spec, exc, how="was cancelled outside stepvisor (ray.cancel?)")
        if isinstance(exc, (*self._crash_types, errors.RayError)):
            return self._crash(spec, exc)
        return AttemptResult(kind="error", error=exc, traceback=format_error(exc))

    def _crash(
        self, spec: AttemptSpec, exc: BaseException, *, how: str = "died, or its node did"
    ) -> AttemptResult:
        name = type(exc).__name__
        return caused(
            spec,
            "crash",
            WorkerCrashedError,
            f"the Ray worker running step {spec.step_id!r} (attempt {spec.attempt}) {how} "
            f"({name}: {_first_line(exc)}); Ray does not retry it: stepvisor retries it if "
            "the step's retry policy allows (retry_crashes)",
            exc,
            note=f"the Ray worker {how} ({name})",
            extra={"ray_error": name},
        )


def _is_ours(module: str | None) -> bool:
    return bool(module) and str(module).split(".")[0] == "stepvisor"


def _not_installed_remotely(spec: AttemptSpec, exc: BaseException) -> AttemptResult:
    return caused(
        spec,
        "unsendable",
        StepNotSerializableError,
        f"step {spec.step_id!r} could not run: stepvisor cannot be imported in the Ray "
        f"workers ({_first_line(exc)}); install the same stepvisor on every node of the "
        "cluster, or call ray.init(address=..., runtime_env={'py_modules': [stepvisor]}) "
        "before sv.run",
        exc,
    )
