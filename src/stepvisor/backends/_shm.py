"""Large values between processes: written once into shared memory, mapped read-only.

A value whose pickle (protocol 5) carries out-of-band buffers of at least
:data:`SHARE_MIN` bytes (NumPy arrays, pandas and Arrow data; a ``bytes``,
``bytearray`` or ``memoryview`` artifact is made to pickle that way) does not
travel through the pipes.  Its writer puts the buffers into one segment and
sends a small reference; every reader maps the segment read-only::

    child A (made it)                  parent (engine)                   child B (reads it)
    pickle(value, buffers out of band)
    memfd: write buffers, seal ──fd──▶ map read-only: the value is a view
    reply: pickle without buffers ───▶ (RunResult, store); keeps the fd
                                       for the run ─────fd + pickle────▶ map read-only, load

Why memfd segments passed as descriptors (``SCM_RIGHTS`` over a socket pair
beside each child's pipes), rather than named POSIX shm in /dev/shm:

* **Nothing can leak, however a process dies.**  A memfd has no name; its
  memory is freed by the kernel when the last descriptor and the last mapping
  of it go, which happens on any death, SIGKILL of the parent included, with
  no cleanup code having to run.  A named segment needs someone alive to
  ``shm_unlink`` it: a parent that is SIGKILLed cannot, and a watchdog in the
  child would have to know every name and run before its group is killed.
* **Read-only for real.**  The writer seals the segment (``F_SEAL_WRITE``,
  ``F_SEAL_SHRINK``, ``F_SEAL_GROW``, ``F_SEAL_SEAL``) before anyone else sees
  it, so no process can map it writable again, and every reader maps it with
  ``ACCESS_READ``: a NumPy array loaded from it raises "assignment destination
  is read-only", a ``memoryview`` raises "cannot modify read-only memory".
  Nothing can corrupt what another step reads.
* **Linux only, like the rest of the process backend** (pidfds, subreaper).
  Where ``memfd_create`` fails, values go through the pipes as before.

Lifetime (what frees a segment):

* The *parent* keeps each segment's descriptor in a table for its run, so a
  later process step can be sent it; the table is dropped when the run ends
  (:func:`release_run`, called by the engine), and the descriptors close.
* The parent's *values* (in ``RunResult.artifacts`` and a memory store) are
  views on the mapping and keep it alive: the memory goes when the last of
  them goes, long after the run if the result is kept.  Nothing is copied at
  the end of the run.
* A *child* closes each descriptor once mapped; its mapping goes with the
  attempt's inputs.  A child that crashes, or whose parent is SIGKILLed (its
  group is then killed), loses its mappings with its life.

What is copied anyway: a ``bytes`` or ``bytearray`` cannot point at shared
memory, so each reader (the parent too) gets its own copy out of the segment
(still no pipe); a ``bytearray`` reader writes only its own copy.  Values
smaller than :data:`SHARE_MIN`, and buffers that pickle in band (a
non-contiguous array), go through the pipe as before.

This module is imported by every process child that handles a large value,
so it imports little (``mmap``, ``fcntl``, ``socket`` when first needed).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from stepvisor.backends._wire import Segment, SharedInput

if TYPE_CHECKING:
    import socket

__all__ = [
    "MEMFD_NAME",
    "SHARE_MIN",
    "Fds",
    "dumps_sharing",
    "load",
    "map_segment",
    "open_run",
    "recv_fds",
    "release_run",
    "send_fds",
    "wrap",
    "write_segment",
]

#: Out-of-band bytes from which a value goes through shared memory.  Below it a
#: pipe is as fast (a segment costs a memfd, a seal, a descriptor and a mapping).
SHARE_MIN: Final = 1 << 20
#: The name of every segment, as /proc/<pid>/fd and /proc/<pid>/maps show it
#: (``/memfd:stepvisor (deleted)``); there is no file in /dev/shm.
MEMFD_NAME: Final = "stepvisor"
#: Buffers start on this boundary, so a NumPy array loaded from a segment is aligned.
_ALIGN: Final = 64
#: The most descriptors Linux passes in one message (``SCM_MAX_FD``).
MAX_FDS: Final = 253
_TAG: Final = b"stepvisor-fds"

#: Descriptors are sent before the message that needs them: waiting long means a bug.
_RECV_TIMEOUT: Final = 10.0

#: Python 3.13 can map without keeping a copy of the descriptor; before, each
#: mapping holds one until its last view goes.
_NO_FD_COPY: Final[dict[str, Any]] = {"trackfd": False} if sys.version_info >= (3, 13) else {}

Dumps = Callable[[object, "list[pickle.PickleBuffer] | None"], bytes]


# -- bytes-like values, out of band ------------------------------------------------------


def _bytes_like(buf: Any, is_bytearray: bool) -> bytes | bytearray:
    """Rebuild a ``bytes``/``bytearray`` (a copy: neither can point at shared memory)."""
    return bytearray(buf) if is_bytearray else bytes(buf)


def _view(buf: Any, fmt: str, shape: tuple[int, ...]) -> memoryview:
    """Rebuild a ``memoryview``: read-only, on the segment itself when it came from one."""
    view = memoryview(buf).toreadonly()
    if view.format != fmt or view.shape != shape:
        view = view.cast("B").cast(fmt, shape)  # type: ignore[call-overload]
    return view


class _OutOfBand:
    """Stands in for a bytes-like value so that its bytes pickle out of band.

    Exact ``bytes`` and ``bytearray`` always pickle in band (pickle has no hook
    for them), and a ``memoryview`` does not pickle at all; wrapped, they
    reduce to a :class:`pickle.PickleBuffer`.
    """

    __slots__ = ("value",)

    def __init__(self, value: bytes | bytearray | memoryview) -> None:
        self.value = value

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        value = self.value
        if isinstance(value, memoryview):
            flat = value if value.c_contiguous else memoryview(value.tobytes())
            return _view, (pickle.PickleBuffer(flat), value.format, value.shape)
        return _bytes_like, (pickle.PickleBuffer(value), type(value) is bytearray)


def wrap(value: object) -> object:
    """``value``, or a stand-in that pickles its bytes out of band (large bytes-likes,
    and any ``memoryview``, which would not pickle otherwise)."""
    kind = type(value)
    if kind is memoryview:
        return _OutOfBand(value)  # type: ignore[arg-type]
    if (kind is bytes or kind is bytearray) and len(value) >= SHARE_MIN:  # type: ignore[arg-type]
        return _OutOfBand(value)  # type: ignore[arg-type]
    return value


def needs_wrap(value: object) -> bool:
    """Whether :func:`wrap` would change ``value``."""
    return wrap(value) is not value


def dumps_sharing(value: object, dumps: Dumps) -> tuple[bytes, list[memoryview]]:
    """``value`` pickled, and its out-of-band buffers if they are worth sharing.

    Returns ``(pickle without the buffers, the buffers)`` when they reach
    :data:`SHARE_MIN` bytes, else ``(the whole pickle, [])``: today's path,
    pickled once when the value has no out-of-band buffers at all.
    """
    wrapped = wrap(value)
    buffers: list[pickle.PickleBuffer] = []
    pickled = dumps(wrapped, buffers)
    if not buffers:
        return pickled, []
    try:
        raws = [buffer.raw() for buffer in buffers]
    except BufferError:  # not contiguous: such a buffer goes in band
        raws = []
    if sum(raw.nbytes for raw in raws) < SHARE_MIN:
        return _in_band(wrapped, dumps), []
    return pickled, raws


def _in_band(value: object, dumps: Dumps) -> bytes:
    """The whole pickle, buffers in band (no buffer list keeps them in)."""
    return dumps(value, None)


def in_band(value: object, dumps: Dumps) -> bytes:
    """``value`` pickled whole, the way it goes when no segment can be made."""
    return _in_band(wrap(value), dumps)


def share(
    pickles: Sequence[tuple[bytes, list[memoryview]]], send: Callable[[list[int]], None]
) -> tuple[Segment | None, ...]:
    """Write the buffers of the values that have some into one segment, and ``send`` it.

    Per value, the :class:`Segment` its buffers are in (descriptor index 0), or
    ``None``.  Raises ``OSError`` when the segment cannot be made or sent.
    """
    fd, size, layout = write_segment([raws for _, raws in pickles if raws])
    try:
        send([fd])
    finally:
        os.close(fd)
    layouts = iter(layout)
    return tuple(Segment(0, size, next(layouts)) if raws else None for _, raws in pickles)


def resolve(values: dict[str, Any], fds: Sequence[int]) -> dict[str, Any]:
    """``values`` with each :class:`SharedInput` replaced by the value, mapped read-only."""
    views: dict[int, memoryview] = {}
    for key, item in values.items():
        if type(item) is SharedInput:
            segment = item.segment
            view = views.get(segment.fd)
            if view is None:
                view = views[segment.fd] = map_segment(fds[segment.fd], segment.size)
            values[key] = load(item.pickled, view, segment.spans)
    return values


_sockets: dict[int, socket.socket] = {}


def socket_of(fd: int) -> socket.socket:
    """The socket object for descriptor ``fd`` (the child's end), made once."""
    sock = _sockets.get(fd)
    if sock is None:
        import socket as _socket  # noqa: PLC0415 - needed only with large values

        sock = _sockets[fd] = _socket.socket(fileno=fd)
        sock.settimeout(_RECV_TIMEOUT)
    return sock


# -- segments --------------------------------------------------------------------------


def _align(offset: int) -> int:
    return -(-offset // _ALIGN) * _ALIGN


def write_segment(
    groups: Sequence[Sequence[memoryview]],
) -> tuple[int, int, list[tuple[tuple[int, int], ...]]]:
    """Write each group's buffers into one new sealed segment.

    Returns ``(descriptor, size, spans per group)``; the caller owns the
    descriptor.  Raises ``OSError`` if no segment can be made.
    """
    import fcntl  # noqa: PLC0415 - small builtin module, needed only here

    layout: list[tuple[tuple[int, int], ...]] = []
    offset = 0
    for group in groups:
        spans: list[tuple[int, int]] = []
        for raw in group:
            offset = _align(offset)
            spans.append((offset, raw.nbytes))
            offset += raw.nbytes
        layout.append(tuple(spans))
    size = max(offset, 1)
    fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        for group, placed in zip(groups, layout, strict=True):
            for raw, (start, length) in zip(group, placed, strict=True):
                _pwrite_all(fd, raw, start, length)
        seals = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    except BaseException:
        os.close(fd)
        raise
    return fd, size, layout


def _pwrite_all(fd: int, raw: memoryview, offset: int, length: int) -> None:
    done = 0
    while done < length:
        done += os.pwrite(fd, raw[done:], offset + done)


def map_segment(fd: int, size: int) -> memoryview:
    """A read-only view of the whole segment (the mapping lives as long as views of it)."""
    import mmap  # noqa: PLC0415 - small builtin module, needed only here

    return memoryview(mmap.mmap(fd, size, access=mmap.ACCESS_READ, **_NO_FD_COPY))


def load(pickled: bytes, view: memoryview, spans: Iterable[tuple[int, int]]) -> Any:
    """The value whose buffers are at ``spans`` of the mapped segment ``view``."""
    buffers = [view[start : start + length] for start, length in spans]
    return pickle.loads(pickled, buffers=buffers)  # noqa: S301 - our own peer's bytes


# -- descriptors over a socket --------------------------------------------------------------


def send_fds(sock: socket.socket, fds: Sequence[int]) -> None:
    """Send ``fds`` in one message (the receiver gets its own copies)."""
    import socket as _socket  # noqa: PLC0415 - needed only with large values

    _socket.send_fds(sock, [_TAG], list(fds))


def recv_fds(sock: socket.socket, count: int) -> list[int]:
    """Receive the ``count`` descriptors sent with the next message; ``OSError`` if not."""
    import socket as _socket  # noqa: PLC0415

    data, fds, flags, _addr = _socket.recv_fds(sock, len(_TAG), count + 1)
    if data != _TAG or len(fds) != count or flags & _socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise OSError(
            f"expected {count} shared-memory descriptors, got {len(fds)} "
            f"(flags {flags:#x}); is the descriptor limit (ulimit -n) reached?"
        )
    return fds


def _close_all(fds: list[int]) -> None:
    for index, fd in enumerate(fds):
        if fd >= 0:
            fds[index] = -1
            with contextlib.suppress(OSError):
                os.close(fd)


class Fds:
    """Received descriptors: closed when closed, or dropped, unless taken first."""

    def __init__(self, fds: Iterable[int]) -> None:
        self._fds = list(fds)
        self._finalizer = weakref.finalize(self, _close_all, self._fds)

    def __len__(self) -> int:
        return len(self._fds)

    def peek(self, index: int) -> int:
        return self._fds[index]

    def take(self, index: int) -> int:
        """The descriptor at ``index``, now the caller's to close."""
        fd, self._fds[index] = self._fds[index], -1
        if fd < 0:
            raise ValueError(f"shared-memory descriptor {index} was already taken")
        return fd

    def close(self) -> None:
        self._finalizer()


# -- the parent's table: the segments of each run ---------------------------------------------


class Held(NamedTuple):
    """A value the parent holds whose buffers are in a segment it can send on."""

    value: object
    fd: int
    pickled: bytes
    segment: Segment  # ``fd`` field: unused here (an index is given per message)


class _Table:
    def __init__(self) -> None:
        #: ``id(value)`` -> held; the value itself is kept, so its id is not reused.
        self.values: dict[int, Held] = {}
        self.fds: list[int] = []


_lock = threading.Lock()
_tables: dict[str, _Table] = {}


def open_run(run_id: str) -> None:
    """A run starts: values shared during it are kept for its later process steps."""
    with _lock:
        _tables.setdefault(run_id, _Table())


def release_run(run_id: str) -> None:
    """A run ended: close its segments' descriptors (values already loaded stay valid).

    Idempotent.  The memory itself goes when the last mapping goes: views in
    the run's result keep theirs.
    """
    with _lock:
        table = _tables.pop(run_id, None)
    if table is not None:
        _close_all(table.fds)


def hold(run_id: str, fd: int) -> bool:
    """Give ``fd`` to the run's table; ``False`` (the caller closes it) if no such run."""
    with _lock:
        table = _tables.get(run_id)
        if table is None:
            return False
        table.fds.append(fd)
        return True


def remember(run_id: str, value: object, fd: int, pickled: bytes, segment: Segment) -> None:
    """``value`` came from (or went into) segment ``fd``: send it on by reference.

    Only for a run that is open, and only after :func:`hold` gave it ``fd``.
    """
    with _lock:
        table = _tables.get(run_id)
        if table is not None:
            table.values[id(value)] = Held(value, fd, pickled, segment)


def known(run_id: str, value: object) -> Held | None:
    """The segment ``value`` is in, if the run holds one."""
    with _lock:
        table = _tables.get(run_id)
        return None if table is None else table.values.get(id(value))


def is_known(run_id: str, values: Iterable[object]) -> bool:
    with _lock:
        table = _tables.get(run_id)
        return table is not None and any(id(v) in table.values for v in values)


def held_fds() -> int:
    """How many segment descriptors the parent holds for open runs (for tests)."""
    with _lock:
        return sum(sum(1 for fd in t.fds if fd >= 0) for t in _tables.values())


def shared_input(held: Held, index: int) -> SharedInput:
    return SharedInput(held.pickled, held.segment._replace(fd=index))
