"""The worker process behind a :class:`~stepvisor.backends.process.ProcessSlot`.

A process slot starts this module once (fork+exec of ``sys.executable``, in a
session and process group of its own) and then sends it one attempt at a time.
The process stays alive between attempts, so a step pays for interpreter
start-up only when its worker was replaced (after a timeout, cancel or crash)::

    parent (ProcessSlot)                         this process (own session, pgid == pid)
    cmd_w   ──[ meta | fn payload | args ]──▶    cmd_fd    main loop: load, call, reply
    res_r   ◀──[ ready | ok | error | unsendable ]──  res_fd
    alive_w (never written)      ── EOF ──▶      alive_fd  SIGIO + watchdog: kill the group
    shm socket  ◀──[ memfd descriptors ]──▶      shm_fd    large values (``_shm``), sent
                                                           ahead of the message naming them

Why it is written the way it is:

* **It imports little.**  Start-up time is paid again after every timeout, so
  only what every attempt needs is imported up front; ``traceback``,
  ``asyncio`` and ``cloudpickle`` are imported on first use.
* **It never outlives its parent.**  Only the parent holds the write end of the
  "alive" pipe, and the kernel closes it however the parent dies (even by
  SIGKILL).  Two independent mechanisms then kill this process *group*, so the
  processes a step started die too: ``O_ASYNC`` makes the kernel send SIGIO
  (default action: terminate) to the group when the pipe's last writer goes,
  which works even while a C extension holds the GIL; and a watchdog thread,
  blocked reading the pipe, sends SIGKILL to the group on EOF, for processes
  that ignore or handle SIGIO.  ``PR_SET_PDEATHSIG`` is deliberately *not*
  used: it fires when the parent *thread* that forked us exits, and the
  engine's worker threads may be replaced while their slot lives on.
* **A step leaves nothing running.**  This process is a child subreaper, so
  every process a step starts stays its descendant even when orphaned.  After
  each attempt, descendants still running are killed (SIGKILL) and reaped, and
  their pids are reported; only processes that both left the process group and
  double-forked before the subreaper existed can escape.
* **Nothing a step does can hang the protocol.**  Results and exceptions are
  checked and packed here with the functions every backend shares
  (:mod:`stepvisor.backends._wire`): ``pickle`` first and ``cloudpickle`` as the
  fallback; an exception that does not survive a pickle round trip is sent as
  text (type, message, traceback) and becomes ``RemoteStepError`` in the parent.
* **It lives beside the process package, not in it**: importing
  ``stepvisor.backends.process`` would load the parent's side (``logging``,
  ``subprocess``, ``cloudpickle``) at every boot.

Wire format, both ways: a message is ``u32 n``, then ``n`` lengths as ``u64``,
then the ``n`` parts; part 0 is always a pickled :mod:`~stepvisor.backends._wire`
message (``Attempt`` in; ``Ready``, ``Returned``, ``Raised`` or ``Unsendable`` out).
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]
import os
import pickle
import signal
import struct
import sys
import threading
import types
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

from stepvisor.backends import _shm
from stepvisor.backends._wire import (
    PROTOCOL,
    Attempt,
    Raised,
    Ready,
    Reply,
    Returned,
    Unsendable,
    check_outputs,
    dump,
    format_remote,
    pack_error,
    safe_str,
    trace_context,
)
from stepvisor.context import StepContext

if TYPE_CHECKING:
    from stepvisor.backends._child_output import ChildCapture

__all__ = [
    "EXIT_PROTOCOL_ERROR",
    "RETURNED_NOTHING",
    "decode_message",
    "dump_attempt",
    "encode_message",
    "load_attempt",
    "main",
]

_COUNT = struct.Struct("<I")
_LENGTH_SIZE = 8
#: A message with more parts than this is a protocol error, not a real message.
_MAX_PARTS = 1 << 20
_PR_SET_CHILD_SUBREAPER = 36
#: A pipe holds 64 KiB, so a larger read returns no more (and costs an ``mmap``).
_READ_CHUNK = 1 << 16
#: The exit code of a worker that lost its pipes to the parent (or got a corrupt message).
EXIT_PROTOCOL_ERROR = 70
#: The socket descriptors of shared-memory segments travel on (both ways), set by ``main``.
_SHM_FD = [-1]
#: The signals whose handlers a step may have changed, reset before each attempt.
_RESET_SIGNALS: Final = (int(signal.SIGTERM), int(signal.SIGIO))
#: ``signal.getsignal`` without its enum: that turns a handler into an enum member, or
#: fails to and raises and catches a ``ValueError`` when it is a function (ours, under
#: capture): 1 to 5 µs, twice per attempt.
_getsignal: Final[Callable[[int], object]] = _signal.getsignal
_SIG_DFL: Final = int(signal.SIG_DFL)


# -- wire format (shared with the parent) --------------------------------------


#: The header of a message of 0 to 7 parts, compiled once (each part costs a reply
#: or an attempt; formatting the layout for each was half the cost of encoding).
_HEADERS: Final = tuple(struct.Struct(f"<I{n}Q") for n in range(8))


def encode_message(parts: Sequence[bytes]) -> bytes:
    """One message: the part count, the part lengths, then the parts."""
    count = len(parts)
    layout = _HEADERS[count] if count < len(_HEADERS) else struct.Struct(f"<I{count}Q")
    return b"".join((layout.pack(count, *map(len, parts)), *parts))


def dump_attempt(meta: Attempt) -> bytes:
    """Part 0 of an attempt message: its fields as a plain tuple.

    A ``NamedTuple`` pickles by class reference, which costs a lookup and a
    Python-level ``__new__`` at each end; a tuple of its fields costs a quarter
    of that, and this is paid on every attempt.
    """
    return pickle.dumps(tuple(meta), protocol=PROTOCOL)


def load_attempt(part: bytes) -> Attempt:
    """The :class:`Attempt` that :func:`dump_attempt` wrote."""
    return Attempt._make(pickle.loads(part))  # noqa: S301 - from our parent over a private pipe


#: Part 0 of the reply of most steps (returned ``None``, left nothing running): made
#: once, and told apart by the parent with a comparison instead of an unpickling.
RETURNED_NOTHING: Final = pickle.dumps(Returned(), protocol=PROTOCOL)


def decode_message(buf: bytearray) -> tuple[list[bytes], int] | None:
    """The first complete message in ``buf`` and its size, or ``None`` if incomplete."""
    if len(buf) < _COUNT.size:
        return None
    (count,) = _COUNT.unpack_from(buf, 0)
    if count > _MAX_PARTS:
        raise ValueError(f"corrupt message: {count} parts")
    head = _COUNT.size + _LENGTH_SIZE * count
    if len(buf) < head:
        return None
    lengths = struct.unpack_from(f"<{count}Q", buf, _COUNT.size)
    end = head + sum(lengths)
    if len(buf) < end:
        return None
    view = memoryview(buf)
    parts: list[bytes] = []
    offset = head
    for length in lengths:
        parts.append(bytes(view[offset : offset + length]))
        offset += length
    view.release()
    return parts, end


class _Reader:
    """Blocking reader of messages from one file descriptor."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buf = bytearray()

    def message(self) -> list[bytes]:
        while True:
            found = decode_message(self._buf)
            if found is not None:
                parts, end = found
                del self._buf[:end]
                return parts
            chunk = os.read(self._fd, _READ_CHUNK)
            if not chunk:
                raise EOFError("the parent closed the command pipe")
            self._buf += chunk


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


