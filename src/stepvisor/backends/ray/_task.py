"""What runs in the Ray worker: one attempt per task, its reply a :mod:`_wire` message.

The step is called with the code the thread backend uses
(:func:`~stepvisor.backends.thread.call_step`, which checks its outputs like
every backend), and its exception is packed with the process child's function
(:func:`~stepvisor.backends._wire.pack_error`).  So a Ray-level error
(``ray.get`` raising in the driver) always means the infrastructure failed,
never the step.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

import cloudpickle

from stepvisor.backends._capture import Capture, install
from stepvisor.backends._wire import (
    Raised,
    RayCall,
    Reply,
    Returned,
    Unsendable,
    format_remote,
    pack_error,
)
from stepvisor.backends.thread import call_step
from stepvisor.context import AttemptControl
from stepvisor.core.attempt import AttemptSpec
from stepvisor.errors import StepNotSerializableError

__all__ = ["attempt_task"]

#: Types whose values always pickle, checked by exact type.
_PLAIN_TYPES: Final = frozenset({bytes, bytearray, str, int, float, bool, complex, type(None)})


def attempt_task(call: RayCall, *sources: Any) -> Reply:
    """Run one attempt in a Ray worker (``sources``: see :class:`RayCall`)."""
    meta = call.attempt
    deadline = None
    if meta.deadline is not None:  # wall time: this host's clock is not the driver's
        deadline = time.monotonic() + (meta.deadline - time.time())
    try:
        fn = cloudpickle.loads(sources[call.fn] if isinstance(call.fn, int) else call.fn)
    except BaseException as exc:
        return Unsendable(
            f"step {meta.step_id!r}: its function could not be loaded in the Ray worker "
            f"({type(exc).__name__}: {exc}); make the module that defines it importable on "
            "every node (install it there, or pass runtime_env={'py_modules': [...]} or "
            "{'working_dir': ...} to ray.init), or define the function in the script you run",
            format_remote(exc),
        )
    inputs = dict(call.inline)
    for name, index, key in call.picks:
        source = sources[index]
        inputs[name] = source if key is None else source.outputs[key]
    spec = AttemptSpec(
        run_id=meta.run_id,
        step_id=meta.step_id,
        attempt=meta.attempt,
        max_attempts=meta.max_attempts,
        fn=functools.partial(_run_coroutine, fn) if meta.is_async else fn,
        is_async=False,
        inputs=inputs,
        params=call.params,
        deadline=deadline,
        trace=meta.trace,
    )
    control = _captured(meta)
    result = call_step(spec, control)
    log = control.log.text() if control is not None and control.log is not None else None
    if result.kind == "ok":
        reply = _ok_reply(meta.step_id, result.outputs)
        return reply._replace(log=log or None) if isinstance(reply, Returned) and log else reply
    error = result.error or RuntimeError("the step failed without an exception")
    return Raised(pack_error(error, where=_where()), log=log or None)


def _captured(meta: Any) -> AttemptControl | None:
    """A control whose log keeps what the task writes, when its run captures."""
    if meta.capture is None:
        return None
    install()
    logging.getLogger().setLevel(meta.capture)
    control = AttemptControl()
    control.capture = Capture("store", meta.log_limit)
    return control


def _where() -> str:
    where = f"Ray worker (pid {os.getpid()}"
    with contextlib.suppress(Exception):
        ray = importlib.import_module("ray")
        where += f" on node {ray.util.get_node_ip_address()}"
    return where + ")"


def _run_coroutine(fn: Callable[[Any], Any], ctx: Any) -> Any:
    return asyncio.run(fn(ctx))


def _ok_reply(step_id: str, outputs: Mapping[str, Any] | None) -> Reply:
    """The outputs, once they are known to pickle.

    Checked here because a return value Ray cannot serialize takes the worker
    down with it.  Values that surely pickle (plain bytes and text, numbers,
    NumPy arrays of plain numbers) are not pickled twice, and buffers of the
    rest are left out of band, so the check does not copy large data.
    """
    if not outputs:
        return Returned(outputs=outputs)
    unsure = {k: v for k, v in outputs.items() if not _surely_picklable(v)}
    if unsure:
        try:
            cloudpickle.dumps(unsure, protocol=5, buffer_callback=_discard)
        except Exception as exc:
            return Unsendable(_unpicklable_output(step_id, unsure, exc), format_remote(exc))
    return Returned(outputs=outputs)


def _surely_picklable(value: object) -> bool:
    cls = type(value)
    if cls in _PLAIN_TYPES:  # exact types: a subclass may add what does not pickle
        return True
    if cls.__name__ != "ndarray" or cls.__module__ != "numpy":
        return False
    dtype = getattr(value, "dtype", None)
    return dtype is not None and not dtype.hasobject


def _discard(_: object) -> None:
    """A pickle buffer callback: leave buffers out of band, uncopied."""


def _unpicklable_output(step_id: str, outputs: Mapping[str, Any], exc: Exception) -> str:
    from stepvisor.backends.process import check_sendable  # noqa: PLC0415 - failure path only

    for name, value in outputs.items():
        try:
            check_sendable(step_id, f"artifact {name!r}", value)
        except StepNotSerializableError as found:
            return f"{found} (it was returned from a Ray worker)"
    return (
        f"step {step_id!r} returned artifacts that cannot be sent back from its Ray worker "
        f"({type(exc).__name__}: {exc}); return plain, picklable data"
    )
