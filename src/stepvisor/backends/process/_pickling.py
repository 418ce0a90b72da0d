"""Pickling what a process step needs, and naming what cannot be pickled.

The step function is pickled with cloudpickle (by import reference when
importable, by value otherwise), once per step; the inputs and params once per
attempt.  A value that cannot be pickled raises :class:`StepNotSerializableError`
naming the step and the path to the offending object (``inputs['rows'][2]``,
``closure variable 'lock' of <lambda>``) before anything is sent, instead of
failing in the child.  The Ray backend uses the same checks.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import pickle
import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final, NamedTuple

import cloudpickle

from stepvisor.backends import _shm
from stepvisor.backends._located import DYNAMIC, located
from stepvisor.backends._wire import Segment
from stepvisor.core.attempt import AttemptSpec
from stepvisor.errors import StepNotSerializableError

__all__ = ["Args", "args_blob", "check_sendable", "payload_and_args", "prepare_payload"]

_PROTOCOL: Final = pickle.HIGHEST_PROTOCOL
_EMPTY_ARGS: Final = pickle.dumps(({}, {}), protocol=_PROTOCOL)
#: How deep, and how many items per level, the search for an unpicklable part goes.
_SEARCH_DEPTH: Final = 6
_SEARCH_WIDTH: Final = 100


def prepare_payload(step_id: str, fn: Callable[..., Any]) -> bytes:
    """Pickle a step function for a worker process.

    Importable functions travel as an import reference; ``__main__`` functions,
    lambdas and closures travel by value (cloudpickle).  Raises
    :class:`StepNotSerializableError` naming the step and the object that
    cannot be pickled, such as a lock captured by a closure.
    """
    try:
        payload = bytes(cloudpickle.dumps(fn, protocol=_PROTOCOL))
        wrapped = located(fn) if DYNAMIC.encode() in payload else None
        if wrapped is not None:  # sent by value: keep its file name and source
            payload = bytes(cloudpickle.dumps(wrapped, protocol=_PROTOCOL))
    except Exception as exc:
        raise _not_serializable(
            step_id,
            f"its function {_function_name(fn)}",
            fn,
            exc,
            fix="create such objects inside the function instead of capturing them, "
            "or run the step with executor='thread'",
        ) from exc
    return payload


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
    else:
        yield from _object_parts(value, path)


def _object_parts(value: object, path: str) -> Iterator[tuple[str, object]]:
    """The parts of a value that is not a container: a callable's, or its attributes."""
    if isinstance(value, types.FunctionType):
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


class Args(NamedTuple):
    """An attempt's inputs and params, pickled, and the segment descriptors they name.

    The descriptors are borrowed from the run's table (:mod:`~stepvisor.backends._shm`),
    except those in ``owned``: made for this attempt alone (no run table), to be
    closed once sent (``close``).
    """

    blob: bytes
    fds: tuple[int, ...] = ()
    owned: tuple[int, ...] = ()

    def close(self) -> None:
        for fd in self.owned:
            with contextlib.suppress(OSError):
                os.close(fd)


def _cloud_dumps(value: object, buffers: list[pickle.PickleBuffer] | None) -> bytes:
    keep = None if buffers is None else buffers.append
    return bytes(cloudpickle.dumps(value, protocol=_PROTOCOL, buffer_callback=keep))


def args_blob(spec: AttemptSpec) -> Args:
    """The attempt's inputs and params, pickled; names the culprit if one cannot be.

    A value whose buffers are large goes by shared memory: one the run already
    holds in a segment (an artifact of an earlier process step) is sent by
    reference; another is written into a new segment once, kept for the run.
    """
    if not spec.inputs and not spec.params:
        return Args(_EMPTY_ARGS)
    value = (dict(spec.inputs), dict(spec.params))
    if _plain(value[0]) and _plain(value[1]):
        return Args(pickle.dumps(value, protocol=_PROTOCOL))
    try:
        if not _maybe_shared(spec, value):
            buffers: list[pickle.PickleBuffer] = []
            blob = _cloud_dumps(value, buffers)
            if not buffers:  # today's path: no out-of-band buffers at all
                return Args(blob)
            if sum(memoryview(b).nbytes for b in buffers) < _shm.SHARE_MIN:
                return Args(_cloud_dumps(value, None))
        return _shared_args(spec, value)
    except Exception as exc:
        for what, mapping in (("inputs", spec.inputs), ("params", spec.params)):
            for key, item in mapping.items():
                check_sendable(spec.step_id, f"{what}[{key!r}]", item)
        raise _not_serializable(
            spec.step_id, "its inputs and params", value, exc, fix="pass plain, picklable data"
        ) from exc


