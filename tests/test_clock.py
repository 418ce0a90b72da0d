"""The real clock's timer thread: due order, waking, and ending when idle.

These use real time, but only a few milliseconds of it, and synchronize on
events: a timer "fires" by setting one.
"""

from __future__ import annotations

import threading

import pytest

from stepvisor.clock import RealClock

pytestmark = pytest.mark.realtime


def _thread_of(clock: RealClock) -> threading.Thread:
    thread = clock._thread
    assert thread is not None
    return thread


def test_a_sooner_timer_set_while_the_thread_sleeps_for_a_later_one_fires_first() -> None:
    clock = RealClock()
    fired: list[str] = []
    soon = threading.Event()
    late = clock.call_later(30.0, lambda: fired.append("late"))
    thread = _thread_of(clock)  # now asleep until the 30 s timer

    def fire_soon() -> None:
        fired.append("soon")
        soon.set()

    clock.call_later(0.005, fire_soon)
    assert soon.wait(5), "the thread slept through a sooner timer"
    assert fired == ["soon"]
    late.cancel()
    thread.join(5)
    assert not thread.is_alive()


def test_cancelling_a_later_timer_keeps_the_sooner_one() -> None:
    clock = RealClock()
    fired = threading.Event()
    clock.call_later(0.005, fired.set)
    later = clock.call_later(30.0, lambda: None)
    later.cancel()  # not the head: the thread is not woken, and need not be
    assert fired.wait(5)
    thread = _thread_of(clock) if clock._thread is not None else None
    if thread is not None:
        thread.join(5)
        assert not thread.is_alive()


def test_cancelling_the_only_timer_lets_the_thread_end_at_once() -> None:
    clock = RealClock()
    timer = clock.call_later(60.0, lambda: None)
    thread = _thread_of(clock)
    timer.cancel()
    thread.join(5)
    assert not thread.is_alive(), "the clock thread waited for a cancelled timer"
