"""One child process of a process slot, and this process's ends of its pipes.

The worker manager's half of the process backend (the slot, ``_slot.py``, is
the task manager): start the child (fork+exec of ``sys.executable`` running
:mod:`stepvisor.backends._child`, in a session of its own), signal its whole
process group, reap it, and move bytes through its pipes without blocking.

It is started with ``-c`` and the directory this ``stepvisor`` was imported
from, rather than ``-m``, so the child runs the *same* stepvisor even when the
parent found it through a ``sys.path`` edit rather than an installation.  The
child is reaped only after SIGKILL has been sent to its group: while the dead
leader is unreaped its pid (the group id) cannot be reused, so the signal
cannot reach a stranger.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import stepvisor
from stepvisor.backends._child import RETURNED_NOTHING, decode_message
from stepvisor.backends._shm import Fds, recv_fds, send_fds
from stepvisor.backends._wire import Ready, Reply, Returned
from stepvisor.backends.process._output import ChildOutput, Key

__all__ = ["Child", "Received"]

#: The directory holding the ``stepvisor`` package this process runs.
_PKG_ROOT: Final = str(Path(stepvisor.__file__).resolve().parent.parent)
_BOOTSTRAP: Final = (
    "import sys; sys.path.insert(0, sys.argv[5]); "
    "from stepvisor.backends._child import main; main(sys.argv[1:5] + sys.argv[7:])"
)
#: What one read asks for: a pipe holds 64 KiB, so more is never returned, and a
#: larger request costs an ``mmap`` and ``munmap`` of the buffer on every read
#: (about 8 µs for 1 MiB, against 0.5 µs for this), paid once per attempt.
_READ_CHUNK: Final = 1 << 16

#: ``waitid`` flags that ask whether a child has exited without reaping it (or waiting).
_PEEK_EXIT: Final = os.WEXITED | os.WNOHANG | os.WNOWAIT
_NOTHING: Final = Returned()
#: The replies that name a step's artifacts and nothing else, by their bytes: a step
#: sends the same every time, and a ``NamedTuple`` costs microseconds to unpickle.
_LOADED: dict[bytes, Returned] = {}
_LOADED_KEPT: Final = 256
#: A reply from the child: its message, all its parts (values follow part 0), and the
#: shared-memory descriptors sent with it.
Received = tuple[Reply, list[bytes], Fds | None]


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


class Child:
    """One live child process and this process's ends of its pipes.

    ``lock`` guards the signalling state, because cancellers run on other
    threads; everything else is used by the one thread inside ``run``.
    """

    def __init__(self, *, name: str) -> None:
        fds: list[int] = []
        try:
            for _ in range(4):
                fds.extend(os.pipe())
            # Datagrams: each batch of descriptors arrives whole, in order, on its own.
            self.shm, shm_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            fds.append(shm_theirs.detach())
            cmd_r, self.cmd_w, self.res_r, res_w, alive_r, self.alive_w, out_r, out_w, shm_r = fds
            self.out_r = out_r
            theirs = (cmd_r, res_w, alive_r, shm_r, out_w)
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _BOOTSTRAP,
                    *map(str, theirs[:4]),
                    _PKG_ROOT,
                    name,
                    str(out_w),
                ],
                pass_fds=theirs,
                close_fds=True,
                start_new_session=True,
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            for fd in fds:
                _close_quietly(fd)
            if hasattr(self, "shm"):
                self.shm.close()
            raise
        for fd in theirs:
            _close_quietly(fd)
        self.pid: int = self.proc.pid
        os.set_blocking(self.cmd_w, False)
        os.set_blocking(self.res_r, False)
        os.set_blocking(self.out_r, False)
        #: What the child writes to fds 1 and 2 while captured, parsed into attempt logs.
        self.output = ChildOutput()
        self.shm.setblocking(False)
        self._open_poller()
        self.lock = threading.Lock()
        self.buf = bytearray()
        #: Attempts it replied to (``AttemptSpec.child_calls`` bounds them).
        self.calls = 0
        self.ready = False
        self.sent_path: list[str] | None = None
        # Signalling state, under ``lock``:
        self.token: object | None = None
        self.term_at: float | None = None
        self.killed_after_grace = False
        self.dying = False
        self.reaped = False
        self.returncode: int | None = None

    def _open_poller(self) -> None:
        """What an attempt's loop waits on: replies, a wake-up from a canceller, the exit.

        The wake-up pipe lets a canceller on another thread cut a poll short;
        the pidfd, where the kernel has one, makes the child's exit an event too.
        """
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.pidfd = self._open_pidfd(self.pid)
        self.poller = select.poll()
        for fd in (self.res_r, self.wake_r, self.out_r):
            self.poller.register(fd, select.POLLIN)
        if self.pidfd is not None:
            self.poller.register(self.pidfd, select.POLLIN)

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
        # One syscall, asked once per attempt: cheaper than a select on the pidfd.
        if self.pidfd is not None:
            return os.waitid(os.P_PIDFD, self.pidfd, _PEEK_EXIT) is not None
        return os.waitid(os.P_PID, self.pid, _PEEK_EXIT) is not None

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
            self.read_output(until_eof=True)  # what it wrote before it died is kept
            for fd in (self.cmd_w, self.res_r, self.alive_w, self.wake_r, self.wake_w, self.out_r):
                _close_quietly(fd)
            self.shm.close()  # descriptors still queued in it are freed with it
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

    def read_output(self, *, until_eof: bool = False) -> bool:
        """Feed what the child wrote to its output pipe to the parser; False at end of file.

        ``until_eof``: the child is dead; read all that is left (never blocks).
        """
        while True:
            try:
                chunk = os.read(self.out_r, _READ_CHUNK)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not chunk:
                return False
            self.output.feed(chunk)
            if not until_eof and len(chunk) < _READ_CHUNK:
                return True

    def take_reply(self, captured: Key | None = None) -> Received | None:
        """The next reply, if complete (the start-up greeting is taken on the way).

        ``captured``: the attempt's ``(run id, step id, attempt)`` when its output is
        captured.  Its reply then comes once the end mark of its output did:
        in the mark itself, or on the reply pipe after it (a large one).  Until
        the mark, a reply in ``buf`` is a later attempt's, never this one's.
        """
        if captured is not None:
            output = self.output
            framed = output.replies.pop(captured, None)
            if framed is not None:
                found = decode_message(bytearray(framed))
                if found is None:  # pragma: no cover - a frame is written whole
                    raise RuntimeError("a worker process sent a cut reply in its end mark")
                return self._received(found[0])
            if captured not in output.ended:
                if not self.ready:
                    self._take_greeting()
                return None
            reply = self.take_reply()
            if reply is not None:
                output.ended.discard(captured)
            return reply
        while True:
            found = decode_message(self.buf)
            if found is None:
                return None
            parts, end = found
            del self.buf[:end]
            received = self._received(parts)
            if received is not None:
                return received

    def _take_greeting(self) -> None:
        """Take the start-up greeting if it is first in ``buf`` (and leave a reply there)."""
        found = decode_message(self.buf)
        if (
            found is not None
            and found[0][0] != RETURNED_NOTHING
            and isinstance(pickle.loads(found[0][0]), Ready)  # noqa: S301 - our own child
        ):
            del self.buf[: found[1]]
            self.ready = True

    def _received(self, parts: list[bytes]) -> Received | None:
        """The reply made of ``parts``; ``None`` for the start-up greeting (noted)."""
        head = parts[0]
        if head == RETURNED_NOTHING:
            return _NOTHING, parts, None
        message = _LOADED.get(head)
        if message is not None:
            return message, parts, None
        message = pickle.loads(head)  # noqa: S301 - from our own child
        if (
            type(message) is Returned
            and message == Returned(names=message.names)
            and len(_LOADED) < _LOADED_KEPT
        ):
            _LOADED[head] = message  # its names only: the same bytes, the same message
        if isinstance(message, Ready):
            self.ready = True
            return None
        fds = None
        if isinstance(message, Returned) and message.fds:
            # Sent before the reply, so queued by now; a loss is a lost reply.
            fds = Fds(recv_fds(self.shm, message.fds))
        return message, parts, fds

    def send_fds(self, fds: Sequence[int]) -> bool:
        """Send shared-memory descriptors ahead of the attempt naming them; False if the
        child is gone (the attempt then finds it dead)."""
        try:
            send_fds(self.shm, fds)
        except OSError:
            return False
        return True

    def drain(self, captured: Key | None = None) -> Received | None:
        """After death: read what is left in the pipes and return a reply if complete."""
        while True:
            try:
                chunk = os.read(self.res_r, _READ_CHUNK)
            except BlockingIOError:
                break
            if not chunk:
                break
            self.buf += chunk
        if captured is not None:
            self.read_output(until_eof=True)  # the reply may be in its end mark
        return self.take_reply(captured)

    def drain_wake(self) -> None:
        try:
            while os.read(self.wake_r, 64):
                pass
        except BlockingIOError:
            pass
