"""How a process attempt ended, as an AttemptResult: its reply, its stop, or its child's death.

Every message here says what happened to the child (which signal, which exit
code, what was left running) and what to do about it.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
from typing import Any, Final

from stepvisor.backends import _shm
from stepvisor.backends._child import EXIT_PROTOCOL_ERROR
from stepvisor.backends._shm import Fds
from stepvisor.backends._wire import Reply, Returned, Segment
from stepvisor.backends.base import caused, remote_failure, stop_error
from stepvisor.core.attempt import AttemptResult, AttemptSpec
from stepvisor.errors import StepCancelledError, StepNotSerializableError, WorkerCrashedError

__all__ = [
    "closed_result",
    "crash_result",
    "describe_exit",
    "reply_result",
    "spawn_failed",
    "stopped_result",
]

_ORIGIN: Final = "worker process"


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        return f"died from signal {signal_name(-returncode)}"
    return f"exited with code {returncode}"


def _leftover_info(leftovers: tuple[int, ...]) -> tuple[str | None, dict[str, Any]]:
    if not leftovers:
        return None, {}
    pids = ", ".join(map(str, leftovers))
    note = f"the step left {len(leftovers)} process(es) running (pid {pids}); they were killed"
    return note, {"leftover_pids": leftovers}


def reply_result(
    spec: AttemptSpec, message: Reply, parts: list[bytes], fds: Fds | None = None
) -> AttemptResult:
    """The result a child's reply (``message``, then the values in ``parts[1:]``, with
    the segment descriptors ``fds``) stands for."""
    try:
        return _reply_result(spec, message, parts, fds)
    finally:
        if fds is not None:
            fds.close()  # those the run's table did not take


def _reply_result(
    spec: AttemptSpec, message: Reply, parts: list[bytes], fds: Fds | None
) -> AttemptResult:
    note, extra = _leftover_info(message.leftovers)
    if not isinstance(message, Returned):
        return remote_failure(spec, message, origin=_ORIGIN, note=note, extra=extra)
    if message.names is None:
        return AttemptResult(kind="ok", note=note, extra=extra)
    outputs: dict[str, Any] = {}
    shared = message.shared or (None,) * len(message.names)
    segments = _Segments(spec.run_id, fds)
    for name, blob, segment in zip(message.names, parts[1:], shared, strict=True):
        try:
            if segment is None:
                outputs[name] = pickle.loads(blob)  # noqa: S301 - from our own child
            else:
                outputs[name] = segments.load(blob, segment)
        except Exception as exc:
            return caused(
                spec,
                "unsendable",
                StepNotSerializableError,
                f"step {spec.step_id!r} returned artifact {name!r}, which could not be loaded "
                f"in the parent process ({type(exc).__name__}: {exc}); return values whose "
                "classes the parent can import, or plain data",
                exc,
                note=note,
                extra=extra,
            )
    return AttemptResult(kind="ok", outputs=outputs, note=note, extra=extra)


class _Segments:
    """The segments of one reply, mapped once each; the run's table keeps their descriptors."""

    def __init__(self, run_id: str, fds: Fds | None) -> None:
        self._run_id = run_id
        self._fds = fds
        self._views: dict[int, tuple[memoryview, int | None]] = {}

    def load(self, pickled: bytes, segment: Segment) -> Any:
        if self._fds is None:
            raise ValueError("the reply named a shared-memory segment but none came with it")
        mapped = self._views.get(segment.fd)
        if mapped is None:
            view = _shm.map_segment(self._fds.peek(segment.fd), segment.size)
            fd = self._fds.take(segment.fd)
            held: int | None = fd
            if not _shm.hold(self._run_id, fd):  # no run to keep it for: close it now
                os.close(fd)
                held = None
            mapped = self._views[segment.fd] = (view, held)
        view, held = mapped
        value = _shm.load(pickled, view, segment.spans)
        if held is not None:
            _shm.remember(self._run_id, value, held, pickled, segment)
        return value


def stopped_result(
    spec: AttemptSpec,
    reason: str | None,
    *,
    pid: int,
    returncode: int,
    killed_after_grace: bool,
) -> AttemptResult:
    """The child was stopped (deadline or cancel) and has died: say by which signal."""
    if killed_after_grace:
        sig = "SIGKILL"
        how = f"its process group was killed (SIGKILL after {spec.kill_grace:g} s grace)"
    elif returncode < 0:
        sig = signal_name(-returncode)
        how = f"its process group was killed ({sig})"
    else:
        sig = "SIGTERM"
        how = f"its process group was sent SIGTERM and the worker exited with code {returncode}"
    return AttemptResult(
        kind="cancelled",
        error=stop_error(spec, reason, how),
        note=f"{how}; a fresh worker process replaces it",
        extra={"signal": sig, "pid": pid, "exitcode": returncode, "reason": reason},
    )


def crash_result(spec: AttemptSpec, pid: int, returncode: int, *, ready: bool) -> AttemptResult:
    """The child died during the attempt, and nobody asked it to."""
    how = describe_exit(returncode)
    if not ready:
        message = (
            f"the worker process (pid {pid}) {how} while starting, before it could run step "
            f"{spec.step_id!r}; its stderr says why (often the Python at {sys.executable} "
            "cannot import stepvisor or something the step needs)"
        )
    else:
        running = f"the worker process (pid {pid}) running step {spec.step_id!r} (attempt "
        if returncode < 0:
            why = (
                f"{how}; a fresh worker process replaces it. Something killed it, or the "
                "step crashed the interpreter (native code, ctypes, out of memory)"
            )
        elif returncode == EXIT_PROTOCOL_ERROR:
            why = (
                f"{how}: it lost its pipes to this process; a fresh worker process replaces "
                "it. Did the step close file descriptors it does not own? The worker's "
                "stderr says more"
            )
        else:
            why = (
                f"{how}; a fresh worker process replaces it. The step or code it called "
                "ended the process (os._exit?); raise an exception instead"
            )
        message = f"{running}{spec.attempt}) {why}"
    error = WorkerCrashedError(
        message, step_id=spec.step_id, attempt=spec.attempt, exitcode=returncode
    )
    signame = signal_name(-returncode) if returncode < 0 else None
    return AttemptResult(
        kind="crash",
        error=error,
        note=f"the worker process {how}; a fresh one replaces it",
        extra={"pid": pid, "exitcode": returncode, "signal": signame},
    )


def spawn_failed(spec: AttemptSpec, exc: OSError) -> AttemptResult:
    why = (
        f"could not start a worker process for step {spec.step_id!r} ({exc}); check the "
        "process and file-descriptor limits (ulimit -u, ulimit -n) and free memory"
    )
    note = "no worker process could be started"
    return caused(spec, "crash", WorkerCrashedError, why, exc, note=note)


def closed_result(spec: AttemptSpec, slot: str, *, pid: int | None) -> AttemptResult:
    """The attempt's slot was closed under it (or before it)."""
    what = "its worker process group was killed (SIGKILL)" if pid else "nothing was run"
    error = StepCancelledError(
        f"step {spec.step_id!r} was stopped on attempt {spec.attempt} because its process "
        f"slot {slot!r} was closed; {what}",
        step_id=spec.step_id,
        attempt=spec.attempt,
    )
    return AttemptResult(
        kind="cancelled", error=error, note=f"the slot was closed; {what}", extra={"pid": pid}
    )
