"""The frames a process child writes between its output bytes (shared by both ends).

The child's file descriptors 1 and 2 are one pipe to its parent while an
attempt is captured.  What the step prints goes down it as plain bytes, and so
does what C code and subprocesses write; the child puts these frames between
them::

    MAGIC  kind (1 byte)  length (8 hex digits)  payload
    R  a logging record (JSON: name, levelno, levelname, msg, created, exc_text, ...)
    S  the stack of every thread, taken when a SIGTERM stopped the attempt
    E  the attempt ended: "<run id>\\x00<step id>\\x00<attempt>" (everything before is
       its output);
       its reply follows on the reply pipe
    F  the attempt ended, its reply in the frame: the key's length (8 hex digits),
       the key as in E, then the encoded reply (a frame of at most PIPE_BUF bytes,
       written whole)
"""

from __future__ import annotations

from typing import Final

__all__ = ["HEADER_SIZE", "MAGIC", "frame"]

MAGIC: Final = b"\x00\x1estepvisor:"
HEADER_SIZE: Final = len(MAGIC) + 1 + 8


def frame(kind: bytes, payload: bytes) -> bytes:
    return b"%s%s%08x%s" % (MAGIC, kind, len(payload), payload)
