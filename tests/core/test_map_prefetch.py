"""One slow instance must not hold back the instances queued after it (issue 23: no barrier).

Tiny attempts are prefetched: an idle slot is handed a batch of up to 16, which
its Worker runs one after the other (``RunMachine._fill``).  The instances of a
mapped step look alike, so once the first ones ran fast, a slot gets a batch of
the rest; when the instance at the head of that batch turns out slow, what is
queued behind it would wait for it while the run's other slot sits idle.  The
idle slot takes that tail back instead (``Reclaim``, ``core/_reclaim.py``).
"""

from __future__ import annotations

import threading

import stepvisor as sv
from stepvisor.core.effects import Effect, Reclaim, SaveStep, SaveSteps
from stepvisor.core.messages import CancelRun, Reclaimed
from tests.machine_sim import Sim, first, make_plan, noop


def _slow_head_run(sim_class: type[Sim] = Sim) -> Sim:
    """Instances 0-7 over 2 slots; score[3] never ends; everything else that can end, ends."""
    wf = sv.Workflow("slow-item", [sv.Step("score", noop, map_over=list(range(8)))])
    sim = sim_class(make_plan(wf, max_parallel=2), {("score[3]", 1): "hang"})
    sim.start()
    while sim.endable():
        sim.end(*sim.endable()[0])
    return sim


def test_the_instances_after_a_slow_one_run_on_the_idle_slot() -> None:
    sim = _slow_head_run()
    saved = [e.record for e in sim.effects if isinstance(e, SaveStep)]
    saved += [r for e in sim.effects if isinstance(e, SaveSteps) for r in e.records]
    done = {r.step_id for r in saved if r.status is sv.StepStatus.SUCCEEDED}
    assert done == {f"score[{i}]" for i in range(8) if i != 3}, sim.queues


def test_an_attempt_taken_back_unstarted_is_not_counted_and_its_record_says_so() -> None:
    sim = _slow_head_run()
    assert sim.reclaimed, "the idle slot took nothing back: the test no longer tests Reclaim"
    state = sim.machine.state
    for sid, _attempt in sim.reclaimed:
        index = int(sid[len("score[") : -1])
        record = state.instance_record(0, index)
        assert record.status is sv.StepStatus.SUCCEEDED
        assert record.attempt_count == 1, record  # taken back: no attempt counted
    # The store saw each taken-back attempt go back to pending before it ran again.
    saved = [e.record for e in sim.effects if isinstance(e, SaveStep)]
    for sid, _attempt in sim.reclaimed:
        trail = [(r.status, r.attempt_count) for r in saved if r.step_id == sid]
        assert trail == [
            (sv.StepStatus.RUNNING, 1),
            (sv.StepStatus.PENDING, 0),
            (sv.StepStatus.RUNNING, 1),
            (sv.StepStatus.SUCCEEDED, 1),
        ], (sid, trail)


class _NothingBack(Sim):
    """A shell whose Worker always started its whole batch before the ask arrives."""

    def _apply(self, effect: Effect, was_stopping: bool) -> None:
        if isinstance(effect, Reclaim):
            self.effects.append(effect)
            self.feed(Reclaimed(effect.slot, ()))
            return
        super()._apply(effect, was_stopping)


def test_a_slot_that_gives_nothing_back_is_not_asked_again_until_it_gets_new_work() -> None:
    sim = _slow_head_run(_NothingBack)
    asks = [e for e in sim.effects if isinstance(e, Reclaim)]
    assert len(asks) == 1, asks  # asked once, found dry, never asked again (no loop)
    busy = {slot for slot, queue in sim.queues.items() if queue}
    assert busy == {asks[0].slot}  # what it holds waits behind score[3], as the backend decided


class _LateAnswer(Sim):
    """A shell that answers ``Reclaim`` only when told to (the run may stop meanwhile)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.asked: list[Reclaim] = []

    def _apply(self, effect: Effect, was_stopping: bool) -> None:
        if isinstance(effect, Reclaim):
            self.effects.append(effect)
            self.asked.append(effect)
            return
        super()._apply(effect, was_stopping)

    def answer(self) -> None:
        for ask in self.asked:
            queue = self.queues[ask.slot]
            taken = [queue.pop() for _ in range(min(ask.wanted, len(queue) - 1))]
            self.feed(Reclaimed(ask.slot, tuple(taken)))
        self.asked.clear()


def test_attempts_taken_back_while_the_run_stops_end_cancelled_without_running() -> None:
    sim = _slow_head_run(_LateAnswer)
    assert isinstance(sim, _LateAnswer)
    assert sim.asked, "nothing was asked back: the test no longer tests the race"
    sim.feed(CancelRun("user"))
    sim.answer()
    result = sim.run_to_end(first)
    assert result.status is sv.RunStatus.CANCELLED
    records = dict(result.steps)
    for i in range(8):
        assert records[f"score[{i}]"].terminal, records[f"score[{i}]"]
    assert sim.dispatched_while_stopping == 0


def test_on_threads_a_blocked_instance_waits_for_all_the_others_and_they_all_run() -> None:
    """The real engine: instance 40 of 120 blocks until every other instance has ended.

    Whatever batch it lands in, what is queued behind it must run on the other
    slot, or the run deadlocks (bounded here by the wait's own timeout).
    """
    size, slow = 120, 40
    lock = threading.Lock()
    ended = [0]
    all_others = threading.Event()

    def score(ctx: sv.StepContext) -> dict[str, int]:
        if ctx.index == slow:
            released = all_others.wait(timeout=30)
            return {"scores": int(released)}
        with lock:
            ended[0] += 1
            if ended[0] == size - 1:
                all_others.set()
        return {"scores": 1}

    wf = sv.Workflow(
        "slow-item", [sv.Step("score", score, map_over=list(range(size)), creates=["scores"])]
    )
    result = sv.run(wf, max_parallel=2)
    assert result.ok, result.error
    assert result.artifacts["scores"] == [1] * size  # the slow one saw every other one end
