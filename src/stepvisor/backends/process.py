"""The process backend: each process Worker owns one child process, reused across attempts.

A :class:`ProcessSlot` starts its child lazily (or with :meth:`ProcessSlot.start`)
and runs one attempt at a time in it.  A deadline or a cancel really stops the
work: the child's whole process group gets SIGTERM, then SIGKILL after the grace
period, and a fresh child is started at once so the next attempt does not wait
for interpreter start-up::

    Worker thread: ProcessSlot.run(spec, control)          child (stepvisor.backends._child)
      prepare fn payload + args (StepNotSerializableError)
      cmd pipe  ──── attempt ────────────────────────▶   load fn, build StepContext, call
      poll(result pipe, pidfd, wake pipe; deadline)
      result pipe ◀── ok | error | unsendable ────────   kill leftovers, pickle the reply
    another thread: control.cancel("timeout"|"cancel")
      canceller: SIGTERM to the group, wake the poll ──▶ dies; the poll escalates to
                                                         SIGKILL after ``kill_grace``

Why it is built this way:

* **fork+exec, not fork.**  The child is ``subprocess.Popen`` of ``sys.executable``
  (``start_new_session=True``), which is safe beside the engine's threads and
  puts the child in a process group of its own that can be killed as a whole.
  It is started with ``-c`` and the directory this ``stepvisor`` was imported
  from, rather than ``-m``, so the child runs the *same* stepvisor even when the
  parent found it through a ``sys.path`` edit rather than an installation.
* **Death is observed, never guessed.**  The parent waits on a pidfd of the
  child as well as on its result pipe, so a child that dies is noticed at once
  even when a process it forked still holds the pipe open.  The child is reaped
  only after SIGKILL has been sent to its group: while the dead leader is
  unreaped its pid (the group id) cannot be reused, so the signal cannot reach
  a stranger.
* **The parent's own deadline is a safety net.**  The engine calls
  ``control.cancel("timeout")`` at the deadline; ``run`` also does it itself when
  ``spec.deadline`` passes, so the backend is correct on its own.
* **No timer threads.**  The canceller only sends SIGTERM and writes a byte to a
  wake-up pipe; the thread blocked in ``run`` then escalates to SIGKILL when
  ``kill_grace`` has passed, from the same poll loop that watches the result
  pipe.  A canceller that fires after its attempt ended finds a different
  attempt token and does nothing, so a late engine timer cannot hit the next
  attempt in a reused child.
* **What a step leaves behind is killed.**  After a timeout, cancel or crash the
  whole process group gets SIGKILL before the child is reaped; after a normal
  end the child itself kills and reaps any descendants still running (it is
  their subreaper) and the result names them (``extra["leftover_pids"]``).
  Processes that put themselves in another session or group (``setsid``)
  survive a timeout; cgroups would be needed to catch those.
* **Values are checked before they travel.**  The step function is pickled with
  cloudpickle (by import reference when importable, by value otherwise);
  a value that cannot be pickled raises :class:`StepNotSerializableError` naming
  the step and the path to the offending object (``inputs['rows'][2]``,
  ``closure variable 'lock' of <lambda>``) instead of failing in the child.

``run`` never raises (a ``KeyboardInterrupt`` in the calling thread is the one
exception: the child is killed and the interrupt goes on).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import pickle
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
import types
import weakref
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final, NamedTuple

import cloudpickle

import stepvisor
from stepvisor._log import log as _root_log
from stepvisor.backends._child import EXIT_PROTOCOL_ERROR, decode_message, encode_message
from stepvisor.backends.base import AttemptResult, AttemptSpec, stop_error
from stepvisor.context import AttemptControl
from stepvisor.errors import (
    RemoteStepError,
    StepCancelledError,
    StepNotSerializableError,
    StepvisorError,
    WorkerCrashedError,
)

__all__ = ["ProcessSlot", "check_sendable", "prepare_payload"]

log = _root_log.getChild(__name__.removeprefix("stepvisor."))

#: The directory holding the ``stepvisor`` package this process runs.
_PKG_ROOT: Final = str(Path(stepvisor.__file__).resolve().parent.parent)
_BOOTSTRAP: Final = (
    "import sys; sys.path.insert(0, sys.argv[4]); "
    "from stepvisor.backends._child import main; main(sys.argv[1:4])"
)
_PROTOCOL: Final = pickle.HIGHEST_PROTOCOL
_EMPTY_ARGS: Final = pickle.dumps(({}, {}), protocol=_PROTOCOL)
_READ_CHUNK: Final = 1 << 20
#: How often a child's death is checked for when pidfds are not available.
_FALLBACK_POLL_S: Final = 0.02
#: The largest attempt message sent ahead to a busy child (see ``ProcessSlot.run``):
#: a pipe write of at most ``PIPE_BUF`` bytes is whole or nothing, never partial.
_AHEAD_MAX: Final = select.PIPE_BUF
#: How deep, and how many items per level, the search for an unpicklable part goes.
_SEARCH_DEPTH: Final = 6
_SEARCH_WIDTH: Final = 100


# -- serialization ---------------------------------------------------------------------


def prepare_payload(step_id: str, fn: Callable[..., Any]) -> bytes:
    """Pickle a step function for a worker process.

    Importable functions travel as an import reference; ``__main__`` functions,
    lambdas and closures travel by value (cloudpickle).  Raises
    :class:`StepNotSerializableError` naming the step and the object that
    cannot be pickled, such as a lock captured by a closure.
    """
    try:
        return bytes(cloudpickle.dumps(fn, protocol=_PROTOCOL))
    except Exception as exc:
        raise _not_serializable(
            step_id,
            f"its function {_function_name(fn)}",
            fn,
            exc,
            fix="create such objects inside the function instead of capturing them, "
            "or run the step with executor='thread'",
        ) from exc


def check_sendable(step_id: str, what: str, value: object) -> bytes:
    """Pickle ``value`` (an input or param, described by ``what``) for a worker process.

    Returns the pickled bytes.  Raises :class:`StepNotSerializableError` naming
    the step, ``what`` and the part of ``value`` that cannot be pickled.
    """
    try:
        return bytes(cloudpickle.dumps(value, protocol=_PROTOCOL))
    except Exception as exc:
        raise _not_serializable(
            step_id,
            what,
            value,
            exc,
            fix="pass plain, picklable data (numbers, strings, lists, dicts, dataclasses), "
            "or run the step with executor='thread'",
        ) from exc


def _function_name(fn: object) -> str:
    return str(getattr(fn, "__qualname__", None) or type(fn).__name__)


def _type_name(value: object) -> str:
    cls = type(value)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _not_serializable(
    step_id: str, what: str, value: object, exc: Exception, *, fix: str
) -> StepNotSerializableError:
    root = _function_name(value) if what.startswith("its function") else what
    found = _find_unpicklable(value, root, depth=0)
    why = f"{type(exc).__name__}: {exc}"
    if found is None:
        message = (
            f"step {step_id!r}: {what} is a {_type_name(value)}, which cannot be sent to a "
            f"worker process ({why}); {fix}"
        )
    else:
        path, culprit = found
        message = (
            f"step {step_id!r}: {what} cannot be sent to a worker process: {path} is a "
            f"{_type_name(culprit)}, which cannot be pickled ({why}); {fix}"
        )
    return StepNotSerializableError(message, step_id=step_id)


def _pickles(value: object) -> bool:
    try:
        cloudpickle.dumps(value, protocol=_PROTOCOL)
    except Exception:
        return False
    return True


def _find_unpicklable(value: object, path: str, *, depth: int) -> tuple[str, object] | None:
    """The deepest part of ``value`` that fails to pickle, with a path naming it."""
    if depth >= _SEARCH_DEPTH:
        return None
    for part_path, part in itertools.islice(_parts(value, path), _SEARCH_WIDTH):
        if not _pickles(part):
            return _find_unpicklable(part, part_path, depth=depth + 1) or (part_path, part)
    return None


def _wrap(path: str) -> str:
    """Parenthesise a path in words before a subscript: ``(global 'cfg' of f)['db']``."""
    return f"({path})" if " " in path and not path.startswith("(") else path


def _parts(value: object, path: str) -> Iterator[tuple[str, object]]:
    """The parts pickling ``value`` would pickle, each with its path."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield f"{_wrap(path)}[{key!r}]", item
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield f"{_wrap(path)}[{index}]", item
    elif isinstance(value, set | frozenset):
        for item in value:
            yield f"an element of {path}", item
    elif isinstance(value, types.FunctionType):
        yield from _function_parts(value, path)
    elif isinstance(value, functools.partial):
        yield f"{_wrap(path)}.func", value.func
        yield from _parts(value.args, f"{_wrap(path)}.args")
        yield from _parts(value.keywords, f"{_wrap(path)}.keywords")
    elif isinstance(value, types.MethodType):
        yield f"{_wrap(path)}.__self__", value.__self__
        yield f"{_wrap(path)}.__func__", value.__func__
    else:
        attrs = getattr(value, "__dict__", None)
        if isinstance(attrs, dict):
            for name, item in attrs.items():
                yield f"{_wrap(path)}.{name}", item


