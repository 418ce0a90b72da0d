"""The run machine on its own: messages in, effects out, no threads, no real time.

The simulator in ``machine_sim`` plays the shell and the Workers; each test
scripts what attempts do and in which order things happen, then checks the
machine's decisions.  The property test at the end draws random DAGs and
random interleavings of outcomes, timers and cancels.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stepvisor as sv
from stepvisor.backends.base import AttemptResult
from stepvisor.core._outcomes import DISCARDED_AFTER_STOP, NOT_RETRIED_STOPPING
from stepvisor.core.effects import (
    AddSlot,
    BeginRun,
    Dispatch,
    Emit,
    Finish,
    ReleaseSlot,
    RetireSlot,
    SaveOutputs,
    SetTimer,
    StopAttempt,
)
from stepvisor.core.events import StepCommitted
from stepvisor.core.machine import PREFETCH_BATCH, RunMachine
from stepvisor.core.messages import (
    AttemptDone,
    AttemptsDone,
    CancelRun,
    DeadlineReached,
    GraceExpired,
    Message,
    RetryDue,
    SlotReady,
    Start,
)
from stepvisor.core.state import StepStatus
from tests.machine_sim import WALL0, Sim, first, make_plan, noop

RETRY2 = sv.RetryPolicy(max_attempts=2, backoff=sv.Backoff.fixed(0.5, jitter="none"))


def wf_of(
    edges: dict[str, list[str]], *, retry: sv.RetryPolicy | None = None, **kw: Any
) -> sv.Workflow:
    steps = [sv.Step(sid, noop, needs=needs, retry=retry, **kw) for sid, needs in edges.items()]
    return sv.Workflow(id="wf", steps=steps)


def test_start_begins_the_run_adds_slots_and_dispatches_ready_steps_in_id_order() -> None:
    sim = Sim(make_plan(wf_of({"b": [], "a": [], "c": ["a"]}), max_parallel=4))
    sim.start()
    kinds = [type(e) for e in sim.effects]
    assert kinds[0] is BeginRun
    assert kinds.count(AddSlot) == 2  # one per ready step, up to max_parallel
    dispatched = [o.spec.step_id for e in sim.effects if isinstance(e, Dispatch) for o in e.orders]
    assert dispatched == ["a", "b"]  # c waits for a; ties go to the smaller id


def test_a_chain_succeeds_and_each_step_sees_its_ancestors_artifacts() -> None:
    sim = Sim(make_plan(wf_of({"a": [], "b": ["a"], "c": ["b"]})))
    sim.start()
    result = sim.run_to_end(first)
    assert result.status is sv.RunStatus.SUCCEEDED
    assert result.commits == ("a", "b", "c")
    assert dict(result.artifacts) == {"a": 1, "b": 1, "c": 1}
    specs = [o.spec for e in sim.effects if isinstance(e, Dispatch) for o in e.orders]
    assert dict(specs[2].inputs) == {"a": 1, "b": 1}


def test_the_bound_holds_with_more_ready_steps_than_slots() -> None:
    sim = Sim(make_plan(wf_of({f"s{i}": [] for i in range(7)}), max_parallel=2))
    sim.start()
    sim.run_to_end(first)
    assert sim.max_running == 2
    assert sum(isinstance(e, AddSlot) for e in sim.effects) == 2


def test_a_failed_attempt_waits_its_backoff_then_runs_again() -> None:
    sim = Sim(make_plan(wf_of({"a": []}, retry=RETRY2)), {("a", 1): "err"})
    sim.start()
    sim.end_attempt(("a", 1))
    timer = next(e for e in sim.effects if isinstance(e, SetTimer) and e.key[0] == "retry")
    assert (timer.delay, timer.message) == (0.5, RetryDue("a", 1))
    assert sim.machine.state.record("a").status is StepStatus.WAITING_RETRY
    assert sim.machine.running == 0  # the slot is free during the backoff
    result = sim.run_to_end(first)
    assert result.status is sv.RunStatus.SUCCEEDED
    assert [a.outcome for a in result.steps["a"].attempts] == ["failed", "succeeded"]


def test_a_late_outcome_of_an_abandoned_attempt_changes_nothing_but_retires_its_slot() -> None:
    plan = make_plan(
        wf_of({"a": [], "b": []}, timeout=1.0),
        max_parallel=1,
        kill_grace=0.5,
        on_failure="continue",
    )
    sim = Sim(plan, {("a", 1): "ignore"})
    sim.start()
    sim.fire(("deadline", "a", 1))
    assert StopAttempt("a", 1, "timeout") in sim.effects
    sim.fire(("grace", "a", 1))
    assert sim.machine.state.record("a").status is StepStatus.TIMED_OUT
    assert sim.machine.state.record("a").attempts[-1].note == "abandoned"
    assert AddSlot("w2") in sim.effects  # the bound holds with a fresh slot
    before = sim.machine.snapshot()
    late = sim.end_attempt(("a", 1))  # it returns at last, with an artifact
    assert late == [RetireSlot("w1")]
    assert sim.machine.snapshot()[:3] == before[:3]  # state, in-flight, saving
    assert sim.machine.discarded == 1


@pytest.mark.parametrize(
    "message",
    [
        DeadlineReached("a", 1),
        GraceExpired("a", 1),
        RetryDue("a", 1),
        AttemptDone("a", 7, "w1", AttemptResult(kind="ok"), 0, 0, 0),
    ],
)
def test_a_stale_timer_or_outcome_changes_no_state(message: Any) -> None:
    sim = Sim(make_plan(wf_of({"a": [], "b": ["a"]}), max_parallel=1))
    sim.start()
    sim.end_attempt(("a", 1))  # attempt 1 of a is over; b runs
    before = sim.machine.snapshot()
    out = sim.feed(message)
    after = sim.machine.snapshot()
    assert out == [] or isinstance(message, AttemptDone)
    if isinstance(message, AttemptDone):
        assert after[:3] == before[:3]
    else:
        assert after == before


@pytest.mark.parametrize("ask", ["fail_fast", "cancel", "deadline", "run_deadline"])
def test_an_attempt_that_returns_after_it_was_asked_to_stop_ends_as_the_stop_says(
    ask: str,
) -> None:
    settings: dict[str, Any] = {"max_parallel": 2}
    timeout = 1.0 if ask == "deadline" else None
    if ask == "run_deadline":
        settings["deadline"] = 5.0
    wf = sv.Workflow(
        id="wf",
        steps=[
            sv.Step("bad", noop),
            sv.Step("coop", noop, timeout=timeout),
        ],
    )
    sim = Sim(make_plan(wf, **settings), {("bad", 1): "fatal", ("coop", 1): "coop"})
    sim.start()
    if ask == "fail_fast":
        sim.end_attempt(("bad", 1))
    elif ask == "cancel":
        sim.feed(CancelRun("by the test"))
    elif ask == "deadline":
        sim.fire(("deadline", "coop", 1))
    else:
        sim.fire(("run",))
    reason = "timeout" if ask in ("deadline", "run_deadline") else "cancel"
    assert sim.stop_asked[("coop", 1)] == reason
    sim.end_attempt(("coop", 1))  # it returns normally, with an artifact
    record = sim.machine.state.record("coop")
    expected = StepStatus.TIMED_OUT if reason == "timeout" else StepStatus.CANCELLED
    assert record.status is expected
    assert "coop" not in sim.machine.state.output("coop")
    last = record.attempts[-1]
    assert DISCARDED_AFTER_STOP in (last.note or "")
    assert "the result was discarded" in (last.error_message or "")
    result = sim.run_to_end(first)
    assert "coop" not in result.artifacts


def test_no_retry_starts_once_the_run_is_stopping() -> None:
    wf = sv.Workflow(
        id="wf", steps=[sv.Step("bad", noop), sv.Step("slow", noop, retry=RETRY2, timeout=1.0)]
    )
    sim = Sim(make_plan(wf, max_parallel=2), {("bad", 1): "fatal", ("slow", 1): "hang"})
    sim.start()
    sim.fire(("deadline", "slow", 1))  # slow is asked to stop: its own timeout
    sim.end_attempt(("bad", 1))  # then bad fails: fail fast, the run stops
    assert sim.machine.stopping
    sim.end_attempt(("slow", 1))  # slow ends timed out, which its policy would retry
    record = sim.machine.state.record("slow")
    assert record.status is StepStatus.TIMED_OUT
    last = record.attempts[-1]
    assert (last.note or "").startswith(NOT_RETRIED_STOPPING)
    assert not any(isinstance(e, SetTimer) and e.key[0] == "retry" for e in sim.effects)
    result = sim.run_to_end(first)
    assert result.status is sv.RunStatus.FAILED
    assert sim.dispatched_while_stopping == 0


def test_a_store_that_refuses_outputs_fails_the_step_and_publishes_nothing() -> None:
    wf = wf_of({"a": [], "b": ["a"]})
    sim = Sim(make_plan(wf, store_may_refuse=True, on_failure="continue"), refuse=frozenset("a"))
    sim.start()
    result = sim.run_to_end(first)
    assert any(isinstance(w, SaveOutputs) for w in sim.writes)
    assert result.steps["a"].status is StepStatus.FAILED
    assert result.steps["a"].attempts[-1].error_type == "stepvisor.errors.ArtifactCodecError"
    assert result.steps["b"].status is StepStatus.SKIPPED
    assert "a" not in result.artifacts


def test_a_crash_is_retried_until_the_poison_limit() -> None:
    retry = sv.RetryPolicy(max_attempts=5, backoff=sv.Backoff.none())
    sim = Sim(
        make_plan(wf_of({"a": []}, retry=retry), max_worker_crashes=2),
        {("a", 1): "crash", ("a", 2): "crash"},
    )
    sim.start()
    result = sim.run_to_end(first)
    assert result.steps["a"].attempt_count == 2
    assert "poisonous" in (result.steps["a"].attempts[-1].note or "")


def test_events_follow_the_decisions_in_order() -> None:
    sim = Sim(make_plan(wf_of({"a": [], "b": ["a"]})))
    sim.start()
    sim.run_to_end(first)
    names = [type(e.event).__name__ for e in sim.effects if isinstance(e, Emit)]
    assert names[0] == "RunStarted"
    assert names[-1] == "RunFinished"
    assert names.index("StepCommitted") > names.index("StepFinished")
    finish = [e for e in sim.effects if isinstance(e, Finish)]
    assert len(finish) == 1
    assert finish[0].result.ended == WALL0 + sim.now


# -- the property: random DAGs, random interleavings ------------------------------------

BEHAVIOURS = ["ok", "ok", "ok", "err", "fatal", "crash", "hang", "coop", "ignore"]


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[sv.Workflow, dict[tuple[str, int], str], int, str]:
    n = draw(st.integers(1, 9))
    ids = [f"s{i}" for i in range(n)]
    edges = {
        sid: sorted(draw(st.sets(st.sampled_from(ids[:i]), max_size=3))) if i else []
        for i, sid in enumerate(ids)
    }
    retry = sv.RetryPolicy(max_attempts=draw(st.integers(1, 3)), backoff=sv.Backoff.none())
    steps = [
        sv.Step(sid, noop, needs=deps, timeout=2.0, retry=retry) for sid, deps in edges.items()
    ]
    script = {(sid, a): draw(st.sampled_from(BEHAVIOURS)) for sid in ids for a in (1, 2, 3)}
    wf = sv.Workflow(id="prop", steps=steps)
    return wf, script, draw(st.integers(1, 4)), draw(st.sampled_from(["fail_fast", "continue"]))


def chooser(data: st.DataObject) -> Any:
    def choose(options: list[tuple[str, Any]]) -> tuple[str, Any]:
        return options[data.draw(st.integers(0, len(options) - 1))]

    return choose


def _run(
    wf: sv.Workflow,
    script: dict[tuple[str, int], str],
    bound: int,
    on_failure: str,
    data: st.DataObject,
    *,
    cancel_at: int | None = None,
    lend: bool = False,
) -> Sim:
    plan = make_plan(wf, max_parallel=bound, on_failure=on_failure, kill_grace=0.5, lend_slots=lend)
    sim = Sim(plan, script)
    sim.start()
    choose = chooser(data)
    for i in range(5_000):
        if cancel_at is not None and i == cancel_at:
            sim.feed(CancelRun("drawn"))
        if sim.result is not None and not sim.endable():
            break
        stale: list[Message] = list(sim.cancelled_timers)
        race: bool = data.draw(st.booleans()) if stale else False
        if race:
            # A timer that was cancelled may still fire (it raced its cancel).
            before = sim.machine.snapshot()
            assert sim.feed(stale[data.draw(st.integers(0, len(stale) - 1))]) == []
            assert sim.machine.snapshot() == before
        if not sim.step_once(choose):
            break
        # At most ``bound`` attempts run (one per slot); tiny attempts may be
        # queued behind them (prefetch), and those count against the scheduler.
        assert sim.busy_slots() <= bound
        assert sim.machine.running <= bound * PREFETCH_BATCH
    assert sim.result is not None
    return sim


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario=scenarios(), data=st.data(), cancel=st.booleans())
def test_property_every_interleaving_keeps_the_invariants(
    scenario: tuple[sv.Workflow, dict[tuple[str, int], str], int, str],
    data: st.DataObject,
    cancel: bool,
) -> None:
    wf, script, bound, on_failure = scenario
    cancel_at = data.draw(st.integers(0, 30)) if cancel else None
    lend: bool = data.draw(st.booleans())
    sim = _run(wf, script, bound, on_failure, data, cancel_at=cancel_at, lend=lend)
    result = sim.result
    assert result is not None
    for sid, record in result.steps.items():
        assert record.terminal, f"{sid} ended {record.status}"
        if record.status is StepStatus.SUCCEEDED:
            assert result.artifacts[sid] == record.attempt_count
        else:
            assert sid not in result.artifacts
    assert sim.max_running <= bound
    assert sim.dispatched_while_stopping == 0
    retries_after_stop = [
        e
        for i, e in enumerate(sim.effects)
        if isinstance(e, SetTimer) and e.key[0] == "retry" and i > _stop_index(sim)
    ]
    assert retries_after_stop == []
    assert result.commits == tuple(wf.graph.order)


def _stop_index(sim: Sim) -> int:
    for i, e in enumerate(sim.effects):
        if isinstance(e, StopAttempt) and e.reason == "cancel":
            return i
    return len(sim.effects)


DETERMINISTIC = ["ok", "ok", "ok", "err", "fatal", "crash"]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 9),
    edges_seed=st.data(),
    first_order=st.data(),
    second_order=st.data(),
)
def test_property_completion_order_does_not_change_commits_or_result(
    n: int, edges_seed: st.DataObject, first_order: st.DataObject, second_order: st.DataObject
) -> None:
    ids = [f"s{i}" for i in range(n)]
    draw = edges_seed.draw
    edges = {
        sid: sorted(draw(st.sets(st.sampled_from(ids[:i]), max_size=3))) if i else []
        for i, sid in enumerate(ids)
    }
    retry = sv.RetryPolicy(max_attempts=draw(st.integers(1, 3)), backoff=sv.Backoff.none())
    steps = [sv.Step(sid, noop, needs=deps, retry=retry) for sid, deps in edges.items()]
    script = {(sid, a): draw(st.sampled_from(DETERMINISTIC)) for sid in ids for a in (1, 2, 3)}
    wf = sv.Workflow(id="order", steps=steps)
    bound = draw(st.integers(1, 4))
    one = _run(wf, script, bound, "continue", first_order)
    two = _run(wf, script, bound, "continue", second_order)
    assert one.result is not None
    assert two.result is not None
    assert one.result.commits == two.result.commits
    assert one.result.statuses() == two.result.statuses()
    assert one.result.attempts() == two.result.attempts()
    assert dict(one.result.artifacts) == dict(two.result.artifacts)
    assert _commit_events(one) == _commit_events(two)


def _commit_events(sim: Sim) -> list[str]:
    """The ``StepCommitted`` events of a run, in the order they were emitted."""
    return [
        e.event.step_id
        for e in sim.effects
        if isinstance(e, Emit) and isinstance(e.event, StepCommitted)
    ]


def test_a_backoff_that_ends_after_the_stop_began_starts_nothing() -> None:
    steps = [sv.Step("bad", noop), sv.Step("flaky", noop, retry=RETRY2), sv.Step("slow", noop)]
    script = {("bad", 1): "fatal", ("flaky", 1): "err", ("slow", 1): "hang"}
    sim = Sim(make_plan(sv.Workflow(id="wf", steps=steps), max_parallel=3), script)
    sim.start()
    sim.end_attempt(("flaky", 1))  # flaky waits out its backoff
    assert sim.machine.state.record("flaky").status is StepStatus.WAITING_RETRY
    sim.end_attempt(("bad", 1))  # fail fast: the stop cancels the backoff timer
    assert not sim.machine.finished  # slow is still stopping
    assert ("retry", "flaky", 1) not in sim.timers
    before = sim.machine.snapshot()
    assert sim.feed(RetryDue("flaky", 1)) == []  # the timer raced its cancel
    assert sim.machine.snapshot() == before
    assert sim.dispatched_while_stopping == 0


def test_a_run_asks_for_slots_as_work_becomes_ready_and_lends_idle_ones_back() -> None:
    wf = wf_of({"a": [], "b": ["a"], "c": ["a"], "d": ["a"], "e": ["b", "c", "d"]})
    sim = Sim(make_plan(wf, max_parallel=4, lend_slots=True))
    sim.start()
    assert sum(isinstance(e, AddSlot) for e in sim.effects) == 1  # only a is ready
    sim.end_attempt(("a", 1))  # b, c and d become ready: two more slots
    assert sum(isinstance(e, AddSlot) for e in sim.effects) == 3
    sim.end_attempt(("b", 1))  # nothing new is ready: b's slot is lent back
    assert sum(isinstance(e, ReleaseSlot) for e in sim.effects) == 1
    result = sim.run_to_end(first)
    assert result.status is sv.RunStatus.SUCCEEDED
    assert sim.max_running == 3


def test_a_run_that_does_not_lend_keeps_its_slots() -> None:
    wf = wf_of({"a": [], "b": [], "c": ["a", "b"]})
    sim = Sim(make_plan(wf, max_parallel=4))
    sim.start()
    sim.run_to_end(first)
    assert not any(isinstance(e, ReleaseSlot) for e in sim.effects)


def _drive_in_rounds(*, batched: bool, fatal: str | None) -> Any:
    """Run a fan of 12 steps, ending every attempt in flight at once each round.

    The outcomes of a round are fed one by one, or in one ``AttemptsDone``
    (as a Worker reports a prefetched batch), in the same order.
    """
    wf = wf_of({f"s{i:02d}": [] for i in range(12)})
    machine = RunMachine(make_plan(wf, max_parallel=3, on_failure="fail_fast"))
    pending = list(machine.handle(Start(), now=0.0, wall=WALL0))
    finished: Any = None
    inflight: list[tuple[str, Any]] = []
    now = 0.0
    while finished is None:
        while pending:
            effect = pending.pop(0)
            if isinstance(effect, AddSlot):
                pending += machine.handle(SlotReady(effect.slot), now=now, wall=WALL0 + now)
            elif isinstance(effect, Dispatch):
                inflight += [(effect.slot, order.spec) for order in effect.orders]
            elif isinstance(effect, Finish):
                finished = effect.result
        if finished is not None:
            break
        assert inflight, "the run stalled"
        now += 1.0
        outcomes = []
        for slot, spec in inflight:
            result = (
                AttemptResult(kind="error", error=sv.FatalError("no"))
                if spec.step_id == fatal
                else AttemptResult(kind="ok", outputs={spec.step_id: spec.attempt})
            )
            outcomes.append(
                AttemptDone(spec.step_id, spec.attempt, slot, result, WALL0, WALL0 + now, 0.001)
            )
        inflight = []
        if batched:
            pending += machine.handle(AttemptsDone(tuple(outcomes)), now=now, wall=WALL0 + now)
        else:
            for done in outcomes:
                pending += machine.handle(done, now=now, wall=WALL0 + now)
    return finished


@pytest.mark.parametrize("fatal", [None, "s04"])
def test_outcomes_reported_together_settle_as_if_they_came_one_by_one(fatal: str | None) -> None:
    one_by_one = _drive_in_rounds(batched=False, fatal=fatal)
    together = _drive_in_rounds(batched=True, fatal=fatal)
    assert together.status is one_by_one.status
    assert together.commits == one_by_one.commits
    assert dict(together.artifacts) == dict(one_by_one.artifacts)
    statuses = {sid: (r.status, r.attempt_count) for sid, r in together.steps.items()}
    assert statuses == {sid: (r.status, r.attempt_count) for sid, r in one_by_one.steps.items()}
    if fatal is None:
        assert together.status is sv.RunStatus.SUCCEEDED
        assert len(together.artifacts) == 12
    else:
        assert together.steps[fatal].status is StepStatus.FAILED
        assert together.status is sv.RunStatus.FAILED


def _fail_one_step_late(
    sid: str, retry: sv.RetryPolicy, error: BaseException, *, late: float
) -> tuple[RunMachine, SetTimer, float]:
    """Run the one-step workflow ``sid`` to its first dispatch at ``now`` = 10 and fail that
    attempt as if it ended ``late`` seconds before the machine takes the failure in; the
    machine, the retry's timer, and ``now``."""
    machine = RunMachine(make_plan(wf_of({sid: []}, retry=retry)))
    now, wall = 10.0, WALL0 + 10.0
    pending = list(machine.handle(Start(), now=now, wall=wall))
    dispatch = None
    while pending:
        effect = pending.pop(0)
        if isinstance(effect, AddSlot):
            pending += machine.handle(SlotReady(effect.slot), now=now, wall=wall)
        elif isinstance(effect, Dispatch):
            dispatch = effect
    assert dispatch is not None
    failed = AttemptResult(kind="error", error=error)
    done = AttemptDone(sid, 1, dispatch.slot, failed, wall - 1.0, wall - late, 0.5)
    effects = machine.handle(done, now=now, wall=wall)
    (timer,) = [e for e in effects if isinstance(e, SetTimer) and e.key[0] == "retry"]
    return machine, timer, now


