"""A process child's side of capture: its stdout, stderr, records and stacks to the parent.

Imported by the child only for an attempt whose run captures (``capture`` not
``off``), so a child that never captures does not load ``logging`` or
``json``.  While such an attempt runs, file descriptors 1 and 2 are the output
pipe (so C extensions and subprocesses are captured too), ``sys.stdout`` and
``sys.stderr`` are :class:`_Text` writers, a handler on the root logger sends
records as frames (:mod:`stepvisor.backends._frames`), and a SIGTERM handler
sends the stack of every thread before the child dies.

Text is gathered and written in chunks: at the end of a ``print()`` line that
comes 5 ms or more after the last chunk (or after 1,024 pieces), at a piece of
8 KiB, every 50 ms (a flusher thread), at each line of stderr, before every
frame, at the attempt's end and at a SIGTERM.  So a
step that prints now and then has each line in the pipe at once, and a child
that crashes or is killed loses at most the last 5 ms of a burst of lines.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import os
import select
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from types import FrameType
from typing import Any, Final, TextIO

from stepvisor.backends._capture import trace_ids
from stepvisor.backends._frames import HEADER_SIZE, frame

__all__ = ["ChildCapture"]

_FLUSH_AT: Final = 8192
#: Pieces gathered before a line's end flushes them whatever the time.
_FLUSH_ITEMS: Final = 1024
_FLUSH_AFTER: Final = 0.05
#: A line ends this long after the last flush: flush now.  A step that prints now and
#: then has each line in the pipe at once (a crash right after it keeps it); a burst of
#: lines goes in chunks, at most this far apart.
_LINE_GAP: Final = 0.005
_monotonic = time.monotonic
#: The key's length in an ``F`` frame: 8 hex digits.
_KEY_LENGTH: Final = 8


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except InterruptedError:  # pragma: no cover - PEP 475 retries
            continue
        view = view[written:]


class _Sink:
    """Text gathered for fd 1, written in chunks; frames between them, in order.

    Writers only append to a deque (thread-safe, and nothing appended is lost
    to a flush running meanwhile); flushing pops what is there under a lock, so
    chunks and frames go down the pipe in the order they were made.
    """

    def __init__(self) -> None:
        # Re-entrant: the SIGTERM handler runs on the main thread, maybe inside a flush.
        self._lock = threading.RLock()
        self.queue: collections.deque[str] = collections.deque()
        self.append = self.queue.append
        #: When the last flush was (a line ending later than ``_LINE_GAP`` after it flushes).
        self.flushed = 0.0
        self._flusher: threading.Thread | None = None

    def start_flusher(self) -> None:
        """Flush every ``_FLUSH_AFTER`` seconds from a thread (once per child)."""
        if self._flusher is None:
            self._flusher = threading.Thread(
                target=self._flush_often, name="stepvisor-output-flusher", daemon=True
            )
            self._flusher.start()

    def _flush_often(self) -> None:
        while True:
            time.sleep(_FLUSH_AFTER)
            if self.queue:
                self.flush()

    def flush(self) -> None:
        with self._lock:
            self._flush()

    def frame(self, kind: bytes, payload: bytes) -> None:
        with self._lock:
            self._flush()
            _write_all(1, frame(kind, payload))

    def raw(self, data: bytes) -> None:
        with self._lock:
            self._flush()
            _write_all(1, data)

    def _flush(self) -> None:
        queue = self.queue
        self.flushed = _monotonic()
        if not queue:
            return
        # What is there now, popped by C (itertools), not a Python loop: appends made
        # meanwhile stay for the next flush.
        parts = list(itertools.starmap(queue.popleft, itertools.repeat((), len(queue))))
        _write_all(1, "".join(parts).encode("utf-8", "surrogatepass"))


class _Text:
    """``sys.stdout`` / ``sys.stderr`` of a captured attempt."""

    encoding = "utf-8"
    errors = "surrogatepass"

    def __init__(self, sink: _Sink, fd: int) -> None:
        self._sink = sink
        self._append = sink.append
        self._fd = fd
        #: ``sys.stdout.buffer``: bytes go down the pipe as they are, after the text before.
        self.buffer = _Bytes(sink)

    def write(self, s: str) -> int:
        # Twice per print(): kept to a few operations (print writes its "\n" apart).
        if type(s) is not str and not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        self._append(s)
        if s == "\n":  # print()'s line end; a piece that ends a line itself waits its turn
            sink = self._sink
            if (
                self._fd == 2  # stderr is line-buffered, as usual
                or _monotonic() - sink.flushed >= _LINE_GAP
                or len(sink.queue) >= _FLUSH_ITEMS
            ):
                sink.flush()
        elif len(s) >= _FLUSH_AT:
            self._sink.flush()
        return len(s)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        # Nothing gathered: no lock to take (flushed twice at the end of every attempt).
        # What this thread wrote is in the queue by now; another's is flushed by its own.
        if self._sink.queue:
            self._sink.flush()

    def fileno(self) -> int:
        return self._fd

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False


class _Bytes:
    """The binary layer of a captured stream: flush the text gathered, then write the bytes."""

    def __init__(self, sink: _Sink) -> None:
        self._sink = sink

    def write(self, data: bytes) -> int:
        self._sink.raw(bytes(data))
        return len(data)

    def flush(self) -> None:
        self._sink.flush()


class _Records(logging.Handler):
    def __init__(self, sink: _Sink) -> None:
        super().__init__()
        self._sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception as exc:
            message = f"{record.msg!r} (could not be formatted: {exc})"
        exc_text = record.exc_text
        if not exc_text and record.exc_info and record.exc_info[0] is not None:
            exc_text = logging.Formatter().formatException(record.exc_info)
        payload = {
            "name": record.name,
            "levelno": record.levelno,
            "levelname": record.levelname,
            "msg": message,
            "created": record.created,
            "exc_text": exc_text,
            "pathname": record.pathname,
            "lineno": record.lineno,
            "funcName": record.funcName,
            "threadName": record.threadName,
            "process": record.process,
        }
        ids = trace_ids()
        if ids is not None:
            payload["otelTraceID"], payload["otelSpanID"] = ids
        self._sink.frame(b"R", json.dumps(payload).encode("utf-8", "surrogatepass"))


_HERE: Final = os.path.dirname(os.path.abspath(__file__))


def _step_frames(frame: FrameType) -> traceback.StackSummary:
    """The stack below the child's own frames (its main loop, the call of the step)."""
    summary = traceback.extract_stack(frame)
    start = 0
    for i, entry in enumerate(summary):
        if entry.filename == "<string>" or entry.filename.startswith(_HERE):
            start = i + 1
        else:
            break
    return traceback.StackSummary.from_list(summary[start:] or summary)


