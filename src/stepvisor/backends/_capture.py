"""What a step writes, kept per attempt: its stdout, stderr and logging records.

Thread and async steps share their process with every other step, so what
they write is told apart by *context*, not by thread: the backend sets
:data:`CURRENT` (a ``ContextVar``) to the attempt's :class:`AttemptLog` around
the step call, and an asyncio task gets its own copy of the context.  Two
process-wide hooks, installed once by :func:`install`, route by it::

    print(...) ── sys.stdout (a _Stream proxy) ─┬─ CURRENT unset: the real stream, as before
                                                └─ CURRENT set: AttemptLog.write (+ tee)
    log.info(...) ── the LogRecord factory ──────── CURRENT set: stepvisor_step and
                                                    stepvisor_attempt on the record, and
                                                    AttemptLog.add_record

A record is kept when it is made: when its logger is enabled for its level,
whatever handlers the program has (the factory, not a handler, so that a
program with none still gets ``logging.lastResort`` as before).

A process child uses the same :class:`AttemptLog`-free writer in
:mod:`stepvisor.backends._child_output`; its bytes come back through a pipe and
are fed to an :class:`AttemptLog` in the parent.

An :class:`AttemptLog` keeps at most ``limit`` bytes (UTF-8): the first half
and the last half, with the cut marked between them.  It is written by the
attempt's own thread; the Supervisor reads a snapshot while the attempt runs
(``stepvisor logs --follow``) and the whole text when it ends.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final, Literal, TextIO

if TYPE_CHECKING:
    from stepvisor.context import AttemptControl

#: What :data:`CURRENT` holds: the attempt's control, step id and attempt number.
Current = tuple["AttemptControl", str, int]

__all__ = [
    "CURRENT",
    "DEFAULT_LOG_LIMIT",
    "TEE_TO",
    "AttemptLog",
    "Capture",
    "CaptureMode",
    "cut_marker",
    "format_record_line",
    "install",
    "log_of",
]

CaptureMode = Literal["tee", "store", "off"]
#: ``log_limit``'s default: 1 MiB per attempt.
DEFAULT_LOG_LIMIT: Final = 1 << 20
#: Text gathered before it is encoded and fitted into the head and tail.
_CHUNK: Final = 1 << 16

#: The attempt running in this context, if its output is captured: its control (whose
#: ``log`` is made on the first write), step id and attempt number.
CURRENT: contextvars.ContextVar[Current | None] = contextvars.ContextVar(
    "stepvisor_attempt", default=None
)


def log_of(control: AttemptControl, step_id: str, attempt: int) -> AttemptLog:
    """The attempt's log, made now if it has written nothing yet (its run captures)."""
    log = control.log
    if log is None:
        capture = control.capture
        assert capture is not None, "log_of() for an attempt whose run does not capture"
        log = control.log = capture.open(step_id, attempt)
    return log


def _opened(current: Current) -> AttemptLog:
    return log_of(*current)


#: Where tee'd lines go instead of the real stream, when set (the CLI's live display).
TEE_TO: list[Callable[[str], None]] = []


def cut_marker(cut: int, limit: int) -> str:
    """The line that stands where a log's middle was cut out."""
    return f"\n[stepvisor: {cut} bytes cut here; log_limit is {limit} bytes]\n"


class Capture:
    """A run's capture setting: the mode, the per-attempt limit, where tee'd lines go."""

    __slots__ = ("limit", "mode")

    def __init__(self, mode: CaptureMode, limit: int) -> None:
        self.mode = mode
        self.limit = limit

    @property
    def tee(self) -> bool:
        return self.mode == "tee"

    def open(self, step_id: str, attempt: int) -> AttemptLog:
        return AttemptLog(step_id, attempt, limit=self.limit, tee=self.mode == "tee")


class _Tee:
    """Whole lines of one stream, shown live with the step's id in front."""

    __slots__ = ("_line", "_out", "_prefix")

    def __init__(self, out: TextIO, prefix: str) -> None:
        self._out = out
        self._prefix = prefix
        self._line = ""

    def write(self, s: str) -> None:
        if "\n" not in s:
            self._line += s
            return
        lines = (self._line + s).split("\n")
        self._line = lines.pop()
        prefix = self._prefix
        self._show("".join(f"{prefix}{line}\n" for line in lines))

    def finish(self) -> None:
        if self._line:
            line, self._line = self._line, ""
            self._show(f"{self._prefix}{line}\n")

    def _show(self, text: str) -> None:
        if TEE_TO:  # the CLI's live display: printed above its block, never into it
            TEE_TO[0](text)
            return
        try:
            self._out.write(text)
            self._out.flush()
        except (OSError, ValueError):  # a closed terminal must not fail the step
            pass


