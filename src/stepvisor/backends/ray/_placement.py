"""Where each input of a Ray task comes from: inline, a shared put, or a Ray step's result.

The driver does get every output value once (the engine keeps values: the
store, the final ``RunResult`` and thread or process consumers need them), but
it also remembers, by object identity, which Ray result each value came from;
a later Ray step that needs the value gets a reference to that result as a
top-level task argument, which its worker fetches straight from the object
store.  A large value made outside Ray (a thread step's output, a restored
artifact) is put into the object store once and the reference is shared by
every Ray step that needs it.  Nothing the engine sees is ever a reference, so
no engine code knows about Ray.
"""

from __future__ import annotations

import logging
import pickle
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import cloudpickle

from stepvisor.backends._wire import Attempt, RayCall
from stepvisor.backends.process import check_sendable, prepare_payload
from stepvisor.core.attempt import AttemptSpec
from stepvisor.errors import StepNotSerializableError

__all__ = ["SHARE_THRESHOLD", "Placement", "RayTransfers"]

#: Pickled size (bytes) from which a driver-side value is put into the object
#: store once and shared, rather than sent inside each task's arguments (Ray
#: itself inlines arguments below 100 KiB).
SHARE_THRESHOLD: Final = 100 * 1024
#: Values that are cheaper to send again than to fetch through a reference.
_ATOMS: Final = (type(None), bool, int, float, complex)
_SMALL_TEXT: Final = 4096


@dataclass(frozen=True, slots=True)
class RayTransfers:
    """How a backend has sent the inputs of its Ray tasks so far.

    ``refs_passed``: inputs sent as a reference to a Ray step's result (the
    worker fetches them from the object store); ``values_put``: driver-side
    values put into the object store, once each; ``values_reused``: inputs sent
    as a reference to a value put earlier; ``values_inlined``: small inputs sent
    inside the task's arguments.
    """

    refs_passed: int = 0
    values_put: int = 0
    values_reused: int = 0
    values_inlined: int = 0


@dataclass(frozen=True, slots=True)
class _Held:
    """A value the driver holds, and the object-store reference that carries it.

    ``value`` is kept so its ``id`` cannot be reused while the entry lives.
    ``key`` is the artifact's name in a Ray step's reply, or ``None`` when
    ``ref`` is the value itself (put by the driver); a ``ref`` of ``None``
    means "small: send it inline".
    """

    value: Any
    ref: Any
    key: str | None


def _is_atom(value: object) -> bool:
    if isinstance(value, _ATOMS):
        return True
    return isinstance(value, str | bytes) and len(value) < _SMALL_TEXT


def _pickled_size(step_id: str, name: str, value: object) -> int:
    """Bytes ``value`` takes pickled (buffers counted, not copied); names what fails."""
    sizes: list[int] = []

    def count(buffer: pickle.PickleBuffer) -> None:
        sizes.append(memoryview(buffer).nbytes)

    try:
        data = cloudpickle.dumps(value, protocol=5, buffer_callback=count)
    except Exception as exc:
        check_sendable(step_id, f"inputs[{name!r}]", value)
        raise StepNotSerializableError(
            f"step {step_id!r}: inputs[{name!r}] cannot be sent to a Ray worker "
            f"({type(exc).__name__}: {exc}); pass plain, picklable data",
            step_id=step_id,
        ) from exc
    return len(data) + sum(sizes)


