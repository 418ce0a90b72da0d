"""How a Worker reports the outcomes of a prefetched batch.

A batch's successes that nothing waits for are reported together (one
``AttemptsDone``); a failure, or a success other steps wait for, is reported
at once with whatever was held.  These drive one Worker actor directly and
record what it sends, in order; nothing here depends on timing except the
``REPORT_WITHIN`` case, which sets the threshold to zero.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from types import MappingProxyType
from typing import Any, ClassVar

import pytest

from stepvisor.actors import worker as worker_module
from stepvisor.actors.messages import RunAttempt, RunBatch
from stepvisor.actors.worker import Worker, WorkerServices
from stepvisor.backends.base import AttemptSpec
from stepvisor.backends.thread import ThreadBackend
from stepvisor.context import AttemptControl, StepContext
from stepvisor.core.messages import AttemptDone, AttemptsDone


class Inbox:
    """A stand-in for the Supervisor: records every message, wakes a waiter per message."""

    def __init__(self) -> None:
        self.messages: list[Any] = []
        self._cond = threading.Condition()

    def tell(self, message: Any) -> None:
        with self._cond:
            self.messages.append(message)
            self._cond.notify_all()

    def outcomes(self, count: int) -> list[Any]:
        """Block until ``count`` outcomes arrived in all; the messages so far."""
        with self._cond:
            assert self._cond.wait_for(lambda: _count(self.messages) >= count, timeout=10)
            return list(self.messages)


def _count(messages: list[Any]) -> int:
    return sum(len(m.outcomes) if isinstance(m, AttemptsDone) else 1 for m in messages)


def ok(ctx: StepContext) -> None:
    """A no-op step."""


def boom(ctx: StepContext) -> None:
    raise RuntimeError("boom")


@pytest.fixture
def worker() -> Iterator[Any]:
    backend = ThreadBackend()
    services = WorkerServices(shared={"thread": lambda: backend}, register_thread=lambda t: None)
    ref = Worker.start("wb1", services)
    yield ref
    ref.stop()


def _attempt(sid: str, fn: Any, inbox: Inbox, *, may_hold: bool = True) -> RunAttempt:
    spec = AttemptSpec("run-1", sid, 1, 1, fn, False, MappingProxyType({}), {}, None)
    return RunAttempt(spec, AttemptControl(), "thread", "w1", inbox, may_hold)


def _shape(messages: list[Any]) -> list[list[str]]:
    return [
        [d.step_id for d in m.outcomes] if isinstance(m, AttemptsDone) else [m.step_id]
        for m in messages
    ]


def test_successes_nothing_waits_for_are_reported_together(worker: Any) -> None:
    inbox = Inbox()
    worker.tell(RunBatch(tuple(_attempt(f"s{i}", ok, inbox) for i in range(4))))
    messages = inbox.outcomes(4)
    assert _shape(messages) == [["s0", "s1", "s2", "s3"]]
    batch = messages[0]
    assert batch.run_id == "run-1"
    assert all(d.result.kind == "ok" and d.worker == "w1" for d in batch.outcomes)


def test_a_failure_or_a_success_others_wait_for_is_reported_at_once(worker: Any) -> None:
    inbox = Inbox()
    attempts = (
        _attempt("a", ok, inbox),
        _attempt("b", ok, inbox, may_hold=False),  # a step with dependants
        _attempt("c", ok, inbox),
        _attempt("d", boom, inbox),  # a failure may stop the run: never held
        _attempt("e", ok, inbox),
    )
    worker.tell(RunBatch(attempts))
    messages = inbox.outcomes(5)
    assert _shape(messages) == [["a", "b"], ["c", "d"], ["e"]]
    assert type(messages[-1]) is AttemptDone


def test_nothing_is_held_past_report_within(worker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker_module, "REPORT_WITHIN", 0.0)
    inbox = Inbox()
    worker.tell(RunBatch(tuple(_attempt(f"s{i}", ok, inbox) for i in range(3))))
    assert _shape(inbox.outcomes(3)) == [["s0"], ["s1"], ["s2"]]


class AheadRecorder:
    """A backend that sends ahead: records what each ``run`` was offered, runs nothing."""

    sends_ahead: ClassVar[bool] = True

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []

    def run(self, spec: AttemptSpec, control: AttemptControl, ahead: Any = None) -> Any:
        from stepvisor.backends.base import AttemptResult  # noqa: PLC0415

        self.calls.append((spec.step_id, [s.step_id for s, _ in ahead or ()]))
        return AttemptResult(kind="ok")

    def close(self) -> None:
        """Nothing to release."""


def test_a_backend_that_sends_ahead_is_offered_the_rest_of_the_batch_on_it() -> None:
    backend = AheadRecorder()
    services = WorkerServices(
        shared={"thread": ThreadBackend, "process": lambda: backend},
        register_thread=lambda t: None,
    )
    ref = Worker.start("wb2", services)
    try:
        inbox = Inbox()
        batch = [_attempt(sid, ok, inbox) for sid in ("a", "b", "c", "d")]
        batch = [a._replace(executor="process") for a in batch[:3]] + batch[3:]
        batch[2].control.cancel("cancel")  # offered ahead: the backend may have started it
        ref.tell(RunBatch(tuple(batch)))
        inbox.outcomes(4)
    finally:
        ref.stop()
    # In order, up to the first attempt on another backend ("d" runs on threads); "c",
    # cancelled but offered, still goes to the backend, which alone can stop it.
    assert backend.calls == [("a", ["b", "c"]), ("b", ["c"]), ("c", [])]


class _AheadBackend:
    """A backend that sends attempts ahead, as a process child's does; its first blocks."""

    sends_ahead: ClassVar[bool] = True

    def __init__(self) -> None:
        self.started = threading.Event()
        self.go_on = threading.Event()
        self.ran: list[str] = []
        self.offered: set[str] = set()

    def run(self, spec: AttemptSpec, control: AttemptControl, ahead: Any = None) -> Any:
        from stepvisor.backends.base import AttemptResult  # noqa: PLC0415

        self.offered.update(s.step_id for s, _control in ahead or ())
        self.ran.append(spec.step_id)
        if len(self.ran) == 1:
            self.started.set()
            assert self.go_on.wait(timeout=10)
        return AttemptResult(kind="ok")

    def close(self) -> None:
        pass