def _function_parts(fn: types.FunctionType, path: str) -> Iterator[tuple[str, object]]:
    code = fn.__code__
    for name, cell in zip(code.co_freevars, fn.__closure__ or (), strict=False):
        try:
            yield f"closure variable {name!r} of {path}", cell.cell_contents
        except ValueError:  # an empty cell
            continue
    for name in _global_names(code):
        if name in fn.__globals__:
            yield f"global {name!r} of {path}", fn.__globals__[name]
    for index, default in enumerate(fn.__defaults__ or ()):
        yield f"default #{index + 1} of {path}", default
    for name, default in (fn.__kwdefaults__ or {}).items():
        yield f"default {name!r} of {path}", default


def _global_names(code: types.CodeType) -> Iterator[str]:
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _global_names(const)


def _args_blob(spec: AttemptSpec) -> bytes:
    """The attempt's inputs and params, pickled; names the culprit if one cannot be."""
    if not spec.inputs and not spec.params:
        return _EMPTY_ARGS
    value = (dict(spec.inputs), dict(spec.params))
    try:
        return bytes(cloudpickle.dumps(value, protocol=_PROTOCOL))
    except Exception as exc:
        for what, mapping in (("inputs", spec.inputs), ("params", spec.params)):
            for key, item in mapping.items():
                check_sendable(spec.step_id, f"{what}[{key!r}]", item)
        raise _not_serializable(
            spec.step_id, "its inputs and params", value, exc, fix="pass plain, picklable data"
        ) from exc