# -- never outliving the parent --------------------------------------------------


def _arm_parent_death(alive_fd: int) -> None:
    """Kill this process group when the parent's end of the alive pipe closes."""
    import fcntl  # noqa: PLC0415 - tiny builtin module, only needed here

    signal.signal(signal.SIGIO, signal.SIG_DFL)
    fcntl.fcntl(alive_fd, fcntl.F_SETOWN, -os.getpgrp())
    flags = fcntl.fcntl(alive_fd, fcntl.F_GETFL)
    fcntl.fcntl(alive_fd, fcntl.F_SETFL, flags | os.O_ASYNC)
    threading.Thread(
        target=_watch_parent, args=(alive_fd,), name="stepvisor-parent-watchdog", daemon=True
    ).start()


def _watch_parent(alive_fd: int) -> None:
    while True:
        try:
            data = os.read(alive_fd, 1)
        except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for clarity
            continue
        except OSError:
            data = b""
        if not data:
            os.killpg(0, signal.SIGKILL)


def _become_subreaper() -> None:
    """Adopt orphaned descendants, so that a step's leftovers can be found and reaped."""
    try:
        import ctypes  # noqa: PLC0415 - only needed once, at start-up

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


# -- leftovers ---------------------------------------------------------------------


def _read_small(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 1 << 16)
    finally:
        os.close(fd)


