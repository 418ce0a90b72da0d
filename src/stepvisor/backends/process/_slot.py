"""The process slot: one Worker's child process, and the attempts it runs there.

The task manager's half of the process backend (the child itself is handled by
``_worker.Child``): it runs one attempt at a time, enforces its deadline,
carries a cancel to the child's process group, sends small attempts ahead, and
replaces the child after a timeout, cancel or crash::

    Worker thread: ProcessSlot.run(spec, control)          child (stepvisor.backends._child)
      prepare fn payload + args (StepNotSerializableError)
      cmd pipe  ──── Attempt ────────────────────────▶   load fn, build StepContext, call
      poll(result pipe, pidfd, wake pipe; deadline)
      result pipe ◀── Returned | Raised | Unsendable ──   kill leftovers, pickle the reply
    another thread: control.cancel("timeout"|"cancel")
      canceller: SIGTERM to the group, wake the poll ──▶ dies; the poll escalates to
                                                         SIGKILL after ``kill_grace``

* **No timer threads.**  The canceller only sends SIGTERM and writes a byte to a
  wake-up pipe; the thread blocked in ``run`` then escalates to SIGKILL when
  ``kill_grace`` has passed, from the same poll loop that watches the result
  pipe.  A canceller that fires after its attempt ended finds a different
  attempt token and does nothing, so a late engine timer cannot hit the next
  attempt in a reused child.
* **The parent's own deadline is a safety net.**  The engine calls
  ``control.cancel("timeout")`` at the deadline; ``run`` also does it itself when
  ``spec.deadline`` passes, so the backend is correct on its own.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import select
import sys
import threading
import weakref
from collections.abc import Sequence
from typing import ClassVar, Final, NamedTuple, cast

from stepvisor._log import log as _root_log
from stepvisor.backends._child import dump_attempt, encode_message
from stepvisor.backends._wire import Attempt
from stepvisor.backends.base import Ahead, not_started
from stepvisor.backends.process._output import Key
from stepvisor.backends.process._pickling import Args, payload_and_args
from stepvisor.backends.process._results import (
    closed_result,
    crash_result,
    describe_exit,
    reply_result,
    spawn_failed,
    stopped_result,
)
from stepvisor.backends.process._wait import enforce_deadline, poll_ms, serve
from stepvisor.backends.process._worker import Child, Received
from stepvisor.backends.thread import ended_with_stack
from stepvisor.context import AttemptControl
from stepvisor.core.attempt import AttemptResult, AttemptSpec
from stepvisor.errors import StepNotSerializableError, StepvisorError

__all__ = ["ProcessSlot", "open_slot"]

log = _root_log.getChild("backends.process")

#: The largest attempt message sent ahead to a busy child (see ``ProcessSlot.run``):
#: a pipe write of at most ``PIPE_BUF`` bytes is whole or nothing, never partial.
_AHEAD_MAX: Final = select.PIPE_BUF


class _SlotState:
    """What a slot's finalizer needs, kept apart from the slot so the slot can be collected."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.child: Child | None = None
        self.closed = False

    def shutdown(self) -> None:
        with self.lock:
            self.closed = True
            child, self.child = self.child, None
        if child is not None:
            child.reap()


class _Ahead(NamedTuple):
    """An attempt already written into a child's command pipe, behind the running one."""

    key: tuple[str, str, int]  # run id, step id, attempt
    child: Child
    #: Whether the attempt before it got its reply: if so, the child may have
    #: started this one, and losing the child now is this attempt's crash.
    replied: bool


