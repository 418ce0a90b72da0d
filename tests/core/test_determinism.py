"""Determinism: the result and the commit sequence never depend on completion order.

Random DAGs (up to 40 steps, random ``needs``, artifact names that collide,
some steps failing under ``on_failure="continue"``) run several times with
completion orders shuffled by small random delays, and once on a single
worker; every run must give the same statuses, notes, artifacts, attempt counts and
sequence of commits.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stepvisor as sv

NAMES = ("a", "b", "c", "d", "e")


@st.composite
def dags(draw: st.DrawFn) -> list[dict[str, Any]]:
    n = draw(st.integers(min_value=1, max_value=40))
    specs = []
    for i in range(n):
        earlier = [f"s{j:02d}" for j in range(i)]
        needs = draw(st.lists(st.sampled_from(earlier), max_size=3, unique=True)) if earlier else []
        creates = draw(st.lists(st.sampled_from(NAMES), max_size=2, unique=True))
        fails = draw(st.booleans()) and draw(st.integers(0, 9)) == 0
        specs.append({"id": f"s{i:02d}", "needs": needs, "creates": creates, "fails": fails})
    draw(st.randoms()).shuffle(specs)  # declaration order must not matter either
    return specs


def build(specs: list[dict[str, Any]], delay_seed: int | None) -> sv.Workflow:
    rng = random.Random(delay_seed)
    delays = {s["id"]: rng.uniform(0, 0.002) for s in specs}

    def make(spec: dict[str, Any]) -> Any:
        def fn(ctx: sv.StepContext) -> dict[str, Any]:
            if delay_seed is not None:
                time.sleep(delays[ctx.step_id])  # perturbs completion order; not a sync
            if spec["fails"]:
                raise RuntimeError(f"{ctx.step_id} fails")
            out: dict[str, Any] = {name: f"{ctx.step_id}:{name}" for name in spec["creates"]}
            out[f"seen_{ctx.step_id}"] = sorted(ctx.inputs.items())
            return out

        return fn

    steps = [
        sv.Step(s["id"], make(s), needs=s["needs"], creates=[*s["creates"], f"seen_{s['id']}"])
        for s in specs
    ]
    return sv.Workflow("det", steps=steps, settings=sv.Settings(on_failure="continue"))


def fingerprint(specs: list[dict[str, Any]], delay_seed: int | None, max_parallel: int) -> Any:
    events: list[sv.Event] = []
    result = sv.run(build(specs, delay_seed), max_parallel=max_parallel, on_event=events.append)
    commits = [
        (e.step_id, e.index, e.status, e.attempts, e.created)
        for e in events
        if isinstance(e, sv.StepCommitted)
    ]
    return (
        result.status,
        result.statuses(),
        {sid: record.note for sid, record in result.steps.items()},
        result.attempts(),
        dict(result.artifacts),
        result.commits,
        commits,
    )


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(specs=dags(), seeds=st.lists(st.integers(0, 2**31), min_size=2, max_size=2))
def test_result_and_commits_do_not_depend_on_completion_order(
    specs: list[dict[str, Any]], seeds: list[int], chdir_tmp: Path
) -> None:
    reference = fingerprint(specs, None, 1)
    for seed in seeds:
        assert fingerprint(specs, seed, 8) == reference
    # The commit sequence is the canonical order itself.
    assert list(reference[5]) == list(build(specs, None).step_ids)
