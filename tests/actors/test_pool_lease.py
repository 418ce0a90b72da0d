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


def _full_pool() -> tuple[WorkerPool, Lease]:
    pool = WorkerPool(
        capacity=1, services=WorkerServices(shared={}, register_thread=lambda thread: None)
    )
    lease = pool.lease(object(), lambda lease: None)
    assert lease is not None
    return pool, lease


def test_leases_go_to_waiters_first_come_first_served() -> None:
    pool, lease = _full_pool()
    got: list[str] = []
    first, second = object(), object()
    assert pool.lease(first, lambda lease: got.append("first")) is None
    assert pool.lease(second, lambda lease: got.append("second")) is None
    assert pool.lease(first, lambda lease: got.append("first again")) is None
    for _ in range(3):
        pool.give_back(lease)
    assert got == ["first", "second", "first again"]
    pool.give_back(lease)
    assert pool.taken == 0


def test_a_withdrawn_request_is_never_delivered_and_the_others_keep_their_turn() -> None:
    pool, lease = _full_pool()
    got: list[str] = []
    ended, waiting = object(), object()
    pool.lease(ended, lambda lease: got.append("ended"))
    pool.lease(waiting, lambda lease: got.append("waiting"))
    pool.lease(ended, lambda lease: got.append("ended again"))
    pool.cancel_waiting(ended)
    pool.cancel_waiting(object())  # an owner that waits for nothing: nothing changes
    pool.give_back(lease)
    assert got == ["waiting"]
    pool.give_back(lease)  # nobody left: the capacity is free again
    assert pool.taken == 0
    assert got == ["waiting"]


def test_an_owner_that_withdrew_may_wait_again() -> None:
    pool, lease = _full_pool()
    got: list[str] = []
    owner = object()
    pool.lease(owner, lambda lease: got.append("withdrawn"))
    pool.cancel_waiting(owner)
    pool.lease(owner, lambda lease: got.append("asked again"))
    pool.give_back(lease)
    assert got == ["asked again"]


def test_an_abandoned_lease_frees_its_capacity_for_the_next_live_request() -> None:
    pool, lease = _full_pool()
    got: list[Lease] = []
    gone, live = object(), object()
    pool.lease(gone, lambda lease: None)
    pool.lease(live, got.append)
    pool.cancel_waiting(gone)
    pool.abandon(lease)
    assert len(got) == 1
    assert pool.taken == 1
