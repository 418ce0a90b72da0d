"""The backend contract: what a backend receives, what it returns, and its guard.

A backend turns an :class:`AttemptSpec` into an :class:`AttemptResult`: whatever
the step does (return, raise, hang, crash its process) comes back as a value,
so a step can never take down the Worker that ran it.  The Worker looks its
backend up by the attempt's executor name and calls it through
:func:`run_guarded`, which holds the edges every backend would otherwise write
again::

    Worker ── run_guarded(backend, spec, control, ahead) ──────────────────────────┐
      not_started(): cancelled, or past its deadline?  -> "cancelled", nothing runs  │
      backend.run(spec, control, ahead)                -> the attempt's result      │
      an exception escaping run (a stepvisor bug)      -> "error", cause chained ───┘

Like httpx's ``BaseTransport``, the protocol is small: ``run`` and ``close``,
plus ``sends_ahead``, which only the process backend sets.  Backends are either
shared by every Worker of a run (the asyncio loop, the Ray connection) or owned
by one Worker (a process slot: one child process per Worker); the runtime says
which when it hands them to the Workers
(:class:`~stepvisor.actors.worker.WorkerServices`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Final, Protocol

from stepvisor.backends._traceback import format_error
from stepvisor.backends._wire import Raised, Unsendable, rebuild_error

# The values the machine and the backends exchange belong to the core; named here too,
# for the backends and for code that took them from here.
from stepvisor.core.attempt import AttemptResult, AttemptSpec, ResultKind
from stepvisor.errors import (
    StepCancelledError,
    StepError,
    StepNotSerializableError,
    StepTimeoutError,
)

if TYPE_CHECKING:
    from stepvisor.context import AttemptControl

__all__ = [
    "Ahead",
    "AttemptResult",
    "AttemptSpec",
    "Backend",
    "Following",
    "ResultKind",
    "backend_bug",
    "caused",
    "format_error",
    "not_started",
    "remote_failure",
    "run_guarded",
    "stop_error",
]

_NOT_STARTED: Final = "stopped before it started; nothing was run"


#: An attempt a Worker will run next on the same backend.
Ahead = tuple[AttemptSpec, "AttemptControl"]
#: What ``run`` is told of the attempts after this one: the next, or the next few in order.
Following = Ahead | Sequence[Ahead]


class Backend(Protocol):
    """Runs one attempt at a time per calling thread; see the module docstring.

    ``run`` blocks until the attempt ends and returns how it ended; it raises
    only when the backend itself is broken (:func:`run_guarded` turns that into
    a result).  It must honour ``control``: stop the attempt when it is
    cancelled, and report ``"cancelled"``.  ``close`` releases what the backend
    holds; it is idempotent.
    """

    #: Whether ``run`` uses its ``ahead`` argument: it may send the next attempt
    #: before this one ends.  Such a backend checks for a stop before start itself
    #: (with :func:`not_started`) for an attempt it was offered ahead, since it may
    #: already have started it; the guard does not.
    sends_ahead: ClassVar[bool]

    def run(
        self, spec: AttemptSpec, control: AttemptControl, ahead: Following | None = None
    ) -> AttemptResult:
        """Run one attempt; block until it ends."""
        ...

    def close(self) -> None:
        """Release what the backend holds (idempotent)."""
        ...


def stop_error(spec: AttemptSpec, reason: str | None, how: str) -> StepError:
    """The error of an attempt its backend stopped: ``how`` says by what means.

    ``reason`` is the :class:`~stepvisor.context.AttemptControl` reason:
    ``"timeout"`` gives a :class:`StepTimeoutError`, anything else a
    :class:`StepCancelledError`.
    """
    if reason == "timeout":
        return StepTimeoutError(
            f"step {spec.step_id!r} passed its deadline on attempt {spec.attempt}: {how}; "
            "raise its timeout, or make it finish sooner",
            step_id=spec.step_id,
            attempt=spec.attempt,
        )
    return StepCancelledError(
        f"step {spec.step_id!r} was cancelled on attempt {spec.attempt}: {how}",
        step_id=spec.step_id,
        attempt=spec.attempt,
    )


def remote_failure(
    spec: AttemptSpec,
    reply: Raised | Unsendable,
    *,
    origin: str,
    note: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> AttemptResult:
    """The result of a remote attempt that raised, or whose values could not cross.

    ``origin`` names what ran it (``worker process``, ``Ray worker``).
    """
    if isinstance(reply, Raised):
        packed = reply.error
        error = rebuild_error(packed, step_id=spec.step_id, attempt=spec.attempt, origin=origin)
        kind: ResultKind = "error"
        text = packed.traceback
    else:
        error = StepNotSerializableError(reply.message, step_id=spec.step_id, attempt=spec.attempt)
        kind = "unsendable"
        text = reply.traceback
    return AttemptResult(
        kind=kind, error=error, traceback=text, note=note, extra={} if extra is None else extra
    )


def not_started(spec: AttemptSpec, control: AttemptControl) -> AttemptResult | None:
    """``"cancelled"`` for an attempt stopped, or past its deadline, before it started.

    ``None`` when it may start.  The error is a :class:`StepTimeoutError` when
    the deadline is why, a :class:`StepCancelledError` otherwise.
    """
    if not control.is_cancelled:
        if spec.deadline is None or time.monotonic() < spec.deadline:
            return None
        control.cancel("timeout")  # the step's context says so too, as at a deadline
    reason = control.reason
    return AttemptResult(
        kind="cancelled",
        error=stop_error(spec, reason, _NOT_STARTED),
        note=_NOT_STARTED,
        extra={"reason": reason},
    )


def caused(
    spec: AttemptSpec,
    kind: ResultKind,
    error_type: type[StepError],
    message: str,
    cause: BaseException,
    *,
    note: str | None = None,
    traceback: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> AttemptResult:
    """A result whose error (``error_type(message)``) was caused by ``cause``: chained."""
    error = error_type(message, step_id=spec.step_id, attempt=spec.attempt)
    error.__cause__ = cause
    return AttemptResult(
        kind=kind,
        error=error,
        traceback=traceback,
        note=note,
        extra={} if extra is None else extra,
    )


def backend_bug(spec: AttemptSpec, exc: BaseException) -> AttemptResult:
    """The result of an attempt whose backend raised: one kind, ``"error"``, everywhere.

    The backend's exception is the cause; the step's retry policy decides as
    for any error, and the note says whom to tell.
    """
    return caused(
        spec,
        "error",
        StepError,
        f"the backend running step {spec.step_id!r} failed on attempt {spec.attempt} "
        f"({type(exc).__name__}: {exc}); this is a stepvisor bug: please report it with "
        "the traceback",
        exc,
        traceback=format_error(exc),
        note="its backend failed (a stepvisor bug)",
    )


def run_guarded(
    backend: Backend,
    spec: AttemptSpec,
    control: AttemptControl,
    ahead: Following | None = None,
    *,
    offered: bool = False,
) -> AttemptResult:
    """Run one attempt on ``backend`` inside the edges every backend shares.

    ``offered`` says the attempt was passed as ``ahead`` to the previous
    ``run`` of this backend: then the backend may have started it already,
    and it checks for a stop before start itself.
    """
    if not offered:
        stopped = not_started(spec, control)
        if stopped is not None:
            return stopped
    try:
        return backend.run(spec, control, ahead)
    except BaseException as exc:  # a backend bug must still end the attempt, as a value
        from stepvisor._log import log  # noqa: PLC0415 - the rare path

        log.exception("the %s backend failed running step %r", type(backend).__name__, spec.step_id)
        return backend_bug(spec, exc)
