"""Determinism with mapped steps: the final state and the commits never depend on completion order.

Random DAGs mix plain steps, maps over fixed lists, maps over a list made by
an upstream step, and maps chained to another map, with random lengths
(0 and 1 included) and some instances failing under ``on_failure="continue"``.
The run machine is driven by the thread-free simulator, once finishing
attempts in a fixed order and then in random orders: statuses, notes,
artifacts, the commit sequence and the committed events must be identical.
"""

from __future__ import annotations

import random
import zlib
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stepvisor as sv
from stepvisor.backends.base import AttemptResult, AttemptSpec
from stepvisor.context import StepContext
from stepvisor.core.effects import Dispatch, Effect
from stepvisor.core.messages import AttemptDone
from stepvisor.core.records import parse_instance_id
from tests.machine_sim import WALL0, Sim, first, make_plan, noop


@st.composite
def dags(draw: st.DrawFn) -> list[dict[str, Any]]:
    n = draw(st.integers(min_value=1, max_value=10))
    specs: list[dict[str, Any]] = []
    for i in range(n):
        sid = f"s{i}"
        earlier = [s["id"] for s in specs]
        lists = [s["id"] for s in specs if s["kind"] == "list"]
        maps = [s["id"] for s in specs if s["kind"] in ("fixed", "over", "chain")]
        kinds = (
            ["plain", "list", "fixed"] + (["over"] if lists else []) + (["chain"] if maps else [])
        )
        spec: dict[str, Any] = {
            "id": sid,
            "kind": draw(st.sampled_from(kinds)),
            "needs": draw(st.lists(st.sampled_from(earlier), max_size=2, unique=True))
            if earlier
            else [],
            "length": draw(st.integers(0, 3)),
        }
        if spec["kind"] == "over":
            spec["over"] = draw(st.sampled_from(lists))
        elif spec["kind"] == "chain":
            spec["over"] = draw(st.sampled_from(maps))
        specs.append(spec)
    return specs


def _outputs(spec: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """A pure function of the step, its item and what it saw."""
    seen = sorted((k, repr(v)) for k, v in ctx.inputs.items())
    value = f"{ctx.step_id}:{ctx.item!r}:{zlib.crc32(repr(seen).encode())}"
    if spec["kind"] == "list":
        return {f"v_{spec['id']}": [f"{value}/{k}" for k in range(spec["length"])]}
    return {f"v_{spec['id']}": value}


def build(specs: list[dict[str, Any]]) -> sv.Workflow:
    steps = []
    for spec in specs:
        over: Any = None
        if spec["kind"] == "fixed":
            over = list(range(spec["length"]))
        elif spec["kind"] in ("over", "chain"):
            over = f"v_{spec['over']}"
        needs = [n for n in spec["needs"] if over is None or f"v_{n}" != over]
        steps.append(
            sv.Step(spec["id"], noop, needs=needs, creates=[f"v_{spec['id']}"], map_over=over)
        )
    return sv.Workflow("det", steps, settings=sv.Settings(on_failure="continue"))


def _fails(uid: str) -> bool:
    """About one instance in seven fails (the same ones whatever the order)."""
    return parse_instance_id(uid) is not None and zlib.crc32(uid.encode()) % 7 == 0


class MapSim(Sim):
    """The simulator, with attempts that return :func:`_outputs` of what they were sent."""

    def __init__(self, specs: list[dict[str, Any]]) -> None:
        super().__init__(make_plan(build(specs)))
        self.by_id = {spec["id"]: spec for spec in specs}
        self.specs: dict[tuple[str, int], AttemptSpec] = {}

    def _apply(self, effect: Effect, was_stopping: bool) -> None:
        if isinstance(effect, Dispatch):
            for order in effect.orders:
                self.specs[(order.spec.step_id, order.spec.attempt)] = order.spec
        super()._apply(effect, was_stopping)

    def end(self, slot: str, key: tuple[str, int]) -> list[Effect]:
        assert self.queues[slot][0] == key
        self.queues[slot].popleft()
        spec = self.specs[key]
        if _fails(key[0]):
            result = AttemptResult(kind="error", error=sv.FatalError(f"{key[0]} fails"))
        else:
            ctx = StepContext(
                run_id="r", step_id=spec.step_id, attempt=spec.attempt, max_attempts=1,
                inputs=spec.inputs, params={}, deadline=None,
            )  # fmt: skip
            parsed = parse_instance_id(key[0])
            node = parsed[0] if parsed is not None else key[0]
            result = AttemptResult(kind="ok", outputs=_outputs(self.by_id[node], ctx))
        return self.feed(
            AttemptDone(key[0], key[1], slot, result, WALL0 + self.now, WALL0 + self.now, 0.0001)
        )


def outcome(specs: list[dict[str, Any]], choose: Any) -> Any:
    sim = MapSim(specs)
    sim.start()
    result = sim.run_to_end(choose)
    committed = [
        (e.step_id, e.index, e.status, e.attempts, e.created)
        for effect in sim.effects
        if (e := getattr(effect, "event", None)) is not None and isinstance(e, sv.StepCommitted)
    ]
    return (
        result.status,
        [(sid, r.status, r.note, r.attempt_count) for sid, r in result.steps.items()],
        dict(result.artifacts),
        result.commits,
        committed,
        result.failed_step,
    )


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(specs=dags(), seeds=st.lists(st.integers(0, 2**31), min_size=3, max_size=3))
def test_mapped_results_and_commits_do_not_depend_on_completion_order(
    specs: list[dict[str, Any]], seeds: list[int]
) -> None:
    reference = outcome(specs, first)
    for seed in seeds:
        assert outcome(specs, random.Random(seed).choice) == reference
    # Every instance of every expanded map has exactly one record, in index order.
    steps = [sid for sid, *_ in reference[1]]
    assert len(steps) == len(set(steps))
    for spec in specs:
        instances = [s for s in steps if s.startswith(f"{spec['id']}[")]
        assert instances == [f"{spec['id']}[{i}]" for i in range(len(instances))]