# -- the child process -------------------------------------------------------------------


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        return f"died from signal {_signal_name(-returncode)}"
    return f"exited with code {returncode}"


class _Child:
    """One live child process and this process's ends of its pipes.

    ``lock`` guards the signalling state, because cancellers run on other
    threads; everything else is used by the one thread inside ``run``.
    """

    def __init__(self, *, name: str) -> None:
        fds: list[int] = []
        try:
            for _ in range(3):
                fds.extend(os.pipe())
            cmd_r, self.cmd_w, self.res_r, res_w, alive_r, self.alive_w = fds
            theirs = (cmd_r, res_w, alive_r)
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _BOOTSTRAP, *map(str, theirs), _PKG_ROOT, name],
                pass_fds=theirs,
                close_fds=True,
                start_new_session=True,
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            for fd in fds:
                _close_quietly(fd)
            raise
        for fd in theirs:
            _close_quietly(fd)
        self.pid: int = self.proc.pid
        os.set_blocking(self.cmd_w, False)
        os.set_blocking(self.res_r, False)
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.pidfd = self._open_pidfd(self.pid)
        self.poller = select.poll()
        for fd in (self.res_r, self.wake_r):
            self.poller.register(fd, select.POLLIN)
        if self.pidfd is not None:
            self.poller.register(self.pidfd, select.POLLIN)
        self.lock = threading.Lock()
        self.buf = bytearray()
        self.ready = False
        self.sent_path: list[str] | None = None
        # Signalling state, under ``lock``:
        self.token: object | None = None
        self.term_at: float | None = None
        self.killed_after_grace = False
        self.dying = False
        self.reaped = False
        self.returncode: int | None = None

    @staticmethod
    def _open_pidfd(pid: int) -> int | None:
        try:
            return os.pidfd_open(pid)
        except (AttributeError, OSError):  # pragma: no cover - kernels before 5.3
            return None

    # -- signalling (any thread) --

    def _killpg(self, sig: int) -> None:
        """Signal the group; the caller holds ``lock`` and has checked ``dying``."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full (already woken) or closed
            os.write(self.wake_w, b"!")

    def terminate(self, token: object) -> None:
        """The canceller of one attempt: SIGTERM to the group, once, if still running it."""
        with self.lock:
            if self.token is not token or self.dying or self.term_at is not None:
                return
            self.term_at = time.monotonic()
            self._killpg(signal.SIGTERM)
            self._wake()

    def escalate(self, *, grace: float) -> None:
        """SIGKILL the group if SIGTERM was sent ``grace`` seconds ago and it still runs."""
        with self.lock:
            if self.dying or self.term_at is None or self.killed_after_grace:
                return
            if time.monotonic() >= self.term_at + grace:
                self.killed_after_grace = True
                self._killpg(signal.SIGKILL)

    def kill(self) -> None:
        """SIGKILL the group now (closing the slot)."""
        with self.lock:
            if not self.dying:
                self._killpg(signal.SIGKILL)

    def claim_reply(self) -> bool:
        """Whether a complete reply counts: only if no cancel reached the child first."""
        with self.lock:
            if self.term_at is not None or self.dying:
                return False
            self.token = None
            return True

    # -- the owning thread --

    def has_exited(self) -> bool:
        """Whether the child has died (without reaping it)."""
        if self.pidfd is not None:
            return bool(select.select([self.pidfd], [], [], 0)[0])
        flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
        return os.waitid(os.P_PID, self.pid, flags) is not None

    def reap(self) -> int:
        """Kill what is left of the group, reap the child, close our fds; the exit status."""
        with self.lock:
            if self.reaped:
                assert self.returncode is not None
                return self.returncode
            self.dying = True
            # The leader is not reaped yet, so its pid still names only its group.
            self._killpg(signal.SIGKILL)
        returncode = self.proc.wait()
        with self.lock:
            self.reaped = True
            self.returncode = returncode
            for fd in (self.cmd_w, self.res_r, self.alive_w, self.wake_r, self.wake_w):
                _close_quietly(fd)
            if self.pidfd is not None:
                _close_quietly(self.pidfd)
        return returncode

    def send_whole(self, data: bytes) -> bool:
        """Write ``data`` (at most ``PIPE_BUF`` bytes) in one go, or nothing; whether it was."""
        try:
            return os.write(self.cmd_w, data) == len(data)
        except OSError:  # full (BlockingIOError), or the child is gone
            return False

    def send_some(self, pending: memoryview) -> memoryview:
        """Write what the pipe takes now; the rest.  A dead reader drops everything."""
        try:
            written = os.write(self.cmd_w, pending)
        except BlockingIOError:
            return pending
        except (BrokenPipeError, OSError):
            return pending[:0]
        return pending[written:]

    def read_some(self) -> bool:
        """Read what is available into ``buf``; False at end of file."""
        try:
            chunk = os.read(self.res_r, _READ_CHUNK)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        self.buf += chunk
        return True

    def take_reply(self) -> list[bytes] | None:
        """The next reply in ``buf`` (skipping the start-up greeting), if complete."""
        while True:
            found = decode_message(self.buf)
            if found is None:
                return None
            parts, end = found
            del self.buf[:end]
            if pickle.loads(parts[0])[0] == "ready":  # noqa: S301 - from our own child
                self.ready = True
                continue
            return parts

    def drain(self) -> list[bytes] | None:
        """After death: read what is left in the pipe and return a reply if complete."""
        while True:
            try:
                chunk = os.read(self.res_r, _READ_CHUNK)
            except BlockingIOError:
                break
            if not chunk:
                break
            self.buf += chunk
        return self.take_reply()

    def drain_wake(self) -> None:
        try:
            while os.read(self.wake_r, 64):
                pass
        except BlockingIOError:
            pass


class _SlotState:
    """What a slot's finalizer needs, kept apart from the slot so the slot can be collected."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.child: _Child | None = None
        self.closed = False

    def shutdown(self) -> None:
        with self.lock:
            self.closed = True
            child, self.child = self.child, None
        if child is not None:
            child.reap()


