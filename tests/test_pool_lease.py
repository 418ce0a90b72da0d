"""What the pool sends a Worker whose lease is given back."""

from __future__ import annotations

from typing import Any

from stepvisor.actors._pool import Lease, WorkerPool
from stepvisor.actors.messages import Warm
from stepvisor.actors.worker import WorkerServices


class Inbox:
    def __init__(self) -> None:
        self.messages: list[Any] = []

    def tell(self, message: Any) -> None:
        self.messages.append(message)


def _given_back(*, holds_values: bool | None) -> list[Any]:
    pool = WorkerPool(
        capacity=2, services=WorkerServices(shared={}, register_thread=lambda thread: None)
    )
    lease = pool.lease(object(), lambda lease: None)
    assert lease is not None
    inbox = Inbox()
    lease.worker, lease.worker_id = inbox, "e1"  # type: ignore[assignment]
    if holds_values is not None:
        lease.holds_values = holds_values
    pool.give_back(lease)
    assert pool.taken == 0
    return inbox.messages


def test_a_worker_whose_last_message_held_values_is_sent_a_no_op_to_let_them_go() -> None:
    assert _given_back(holds_values=True) == [Warm(())]


def test_a_lease_holds_values_unless_its_holder_says_otherwise() -> None:
    # The Executor's hub never says: its Workers always get the no-op.
    assert Lease().holds_values
    assert _given_back(holds_values=None) == [Warm(())]


def test_a_worker_whose_last_message_held_nothing_of_the_run_is_not_woken() -> None:
    assert _given_back(holds_values=False) == []