def test_a_batch_left_in_the_deque_can_be_taken_back_all_but_what_was_sent_ahead() -> None:
    """While the first attempt runs, the shell's ``Reclaim`` can take every attempt of
    the batch but the ``AHEAD`` the backend was offered; those run, the rest never do."""
    from collections import deque  # noqa: PLC0415

    backend = _AheadBackend()
    services = WorkerServices(shared={"ahead": lambda: backend}, register_thread=lambda t: None)
    ref = Worker.start("wb2", services)
    try:
        inbox = Inbox()
        attempts = [_attempt(f"s{i:02d}", ok, inbox)._replace(executor="ahead") for i in range(12)]
        queue = deque(attempts)
        ref.tell(RunBatch(queue))
        assert backend.started.wait(timeout=10)
        taken = []
        while True:
            try:
                taken.append(queue.pop().spec.step_id)
            except IndexError:
                break
        backend.go_on.set()
        messages = inbox.outcomes(1 + worker_module.AHEAD)
    finally:
        ref.stop()
    assert len(taken) == 12 - 1 - worker_module.AHEAD
    ran = backend.ran
    assert ran == [f"s{i:02d}" for i in range(1 + worker_module.AHEAD)]
    assert not set(taken) & (set(ran) | backend.offered)  # taken back: never offered, never run
    assert sorted(sid for group in _shape(messages) for sid in group) == ran
