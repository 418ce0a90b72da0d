"""Waiting for one attempt's end: what a poll served, how long the next may block, the deadline.

The slot (``_slot.py``) runs one loop per attempt: poll the child's reply
pipe, its command pipe while a message is part-sent, the wake-up pipe a
canceller writes to, and the child's pidfd; serve what is ready; enforce the
deadline and the SIGTERM -> SIGKILL grace.  These are that loop's steps, with
no state of their own (the child's is in ``_worker.Child``).
"""

from __future__ import annotations

import math
import time
from typing import Final

from stepvisor.backends.process._worker import Child
from stepvisor.context import AttemptControl
from stepvisor.core.attempt import AttemptSpec

__all__ = ["enforce_deadline", "poll_ms", "serve"]

#: How often a child's death is checked for when pidfds are not available.
_FALLBACK_POLL_S: Final = 0.02


def serve(
    child: Child, ready: list[tuple[int, int]], pending: memoryview, *, reading: bool
) -> tuple[memoryview, bool, bool]:
    """Serve one poll's ready descriptors: read replies, send the rest, drain a wake-up.

    Returns what is still to send, whether the reply pipe is still open, and
    whether the child is dead (its pidfd became readable).
    """
    dead = False
    for fd, _events in ready:
        if fd == child.res_r:
            reading = child.read_some()
            if not reading:
                child.poller.unregister(child.res_r)
        elif fd == child.cmd_w:
            pending = child.send_some(pending)
            if not pending:
                child.poller.unregister(child.cmd_w)
        elif fd == child.wake_r:
            child.drain_wake()
        elif fd == child.out_r:
            if not child.read_output():
                child.poller.unregister(child.out_r)
        else:
            dead = True
    return pending, reading, dead


def poll_ms(child: Child, spec: AttemptSpec, control: AttemptControl) -> int | None:
    """How long the next poll may block: until the deadline, the end of grace, or forever."""
    if spec.deadline is None and child.pidfd is not None and not control.is_cancelled:
        return None  # the common case, without the lock: only a reply or an event ends it
    now = time.monotonic()
    waits: list[float] = []
    with child.lock:
        term_at, killed = child.term_at, child.killed_after_grace
    if not control.is_cancelled:
        if spec.deadline is not None:
            waits.append(spec.deadline - now)
    elif term_at is None:
        waits.append(0.0)  # cancelled, but our canceller has not run yet: look again soon
    elif not killed:
        waits.append(term_at + spec.kill_grace - now)
    if child.pidfd is None:
        waits.append(_FALLBACK_POLL_S)
    if not waits:
        return None
    return max(0, math.ceil(min(waits) * 1000))


def enforce_deadline(child: Child, spec: AttemptSpec, control: AttemptControl) -> None:
    """Cancel at the deadline (the engine's timer may be late); SIGKILL after the grace."""
    if not control.is_cancelled:
        if spec.deadline is not None and time.monotonic() >= spec.deadline:
            control.cancel("timeout")  # runs our canceller (SIGTERM) like the engine would
        return
    # Normally a no-op: our canceller ran inside control.cancel.  It is repeated here in
    # case another canceller registered before ours raised and ours was never called.
    child.terminate(child.token)
    child.escalate(grace=spec.kill_grace)
