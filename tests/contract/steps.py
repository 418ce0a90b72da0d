"""The step functions of the contract suite, one plain and one ``async def`` version each.

They are module-level functions so that a process child or a Ray worker can
import them by reference (``tests.contract.steps``); this module therefore
imports nothing of pytest or of the suite's conftest.  Steps and tests talk
through files in the directory ``ctx.params["dir"]``, never through memory
(a process or Ray step has none in common with the test):

* ``attempts.log`` gets one line per call, ``<step> <attempt> <pid>``: the
  counter a step uses to decide whether this is its first call, and the test's
  record of what really ran;
* ``<step>.<attempt>.<what>`` holds the pid of the process that wrote it:
  ``started`` on entry, ``late`` for work done after a stop was asked for,
  ``returned`` when a step returns after it saw ``ctx.cancelled``;
* ``go``, written by a test, tells a step its next run should just succeed
  (the resumed run of a cooperative stop);
* other names a step waits for are given in its params.

``ASYNC`` maps each plain step to its ``async def`` version.  Where a step
only returns or raises, the version is made by :func:`_async_version`; where
it waits, it is written out, so that it waits on the event loop (an awaited
sleep a task cancel can interrupt) and never blocks the loop's thread.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import stepvisor as sv

__all__ = ["ASYNC", "STOP_BOUND", "Abort", "LockedError", "QuotaError"]

#: How long a step that is meant to be stopped waits for the stop before it
#: gives up (so a stop that never comes fails the test instead of hanging it).
STOP_BOUND = 20.0
_POLL = 0.005

Outputs = Mapping[Any, Any] | None
SyncStep = Callable[[sv.StepContext], Any]
AsyncStep = Callable[[sv.StepContext], Awaitable[Any]]


# -- what steps tell the test -----------------------------------------------------------------


def folder(ctx: sv.StepContext) -> Path:
    return Path(ctx.params["dir"])


def publish(ctx: sv.StepContext, what: str) -> None:
    """Write ``<step>.<attempt>.<what>`` holding our pid, atomically (write, then rename)."""
    path = folder(ctx) / f"{ctx.step_id}.{ctx.attempt}.{what}"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, path)


def begin(ctx: sv.StepContext) -> int:
    """Log this call and announce it; return how many times this step has been called."""
    with open(folder(ctx) / "attempts.log", "a") as fh:  # one short append: atomic
        fh.write(f"{ctx.step_id} {ctx.attempt} {os.getpid()}\n")
    calls = (folder(ctx) / "attempts.log").read_text().split("\n")
    publish(ctx, "started")
    return sum(1 for line in calls if line.split(" ")[0] == ctx.step_id)


def told_to_go(ctx: sv.StepContext) -> bool:
    return (folder(ctx) / "go").exists()


def _missing(ctx: sv.StepContext, names: list[str]) -> list[str]:
    return [name for name in names if not (folder(ctx) / name).exists()]


def wait_for_files(ctx: sv.StepContext, names: list[str]) -> None:
    deadline = time.monotonic() + STOP_BOUND
    while missing := _missing(ctx, names):
        if time.monotonic() > deadline:
            raise RuntimeError(f"step {ctx.step_id!r} gave up waiting for {missing}")
        time.sleep(_POLL)


async def wait_for_files_async(ctx: sv.StepContext, names: list[str]) -> None:
    deadline = time.monotonic() + STOP_BOUND
    while missing := _missing(ctx, names):
        if time.monotonic() > deadline:
            raise RuntimeError(f"step {ctx.step_id!r} gave up waiting for {missing}")
        await asyncio.sleep(_POLL)


# -- outputs -------------------------------------------------------------------------------------


def return_list(ctx: sv.StepContext) -> Any:
    return [1, 2]


def return_int_name(ctx: sv.StepContext) -> Outputs:
    return {1: "x"}


def return_empty_name(ctx: sv.StepContext) -> Outputs:
    return {"": 1}


def return_mapping(ctx: sv.StepContext) -> Outputs:
    return {"made_by": ctx.step_id}


def return_none(ctx: sv.StepContext) -> Outputs:
    return None


# -- exceptions ----------------------------------------------------------------------------------


class QuotaError(Exception):
    """An ordinary user exception: pickles by reference, comes back as itself."""


class LockedError(Exception):
    """An exception that cannot be pickled: it holds a lock."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


class Abort(BaseException):
    """A user ``BaseException`` subclass, like ``KeyboardInterrupt`` not an ``Exception``."""


def raise_picklable(ctx: sv.StepContext) -> Outputs:
    raise QuotaError(f"over quota on attempt {ctx.attempt}")


def raise_unpicklable(ctx: sv.StepContext) -> Outputs:
    raise LockedError("holds a lock")