class Placement:
    """The driver's record of what is in the object store, for one backend.

    Thread-safe: several Worker threads build task arguments at once.
    """

    def __init__(self, ray: Any) -> None:
        self._ray = ray
        self._lock = threading.Lock()
        self._closed = False
        #: id(value) -> where that value is in the object store (see ``_Held``).
        self._origins: dict[int, _Held] = {}
        self._shared: dict[int, _Held] = {}
        self._counts = {"refs_passed": 0, "values_put": 0, "values_reused": 0, "values_inlined": 0}

    @property
    def transfers(self) -> RayTransfers:
        """How inputs were sent so far (a snapshot)."""
        with self._lock:
            return RayTransfers(**self._counts)

    def clear(self) -> None:
        """Drop every reference, and remember no more (the backend closed)."""
        with self._lock:
            self._closed = True
            self._origins.clear()
            self._shared.clear()

    def task_args(self, spec: AttemptSpec, *, log_limit: int | None = None) -> tuple[Any, ...]:
        """The task's arguments: its :class:`RayCall`, then the sources it reads.

        ``log_limit``: the run captures output, and the task keeps up to this much.
        """
        wall_deadline = None
        if spec.deadline is not None:
            wall_deadline = time.time() + (spec.deadline - time.monotonic())
        meta = Attempt(
            spec.run_id,
            spec.step_id,
            spec.attempt,
            spec.max_attempts,
            wall_deadline,
            spec.is_async,
            trace=spec.trace,
            capture=None if log_limit is None else logging.getLogger().getEffectiveLevel(),
            log_limit=log_limit or 0,
        )
        inline: dict[str, Any] = {}
        picks: list[tuple[str, int, str | None]] = []
        sources: list[Any] = []
        index_of: dict[Any, int] = {}

        def source_index(ref: Any) -> int:
            index = index_of.get(ref)
            if index is None:
                index = index_of[ref] = len(sources)
                sources.append(ref)
            return index

        for name, value in spec.inputs.items():
            held = self._locate(spec.step_id, name, value)
            if held is None:
                inline[name] = value
            else:
                picks.append((name, source_index(held.ref), held.key))
        fn_arg = self._function(spec)
        if not isinstance(fn_arg, bytes):  # a shared reference: Ray resolves it as a source
            fn_arg = source_index(fn_arg)
        call = RayCall(meta, fn_arg, dict(spec.params), inline, tuple(picks))
        return (call, *sources)

    def _function(self, spec: AttemptSpec) -> Any:
        """The pickled step function, or a shared reference to it when it is large."""
        if spec.fn_payload is None:
            return prepare_payload(spec.step_id, spec.fn)
        payload = spec.fn_payload
        if len(payload) < SHARE_THRESHOLD:
            return payload
        with self._lock:
            held = self._shared.get(id(payload))
        if held is None or held.value is not payload:
            held = _Held(payload, self._ray.put(payload), None)
            with self._lock:
                held = self._shared.setdefault(id(payload), held)
        return held.ref

    def _locate(self, step_id: str, name: str, value: object) -> _Held | None:
        """Where a Ray task should take input ``name`` from; ``None``: send it inline."""
        key = id(value)
        with self._lock:
            held = self._known(key, value)
            if held is not None:
                self._count(held)
                return held if held.ref is not None else None
        if _is_atom(value):
            with self._lock:
                self._counts["values_inlined"] += 1
            return None
        ref = None
        if _pickled_size(step_id, name, value) >= SHARE_THRESHOLD:
            ref = self._ray.put(value)
            with self._lock:
                self._counts["values_put"] += 1
        with self._lock:
            held = self._shared.setdefault(key, _Held(value, ref, None))
            if ref is None:
                self._counts["values_inlined"] += 1
        return held if held.ref is not None else None

    def _known(self, key: int, value: object) -> _Held | None:
        """What is known about ``value`` (the caller holds the lock)."""
        for table in (self._origins, self._shared):
            held = table.get(key)
            if held is not None and held.value is value:
                return held
        return None

    def _count(self, held: _Held) -> None:
        """Count one more use of a known value (the caller holds the lock)."""
        if held.ref is None:
            self._counts["values_inlined"] += 1
        elif held.key is None:
            self._counts["values_reused"] += 1
        else:
            self._counts["refs_passed"] += 1

    def remember(self, ref: Any, outputs: Mapping[str, Any]) -> None:
        """Note where each output of a Ray step lives, for Ray steps that need it later."""
        with self._lock:
            if self._closed:
                return
            for name, value in outputs.items():
                if not _is_atom(value):
                    self._origins[id(value)] = _Held(value, ref, name)

    def forget(self, refs: tuple[Any, ...]) -> None:
        """After a crash: stop handing out references that may be lost with a node.

        The driver still holds every value, so the next attempt sends fresh copies.
        """
        if not refs:
            return
        gone = set(refs)
        with self._lock:
            for table in (self._origins, self._shared):
                for key in [k for k, held in table.items() if held.ref in gone]:
                    del table[key]

    # -- outcomes --