def _children_of(pid: int | str) -> list[int]:
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    found: list[int] = []
    for tid in tasks:
        try:
            found.extend(int(p) for p in _read_small(f"/proc/{pid}/task/{tid}/children").split())
        except OSError:
            continue
    return found


def _is_zombie(pid: int) -> bool:
    try:
        stat = _read_small(f"/proc/{pid}/stat")
    except OSError:
        return True
    # The state follows the parenthesised command name, which may contain spaces.
    state = stat.rfind(b")") + 2
    return stat[state : state + 1] in (b"Z", b"X")


def _descendants() -> list[int]:
    """Pids of every process below this one, parents before their children."""
    order: list[int] = []
    todo = _children_of("self")
    seen: set[int] = set()
    while todo:
        pid = todo.pop(0)
        if pid in seen:
            continue
        seen.add(pid)
        order.append(pid)
        todo.extend(_children_of(pid))
    return order


def _kill_leftovers() -> tuple[int, ...]:
    """SIGKILL and reap what the last step left running; return the pids killed."""
    try:
        # The common case, in about a microsecond: no children at all, running or not.
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return ()
    killed: list[int] = []
    for _ in range(3):  # a second pass catches what forked while we were killing
        running = [pid for pid in _descendants() if not _is_zombie(pid)]
        if not running:
            break
        for pid in running:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                continue
        _reap(running)
    _reap_exited()
    return tuple(sorted(set(killed)))


def _reap(pids: Sequence[int]) -> None:
    # Parents first: once a killed parent is reaped, its killed children have been
    # handed to us (we are their subreaper) and can be waited for in turn.
    for pid in pids:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            continue


def _reap_exited() -> None:
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


# -- one attempt ---------------------------------------------------------------------


class _UnsendableError(Exception):
    """A value that cannot cross the process boundary: what, why (``cause``), and the fix."""

    def __init__(self, problem: str, fix: str, cause: BaseException) -> None:
        super().__init__(problem)
        self.problem = problem
        self.fix = fix
        self.cause = cause


def _reply(message: Reply, *values: bytes) -> list[bytes]:
    return [pickle.dumps(message, protocol=PROTOCOL), *values]


def _unsendable_reply(bad: _UnsendableError, leftovers: tuple[int, ...]) -> list[bytes]:
    cause = bad.cause
    message = f"{bad.problem} ({type(cause).__name__}: {safe_str(cause)}); {bad.fix}"
    return _reply(Unsendable(message, format_remote(cause), leftovers))


#: Part 0 of the reply of a step that returned these artifact names and left nothing
#: running, by names: a ``NamedTuple`` costs about 8 µs to pickle (its class is
#: looked up and its ``__getnewargs__`` called), and a step returns the same names
#: every time (an Executor call: one).
_RETURNED: dict[tuple[str, ...], bytes] = {}
_RETURNED_KEPT: Final = 64


def _returned(names: tuple[str, ...], leftovers: tuple[int, ...]) -> bytes:
    """Part 0 of the reply of a step that returned ``names`` (its values sent whole)."""
    if leftovers:
        return pickle.dumps(Returned(names=names, leftovers=leftovers), protocol=PROTOCOL)
    head = _RETURNED.get(names)
    if head is None:
        head = pickle.dumps(Returned(names=names), protocol=PROTOCOL)
        if len(_RETURNED) < _RETURNED_KEPT:
            _RETURNED[names] = head
    return head