class AttemptLog:
    """One attempt's output and records, in order, bounded to ``limit`` bytes.

    ``write`` is the hot path (one list append); every ``_CHUNK`` characters
    the text is encoded and fitted: the head fills first, then the tail keeps
    the newest bytes and counts what it drops.
    """

    __slots__ = (
        "_cut",
        "_fitted",
        "_head",
        "_n",
        "_parts",
        "_tail",
        "_tail_n",
        "_tees",
        "attempt",
        "limit",
        "records",
        "step_id",
        "tee",
    )

    def __init__(self, step_id: str, attempt: int, *, limit: int, tee: bool) -> None:
        self.step_id = step_id
        self.attempt = attempt
        self.limit = limit
        self.tee = tee
        #: Records a process child sent, to emit again in the parent (tee).
        self.records: list[dict[str, Any]] | None = None
        self._fitted = 0
        self._parts: list[str] = []
        self._n = 0
        self._head = bytearray()
        self._tail: deque[bytes] = deque()
        self._tail_n = 0
        self._cut = 0
        self._tees: dict[int, _Tee] | None = None

    # -- writing (the attempt's thread) --

    def write(self, s: str, out: TextIO | None = None) -> None:
        """Keep ``s``; with tee, show its whole lines on ``out`` prefixed by the step id."""
        self._parts.append(s)
        self._n += len(s)
        if self._n >= _CHUNK:
            self._fit()
        if self.tee and out is not None:
            self._tee_to(out).write(s)

    def add_record(self, record: logging.LogRecord) -> None:
        """Keep a logging record as one line of text (with its traceback, if any)."""
        self.write(format_record_line(record))

    def note(self, text: str) -> None:
        """A line of stepvisor's own (the stack at a deadline), kept and not shown."""
        self.write(text if text.endswith("\n") else text + "\n")

    def finish(self) -> None:
        """The attempt ended: show the last partial lines, fit what is left."""
        if self._tees:
            for tee in self._tees.values():
                tee.finish()
        self._fit()

    def _tee_to(self, out: TextIO) -> _Tee:
        tees = self._tees
        if tees is None:
            tees = self._tees = {}
        tee = tees.get(id(out))
        if tee is None:
            tee = tees[id(out)] = _Tee(out, f"[{self.step_id}] ")
        return tee

    def _fit(self) -> None:
        if not self._parts:
            return
        parts, self._parts = self._parts, []
        self._fitted += self._n
        self._n = 0
        data = "".join(parts).encode("utf-8", "surrogatepass")
        room = self.limit // 2 - len(self._head)
        if room > 0:
            self._head += data[:room]
            data = data[room:]
        if not data:
            return
        self._tail.append(data)
        self._tail_n += len(data)
        keep = self.limit - self.limit // 2
        while self._tail_n > keep:
            first = self._tail[0]
            over = self._tail_n - keep
            if len(first) <= over:
                self._tail.popleft()
                self._tail_n -= len(first)
                self._cut += len(first)
            else:
                self._tail[0] = first[over:]
                self._tail_n -= over
                self._cut += over

    # -- reading (any thread) --

    @property
    def written(self) -> int:
        """Characters written so far (a change tells the follower to look again)."""
        return self._fitted + self._n

    @property
    def empty(self) -> bool:
        return self.written == 0

    def text(self) -> str:
        """Everything kept, as text (see :meth:`render`)."""
        return self.render()[0]

    def render(self) -> tuple[str, int]:
        """Head, the cut marked (if any), tail, and how many bytes were cut; never raises.

        Safe to call while the attempt still writes (it copies, it does not fit).
        """
        pending = "".join(list(self._parts)).encode("utf-8", "surrogatepass")
        head = bytes(self._head)
        tail = b"".join(list(self._tail)) + pending
        keep = self.limit - self.limit // 2
        cut = self._cut
        room = self.limit // 2 - len(head)
        if room > 0 and not cut:
            head, tail = head + tail[:room], tail[room:]
        if len(tail) > keep:
            cut += len(tail) - keep
            tail = tail[len(tail) - keep :]
        if not cut:
            return (head + tail).decode("utf-8", "replace"), 0
        text = (
            head.decode("utf-8", "replace")
            + cut_marker(cut, self.limit)
            + tail.decode("utf-8", "replace")
        )
        return text, cut


