"""The machine's side of the cache: lookups instead of dispatches, answers settled in place.

Pure: the test plays the shell, answering each ``LookUpCache`` as a store would,
and reads the effects.  A reused step must cost no slot (no ``AddSlot``), no
dispatch and no attempt; a computed one is queued as any step, and only its
success (after its outputs are saved) asks for ``PutInCache``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import stepvisor as sv
from stepvisor.core.attempt import AttemptResult
from stepvisor.core.effects import AddSlot, Dispatch, Effect, LookUpCache, PutInCache, SaveStep
from stepvisor.core.machine import RunMachine
from stepvisor.core.messages import AttemptDone, CacheAnswer, SlotReady, Start
from stepvisor.core.state import StepStatus
from tests.machine_sim import WALL0, make_plan, noop


def machine(edges: dict[str, list[str]], cached: set[str]) -> RunMachine:
    wf = sv.Workflow("wf", [sv.Step(sid, noop, needs=needs) for sid, needs in edges.items()])
    plan = make_plan(wf, max_parallel=2)
    ranks = frozenset(wf.graph.rank[sid] for sid in cached)
    return RunMachine(dataclasses.replace(plan, cached=ranks))


def feed(m: RunMachine, message: Any) -> list[Effect]:
    return m.handle(message, now=1.0, wall=WALL0 + 1.0)


def of(kind: type, effects: list[Effect]) -> list[Any]:
    return [e for e in effects if isinstance(e, kind)]


def test_a_reused_chain_asks_for_no_slot_and_makes_no_attempt() -> None:
    m = machine({"a": [], "b": ["a"]}, cached={"a", "b"})
    fx = feed(m, Start())
    assert [e.step_id for e in of(LookUpCache, fx)] == ["a"]
    assert not of(AddSlot, fx)  # a step being looked up is not ready work
    fx = feed(m, CacheAnswer("a", {"x": 1}, "old-run", "reused from run old-run"))
    assert [e.step_id for e in of(LookUpCache, fx)] == ["b"]
    assert dict(of(LookUpCache, fx)[0].inputs) == {"x": (0, 1)}
    fx += feed(m, CacheAnswer("b", {"y": 2}, "old-run", "reused from run old-run"))
    assert not of(AddSlot, fx)
    assert not of(Dispatch, fx)
    assert not of(PutInCache, fx)  # a reused result is not stored again
    assert m.finished
    record = m.state.record("b")
    assert (record.status, record.attempts, record.reused_from) == (
        StepStatus.SUCCEEDED, (), "old-run",
    )  # fmt: skip
    assert dict(m.state.artifacts) == {"x": 1, "y": 2}


def test_a_miss_is_queued_noted_and_put_in_the_cache_once_it_succeeded() -> None:
    m = machine({"a": []}, cached={"a"})
    feed(m, Start())
    fx = feed(m, CacheAnswer("a", None, None, "computed: no entry"))
    assert of(AddSlot, fx)  # now it is ready work: it asks for a slot
    assert m.state.record("a").cache_note == "computed: no entry"
    fx = feed(m, SlotReady(of(AddSlot, fx)[0].slot))
    (dispatch,) = of(Dispatch, fx)
    ok = AttemptResult(kind="ok", outputs={"x": 1})
    done = AttemptDone("a", 1, dispatch.slot, ok, WALL0, WALL0 + 0.1, 0.1, "run-1")
    fx = feed(m, done)
    saves = [i for i, e in enumerate(fx) if isinstance(e, SaveStep)]
    puts = [i for i, e in enumerate(fx) if isinstance(e, PutInCache)]
    assert len(puts) == 1
    assert saves[-1] < puts[0]  # the outputs are stored before they enter the cache
    assert of(PutInCache, fx)[0].outputs == {"x": 1}
    assert m.state.record("a").cache_note == "computed: no entry"


def test_a_step_that_cannot_be_keyed_computes_and_is_not_put() -> None:
    m = machine({"a": []}, cached={"a"})
    feed(m, Start())
    fx = feed(m, CacheAnswer("a", None, None, "computed: input f cannot be hashed", False))
    fx = feed(m, SlotReady(of(AddSlot, fx)[0].slot))
    (dispatch,) = of(Dispatch, fx)
    ok = AttemptResult(kind="ok", outputs={})
    fx = feed(m, AttemptDone("a", 1, dispatch.slot, ok, WALL0, WALL0, 0.0, "run-1"))
    assert not of(PutInCache, fx)
    assert m.finished