def _ok_reply(
    step_id: str, outputs: dict[str, Any] | None, leftovers: tuple[int, ...]
) -> list[bytes]:
    """The reply for a step that returned; raises ``_UnsendableError`` naming a bad artifact."""
    if outputs is None:
        return [RETURNED_NOTHING] if not leftovers else _reply(Returned(leftovers=leftovers))
    pickles: list[tuple[bytes, list[memoryview]]] = []
    for name, value in outputs.items():
        try:
            pickles.append(_shm.dumps_sharing(value, dump))
        except Exception as exc:
            raise _UnsendableError(
                f"step {step_id!r} returned artifact {name!r} (a {type(value).__name__}) "
                "that cannot be sent back from its worker process",
                "return picklable values (plain data), or run the step with executor='thread'",
                exc,
            ) from exc
    names = tuple(outputs)
    if not any(raws for _, raws in pickles):
        return [_returned(names, leftovers), *(p for p, _ in pickles)]
    try:
        # Large buffers: one segment, its descriptor sent ahead of the reply.
        shared = _shm.share(pickles, lambda fds: _shm.send_fds(_shm.socket_of(_SHM_FD[0]), fds))
    except OSError:  # no memfd here, or no descriptors left: the pipe still works
        blobs = [
            _shm.in_band(v, dump) if raws else p
            for v, (p, raws) in zip(outputs.values(), pickles, strict=True)
        ]
        return [_returned(names, leftovers), *blobs]
    message = Returned(names=names, leftovers=leftovers, shared=shared, fds=1)
    return _reply(message, *(p for p, _ in pickles))


def _call(fn: Callable[..., Any], ctx: StepContext, *, is_async: bool) -> object:
    result = fn(ctx)
    if is_async or isinstance(result, types.CoroutineType):
        import asyncio  # noqa: PLC0415 - slow to import, needed only by async steps

        result = asyncio.run(result)
    return result


def _call_traced(meta: Attempt, fn: Callable[..., Any], ctx: StepContext) -> object:
    """Call the step; a traced attempt with its span's context attached (imported only then)."""
    if meta.trace is None:
        return _call(fn, ctx, is_async=meta.is_async)
    with trace_context(meta.trace):
        return _call(fn, ctx, is_async=meta.is_async)


def _load_attempt(meta: Attempt, parts: list[bytes]) -> tuple[Callable[..., Any], Any, Any]:
    if meta.path is not None:
        sys.path[:] = meta.path
    if meta.authkey is not None:
        from multiprocessing import process  # noqa: PLC0415 - only for a parent that has it

        process.current_process().authkey = process.AuthenticationString(meta.authkey)  # type: ignore[attr-defined]
    try:
        fn = pickle.loads(parts[1])  # noqa: S301 - same
    except BaseException as exc:
        raise _UnsendableError(
            f"step {meta.step_id!r}: its function could not be loaded in the worker process",
            "make its module importable there (same sys.path and working directory)",
            exc,
        ) from exc
    fds: list[int] = []
    try:
        if meta.fds:  # sent ahead of this message, so already here
            fds = _shm.recv_fds(_shm.socket_of(_SHM_FD[0]), meta.fds)
        inputs, params = pickle.loads(parts[2])  # noqa: S301 - same
        if fds:
            inputs, params = _shm.resolve(inputs, fds), _shm.resolve(params, fds)
    except BaseException as exc:
        raise _UnsendableError(
            f"step {meta.step_id!r}: its inputs or params could not be loaded in the worker "
            "process",
            "pass plain data, or run the step with executor='thread'",
            exc,
        ) from exc
    finally:
        for fd in fds:  # each mapping holds its own
            os.close(fd)
    return fn, inputs, params


def _run_attempt(parts: list[bytes]) -> tuple[list[bytes], ChildCapture | None]:
    """Run one attempt message and build the reply; never raises for a step's sake.

    Also the attempt's capture, if its run captures: its reply then goes with
    the end mark of its output (see :func:`_send_reply`).
    """
    # Undo what a previous step may have changed: a step stopped by SIGTERM must die
    # (under capture, by the handler that sends its stacks first: see _child_output).
    kept = _CAPTURE[0].handler if _CAPTURE else None
    handler_set = False
    for signum in _RESET_SIGNALS:
        handler = _getsignal(signum)
        if handler == _SIG_DFL:
            continue
        if signum == signal.SIGTERM and handler == kept:
            handler_set = True
        else:
            signal.signal(signum, signal.SIG_DFL)
    meta = load_attempt(parts[0])
    try:
        fn, inputs, params = _load_attempt(meta, parts)
    except _UnsendableError as bad:
        # A captured attempt still ends its output (the parent waits for the mark).
        return _unsendable_reply(bad, ()), _capture_for(meta, handler_set=handler_set)
    ctx = StepContext(
        run_id=meta.run_id,
        step_id=meta.step_id,
        attempt=meta.attempt,
        max_attempts=meta.max_attempts,
        inputs=inputs,
        params=params,
        deadline=meta.deadline,
    )
    capture = _capture_for(meta, handler_set=handler_set)
    try:
        outputs = check_outputs(meta.step_id, _call_traced(meta, fn, ctx))
    except BaseException as exc:
        packed = pack_error(exc, where=f"worker process {os.getpid()}")
        return _reply(Raised(packed, _finish_attempt())), capture
    leftovers = _finish_attempt()
    try:
        return _ok_reply(meta.step_id, outputs, leftovers), capture
    except _UnsendableError as bad:
        return _unsendable_reply(bad, leftovers), capture