def raise_base(ctx: sv.StepContext) -> Outputs:
    """Raise the ``BaseException`` named by ``params["kind"]``."""
    kind = ctx.params["kind"]
    if kind == "SystemExit":
        raise SystemExit(3)
    if kind == "KeyboardInterrupt":
        raise KeyboardInterrupt
    if kind == "GeneratorExit":
        raise GeneratorExit
    raise Abort("abort the step")


# -- stopping ------------------------------------------------------------------------------------


def block_until_stopped(ctx: sv.StepContext) -> Outputs:
    """Wait to be stopped, the way each backend stops a step.

    A thread step cooperates: it wakes when told and raises.  A process or Ray
    step never sees the ask (``ctx.cancelled`` stays false there): it sleeps
    until killed.  Work done after the stop would leave a ``late`` file.
    """
    begin(ctx)
    ctx.wait_cancelled(STOP_BOUND)
    ctx.raise_if_cancelled()
    publish(ctx, "late")
    return {"late": True}


async def block_until_stopped_async(ctx: sv.StepContext) -> Outputs:
    """The async version: its task is cancelled while it awaits."""
    begin(ctx)
    await asyncio.sleep(STOP_BOUND)
    publish(ctx, "late")
    return {"late": True}


def stop_politely(ctx: sv.StepContext) -> Outputs:
    """Poll ``ctx.cancelled``; when it turns true, return (partial) artifacts normally.

    Told to ``go`` (a resumed run), it returns its full artifacts at once.
    """
    begin(ctx)
    if told_to_go(ctx):
        return {"polite_done": ctx.attempt}
    deadline = time.monotonic() + STOP_BOUND
    while not ctx.cancelled and time.monotonic() < deadline:
        time.sleep(_POLL)
    publish(ctx, "returned")
    return {"polite_partial": True}


async def stop_politely_async(ctx: sv.StepContext) -> Outputs:
    """The async version: it also treats its task's cancel as the ask, and returns."""
    begin(ctx)
    if told_to_go(ctx):
        return {"polite_done": ctx.attempt}
    deadline = time.monotonic() + STOP_BOUND
    try:
        while not ctx.cancelled and time.monotonic() < deadline:
            await asyncio.sleep(_POLL)
    except asyncio.CancelledError:
        pass  # returning instead of re-raising is the point of this step
    publish(ctx, "returned")
    return {"polite_partial": True}


def fail_once_started(ctx: sv.StepContext) -> Outputs:
    """Fail as soon as the files ``params["after"]`` exist (succeed once told to ``go``)."""
    begin(ctx)
    if told_to_go(ctx):
        return None
    wait_for_files(ctx, list(ctx.params["after"]))
    raise RuntimeError(f"step {ctx.step_id!r} failed on purpose")


async def fail_once_started_async(ctx: sv.StepContext) -> Outputs:
    begin(ctx)
    if told_to_go(ctx):
        return None
    await wait_for_files_async(ctx, list(ctx.params["after"]))
    raise RuntimeError(f"step {ctx.step_id!r} failed on purpose")


# -- crashes -------------------------------------------------------------------------------------


def _crash(how: str) -> None:
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(3)


def crash(ctx: sv.StepContext) -> Outputs:
    """Kill the process running this step, by ``params["how"]``: ``exit`` or ``sigkill``."""
    begin(ctx)
    _crash(ctx.params["how"])
    return None  # not reached


# -- artifacts -----------------------------------------------------------------------------------


def emit(ctx: sv.StepContext) -> Outputs:
    """Wait for ``params["wait_for"]``, then return ``params["out"]`` and what it saw."""
    begin(ctx)
    wait_for_files(ctx, list(ctx.params.get("wait_for", ())))
    return {**_seen(ctx), **ctx.params["out"]}


async def emit_async(ctx: sv.StepContext) -> Outputs:
    begin(ctx)
    await wait_for_files_async(ctx, list(ctx.params.get("wait_for", ())))
    return {**_seen(ctx), **ctx.params["out"]}


def _seen(ctx: sv.StepContext) -> dict[str, Any]:
    return {f"saw_{ctx.step_id}": sorted(ctx.inputs), f"x_at_{ctx.step_id}": ctx.inputs.get("x")}


# -- retries -------------------------------------------------------------------------------------


def fail_first(ctx: sv.StepContext) -> Outputs:
    """Raise on the first call (counted in the log), succeed on the next."""
    calls = begin(ctx)
    if calls == 1:
        raise ValueError(f"failed on call {calls}")
    return {"ok_on": calls}


def block_first(ctx: sv.StepContext) -> Outputs:
    """Wait to be stopped (past its timeout) on the first call, succeed on the next."""
    calls = begin(ctx)
    if calls == 1:
        ctx.wait_cancelled(STOP_BOUND)
        ctx.raise_if_cancelled()
        publish(ctx, "late")
    return {"ok_on": calls}