def format_record_line(record: logging.LogRecord) -> str:
    """``12:00:01.250 INFO name: message`` (and the traceback), as a log keeps a record."""
    try:
        message = record.getMessage()
    except Exception as exc:  # a bad format string must not fail the step
        message = f"{record.msg!r} (could not be formatted: {exc})"
    trace_id = getattr(record, "otelTraceID", None)
    if trace_id:
        message += f" [trace_id={trace_id} span_id={getattr(record, 'otelSpanID', '')}]"
    return record_line(record.created, record.levelname, record.name, message, _exc_text(record))


def trace_ids() -> tuple[str, str] | None:
    """The current OpenTelemetry trace and span ids (hex), when a traced attempt runs.

    OpenTelemetry is looked up, never imported: an untraced program has not loaded it.
    """
    otel_trace = sys.modules.get("opentelemetry.trace")
    if otel_trace is None:
        return None
    try:
        context = otel_trace.get_current_span().get_span_context()
    except Exception:  # an odd SDK must not fail the step's logging
        return None
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


def record_line(created: float, level: str, name: str, message: str, exc_text: str | None) -> str:
    """One record as a log line (shared with the process child's records)."""
    stamp = (
        time.strftime("%H:%M:%S", time.localtime(created)) + f".{int(created * 1000) % 1000:03d}"
    )
    line = f"{stamp} {level} {name}: {message}\n"
    if exc_text:
        line += exc_text if exc_text.endswith("\n") else exc_text + "\n"
    return line


def _exc_text(record: logging.LogRecord) -> str | None:
    if record.exc_text:
        return record.exc_text
    if record.exc_info and record.exc_info[0] is not None:
        return logging.Formatter().formatException(record.exc_info)
    return None


# -- the process-wide hooks --------------------------------------------------------------


class _Stream:
    """``sys.stdout`` / ``sys.stderr`` while captures may run: routes by :data:`CURRENT`."""

    def __init__(self, original: TextIO) -> None:
        self._original = original

    def write(self, s: str) -> int:
        current = CURRENT.get()
        if current is None:
            return self._original.write(s)
        log = current[0].log or _opened(current)
        if type(s) is not str and not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        if log.tee:
            log.write(s, self._original)
            return len(s)
        # AttemptLog.write inlined: this runs twice per print() of a captured step.
        log._parts.append(s)
        n = len(s)
        log._n += n
        if log._n >= _CHUNK:
            log._fit()
        return n

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if CURRENT.get() is None:
            self._original.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._original, name)


_installed_lock = threading.Lock()
_record_factory: list[Callable[..., Any]] = []


def install() -> None:
    """Put the hooks in place (idempotent): the stream proxies and the record factory.

    A stream replaced since (pytest's capture, a ``redirect_stdout``) is
    wrapped again, so what a step prints still goes where the program says.
    """
    with _installed_lock:
        if not isinstance(sys.stdout, _Stream) and sys.stdout is not None:
            sys.stdout = _Stream(sys.stdout)
        if not isinstance(sys.stderr, _Stream) and sys.stderr is not None:
            sys.stderr = _Stream(sys.stderr)
        if not _record_factory:
            previous = logging.getLogRecordFactory()
            _record_factory.append(previous)

            def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
                record = previous(*args, **kwargs)
                current = CURRENT.get()
                if current is not None:
                    log = current[0].log or _opened(current)
                    record.stepvisor_step = log.step_id
                    record.stepvisor_attempt = log.attempt
                    ids = trace_ids()
                    if ids is not None:  # the names OpenTelemetry's logging instrumentation uses
                        record.otelTraceID, record.otelSpanID = ids
                    log.add_record(record)
                return record

            logging.setLogRecordFactory(factory)
