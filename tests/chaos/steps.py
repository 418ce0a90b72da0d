"""The step functions of a campaign: what each attempt does is read from ``ctx.params``.

They are module-level functions, so process steps and resumed runs in other
programs import them by reference, as ``tests.chaos.steps.chaos_step``.  A
resumed run's workflow fingerprint names them by module, so they must be this
module in every program (never ``__main__``).  Each attempt writes a line when
it begins and ends into a per-run directory, outside the program, so that "ran
exactly once" is observed rather than assumed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any, Final

from stepvisor.context import StepContext
from stepvisor.errors import FatalError, RetryableError

#: The environment variable that tags every process of a run (and its phase).
MARK_VAR: Final = "STEPVISOR_CHAOS_MARK"


def _phase() -> str:
    return os.environ.get(MARK_VAR, "?").rsplit(".", 1)[-1]


def _note(ctx: StepContext, event: str) -> None:
    """Append one line about this attempt to the step's side-effect file (one write: atomic)."""
    directory = ctx.params["dir"]
    if not directory:
        return
    line = f"{event} {_phase()} {ctx.attempt} {os.getpid()}\n".encode()
    fd = os.open(
        os.path.join(directory, "effects", f"{ctx.step_id}.log"),
        os.O_WRONLY | os.O_CREAT | os.O_APPEND,
        0o600,
    )
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


#: Files of the store-fault handshake, in the run directory (see :func:`_store_fault_due`).
FAULT_REQUEST: Final = "store-fault.request"
FAULT_ACK: Final = "store-fault.ack"
#: How long an attempt waits for the campaign to inject its store fault.
_ACK_WAIT: Final = 60.0


