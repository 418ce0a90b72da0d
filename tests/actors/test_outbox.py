"""Outcomes that end together travel together: the shell's Outbox and the async backend."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from stepvisor.actors._outbox import Outbox
from stepvisor.backends.asyncio import LoopThread
from stepvisor.backends.base import AttemptResult, AttemptSpec
from stepvisor.context import AttemptControl, StepContext
from stepvisor.core.messages import AttemptDone, AttemptsDone

OK = AttemptResult(kind="ok")


class Recorder:
    def __init__(self) -> None:
        self.messages: list[Any] = []

    def tell(self, message: Any) -> None:
        self.messages.append(message)


def _done(sid: str) -> AttemptDone:
    return AttemptDone(sid, 1, "w1", OK, 0.0, 0.0, 0.0, "run-1")


def test_outcomes_posted_in_one_loop_iteration_go_as_one_message() -> None:
    inbox = Recorder()
    outbox = Outbox(inbox)

    async def main() -> None:
        for sid in ("a", "b", "c"):
            outbox.post(_done(sid))
        assert inbox.messages == []  # held until the end of this iteration
        await asyncio.sleep(0)
        outbox.post(_done("d"))  # a later iteration: a message of its own
        await asyncio.sleep(0)

    asyncio.run(main())
    first, second = inbox.messages
    assert isinstance(first, AttemptsDone)
    assert [d.step_id for d in first.outcomes] == ["a", "b", "c"]
    assert first.run_id == "run-1"
    assert type(second) is AttemptDone
    assert second.step_id == "d"


def test_an_outcome_posted_without_a_running_loop_goes_at_once() -> None:
    inbox = Recorder()
    Outbox(inbox).post(_done("a"))
    assert [m.step_id for m in inbox.messages] == ["a"]


async def _sleepy(ctx: StepContext) -> None:
    await asyncio.sleep(0)


def test_a_burst_of_submissions_starts_every_attempt_and_ends_each_once() -> None:
    loop = LoopThread()
    ended: list[str] = []
    all_done = threading.Event()
    n = 50

    def done_for(sid: str) -> Any:
        def done(result: AttemptResult) -> None:
            assert result.kind == "ok"
            ended.append(sid)
            if len(ended) == n:
                all_done.set()

        return done

    try:
        for i in range(n):
            spec = AttemptSpec("r", f"s{i}", 1, 1, _sleepy, True, {}, {}, None)
            loop.submit(spec, AttemptControl(), done_for(f"s{i}"))
        assert all_done.wait(10)
        assert sorted(ended) == sorted(f"s{i}" for i in range(n))
    finally:
        loop.close()


def test_an_attempt_submitted_to_a_closed_loop_ends_as_a_backend_bug() -> None:
    loop = LoopThread()
    loop.close()
    results: list[AttemptResult] = []
    spec = AttemptSpec("r", "s", 1, 1, _sleepy, True, {}, {}, None)
    loop.submit(spec, AttemptControl(), results.append)
    (result,) = results
    assert result.kind != "ok"
    assert "closed" in str(result.error)
