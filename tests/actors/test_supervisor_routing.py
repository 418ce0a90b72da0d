"""The Supervisor's routing of messages for runs that have already ended."""

from __future__ import annotations

import time
from typing import Any

import pytest

from stepvisor.actors import supervisor as supervisor_module
from stepvisor.actors.messages import SlotGranted
from stepvisor.actors.supervisor import _DUE, Supervisor
from stepvisor.backends.base import AttemptResult
from stepvisor.core.messages import AttemptDone, RetryDue


class RecordingPool:
    """Stands in for the engine's WorkerPool: records the leases given back."""

    def __init__(self) -> None:
        self.given_back: list[Any] = []

    def give_back(self, lease: Any) -> None:
        self.given_back.append(lease)


def test_a_lease_granted_to_a_run_that_ended_goes_back_to_the_pool() -> None:
    # The pool may grant a waiting run a lease just as that run ends: dropping
    # the grant would shrink the engine's bound by one for good.
    pool = RecordingPool()
    supervisor = Supervisor(pool=pool, register_thread=lambda thread: None)  # type: ignore[arg-type]
    lease = object()
    supervisor._route("ended-run", SlotGranted("w3", lease))
    assert pool.given_back == [lease]


def test_a_late_outcome_for_a_run_that_ended_is_dropped_quietly() -> None:
    pool = RecordingPool()
    supervisor = Supervisor(pool=pool, register_thread=lambda thread: None)  # type: ignore[arg-type]
    late = AttemptDone("a", 1, "w1", AttemptResult(kind="ok"), 0.0, 0.0, 0.0, "ended-run")
    supervisor._route("ended-run", late)
    assert pool.given_back == []


class RecordingShell:
    """Stands in for a run's shell: records what the Supervisor hands it, in order."""

    completed = False

    def __init__(self) -> None:
        self.received: list[object] = []

    def receive(self, message: object) -> None:
        self.received.append(message)


def test_a_due_retry_goes_ahead_of_the_messages_already_queued() -> None:
    # In a storm the inbox holds hundreds of failures; a retry's timer queued
    # behind them would start the retry as late as the queue is long.
    supervisor = Supervisor(pool=RecordingPool(), register_thread=lambda thread: None)  # type: ignore[arg-type]
    shell = RecordingShell()
    supervisor._runs["r"] = shell  # type: ignore[assignment]
    queued = AttemptDone("b", 1, "w2", AttemptResult(kind="ok"), 0.0, 0.0, 0.0, "r")
    supervisor.tell_due("r", RetryDue("a", 1))  # from the clock, after ``queued`` came in
    supervisor.on_receive(queued)
    assert shell.received == [RetryDue("a", 1), queued]
    supervisor.on_receive(_DUE)  # the wake-up that follows finds the lane empty
    assert shell.received == [RetryDue("a", 1), queued]


def test_a_due_retry_for_a_run_that_ended_is_dropped() -> None:
    supervisor = Supervisor(pool=RecordingPool(), register_thread=lambda thread: None)  # type: ignore[arg-type]
    supervisor.tell_due("ended-run", RetryDue("a", 1))
    supervisor.on_receive(_DUE)
    assert not supervisor._due


def test_with_a_backlog_the_supervisor_lets_the_waiting_threads_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Holding the GIL through a backlog starves the Workers whose steps just ended.
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    supervisor = Supervisor(pool=RecordingPool(), register_thread=lambda thread: None)  # type: ignore[arg-type]
    supervisor.on_receive(_DUE)
    assert slept == []  # nothing waiting: no yield
    for _ in range(supervisor_module.BACKLOG + 1):
        supervisor.actor_ref.tell(_DUE)  # queued: the actor is not started
    supervisor.on_receive(_DUE)
    assert slept == [0]


def test_retries_come_due_together_send_one_wake_up() -> None:
    supervisor = Supervisor(pool=RecordingPool(), register_thread=lambda thread: None)  # type: ignore[arg-type]
    shell = RecordingShell()
    supervisor._runs["r"] = shell  # type: ignore[assignment]
    for attempt in (1, 2, 3):
        supervisor.tell_due("r", RetryDue(f"s{attempt}", 1))
    assert supervisor._inbox.qsize() == 1
    supervisor.on_receive(_DUE)
    assert shell.received == [RetryDue("s1", 1), RetryDue("s2", 1), RetryDue("s3", 1)]
    supervisor.tell_due("r", RetryDue("s4", 1))  # the lane was taken: a new wake-up
    assert supervisor._inbox.qsize() == 2