def _store_fault_due(ctx: StepContext) -> None:
    """If this attempt is the one a store fault strikes at, have the campaign inject it now.

    Every eligible attempt of the first program (phase ``p0``) takes a numbered
    ticket (``O_EXCL``: one attempt per number, across threads and processes);
    the one drawing ``fault_at`` asks the campaign for the fault and waits until
    it is in place, so the fault strikes before this attempt's outcome is stored.
    """
    at = int(ctx.params.get("fault_at", 0))
    directory = ctx.params["dir"]
    if not at or not directory or _phase() != "p0":
        return
    tickets = os.path.join(directory, "tickets")
    if os.path.exists(os.path.join(tickets, str(at))):
        return  # drawn already
    number = 1
    while number <= at:
        try:
            os.close(os.open(os.path.join(tickets, str(number)), os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            number += 1
            continue
        break
    if number != at:
        return
    tmp = os.path.join(directory, f".{FAULT_REQUEST}.tmp")
    with open(tmp, "w", encoding="ascii") as fh:
        fh.write(f"{ctx.step_id} {ctx.attempt} {os.getpid()}\n")
    os.replace(tmp, os.path.join(directory, FAULT_REQUEST))
    ack = os.path.join(directory, FAULT_ACK)
    deadline = time.monotonic() + _ACK_WAIT
    while not os.path.exists(ack):  # the campaign's monitor polls every few ms
        if time.monotonic() > deadline:
            raise RuntimeError(f"chaos: the store fault asked for by {ctx.step_id} never came")
        time.sleep(0.002)


def _artifacts(step_id: str, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """Deterministic outputs: a digest of the step id and its inputs.

    Every step also writes ``shared``, so the value a step sees there says which
    ancestor came last in canonical order: merging order is checked too.
    """
    text = json.dumps(sorted(inputs.items()), sort_keys=True)
    digest = hashlib.sha256(f"{step_id}|{text}".encode()).hexdigest()
    return {f"v_{step_id}": digest[:16], "shared": f"{step_id}:{digest[:8]}"}


def _struck(ctx: StepContext) -> bool:
    """Whether the step's fault is this attempt's: always for a step; for an
    instance of a mapped step, only when its index is one of the ``bad`` ones."""
    return ctx.params["fault"] != "ok" and (ctx.index is None or ctx.index in ctx.params["bad"])


def _misbehaving(ctx: StepContext) -> bool:
    return _struck(ctx) and ctx.attempt <= int(ctx.params["failing"])


def instance_value(instance: str, item: Any, inputs: Mapping[str, Any]) -> str:
    """What instance ``instance`` of a mapped step returns: a pure function of its item.

    (and of its id and the step's other inputs, the same in every run), so the
    collected list of a run that was killed and resumed must equal an
    uninterrupted run's.
    """
    text = json.dumps([item, sorted(inputs.items())], sort_keys=True)
    return hashlib.sha256(f"{instance}|{text}".encode()).hexdigest()[:16]


def _outputs(ctx: StepContext) -> dict[str, Any]:
    """An attempt's artifacts: an instance's value, or a step's digests (and list)."""
    if ctx.index is not None:
        return {ctx.params["list"]: instance_value(ctx.step_id, ctx.item, ctx.inputs)}
    out = _artifacts(ctx.step_id, ctx.inputs)
    emits = int(ctx.params.get("emits", -1))
    if emits >= 0:
        digest = out["shared"].rsplit(":", 1)[-1]
        out[ctx.params["list"]] = [f"{ctx.step_id}#{k}:{digest}" for k in range(emits)]
    elif emits != -1:
        out[ctx.params["list"]] = f"not a list, made by {ctx.step_id}"  # BAD_LIST
    return out


def _unstorable(ctx: StepContext, out: dict[str, Any]) -> None:
    out[ctx.params["list"] if ctx.index is not None else f"v_{ctx.step_id}"] = {1, 2}


def _hang_here(ctx: StepContext, *, in_process: bool) -> None:
    """Run past the deadline until stopped, the way the step's style says."""
    style = ctx.params["style"]
    end = time.monotonic() + float(ctx.params["hang"])
    if in_process:
        if style == "stubborn":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only SIGKILL stops it
        while time.monotonic() < end:
            if style != "busy":
                _hang_line(ctx)
                time.sleep(0.05)
        return
    if style == "busy":
        while time.monotonic() < end and not ctx.cancelled:
            pass
    else:
        _hang_line(ctx)
        ctx.wait_cancelled(float(ctx.params["hang"]))
    ctx.raise_if_cancelled()


def _ask_to_be_killed(ctx: StepContext) -> None:
    """Write a pid file the campaign's monitor kills us through, then wait for it."""
    pids = os.path.join(ctx.params["dir"], "pids")
    name = f"{ctx.step_id}.{_phase()}.{ctx.attempt}"
    tmp = os.path.join(pids, f".{name}.tmp")
    with open(tmp, "w", encoding="ascii") as fh:
        fh.write(str(os.getpid()))
    os.replace(tmp, os.path.join(pids, f"{name}.pid"))
    time.sleep(float(ctx.params["hang"]))


def _leave_a_grandchild() -> None:
    sleep = shutil.which("sleep")
    argv = [sleep, "60"] if sleep else [sys.executable, "-c", "import time; time.sleep(60)"]
    subprocess.Popen(argv, stdin=subprocess.DEVNULL, close_fds=True)


def _fail_the_attempt(ctx: StepContext, *, in_process: bool) -> None:
    """Raise, crash or hang as the step's fault says (called only while misbehaving)."""
    fault = ctx.params["fault"]
    if fault == "raise":
        raise ValueError(f"chaos: planned failure of {ctx.step_id} on attempt {ctx.attempt}")
    if fault == "retryable":
        raise RetryableError(f"chaos: please retry {ctx.step_id}", after=0.001)
    if fault == "fatal":
        raise FatalError(f"chaos: {ctx.step_id} fails for good")
    if fault == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault == "exit":
        os._exit(13)
    if fault == "outside_kill":
        _ask_to_be_killed(ctx)
    if fault in ("timeout", "ignore_cancel"):
        if fault == "ignore_cancel":
            time.sleep(float(ctx.params["hang"]))  # deaf to the cancel request
            return
        _hang_here(ctx, in_process=in_process)


def _chatter(ctx: StepContext) -> None:
    """Write this attempt's numbered output lines (its log must hold them, and only them)."""
    for i in range(int(ctx.params.get("chatter", 0))):
        print(f"chaos {ctx.step_id} {ctx.attempt} {i}")


def _hang_line(ctx: StepContext) -> None:
    """A line written while hanging: a step stopped at its deadline is stopped mid-write."""
    if ctx.params.get("chatter"):
        print(f"chaos {ctx.step_id} {ctx.attempt} hang", flush=True)


def chaos_step(ctx: StepContext) -> dict[str, Any] | None:
    """The step every thread and process step of a campaign runs; ``ctx.params`` steers it."""
    _note(ctx, "start")
    _chatter(ctx)
    _store_fault_due(ctx)
    in_process = ctx.params["executor"] == "process"
    if _misbehaving(ctx):
        _fail_the_attempt(ctx, in_process=in_process)
        if ctx.params["fault"] == "ignore_cancel":
            return None  # abandoned long ago: its outcome is discarded, write nothing
    if ctx.params["duration"]:
        if in_process:
            time.sleep(float(ctx.params["duration"]))
        else:
            ctx.wait_cancelled(float(ctx.params["duration"]))
            ctx.raise_if_cancelled()
    out = _outputs(ctx)
    fault = ctx.params["fault"] if _struck(ctx) else "ok"
    if fault == "orphan":
        _leave_a_grandchild()
    elif fault == "unpicklable":
        out["lock"] = threading.Lock()
    elif fault == "unstorable":
        _unstorable(ctx, out)  # a set: the json codec refuses it
    _note(ctx, "end")
    return out


async def chaos_step_async(ctx: StepContext) -> dict[str, Any] | None:
    """The async twin of :func:`chaos_step` (timeouts are cancelled tasks)."""
    _note(ctx, "start")
    _chatter(ctx)
    _store_fault_due(ctx)
    if _misbehaving(ctx):
        if ctx.params["fault"] == "timeout":
            await asyncio.sleep(float(ctx.params["hang"]))
        else:
            _fail_the_attempt(ctx, in_process=False)
    if ctx.params["duration"]:
        await asyncio.sleep(float(ctx.params["duration"]))
    out = _outputs(ctx)
    if ctx.params["fault"] == "unstorable" and _struck(ctx):
        _unstorable(ctx, out)
    _note(ctx, "end")
    return out