class ProcessSlot:
    """The process backend: one child process owned by one Worker; reused across attempts.

    ``run`` blocks the calling thread until the attempt ends; it raises only on
    a bug of its own or a ``KeyboardInterrupt``, after killing its child.
    After a timeout, a cancel or a crash the old child's process group is gone
    and a fresh child is already starting.  ``close`` kills and reaps the child;
    a slot that is garbage-collected, or still open at interpreter exit, is
    closed too.  Use one slot from one thread at a time (``close`` may come from
    any thread).
    """

    sends_ahead: ClassVar[bool] = True

    def __init__(self, *, name: str = "worker") -> None:
        self._name = name
        self._state = _SlotState()
        self._run_lock = threading.Lock()
        self._finalizer = weakref.finalize(self, self._state.shutdown)
        #: The attempts written into the current child's pipe behind the running one,
        #: in the order the child takes them.
        self._ahead: collections.deque[_Ahead] = collections.deque()

    def __repr__(self) -> str:
        return f"ProcessSlot(name={self._name!r}, pid={self.pid})"

    def __enter__(self) -> ProcessSlot:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        """The current child's pid, or ``None`` if none is running."""
        child = self._state.child
        return None if child is None else child.pid

    def start(self) -> int:
        """Start the child now (if not running) so the first attempt need not wait; its pid."""
        with self._run_lock:
            child = self._ensure_child()
        if child is None:
            raise StepvisorError(f"process slot {self._name!r} is closed; create a new one")
        return child.pid

    def close(self) -> None:
        """Kill the child's whole process group and reap it.  Idempotent, any thread.

        An attempt running in ``run`` at that moment ends as ``cancelled``.
        """
        state = self._state
        with state.lock:
            if state.closed:
                return
            state.closed = True
            child = state.child
        if child is not None:
            child.kill()  # ends a running attempt at once
        with self._run_lock:
            self._finalizer()

    def run(
        self,
        spec: AttemptSpec,
        control: AttemptControl,
        ahead: Ahead | Sequence[Ahead] | None = None,
    ) -> AttemptResult:
        """Run one attempt in the child; block until it ends; return how it ended.

        ``ahead`` is the attempt the caller will run next, or the attempts, in
        order, if it knows: while they are small and have no deadline, their
        messages go into the child's pipe behind this one's (one write for all
        that fit in ``PIPE_BUF``), so the child starts each the moment it
        replies to the one before instead of waiting a round trip (two thread
        wakes, each a cross-CPU interrupt on a VM).  The next calls must then
        be for those attempts, in that order; a call for any other attempt
        first replaces the child, so a reply is never taken for the wrong
        attempt.  An attempt offered again in a later ``ahead`` is not sent twice.
        """
        with self._run_lock:
            try:
                return self._run(spec, control, _following(ahead))
            except BaseException as exc:
                # A bug here, or an interrupt: the child may hold anything now.
                self._retire_current(respawn=isinstance(exc, Exception))
                raise

    # -- one attempt --

    def _run(
        self,
        spec: AttemptSpec,
        control: AttemptControl,
        following: Sequence[Ahead] = (),
    ) -> AttemptResult:
        if self._state.closed:
            return closed_result(spec, self._name, pid=None)
        sent = self._take_ahead(spec)
        if sent is not None:
            if sent.child is self._state.child:
                # Already in the child's pipe: only wait for its reply.
                return self._attempt_on(sent.child, spec, control, b"", following)
            if sent.replied:
                # The child took this attempt from its pipe, or was about to, and
                # died: that is this attempt's crash, not something to run again.
                return crash_result(spec, sent.child.pid, sent.child.reap(), ready=True)
        stopped = not_started(spec, control)
        if stopped is not None:
            return stopped
        try:
            fn_payload, args = payload_and_args(spec)
        except StepNotSerializableError as exc:
            exc.attempt = spec.attempt
            return AttemptResult(kind="unsendable", error=exc, note="nothing was sent")
        try:
            child = self._ensure_child()
        except OSError as exc:
            args.close()
            return spawn_failed(spec, exc)
        if child is None:
            args.close()
            return closed_result(spec, self._name, pid=None)
        message = self._message(child, spec, fn_payload, args, captured=control.capture is not None)
        if args.fds:  # ahead of the message: the child takes them when it reads it
            child.send_fds(args.fds)
        args.close()
        return self._attempt_on(child, spec, control, message, following)

    def _attempt_on(
        self,
        child: Child,
        spec: AttemptSpec,
        control: AttemptControl,
        message: bytes,
        following: Sequence[Ahead],
    ) -> AttemptResult:
        """Make ``child`` this attempt's (its cancel stops it), send ``message``
        (``b""`` if it was sent ahead) and wait for the outcome."""
        token = object()
        with child.lock:
            child.token = token
        # Called at once if already cancelled: an attempt sent ahead may be
        # running in the child by now, and this stops it.
        control.on_cancel(functools.partial(child.terminate, token))
        child.output.bind((control, spec.step_id, spec.attempt))
        # A captured attempt's reply comes with the end of its output (or after it).
        captured = (
            (spec.run_id, spec.step_id, spec.attempt) if control.capture is not None else None
        )
        reply = self._exchange(child, spec, control, message, following, captured=captured)
        if reply is not None:
            result = self._reply_result(spec, child, reply)
        else:
            result = self._end_of_child(spec, control, child)
        child.output.unbind()
        if control.is_cancelled and control.reason == "timeout" and child.output.stack:
            control.stack = child.output.stack
        if control.log is None and control.stack is None:
            return result
        return ended_with_stack(result, control)

    def _take_ahead(self, spec: AttemptSpec) -> _Ahead | None:
        """The record of ``spec`` sent ahead, if it was; replace a child holding another."""
        if not self._ahead:
            return None
        sent = self._ahead.popleft()
        if sent.key == _key(spec):
            return sent
        self._ahead.clear()  # all behind it went to the same child
        if sent.child is self._state.child:
            # Its pipe holds (or it runs) an attempt nobody will wait for: a fresh
            # child is the only way to keep replies matched to attempts.
            log.info("worker process %s had another attempt queued; replacing it", sent.child.pid)
            self._retire(sent.child, respawn=True)
        return None

    def _message(
        self, child: Child, spec: AttemptSpec, fn_payload: bytes, args: Args, *, captured: bool
    ) -> bytes:
        path = None if child.sent_path == sys.path else list(sys.path)
        authkey = None
        if path is not None and "multiprocessing.process" in sys.modules:
            # Without multiprocessing imported here there is no proxy to share.
            authkey = bytes(sys.modules["multiprocessing.process"].current_process().authkey)
        meta = Attempt(
            spec.run_id,
            spec.step_id,
            spec.attempt,
            spec.max_attempts,
            spec.deadline,
            spec.is_async,
            path,
            fds=len(args.fds),
            trace=spec.trace,
            authkey=authkey,
            capture=logging.getLogger().getEffectiveLevel() if captured else None,
        )
        message = encode_message([dump_attempt(meta), fn_payload, args.blob])
        if path is not None:
            child.sent_path = path
        return message

    def _send_ahead(self, child: Child, following: Sequence[Ahead]) -> None:
        """Write the next attempts into the pipe behind the current one, those that may go.

        In order, and up to the first that may not: only attempts without a
        deadline (its time must start when it does), not cancelled, to a child
        that has booted, together small enough for one whole-or-nothing write;
        ``_ahead`` records them.  Those already in the pipe are skipped.
        """
        # Records of an earlier child are stale here: this attempt is going to ``child``,
        # so those behind it never started there, and go again in order.
        if self._ahead and self._ahead[0].child is not child:  # all are for one child
            self._ahead.clear()
        if not following or not child.ready:
            return
        queued = len(self._ahead)
        if [sent.key for sent in self._ahead] != [_key(s) for s, _ in following[:queued]]:
            return  # not what the caller runs next: its next call replaces the child
        keys: list[tuple[str, str, int]] = []
        messages: list[bytes] = []
        size = 0
        path_before = child.sent_path  # a message carrying sys.path may not go after all
        for spec, control in following[queued:]:
            key = _key(spec)
            message = self._ahead_message(child, spec, control)
            size += len(message)
            if not message or size > _AHEAD_MAX:
                break
            keys.append(key)
            messages.append(message)
        if messages and child.send_whole(b"".join(messages)):
            self._ahead.extend(_Ahead(key, child, replied=False) for key in keys)
        elif child.sent_path is not path_before:
            child.sent_path = path_before

    def _ahead_message(self, child: Child, spec: AttemptSpec, control: AttemptControl) -> bytes:
        if spec.deadline is not None or control.is_cancelled:
            return b""
        try:
            fn_payload, args = payload_and_args(spec)
        except StepNotSerializableError:
            return b""  # its own run reports that
        if args.fds:  # descriptors go just before their message, which must not wait
            args.close()
            return b""
        return self._message(child, spec, fn_payload, args, captured=control.capture is not None)

    def _exchange(
        self,
        child: Child,
        spec: AttemptSpec,
        control: AttemptControl,
        message: bytes,
        following: Sequence[Ahead] = (),
        *,
        captured: Key | None = None,
    ) -> Received | None:
        """Send the attempt (if not sent yet) and maybe the next one behind it, then
        wait for its reply (``None``: the child died first; ``captured``: see
        :meth:`Child.take_reply`)."""
        # Nothing to write when it went ahead: not even an empty write (a syscall).
        pending = child.send_some(memoryview(message)) if message else memoryview(message)
        if pending:
            child.poller.register(child.cmd_w, select.POLLOUT)
        elif spec.child_calls is None:  # a child with a bound takes one attempt at a time
            self._send_ahead(child, following)  # never interleaved with a part-sent message
        try:
            reply = self._await_reply(child, spec, control, pending, captured)
        finally:
            if pending:  # registered above; the poller outlives this attempt
                with contextlib.suppress(KeyError):
                    child.poller.unregister(child.cmd_w)
        if reply is not None and self._ahead and self._ahead[0].child is child:
            self._ahead[0] = self._ahead[0]._replace(replied=True)
        return reply

    def _await_reply(
        self,
        child: Child,
        spec: AttemptSpec,
        control: AttemptControl,
        pending: memoryview,
        captured: Key | None,
    ) -> Received | None:
        reading = True
        # With attempts sent ahead, the reply may have come in with the previous one.
        early = child.take_reply(captured)
        if early is not None and child.claim_reply():
            return early
        while True:
            ready = child.poller.poll(poll_ms(child, spec, control))
            pending, reading, dead = serve(child, ready, pending, reading=reading)
            reply = child.take_reply(captured)
            if reply is None and (dead or (child.pidfd is None and child.has_exited())):
                reply = child.drain(captured)
                dead = True
            if reply is not None and child.claim_reply():
                return reply
            if dead or (not reading and child.pidfd is None and child.has_exited()):
                return None
            enforce_deadline(child, spec, control)

    def _reply_result(self, spec: AttemptSpec, child: Child, reply: Received) -> AttemptResult:
        result = reply_result(spec, *reply)
        if self._ahead and self._ahead[0].child is child:
            # The next attempt is in its pipe, and waiting for it watches the pidfd:
            # a death now is seen there, as that attempt's crash (as it would be here).
            return result
        if child.has_exited():  # it replied, then died: keep the reply, replace the child
            log.warning("worker process %s died right after replying; replacing it", child.pid)
            self._retire(child, respawn=True)
            return result
        child.calls += 1
        if spec.child_calls is not None and child.calls >= spec.child_calls:
            self._retire(child, respawn=True)  # idle now: nothing of an attempt is lost
        return result

    def _end_of_child(
        self, spec: AttemptSpec, control: AttemptControl, child: Child
    ) -> AttemptResult:
        """The child died during the attempt: say why, and start its replacement."""
        was_ready = child.ready
        returncode = self._retire(child, respawn=True)
        if self._state.closed:
            return closed_result(spec, self._name, pid=child.pid)
        if control.is_cancelled:
            return stopped_result(
                spec,
                control.reason,
                pid=child.pid,
                returncode=returncode,
                killed_after_grace=child.killed_after_grace,
            )
        return crash_result(spec, child.pid, returncode, ready=was_ready)

    # -- the child's life --

    def _ensure_child(self) -> Child | None:
        """The running child, started if need be; ``None`` if the slot was closed."""
        state = self._state
        child = state.child
        if child is not None and child.ready and child.has_exited():
            returncode = child.reap()
            log.warning(
                "worker process %s of slot %r %s while idle; starting a fresh one",
                child.pid,
                self._name,
                describe_exit(returncode),
            )
            child = None
            with state.lock:
                state.child = None
        if child is not None:
            return child
        child = Child(name=self._name)
        with state.lock:
            if not state.closed:
                state.child = child
                return child
        child.reap()
        return None

    def _retire(self, child: Child, *, respawn: bool) -> int:
        """Kill and reap ``child``, maybe start the next one at once; the old exit status.

        Eager: ``Popen`` returns in about half a millisecond, and the new
        interpreter starts up while the engine handles this attempt's outcome.
        """
        state = self._state
        with state.lock:
            if state.child is child:
                state.child = None
        returncode = child.reap()
        if respawn and not state.closed:
            try:
                self._ensure_child()
            except OSError as exc:
                log.warning("could not start a fresh worker process yet: %s", exc)
        return returncode

    def _retire_current(self, *, respawn: bool) -> None:
        child = self._state.child
        if child is not None:
            self._retire(child, respawn=respawn)


# -- helpers ----------------------------------------------------------------------------------


def _following(ahead: Ahead | Sequence[Ahead] | None) -> Sequence[Ahead]:
    """``run``'s ``ahead`` as a sequence: one attempt (the protocol's form), or several."""
    if not ahead:
        return ()
    if isinstance(ahead[0], AttemptSpec):
        return (cast("Ahead", ahead),)
    return cast("Sequence[Ahead]", ahead)


def _key(spec: AttemptSpec) -> tuple[str, str, int]:
    return (spec.run_id, spec.step_id, spec.attempt)


def open_slot(name: str) -> ProcessSlot:
    """A Worker's slot, its child already booting so a first deadline is not spent on it.

    A child that cannot be started now is only logged: the first attempt
    tries again and reports why it cannot.
    """
    slot = ProcessSlot(name=name)
    try:
        slot.start()
    except OSError as exc:
        log.warning("could not start a worker process for %s yet: %s", name, exc)
    return slot