@pytest.mark.parametrize(
    ("ended_before", "expected"),
    [(0.0, 0.5), (0.2, 0.3), (2.0, 0.0), (-1.0, 0.5)],  # -1: a Worker clock ahead of ours
)
def test_a_backoff_counts_from_when_the_attempt_ended(ended_before: float, expected: float) -> None:
    machine, timer, now = _fail_one_step_late("a", RETRY2, RuntimeError("down"), late=ended_before)
    assert timer.delay == pytest.approx(expected)
    assert timer.due == pytest.approx(now + expected)
    record = machine.state.record("a")
    assert record.attempts[0].delay_after == pytest.approx(0.5)  # the backoff chosen, as recorded


def test_a_jittered_backoff_is_waited_from_when_its_failure_is_taken_in() -> None:
    # A failure the shell takes in 0.15 s after it ended, with full jitter over
    # [0, 0.2]: the timer waits the whole draw from now, and the delay recorded
    # (from the attempt's end) is the lag plus the draw.
    policy = sv.RetryPolicy(max_attempts=2, backoff=sv.Backoff.exponential(initial=0.2, cap=0.2))
    late = 0.15
    for sid in ("a", "b", "c", "d", "e", "f"):
        machine, timer, _ = _fail_one_step_late(sid, policy, ConnectionError("down"), late=late)
        drawn = policy.delays(1, seed=machine.plan.seed, step_id=sid)[0]
        chosen = machine.state.record(sid).attempts[0].delay_after
        assert chosen == pytest.approx(late + drawn, abs=1e-6)  # wall-clock floats
        assert timer.delay == pytest.approx(drawn, abs=1e-6)