# -- the slot ------------------------------------------------------------------------------


class _Ahead(NamedTuple):
    """An attempt already written into a child's command pipe, behind the running one."""

    key: tuple[str, str, int]  # run id, step id, attempt
    child: _Child
    #: Whether the attempt before it got its reply: if so, the child may have
    #: started this one, and losing the child now is this attempt's crash.
    replied: bool


class ProcessSlot:
    """One child process owned by one Worker; reused across attempts.

    ``run`` blocks the calling thread until the attempt ends and never raises.
    After a timeout, a cancel or a crash the old child's process group is gone
    and a fresh child is already starting.  ``close`` kills and reaps the child;
    a slot that is garbage-collected, or still open at interpreter exit, is
    closed too.  Use one slot from one thread at a time (``close`` may come from
    any thread).
    """

    def __init__(self, *, name: str = "worker") -> None:
        self._name = name
        self._state = _SlotState()
        self._run_lock = threading.Lock()
        self._finalizer = weakref.finalize(self, self._state.shutdown)
        self._ahead: _Ahead | None = None

    def __repr__(self) -> str:
        return f"ProcessSlot(name={self._name!r}, pid={self.pid})"

    def __enter__(self) -> ProcessSlot:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        """The current child's pid, or ``None`` if none is running."""
        child = self._state.child
        return None if child is None else child.pid

    def start(self) -> int:
        """Start the child now (if not running) so the first attempt need not wait; its pid."""
        with self._run_lock:
            child = self._ensure_child()
        if child is None:
            raise StepvisorError(f"process slot {self._name!r} is closed; create a new one")
        return child.pid

    def close(self) -> None:
        """Kill the child's whole process group and reap it.  Idempotent, any thread.

        An attempt running in ``run`` at that moment ends as ``cancelled``.
        """
        state = self._state
        with state.lock:
            if state.closed:
                return
            state.closed = True
            child = state.child
        if child is not None:
            child.kill()  # ends a running attempt at once
        with self._run_lock:
            self._finalizer()

    def run(
        self,
        spec: AttemptSpec,
        control: AttemptControl,
        ahead: tuple[AttemptSpec, AttemptControl] | None = None,
    ) -> AttemptResult:
        """Run one attempt in the child; block until it ends; return how it ended.

        ``ahead`` is the attempt the caller will run next, if it knows: when
        both are small and have no deadline, its message goes into the child's
        pipe with this one's, so the child starts it the moment it replies
        instead of waiting a round trip (two thread wakes, each a cross-CPU
        interrupt on a VM).  The next call must then be for that attempt; a
        call for any other attempt first replaces the child, so a reply is
        never taken for the wrong attempt.
        """
        with self._run_lock:
            try:
                return self._run(spec, control, ahead)
            except Exception as exc:
                log.exception("process slot %r failed running step %r", self._name, spec.step_id)
                self._retire_current(respawn=True)
                return _backend_failed(spec, exc)
            except BaseException:
                self._retire_current(respawn=False)
                raise

    # -- one attempt --

    def _run(
        self,
        spec: AttemptSpec,
        control: AttemptControl,
        ahead: tuple[AttemptSpec, AttemptControl] | None = None,
    ) -> AttemptResult:
        if self._state.closed:
            return self._closed_result(spec, pid=None)
        sent = self._take_ahead(spec)
        if sent is not None:
            if sent.child is self._state.child:
                # Already in the child's pipe: only wait for its reply.
                return self._attempt_on(sent.child, spec, control, b"", ahead)
            if sent.replied:
                # The child took this attempt from its pipe, or was about to, and
                # died: that is this attempt's crash, not something to run again.
                return _crash_result(spec, sent.child.pid, sent.child.reap(), ready=True)
        late = spec.deadline is not None and time.monotonic() >= spec.deadline
        if late and not control.is_cancelled:
            control.cancel("timeout")
        if control.is_cancelled:
            return _stopped_before_start(spec, control)
        try:
            fn_payload, args = _payload_and_args(spec)
        except StepNotSerializableError as exc:
            exc.attempt = spec.attempt
            return AttemptResult(kind="unsendable", error=exc, note="nothing was sent")
        try:
            child = self._ensure_child()
        except OSError as exc:
            return _spawn_failed(spec, exc)
        if child is None:
            return self._closed_result(spec, pid=None)
        message = self._message(child, spec, fn_payload, args)
        return self._attempt_on(child, spec, control, message, ahead)

    def _attempt_on(
        self,
        child: _Child,
        spec: AttemptSpec,
        control: AttemptControl,
        message: bytes,
        ahead: tuple[AttemptSpec, AttemptControl] | None,
    ) -> AttemptResult:
        """Make ``child`` this attempt's (its cancel stops it), send ``message``
        (``b""`` if it was sent ahead) and wait for the outcome."""
        token = object()
        with child.lock:
            child.token = token
        # Called at once if already cancelled: an attempt sent ahead may be
        # running in the child by now, and this stops it.
        control.on_cancel(functools.partial(child.terminate, token))
        reply = self._exchange(child, spec, control, message, ahead)
        if reply is not None:
            return self._reply_result(spec, child, reply)
        return self._end_of_child(spec, control, child)

    def _take_ahead(self, spec: AttemptSpec) -> _Ahead | None:
        """The record of ``spec`` sent ahead, if it was; replace a child holding another."""
        sent, self._ahead = self._ahead, None
        if sent is None:
            return None
        if sent.key == _key(spec):
            return sent
        if sent.child is self._state.child:
            # Its pipe holds (or it runs) an attempt nobody will wait for: a fresh
            # child is the only way to keep replies matched to attempts.
            log.info("worker process %s had another attempt queued; replacing it", sent.child.pid)
            self._retire(sent.child, respawn=True)
        return None

    def _message(self, child: _Child, spec: AttemptSpec, fn_payload: bytes, args: bytes) -> bytes:
        path = None if child.sent_path == sys.path else list(sys.path)
        meta = (
            spec.run_id,
            spec.step_id,
            spec.attempt,
            spec.max_attempts,
            spec.deadline,
            spec.is_async,
            path,
        )
        message = encode_message([pickle.dumps(meta, protocol=_PROTOCOL), fn_payload, args])
        if path is not None:
            child.sent_path = path
        return message

    def _send_ahead(self, child: _Child, ahead: tuple[AttemptSpec, AttemptControl] | None) -> None:
        """Write the next attempt into the pipe behind the current one, if it may go.

        Only an attempt without a deadline (its time must start when it does),
        not cancelled, to a child that has booted, and small enough for one
        whole-or-nothing write; ``_ahead`` records it.
        """
        message = self._ahead_message(child, ahead)
        if message and child.send_whole(message):
            assert ahead is not None
            self._ahead = _Ahead(_key(ahead[0]), child, replied=False)

    def _ahead_message(
        self, child: _Child, ahead: tuple[AttemptSpec, AttemptControl] | None
    ) -> bytes:
        if ahead is None:
            return b""
        spec, control = ahead
        if spec.deadline is not None or control.is_cancelled or not child.ready:
            return b""
        try:
            fn_payload, args = _payload_and_args(spec)
        except StepNotSerializableError:
            return b""  # its own run reports that
        message = self._message(child, spec, fn_payload, args)
        return message if len(message) <= _AHEAD_MAX else b""

    def _exchange(
        self,
        child: _Child,
        spec: AttemptSpec,
        control: AttemptControl,
        message: bytes,
        ahead: tuple[AttemptSpec, AttemptControl] | None = None,
    ) -> list[bytes] | None:
        """Send the attempt (if not sent yet) and maybe the next one behind it, then
        wait for its reply (``None``: the child died first)."""
        pending = child.send_some(memoryview(message))
        if pending:
            child.poller.register(child.cmd_w, select.POLLOUT)
        else:
            self._send_ahead(child, ahead)  # never interleaved with a part-sent message
        try:
            reply = self._await_reply(child, spec, control, pending)
        finally:
            if pending:  # registered above; the poller outlives this attempt
                with contextlib.suppress(KeyError):
                    child.poller.unregister(child.cmd_w)
        sent = self._ahead
        if sent is not None and sent.child is child and reply is not None:
            self._ahead = sent._replace(replied=True)
        return reply

    def _await_reply(
        self, child: _Child, spec: AttemptSpec, control: AttemptControl, pending: memoryview
    ) -> list[bytes] | None:
        reading = True
        # With attempts sent ahead, the reply may have come in with the previous one.
        early = child.take_reply()
        if early is not None and child.claim_reply():
            return early
        while True:
            dead = False
            for fd, _events in child.poller.poll(_poll_ms(child, spec, control)):
                if fd == child.res_r:
                    reading = child.read_some()
                    if not reading:
                        child.poller.unregister(child.res_r)
                elif fd == child.cmd_w:
                    pending = child.send_some(pending)
                    if not pending:
                        child.poller.unregister(child.cmd_w)
                elif fd == child.wake_r:
                    child.drain_wake()
                else:
                    dead = True
            reply = child.take_reply()
            if reply is None and (dead or (child.pidfd is None and child.has_exited())):
                reply = child.drain()
                dead = True
            if reply is not None and child.claim_reply():
                return reply
            if dead or (not reading and child.pidfd is None and child.has_exited()):
                return None
            _enforce_deadline(child, spec, control)

    def _reply_result(self, spec: AttemptSpec, child: _Child, reply: list[bytes]) -> AttemptResult:
        result = _decode_reply(spec, child.pid, reply)
        if child.has_exited():  # it replied, then died: keep the reply, replace the child
            log.warning("worker process %s died right after replying; replacing it", child.pid)
            self._retire(child, respawn=True)
        return result

    def _end_of_child(
        self, spec: AttemptSpec, control: AttemptControl, child: _Child
    ) -> AttemptResult:
        """The child died during the attempt: say why, and start its replacement."""
        was_ready = child.ready
        returncode = self._retire(child, respawn=True)
        if self._state.closed:
            return self._closed_result(spec, pid=child.pid)
        if control.is_cancelled:
            return _stopped_result(spec, control, child, returncode)
        return _crash_result(spec, child.pid, returncode, ready=was_ready)

    # -- the child's life --

    def _ensure_child(self) -> _Child | None:
        """The running child, started if need be; ``None`` if the slot was closed."""
        state = self._state
        child = state.child
        if child is not None and child.ready and child.has_exited():
            returncode = child.reap()
            log.warning(
                "worker process %s of slot %r %s while idle; starting a fresh one",
                child.pid,
                self._name,
                _describe_exit(returncode),
            )
            child = None
            with state.lock:
                state.child = None
        if child is not None:
            return child
        child = _Child(name=self._name)
        with state.lock:
            if not state.closed:
                state.child = child
                return child
        child.reap()
        return None

    def _retire(self, child: _Child, *, respawn: bool) -> int:
        """Kill and reap ``child``, maybe start the next one at once; the old exit status.

        Eager: ``Popen`` returns in about half a millisecond, and the new
        interpreter starts up while the engine handles this attempt's outcome.
        """
        state = self._state
        with state.lock:
            if state.child is child:
                state.child = None
        returncode = child.reap()
        if respawn and not state.closed:
            try:
                self._ensure_child()
            except OSError as exc:
                log.warning("could not start a fresh worker process yet: %s", exc)
        return returncode

    def _retire_current(self, *, respawn: bool) -> None:
        child = self._state.child
        if child is not None:
            self._retire(child, respawn=respawn)

    def _closed_result(self, spec: AttemptSpec, *, pid: int | None) -> AttemptResult:
        what = "its worker process group was killed (SIGKILL)" if pid else "nothing was run"
        error = StepCancelledError(
            f"step {spec.step_id!r} was stopped on attempt {spec.attempt} because its process "
            f"slot {self._name!r} was closed; {what}",
            step_id=spec.step_id,
            attempt=spec.attempt,
        )
        return AttemptResult(
            kind="cancelled", error=error, note=f"the slot was closed; {what}", extra={"pid": pid}
        )


