"""What crosses between the engine and a step that runs elsewhere: one wire format.

A process child (:mod:`stepvisor.backends._child`) and a Ray task run a step
away from the engine and send back how it ended.  Both speak with the typed
messages below, and both treat the two things that can go wrong on the way
with the same functions::

    the step's side                              the engine's side
    check_outputs(step_id, value)  (every backend, the thread one too)
    Returned(names | outputs)  ───────────▶      the outputs
    pack_error(exc) -> Raised(PackedError) ──▶   rebuild_error(): the exception as
      pickle, cloudpickle if need be,              itself, or RemoteStepError with
      proven to load; else text only               its type and traceback text
    Unsendable(message) ──────────────────▶      StepNotSerializableError

The process backend frames these messages into bytes (``encode_message`` in
``_child``); Ray carries them as task arguments and returns.  This module is
imported by every process child at boot, so it imports nothing heavy
(``cloudpickle`` and ``traceback`` only when needed, ``logging`` never).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
from collections.abc import Iterator, Mapping
from typing import Any, Final, NamedTuple

from stepvisor.errors import RemoteStepError

__all__ = [
    "Attempt",
    "PackedError",
    "Raised",
    "RayCall",
    "Ready",
    "Reply",
    "Returned",
    "Segment",
    "SharedInput",
    "Unsendable",
    "check_outputs",
    "dump",
    "format_remote",
    "pack_error",
    "rebuild_error",
    "trace_context",
]

PROTOCOL: Final = pickle.HIGHEST_PROTOCOL
#: Frames from here (``backends/``) come before the step's own in a remote traceback.
_OUR_DIR: Final = os.path.dirname(os.path.abspath(__file__))


# -- messages ----------------------------------------------------------------------------


class Attempt(NamedTuple):
    """Engine -> child or Ray task: which attempt to run (its function and inputs apart)."""

    run_id: str
    step_id: str
    attempt: int
    max_attempts: int
    #: The process child's deadline is the parent's ``time.monotonic()`` value
    #: (one host, one clock); a Ray task's is wall time (``time.time()``).
    deadline: float | None
    is_async: bool
    #: The parent's ``sys.path``, when it changed since the last attempt (process only).
    path: list[str] | None = None
    #: How many shared-memory descriptors were sent ahead of this message (process only).
    fds: int = 0
    #: The attempt span's W3C trace context, when the run is traced (see ``trace_context``).
    trace: Mapping[str, str] | None = None
    #: The parent's ``multiprocessing`` authentication key, sent with ``path``
    #: (process only): a step can then use the parent's ``Manager`` proxies and
    #: listeners, as a ``ProcessPoolExecutor`` worker can.
    authkey: bytes | None = None
    #: Captured: the lowest level of records to keep, else ``None`` (process and Ray).
    capture: int | None = None
    #: Bytes of output a Ray task keeps (``log_limit``); a process child's are cut
    #: by its parent.
    log_limit: int = 1 << 20


class RayCall(NamedTuple):
    """Engine -> Ray task: one attempt, in one task argument (each costs Ray a serialization).

    The task's other arguments are its *sources*, resolved by Ray before it
    runs: each is either the :class:`Returned` reply of a Ray step or a value
    the driver put.  ``picks`` says which input comes from which: ``(input name,
    source index, key)``, where ``key`` is the artifact's name in a reply, or
    ``None`` for a put value.
    """

    attempt: Attempt
    #: The pickled function, or the index of the source holding it when it is large.
    fn: bytes | int
    params: Mapping[str, Any]
    inline: Mapping[str, Any]
    picks: tuple[tuple[str, int, str | None], ...]


class Ready(NamedTuple):
    """Child -> parent, once: booted and waiting for attempts."""

    pid: int


class PackedError(NamedTuple):
    """An exception packed on the step's side: itself if it can travel, always as text."""

    qualname: str
    message: str
    traceback: str
    #: The pickled exception, proven to load again; ``None`` if it cannot travel.
    blob: bytes | None
    #: Why ``blob`` is ``None``.
    why_not: str
    #: Where it was raised, for the note: ``worker process 123``.
    where: str