async def block_first_async(ctx: sv.StepContext) -> Outputs:
    calls = begin(ctx)
    if calls == 1:
        await asyncio.sleep(STOP_BOUND)
        publish(ctx, "late")
    return {"ok_on": calls}


def crash_first(ctx: sv.StepContext) -> Outputs:
    """Kill our process on the first call (``params["how"]``), succeed on the next."""
    calls = begin(ctx)
    if calls == 1:
        _crash(ctx.params["how"])
    return {"ok_on": calls, "pid": os.getpid()}


# -- the async versions --------------------------------------------------------------------------


# -- mapped steps (test_map.py) ------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A value as plain data to compare in a test (a NumPy array as a list)."""
    return value.tolist() if hasattr(value, "tolist") else value


def map_make(ctx: sv.StepContext) -> Outputs:
    """Create ``params['name']`` with the value ``params['value']`` (a list, or not)."""
    return {ctx.params["name"]: ctx.params["value"]}


def map_arrays(ctx: sv.StepContext) -> Outputs:
    """``chunks``: ``params['n']`` arrays of 131,072 float64 (1 MiB each: shared memory)."""
    import numpy as np  # noqa: PLC0415 - only the tests that map arrays need it

    return {"chunks": [np.full(131_072, float(i)) for i in range(ctx.params["n"])]}


def map_report(ctx: sv.StepContext) -> Outputs:
    """An instance tells what it got: its id, item, index and the names of its inputs.

    Items listed in ``params['bad']`` fail (a ``ValueError``), the first call of
    items in ``params['flaky']`` fails too (retried), and items in
    ``params['block']`` wait to be stopped on their first call.
    """
    calls = begin(ctx)
    if ctx.item in ctx.params.get("bad", ()):
        raise ValueError(f"bad item {ctx.item!r}")
    if ctx.item in ctx.params.get("flaky", ()) and calls == 1:
        raise ValueError(f"flaky item {ctx.item!r} failed on call 1")
    if ctx.item in ctx.params.get("block", ()) and calls == 1:
        ctx.wait_cancelled(STOP_BOUND)
        ctx.raise_if_cancelled()
        publish(ctx, "late")
    seen = sorted(name for name in ctx.inputs if name != "dir")
    got = {"id": ctx.step_id, "item": _plain(ctx.item), "index": ctx.index, "seen": seen}
    return {"got": got, "doubled": ctx.item * 2}


async def map_report_async(ctx: sv.StepContext) -> Outputs:
    calls = begin(ctx)
    if ctx.item in ctx.params.get("bad", ()):
        raise ValueError(f"bad item {ctx.item!r}")
    if ctx.item in ctx.params.get("flaky", ()) and calls == 1:
        raise ValueError(f"flaky item {ctx.item!r} failed on call 1")
    if ctx.item in ctx.params.get("block", ()) and calls == 1:
        await asyncio.sleep(STOP_BOUND)
        publish(ctx, "late")
    seen = sorted(name for name in ctx.inputs if name != "dir")
    got = {"id": ctx.step_id, "item": _plain(ctx.item), "index": ctx.index, "seen": seen}
    return {"got": got, "doubled": ctx.item * 2}


def map_sum(ctx: sv.StepContext) -> Outputs:
    """A chained instance: the sum of its item (an array or a number), and its index."""
    return {"sums": [float(ctx.item.sum()) if hasattr(ctx.item, "sum") else ctx.item, ctx.index]}


def map_total(ctx: sv.StepContext) -> Outputs:
    """Requires a mapped artifact whole: the list of every instance's value."""
    return {"total": [_plain(v) for v in ctx.inputs[ctx.params["of"]]]}


def _async_version(fn: SyncStep) -> AsyncStep:
    """An ``async def`` step doing what ``fn`` does (``fn`` neither waits nor blocks)."""

    async def version(ctx: sv.StepContext) -> Any:
        await asyncio.sleep(0)
        return fn(ctx)

    version.__name__ = version.__qualname__ = f"{fn.__name__}_async"
    return version


_WRITTEN_OUT: dict[SyncStep, AsyncStep] = {
    block_until_stopped: block_until_stopped_async,
    stop_politely: stop_politely_async,
    fail_once_started: fail_once_started_async,
    emit: emit_async,
    block_first: block_first_async,
    map_report: map_report_async,
}
_SIMPLE: tuple[SyncStep, ...] = (
    return_list,
    return_int_name,
    return_empty_name,
    return_mapping,
    return_none,
    raise_picklable,
    raise_unpicklable,
    raise_base,
    fail_first,
    map_make,
    map_arrays,
    map_sum,
    map_total,
)

#: Plain step -> its ``async def`` version, for the async backend.  (``crash`` and
#: ``crash_first`` have none: an async step runs in the engine's own process.)
ASYNC: Mapping[SyncStep, AsyncStep] = {
    **_WRITTEN_OUT,
    **{fn: _async_version(fn) for fn in _SIMPLE},
}