# -- the loop's timing ------------------------------------------------------------------------


def _payload_and_args(spec: AttemptSpec) -> tuple[bytes, bytes]:
    """The pickled function and inputs of an attempt (raises ``StepNotSerializableError``)."""
    return spec.fn_payload or prepare_payload(spec.step_id, spec.fn), _args_blob(spec)


def _key(spec: AttemptSpec) -> tuple[str, str, int]:
    return (spec.run_id, spec.step_id, spec.attempt)


def _poll_ms(child: _Child, spec: AttemptSpec, control: AttemptControl) -> int | None:
    """How long the next poll may block: until the deadline, the end of grace, or forever."""
    now = time.monotonic()
    waits: list[float] = []
    with child.lock:
        term_at, killed = child.term_at, child.killed_after_grace
    if not control.is_cancelled:
        if spec.deadline is not None:
            waits.append(spec.deadline - now)
    elif term_at is None:
        waits.append(0.0)  # cancelled, but our canceller has not run yet: look again soon
    elif not killed:
        waits.append(term_at + spec.kill_grace - now)
    if child.pidfd is None:
        waits.append(_FALLBACK_POLL_S)
    if not waits:
        return None
    return max(0, math.ceil(min(waits) * 1000))


def _enforce_deadline(child: _Child, spec: AttemptSpec, control: AttemptControl) -> None:
    if not control.is_cancelled:
        if spec.deadline is not None and time.monotonic() >= spec.deadline:
            control.cancel("timeout")  # runs our canceller (SIGTERM) like the engine would
        return
    # Normally a no-op: our canceller ran inside control.cancel.  It is repeated here in
    # case another canceller registered before ours raised and ours was never called.
    child.terminate(child.token)
    child.escalate(grace=spec.kill_grace)


