"""What a step, or an instance of a mapped step, must end with if nothing disturbs it (pure).

:func:`expected_outcome` reads a step's fault; the rest extends it to mapped
steps: an instance ends as the step's fault says when its index is one of the
``bad`` ones and succeeds at once otherwise, unless it is chained to an instance
that did not succeed (then it is skipped); a mapped step sums its instances up
(succeeded only if all did).  What stops a run early (fail-fast, a cancel) or
blocks a step (a dependency that did not succeed) is the oracle's business, not
this module's.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from stepvisor.core.records import parse_instance_id
from tests.chaos.scenario import (
    BAD_LIST,
    CRASHES,
    Scenario,
    StepPlan,
    chain_source,
    list_name,
    map_size,
)

_FAILED: Final = ("failed", "timed_out")


def expected_outcome(plan: StepPlan, *, max_worker_crashes: int) -> tuple[str, int]:
    """The status a step must end with, and its number of attempts, if it runs undisturbed."""
    fault, k, m = plan.fault, plan.failing, plan.max_attempts
    if fault in ("ok", "orphan"):
        return "succeeded", 1
    if fault in ("fatal", "unpicklable", "unstorable"):
        return "failed", 1  # never retried
    if fault == "ignore_cancel":
        return "timed_out", 1  # abandoned, never retried
    if fault == "timeout":
        return ("succeeded", k + 1) if k < m else ("timed_out", m)
    if fault in CRASHES:
        cap = min(m, max_worker_crashes)
        return ("succeeded", k + 1) if k < cap else ("failed", cap)
    return ("succeeded", k + 1) if k < m else ("failed", m)  # raise, retryable


def summary_of(statuses: Iterable[str]) -> str:
    """A mapped step's status from its instances' (the documented rule, written anew here)."""
    seen = list(statuses)
    if all(s == "succeeded" for s in seen):
        return "succeeded"
    if any(s in _FAILED for s in seen):
        return "failed"
    return "cancelled" if "cancelled" in seen else "skipped"


def own_instance(scenario: Scenario, plan: StepPlan, index: int) -> tuple[str, int]:
    """How instance ``index`` of the mapped step ``plan`` ends once it runs."""
    if plan.fault != "ok" and index in plan.bad:
        return expected_outcome(plan, max_worker_crashes=scenario.max_worker_crashes)
    return "succeeded", 1


def expected_instance(scenario: Scenario, plan: StepPlan, index: int) -> tuple[str, int]:
    """How instance ``index`` of ``plan`` ends, the chain it is on included (skipped after
    an instance of its source that did not succeed)."""
    source = chain_source(scenario, plan)
    if source is not None and expected_instance(scenario, source, index)[0] != "succeeded":
        return "skipped", 0
    return own_instance(scenario, plan, index)


def bad_list(scenario: Scenario, plan: StepPlan) -> bool:
    """Whether ``plan`` maps over a splitter's value that is no list."""
    if not plan.mapped or plan.over == "list":
        return False
    source = scenario.step(plan.over)
    return not source.mapped and source.emits == BAD_LIST


def expected_status(scenario: Scenario, plan: StepPlan) -> tuple[str, int]:
    """A step's expected status and attempts; a mapped step's summary (and 0 attempts)."""
    if not plan.mapped:
        return expected_outcome(plan, max_worker_crashes=scenario.max_worker_crashes)
    if bad_list(scenario, plan):
        return "failed", 0
    size = map_size(scenario, plan)
    return summary_of(expected_instance(scenario, plan, i)[0] for i in range(size)), 0


def dependencies(scenario: Scenario, plan: StepPlan) -> list[str]:
    """The steps ``plan`` waits for as a whole: its needs, its lists' makers, its map's
    source (unless chained to it instance by instance)."""
    deps = list(plan.needs)
    makers = {list_name(p): p.id for p in scenario.steps if p.mapped or p.emits != -1}
    deps += [makers[name] for name in plan.requires if name in makers]
    if plan.mapped and plan.over != "list" and chain_source(scenario, plan) is None:
        deps.append(plan.over)
    return list(dict.fromkeys(deps))


def mapped_ids(scenario: Scenario) -> frozenset[str]:
    """The ids of the scenario's mapped steps (which never run themselves)."""
    return frozenset(p.id for p in scenario.steps if p.mapped)


def plan_of(scenario: Scenario, uid: str) -> tuple[StepPlan, int] | None:
    """(plan, index) of a step id (index -1) or an instance id; None for an unknown id."""
    ids = {p.id: p for p in scenario.steps}
    if uid in ids:
        return ids[uid], -1
    parsed = parse_instance_id(uid)
    if parsed is None or parsed[0] not in ids or not ids[parsed[0]].mapped:
        return None
    return ids[parsed[0]], parsed[1]