def all_stacks(main_frame: FrameType | None) -> str:
    """Every thread's stack, the main thread (where the signal found it) first."""
    names = {t.ident: t.name for t in threading.enumerate()}
    frames = sys._current_frames()
    main = threading.main_thread().ident
    if main_frame is not None and main is not None:
        frames[main] = main_frame
    blocks = []
    for ident in sorted(frames, key=lambda ident: ident != main):
        if names.get(ident, "").startswith("stepvisor-"):
            continue  # the child's own watchdog: not the step's
        text = "".join(_step_frames(frames[ident]).format())
        blocks.append(f"Thread {names.get(ident, ident)!s} ({ident}):\n{text}")
    return "\n".join(blocks)


class ChildCapture:
    """The child's capture: switched on by a captured attempt, left on for the next.

    Switching costs system calls (fds 1 and 2, the SIGTERM handler) that a tiny
    step would feel, so it stays on across captured attempts; only an attempt
    whose run does not capture switches it off (:meth:`off`).  Each captured
    attempt still gets its own end mark.
    """

    def __init__(self, out_fd: int) -> None:
        self._out_fd = out_fd
        self._original = (os.dup(1), os.dup(2))
        os.set_inheritable(self._original[0], False)
        os.set_inheritable(self._original[1], False)
        self._sink = _Sink()
        self._handler = _Records(self._sink)
        self._text = (_Text(self._sink, 1), _Text(self._sink, 2))
        self._streams: tuple[TextIO | Any, TextIO | Any] = (sys.stdout, sys.stderr)
        self._on = False
        self._level: int | None = None
        self._key = b""

    @property
    def handler(self) -> Callable[[int, FrameType | None], None]:
        """The SIGTERM handler a captured attempt runs under (kept between attempts)."""
        return self._on_term

    def begin(
        self, run_id: str, step_id: str, attempt: int, level: int, *, handler_set: bool
    ) -> None:
        """Route fds 1 and 2, the streams and the records of this attempt to the parent.

        ``handler_set``: SIGTERM's handler is ours already (asking costs an enum lookup).
        """
        # The run's id too: an Executor's calls share a step id and an attempt number.
        self._key = f"{run_id}\x00{step_id}\x00{attempt}".encode("utf-8", "surrogatepass")
        if not self._on:
            for stream in (sys.stdout, sys.stderr):
                try:
                    if stream is not None:
                        stream.flush()
                except (OSError, ValueError):
                    continue
            os.dup2(self._out_fd, 1)
            os.dup2(self._out_fd, 2)
            self._streams = (sys.stdout, sys.stderr)
            self._sink.start_flusher()
            self._on = True
        if sys.stdout is not self._text[0] or sys.stderr is not self._text[1]:
            sys.stdout, sys.stderr = self._text  # (a step before may have replaced them)
        self._sink.flushed = 0.0  # the attempt's first line goes down the pipe at once
        root = logging.getLogger()
        if level != self._level or root.level != level:
            root.setLevel(level)  # (it clears every logger's cache: only when it changes)
            self._level = level
        if self._handler not in root.handlers:
            root.addHandler(self._handler)
        if not handler_set:
            signal.signal(signal.SIGTERM, self._on_term)

    def end(self, reply: bytes) -> bool:
        """Flush, and mark the end of the attempt's output (capture stays on).

        ``reply`` (the attempt's encoded reply) goes in the mark when the whole
        frame fits one write the pipe keeps whole (``PIPE_BUF``): nothing else
        written to fds 1 and 2 meanwhile can cut into it.  Returns whether it
        went; if not, the caller sends it on the reply pipe, after the mark.
        """
        key = self._key
        size = HEADER_SIZE + _KEY_LENGTH + len(key) + len(reply)
        if size <= select.PIPE_BUF:
            self._sink.frame(b"F", b"%08x%s%s" % (len(key), key, reply))
            return True
        self._sink.frame(b"E", key)
        return False

    def off(self) -> None:
        """An attempt whose run does not capture: fds 1 and 2 and the streams back."""
        if not self._on:
            return
        self._sink.flush()
        sys.stdout, sys.stderr = self._streams
        os.dup2(self._original[0], 1)
        os.dup2(self._original[1], 2)
        if signal.getsignal(signal.SIGTERM) == self._on_term:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        self._on = False

    def _on_term(self, signum: int, frame_: FrameType | None) -> None:
        """Stopped (deadline or cancel): send what is pending and every stack, then die."""
        try:
            self._sink.frame(b"S", all_stacks(frame_).encode("utf-8", "surrogatepass"))
        finally:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