class Segment(NamedTuple):
    """Where one value's out-of-band buffers are: in a shared-memory segment whose
    descriptor travelled beside the message (see :mod:`stepvisor.backends._shm`)."""

    #: Index of the segment's descriptor among those sent with the message.
    fd: int
    #: The segment's size in bytes.
    size: int
    #: ``(offset, length)`` of each out-of-band buffer, in the order the pickle uses them.
    spans: tuple[tuple[int, int], ...]


class SharedInput(NamedTuple):
    """Engine -> process child: stands in for an input or param whose buffers are shared."""

    #: The value pickled (protocol 5) without its out-of-band buffers.
    pickled: bytes
    segment: Segment


class Returned(NamedTuple):
    """The step returned.  A process child sends ``names`` and one part per value after
    the message; a Ray task sends the ``outputs`` themselves."""

    names: tuple[str, ...] | None = None
    outputs: Mapping[str, Any] | None = None
    #: Processes the step left running, killed after it returned (process only).
    leftovers: tuple[int, ...] = ()
    #: Per name, the segment holding that value's buffers (its part is then the pickle
    #: without them), or ``None`` for a value sent whole; empty: all sent whole.
    shared: tuple[Segment | None, ...] = ()
    #: How many shared-memory descriptors were sent ahead of this message.
    fds: int = 0
    #: What a captured Ray task wrote (a process child's goes through its output pipe).
    log: str | None = None


class Raised(NamedTuple):
    """The step raised (or failed its output check)."""

    error: PackedError
    leftovers: tuple[int, ...] = ()
    #: What a captured Ray task wrote.
    log: str | None = None


class Unsendable(NamedTuple):
    """Something could not cross: the function or inputs in, an output back."""

    message: str
    traceback: str
    leftovers: tuple[int, ...] = ()


Reply = Returned | Raised | Unsendable


# -- the step's side ------------------------------------------------------------------------


def check_outputs(step_id: str, value: object) -> dict[str, Any] | None:
    """A step returns a mapping of artifact name to value, or ``None``: check it.

    Every backend calls this where the step ran, so a bad return fails the same
    way (``TypeError``) on a thread, an event loop, a child process or Ray, with
    any store.
    """
    if value is None:
        return None
    # A dict is a Mapping: asking the ABC costs most of this check (every call of
    # an Executor returns one).
    if type(value) is not dict and not isinstance(value, Mapping):
        raise TypeError(
            f"step {step_id!r} returned {type(value).__name__}; a step must return a "
            "mapping of artifact names to values (a dict such as {'rows': rows}), or None"
        )
    for key in value:
        if not isinstance(key, str) or not key:
            raise TypeError(
                f"step {step_id!r} returned an artifact name {key!r}; artifact names must be "
                "non-empty strings: return a dict such as {'rows': rows}"
            )
    return dict(value)


@contextlib.contextmanager
def trace_context(carrier: Mapping[str, str]) -> Iterator[None]:
    """Make the trace context in ``carrier`` current while the step runs.

    Spans the step creates then nest under its attempt's span.  OpenTelemetry
    is imported here, on first use, and only for a traced attempt: a process
    child must boot light, and one where it is not installed runs the step
    untraced.
    """
    try:
        from opentelemetry import context, propagate  # noqa: PLC0415 - see above
    except ImportError:
        yield
        return
    token = context.attach(propagate.extract(carrier))
    try:
        yield
    finally:
        context.detach(token)


