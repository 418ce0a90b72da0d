"""What a process child writes to its fds 1 and 2, parsed into its attempts' logs.

The child's output pipe carries plain bytes with frames between them
(:mod:`stepvisor.backends._frames`).  :class:`ChildOutput` is fed what the slot
reads, on the Worker's thread, and routes it to the log of the attempt the slot
is waiting for (bound with :meth:`ChildOutput.bind`)::

    bytes ── text ───────────▶ AttemptLog.write (tee: the parent's stdout, prefixed)
          ── R frame (record) ▶ AttemptLog.write (as a line) + emitted again here,
                                through this program's logging (tee)
          ── S frame (stacks) ▶ ``stack``: the slot puts it in the log and error text
          ── E frame (end) ───▶ ``ended``: the attempt's output is complete
          ── F frame (end) ───▶ ``replies``: the same, with the attempt's reply

Output that comes before its attempt is bound (an attempt sent ahead starts in
the child before the slot waits for it) is held and handed over at ``bind``.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import logging
import sys
from typing import Any, Final

from stepvisor.backends._capture import AttemptLog, Current, log_of, record_line
from stepvisor.backends._frames import HEADER_SIZE, MAGIC

__all__ = ["ChildOutput", "Key"]

#: An attempt, as its end mark names it: run id, step id, attempt number.
Key = tuple[str, str, int]

_KIND: Final = slice(len(MAGIC), len(MAGIC) + 1)
_LENGTH: Final = slice(len(MAGIC) + 1, HEADER_SIZE)
#: An ``F`` frame's key length: 8 hex digits.
_KEY_LENGTH: Final = 8


class ChildOutput:
    """The parser of one child's output pipe."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._bound: Current | None = None
        self._held: list[tuple[str, Any]] = []
        #: The ends seen, as ``(run id, step id, attempt)``, of attempts whose reply
        #: comes on the reply pipe (``E``).
        self.ended: set[Key] = set()
        #: The replies that came in the end mark (``F``), by ``(run id, step id, attempt)``.
        self.replies: dict[Key, bytes] = {}
        #: The stacks the child sent when a SIGTERM stopped it (the bound attempt's).
        self.stack: str | None = None

    def bind(self, attempt: Current) -> None:
        """What follows (and what was held) belongs to ``attempt`` (its control, id, number)."""
        self._bound = attempt
        self.stack = None
        held, self._held = self._held, []
        for kind, value in held:
            if kind == "t":
                self._text(value)
            else:
                self._record(value)

    def unbind(self) -> None:
        self._bound = None

    def _log(self) -> AttemptLog | None:
        """The bound attempt's log (made now if need be), or ``None`` if it is not captured."""
        bound = self._bound
        if bound is None or bound[0].capture is None:
            return None
        return log_of(*bound)

    def feed(self, chunk: bytes) -> None:
        buf = self._buf
        if not buf and chunk.startswith(MAGIC) and self._one_frame(chunk):
            return  # the read of an attempt that wrote nothing: its end mark alone
        buf += chunk
        while buf:
            start = buf.find(MAGIC)
            if start < 0:
                # Hold back a tail that may be the start of a frame cut by the read.
                keep = 0
                for n in range(min(len(MAGIC) - 1, len(buf)), 0, -1):
                    if buf.endswith(MAGIC[:n]):
                        keep = n
                        break
                self._bytes(bytes(buf[: len(buf) - keep]))
                del buf[: len(buf) - keep]
                return
            if start:
                self._bytes(bytes(buf[:start]))
                del buf[:start]
            if len(buf) < HEADER_SIZE:
                return
            try:
                length = int(bytes(buf[_LENGTH]), 16)
            except ValueError:  # not a frame after all: the step wrote these bytes
                self._bytes(bytes(buf[:1]))
                del buf[:1]
                continue
            if len(buf) < HEADER_SIZE + length:
                return
            kind = bytes(buf[_KIND])
            payload = bytes(buf[HEADER_SIZE : HEADER_SIZE + length])
            del buf[: HEADER_SIZE + length]
            self._frame(kind, payload)

    def _one_frame(self, chunk: bytes) -> bool:
        """Handle ``chunk`` if it is exactly one frame (no copies); whether it was."""
        try:
            length = int(chunk[_LENGTH], 16)
        except ValueError:
            return False
        if len(chunk) != HEADER_SIZE + length:
            return False
        self._frame(chunk[_KIND], chunk[HEADER_SIZE:])
        return True

    def _bytes(self, data: bytes) -> None:
        if data:
            text = self._decoder.decode(data)
            if text:
                self._text(text)

    def _text(self, text: str) -> None:
        log = self._log()
        if self._bound is None:
            self._held.append(("t", text))
        elif log is not None:
            log.write(text, sys.stdout)
        else:  # not captured, yet in the pipe (a step's leftover thread): show it
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write(text)

    def _frame(self, kind: bytes, payload: bytes) -> None:
        tail = self._decoder.decode(b"", final=True)
        if tail:
            self._text(tail)
        if kind == b"R":
            try:
                record = json.loads(payload.decode("utf-8", "replace"))
            except ValueError:
                return
            if self._bound is not None:
                self._record(record)
            else:
                self._held.append(("r", record))
        elif kind == b"S":
            self.stack = payload.decode("utf-8", "replace")
        elif kind in (b"E", b"F"):
            self._end(kind, payload)

    def _end(self, kind: bytes, payload: bytes) -> None:
        """An end mark: what follows is the next attempt's; an ``F`` carries the reply."""
        self.unbind()
        if kind == b"E":
            key = _key(payload)
            if key is not None:
                self.ended.add(key)
            return
        try:
            size = int(payload[:_KEY_LENGTH], 16)
        except ValueError:
            return
        key = _key(payload[_KEY_LENGTH : _KEY_LENGTH + size])
        if key is not None:
            self.replies[key] = payload[_KEY_LENGTH + size :]

    def _record(self, fields: dict[str, Any]) -> None:
        log = self._log()
        if log is None:
            return
        message = str(fields.get("msg", ""))
        if fields.get("otelTraceID"):
            message += f" [trace_id={fields['otelTraceID']} span_id={fields.get('otelSpanID', '')}]"
        log.write(
            record_line(
                float(fields.get("created", 0.0)),
                str(fields.get("levelname", "")),
                str(fields.get("name", "")),
                message,
                fields.get("exc_text"),
            )
        )
        if log.tee:
            emit_again(fields, log.step_id, log.attempt)


def _key(payload: bytes) -> Key | None:
    """``(run id, step id, attempt)`` from an end mark's ``<run>\\x00<step>\\x00<attempt>``."""
    run_id, _, rest = payload.decode("utf-8", "replace").partition("\x00")
    step_id, _, attempt = rest.rpartition("\x00")
    return (run_id, step_id, int(attempt)) if attempt.isdigit() else None


def emit_again(fields: dict[str, Any], step_id: str, attempt: int) -> None:
    """A child's record, through this program's logging config, naming its step and attempt."""
    name = str(fields.get("name", "root"))
    logger = logging.getLogger(name) if name != "root" else logging.getLogger()
    levelno = int(fields.get("levelno", logging.INFO))
    if not logger.isEnabledFor(levelno):
        return
    record = logging.makeLogRecord(
        {**fields, "args": None, "stepvisor_step": step_id, "stepvisor_attempt": attempt}
    )
    logger.handle(record)