def _finish_attempt() -> tuple[int, ...]:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            continue
    return _kill_leftovers()


def _send_reply(res_fd: int, reply: bytes, capture: ChildCapture | None) -> None:
    """Send the reply of an attempt; a captured one's goes with the end of its output.

    A captured attempt's output ends with a mark on the output pipe, written
    after its leftovers died (nothing of theirs follows it), so the parent
    knows where the next attempt's output begins.  A small reply rides in that
    mark, in the same write: one system call here, one wake-up and one read in
    the parent, as for an attempt that is not captured.  A larger one follows
    the mark on the reply pipe.
    """
    if capture is None or not capture.end(reply):
        _write_all(res_fd, reply)


#: The output pipe to the parent (``-1``: none) and the capture using it, made on first use.
_OUT_FD = [-1]
_CAPTURE: list[ChildCapture] = []


def _capture_for(meta: Attempt, *, handler_set: bool) -> ChildCapture | None:
    """Start capturing this attempt's output if its run captures (see ``_child_output``)."""
    if meta.capture is None or _OUT_FD[0] < 0:
        if _CAPTURE:
            _CAPTURE[0].off()
        return None
    if not _CAPTURE:
        from stepvisor.backends._child_output import ChildCapture  # noqa: PLC0415 - captured only

        _CAPTURE.append(ChildCapture(_OUT_FD[0]))
    capture = _CAPTURE[0]
    capture.begin(meta.run_id, meta.step_id, meta.attempt, meta.capture, handler_set=handler_set)
    return capture


# -- main loop --------------------------------------------------------------------------


def _take_fds(argv: Sequence[str]) -> tuple[int, int, int, int]:
    cmd_fd, res_fd, alive_fd, shm_fd = (int(arg) for arg in argv[:4])
    if len(argv) > 4:
        _OUT_FD[0] = int(argv[4])
        os.set_inheritable(_OUT_FD[0], False)
    for fd in (cmd_fd, res_fd, alive_fd, shm_fd):
        # The parent passed them inheritable; the step's own subprocesses must not get them.
        os.set_inheritable(fd, False)
    return cmd_fd, res_fd, alive_fd, shm_fd


def main(argv: Sequence[str] | None = None) -> None:
    """Serve attempts from the parent until it closes the command pipe (or dies)."""
    cmd_fd, res_fd, alive_fd, _SHM_FD[0] = _take_fds(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # an ignoring parent must not protect us
    _arm_parent_death(alive_fd)
    _become_subreaper()
    try:
        _write_all(res_fd, encode_message([pickle.dumps(Ready(os.getpid()), protocol=PROTOCOL)]))
        reader = _Reader(cmd_fd)
        while True:
            try:
                parts = reader.message()
            except EOFError:
                break
            reply, capture = _run_attempt(parts)
            _send_reply(res_fd, encode_message(reply), capture)
    except BaseException as exc:
        # Our own failure (a broken pipe, a corrupt message): nothing can be reported
        # through the pipe; say it on stderr and let the parent see the exit code.
        if not isinstance(exc, BrokenPipeError):
            os.write(2, f"stepvisor worker {os.getpid()}: {format_remote(exc)}".encode())
        os._exit(EXIT_PROTOCOL_ERROR)
    _finish_attempt()
    os._exit(0)


if __name__ == "__main__":
    main()
