"""The Supervisor's routing of messages for runs that have already ended."""

from __future__ import annotations

from typing import Any

from stepvisor.actors.messages import SlotGranted
from stepvisor.actors.supervisor import Supervisor
from stepvisor.backends.base import AttemptResult
from stepvisor.core.messages import AttemptDone


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