#: Values that plain ``pickle`` sends exactly as ``cloudpickle`` does (nothing by value,
#: nothing out of band, nothing a run holds in shared memory).  ``bytes`` are not among
#: them: a large one goes by shared memory.
_SCALARS: Final = frozenset({int, float, complex, str, bool, type(None)})


def _plain(mapping: Mapping[str, Any]) -> bool:
    """Whether every value is a scalar, or a tuple, list or dict of scalars.

    Then plain ``pickle`` is enough, and a quarter of ``cloudpickle``'s cost
    (its pickler is made in Python on every call): an Executor's call sends its
    arguments so (``{args: (1,), kwargs: {}}``), a map's item too.
    """
    scalars = _SCALARS
    for value in mapping.values():
        kind = type(value)
        if kind in scalars:
            continue
        if kind is tuple or kind is list:
            if not all(type(item) in scalars for item in value):
                return False
        elif kind is dict:
            if not all(type(k) in scalars and type(v) in scalars for k, v in value.items()):
                return False
        else:
            return False
    return True


def _maybe_shared(spec: AttemptSpec, value: tuple[dict[str, Any], dict[str, Any]]) -> bool:
    """Whether a value must be looked at one by one: held by the run, or bytes-like."""
    items = [*value[0].values(), *value[1].values()]
    return any(_shm.needs_wrap(item) for item in items) or _shm.is_known(spec.run_id, items)


def _shared_args(spec: AttemptSpec, value: tuple[dict[str, Any], dict[str, Any]]) -> Args:
    fds: list[int] = []
    owned: list[int] = []
    index: dict[int, int] = {}  # descriptor -> its index in this message

    def slot_of(fd: int) -> int | None:
        if fd not in index:
            if len(fds) >= _shm.MAX_FDS:
                return None
            index[fd] = len(fds)
            fds.append(fd)
        return index[fd]

    try:
        for mapping in value:
            for key, item in mapping.items():
                mapping[key] = _one_value(spec.run_id, item, slot_of, owned)
        return Args(_cloud_dumps(value, None), tuple(fds), tuple(owned))
    except BaseException:
        Args(b"", owned=tuple(owned)).close()
        raise


def _one_value(
    run_id: str, item: object, slot_of: Callable[[int], int | None], owned: list[int]
) -> object:
    """``item`` itself, or the :class:`SharedInput` standing in for it."""
    held = _shm.known(run_id, item)
    if held is None:
        pickled, raws = _shm.dumps_sharing(item, _cloud_dumps)
        if not raws:
            return _shm.wrap(item)
        try:
            fd, size, (spans,) = _shm.write_segment([raws])
        except OSError:  # no memfd here, or no descriptors left: the pipe still works
            return _shm.wrap(item)
        segment = Segment(0, size, spans)
        if _shm.hold(run_id, fd):
            _shm.remember(run_id, item, fd, pickled, segment)
        else:
            owned.append(fd)
        held = _shm.Held(item, fd, pickled, segment)
    index = slot_of(held.fd)
    if index is None:  # more segments than one message carries: the rest go whole
        return _shm.wrap(item)
    return _shm.shared_input(held, index)


def payload_and_args(spec: AttemptSpec) -> tuple[bytes, Args]:
    """The pickled function and inputs of an attempt (raises ``StepNotSerializableError``)."""
    return spec.fn_payload or prepare_payload(spec.step_id, spec.fn), args_blob(spec)