# -- results ------------------------------------------------------------------------------------


def _leftover_info(leftovers: list[int]) -> tuple[str | None, dict[str, Any]]:
    if not leftovers:
        return None, {}
    pids = ", ".join(map(str, leftovers))
    note = f"the step left {len(leftovers)} process(es) running (pid {pids}); they were killed"
    return note, {"leftover_pids": tuple(leftovers)}


def _decode_reply(spec: AttemptSpec, pid: int, reply: list[bytes]) -> AttemptResult:
    meta = pickle.loads(reply[0])  # noqa: S301 - from our own child over a private pipe
    kind = meta[0]
    if kind == "ok":
        return _ok_result(spec, meta[1], reply[1:], meta[2])
    if kind == "error":
        _, qualname, message, remote_tb, why_not, leftovers = meta
        return _error_result(
            spec, pid, reply[1], qualname=qualname, message=message, remote_tb=remote_tb,
            why_not=why_not, leftovers=leftovers,
        )  # fmt: skip
    _, message, remote_tb, leftovers = meta
    note, extra = _leftover_info(leftovers)
    error = StepNotSerializableError(message, step_id=spec.step_id, attempt=spec.attempt)
    return AttemptResult(
        kind="unsendable", error=error, traceback=remote_tb, note=note, extra=extra
    )