def dump(value: object, buffers: list[pickle.PickleBuffer] | None = None) -> bytes:
    """Pickle ``value`` for the engine, without importing anything as a side effect.

    Plain ``pickle`` is fastest, but it *imports* the module named by each class it
    meets, to check the class is reachable there.  For a class that came by value
    (defined in a step function sent by value, whose module this process never
    imported) that would run the module here: a test module, say, with its
    conftest.  So once anything came by value (``cloudpickle`` is loaded), or
    when plain ``pickle`` fails, ``cloudpickle`` is used: it sends such classes by
    value and never imports.

    Given ``buffers``, out-of-band buffers (protocol 5) are left out of the bytes
    and appended to it instead, for :mod:`stepvisor.backends._shm`.
    """
    keep = None if buffers is None else buffers.append
    if "cloudpickle" not in sys.modules:
        try:
            return pickle.dumps(value, protocol=PROTOCOL, buffer_callback=keep)
        except Exception:
            if buffers is not None:
                buffers.clear()  # what the failed attempt handed over
    import cloudpickle  # noqa: PLC0415 - slow to import, needed only for by-value values

    return bytes(cloudpickle.dumps(value, protocol=PROTOCOL, buffer_callback=keep))


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def safe_str(exc: BaseException) -> str:
    """``str(exc)``, or a placeholder when even that raises."""
    try:
        return str(exc)
    except Exception:
        return f"<str() of the {type(exc).__name__} failed>"


def format_remote(exc: BaseException) -> str:
    """The traceback text of ``exc``, starting at the step's frames (ours are dropped)."""
    import traceback  # noqa: PLC0415 - only needed when a step fails

    tb = exc.__traceback__
    while (
        tb is not None
        and tb.tb_next is not None
        and tb.tb_frame.f_code.co_filename.startswith(_OUR_DIR)
    ):
        tb = tb.tb_next
    try:
        return "".join(traceback.format_exception(type(exc), exc, tb))
    except Exception:
        return f"{_qualname(type(exc))}: {safe_str(exc)} (its traceback could not be formatted)\n"


def pack_error(exc: BaseException, *, where: str, text: str | None = None) -> PackedError:
    """Pack ``exc`` to travel: pickled if that round-trips here, and always as text.

    Nothing the exception does (a ``__reduce__`` that raises, a ``__str__``
    that raises, a class that cannot be rebuilt from its ``args``) escapes.
    """
    blob: bytes | None
    try:
        blob = dump(exc)
        pickle.loads(blob)  # noqa: S301 - our own bytes; proves the engine can load them
    except BaseException as why:  # a __reduce__ may raise anything, even SystemExit
        blob, why_not = None, f"{type(why).__name__}: {safe_str(why)}"
    else:
        why_not = ""
    return PackedError(
        qualname=_qualname(type(exc)),
        message=safe_str(exc),
        traceback=format_remote(exc) if text is None else text,
        blob=blob,
        why_not=why_not,
        where=where,
    )


# -- the engine's side ------------------------------------------------------------------------


def rebuild_error(packed: PackedError, *, step_id: str, attempt: int, origin: str) -> BaseException:
    """The step's exception as itself, else a :class:`RemoteStepError` with its type and text.

    ``origin`` names what ran it (``worker process``, ``Ray worker``); the
    remote traceback is added as a note either way.
    """
    error: object = None
    why_not = packed.why_not
    if packed.blob is not None:
        try:
            error = pickle.loads(packed.blob)  # noqa: S301 - from our own child or task
        except Exception as exc:
            why_not = f"{type(exc).__name__}: {exc} (while loading it here)"
    if not isinstance(error, BaseException):
        error = RemoteStepError(
            f"step {step_id!r} raised {packed.qualname}: {packed.message}; that exception "
            f"could not be sent back from its {origin} ({why_not}), so its type and traceback "
            "are in remote_type and remote_traceback; make the exception class picklable "
            "(pass every __init__ argument on to Exception.__init__) to get it back as itself",
            step_id=step_id,
            attempt=attempt,
            remote_type=packed.qualname,
            remote_traceback=packed.traceback,
        )
    with contextlib.suppress(Exception):  # a class may forbid new attributes
        error.add_note(f"Traceback in {packed.where}:\n{packed.traceback.rstrip()}")
    return error