def _ok_result(
    spec: AttemptSpec, names: list[str] | None, blobs: list[bytes], leftovers: list[int]
) -> AttemptResult:
    note, extra = _leftover_info(leftovers)
    if names is None:
        return AttemptResult(kind="ok", note=note, extra=extra)
    outputs: dict[str, Any] = {}
    for name, blob in zip(names, blobs, strict=True):
        try:
            outputs[name] = pickle.loads(blob)  # noqa: S301 - from our own child
        except Exception as exc:
            error = StepNotSerializableError(
                f"step {spec.step_id!r} returned artifact {name!r}, which could not be loaded "
                f"in the parent process ({type(exc).__name__}: {exc}); return values whose "
                "classes the parent can import, or plain data",
                step_id=spec.step_id,
                attempt=spec.attempt,
            )
            error.__cause__ = exc
            return AttemptResult(kind="unsendable", error=error, note=note, extra=extra)
    return AttemptResult(kind="ok", outputs=outputs, note=note, extra=extra)


def _error_result(
    spec: AttemptSpec,
    pid: int,
    blob: bytes,
    *,
    qualname: str,
    message: str,
    remote_tb: str,
    why_not: str,
    leftovers: list[int],
) -> AttemptResult:
    note, extra = _leftover_info(leftovers)
    error: BaseException | None = None
    if blob:
        try:
            error = pickle.loads(blob)  # noqa: S301 - from our own child
        except Exception as exc:
            why_not = f"{type(exc).__name__}: {exc} (while loading it in the parent)"
    if not isinstance(error, BaseException):
        error = RemoteStepError(
            f"step {spec.step_id!r} raised {qualname}: {message}; that exception could not "
            f"be sent back from its worker process ({why_not}), so its type and traceback "
            "are in remote_type and remote_traceback; make the exception class picklable "
            "(pass every __init__ argument on to Exception.__init__) to get it back as itself",
            step_id=spec.step_id,
            attempt=spec.attempt,
            remote_type=qualname,
            remote_traceback=remote_tb,
        )
    error.add_note(f"Traceback in worker process {pid}:\n{remote_tb.rstrip()}")
    return AttemptResult(kind="error", error=error, traceback=remote_tb, note=note, extra=extra)


def _stopped_before_start(spec: AttemptSpec, control: AttemptControl) -> AttemptResult:
    note = "stopped before it started; no process was signalled"
    return AttemptResult(
        kind="cancelled",
        error=stop_error(spec, control.reason, note),
        note=note,
        extra={"reason": control.reason},
    )


def _stopped_result(
    spec: AttemptSpec, control: AttemptControl, child: _Child, returncode: int
) -> AttemptResult:
    if child.killed_after_grace:
        sig = "SIGKILL"
        how = f"its process group was killed (SIGKILL after {spec.kill_grace:g} s grace)"
    elif returncode < 0:
        sig = _signal_name(-returncode)
        how = f"its process group was killed ({sig})"
    else:
        sig = "SIGTERM"
        how = f"its process group was sent SIGTERM and the worker exited with code {returncode}"
    return AttemptResult(
        kind="cancelled",
        error=stop_error(spec, control.reason, how),
        note=f"{how}; a fresh worker process replaces it",
        extra={"signal": sig, "pid": child.pid, "exitcode": returncode, "reason": control.reason},
    )


def _crash_result(spec: AttemptSpec, pid: int, returncode: int, *, ready: bool) -> AttemptResult:
    how = _describe_exit(returncode)
    if not ready:
        message = (
            f"the worker process (pid {pid}) {how} while starting, before it could run step "
            f"{spec.step_id!r}; its stderr says why (often the Python at {sys.executable} "
            "cannot import stepvisor or something the step needs)"
        )
    elif returncode < 0:
        message = (
            f"the worker process (pid {pid}) running step {spec.step_id!r} (attempt "
            f"{spec.attempt}) {how}; a fresh worker process replaces it. Something killed "
            "it, or the step crashed the interpreter (native code, ctypes, out of memory)"
        )
    elif returncode == EXIT_PROTOCOL_ERROR:
        message = (
            f"the worker process (pid {pid}) running step {spec.step_id!r} (attempt "
            f"{spec.attempt}) {how}: it lost its pipes to this process; a fresh worker "
            "process replaces it. Did the step close file descriptors it does not own? "
            "The worker's stderr says more"
        )
    else:
        message = (
            f"the worker process (pid {pid}) running step {spec.step_id!r} (attempt "
            f"{spec.attempt}) {how}; a fresh worker process replaces it. The step or code it "
            "called ended the process (os._exit?); raise an exception instead"
        )
    error = WorkerCrashedError(
        message, step_id=spec.step_id, attempt=spec.attempt, exitcode=returncode
    )
    signame = _signal_name(-returncode) if returncode < 0 else None
    return AttemptResult(
        kind="crash",
        error=error,
        note=f"the worker process {how}; a fresh one replaces it",
        extra={"pid": pid, "exitcode": returncode, "signal": signame},
    )


def _backend_failed(spec: AttemptSpec, exc: Exception) -> AttemptResult:
    error = WorkerCrashedError(
        f"the process backend failed while running step {spec.step_id!r} "
        f"({type(exc).__name__}: {exc}); a fresh worker process will be started for "
        "the next attempt; please report this as a stepvisor bug",
        step_id=spec.step_id,
        attempt=spec.attempt,
    )
    error.__cause__ = exc
    return AttemptResult(kind="crash", error=error, traceback=traceback.format_exc())


def _spawn_failed(spec: AttemptSpec, exc: OSError) -> AttemptResult:
    error = WorkerCrashedError(
        f"could not start a worker process for step {spec.step_id!r} ({exc}); check the "
        "process and file-descriptor limits (ulimit -u, ulimit -n) and free memory",
        step_id=spec.step_id,
        attempt=spec.attempt,
    )
    error.__cause__ = exc
    return AttemptResult(kind="crash", error=error, note="no worker process could be started")
