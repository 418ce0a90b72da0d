"""The invariants of mapped steps, checked after every run that has them.

* ``instances``: no instance is lost or duplicated.  A mapped step that expanded
  (its note reads ``mapped over N items``) has N as its list says, and exactly one
  record for each of ``step[0]`` … ``step[N-1]``, each in a terminal status, and
  none beyond; one that never expanded has none.  A run's result lists each
  step then its instances in index order, each id once.
* ``map-summary``: a mapped step's status is the summary of its instances'
  (succeeded if and only if all of them did), and its note counts them.
* ``map-list``: a mapped step that succeeded has, for its list, one value per
  instance, equal to an uninterrupted fault-free run's (each value is a pure
  function of its item: :func:`tests.chaos.steps.instance_value`).

That no succeeded instance runs again after a resume is ``no-rerun``'s, as for
steps: the side-effect log of every instance (``effects/step[i].log``) counts
the attempts it began, across every program.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from stepvisor.core.records import instance_id, parse_instance_id
from tests.chaos.expect import bad_list, summary_of
from tests.chaos.scenario import Scenario, StepPlan, list_name, map_size

if TYPE_CHECKING:
    from tests.chaos.observe import Outcome
    from tests.chaos.oracle import Checker

_TERMINAL: Final = frozenset({"succeeded", "failed", "timed_out", "cancelled", "skipped"})
_NOTE: Final = re.compile(r"mapped over (\d+) items(?:: (.*))?$")


def expanded(record: Any) -> bool:
    """Whether a mapped step's record says it learnt its list (and so has instances)."""
    return record is not None and _NOTE.match(record.note or "") is not None


def instance_records(steps: Mapping[str, Any], sid: str) -> dict[int, Any]:
    """Index -> record of every instance of ``sid`` among ``steps``."""
    found = {}
    for uid, record in steps.items():
        parsed = parse_instance_id(uid)
        if parsed is not None and parsed[0] == sid:
            found[parsed[1]] = record
    return found


def check_maps(checker: Checker, scenario: Scenario, outcome: Outcome) -> None:
    """``instances`` and ``map-summary`` for every mapped step of the run."""
    for plan in scenario.steps:
        node = outcome.steps.get(plan.id)
        if plan.mapped and node is not None:  # a missing step is ``terminal``'s to report
            _check_map(checker, scenario, plan, node, instance_records(outcome.steps, plan.id))
    if outcome.ids:
        _check_listing(checker, scenario, outcome)


def _check_map(
    checker: Checker, scenario: Scenario, plan: StepPlan, node: Any, records: dict[int, Any]
) -> None:
    sid = plan.id
    match = _NOTE.match(node.note or "")
    if match is None:
        checker.check(
            "instances",
            not records,
            lambda: f"{sid} never expanded, yet has instances {sorted(records)}",
        )
        checker.check(
            "instances",
            str(node.status) != "succeeded",
            f"{sid} succeeded without expanding (note {node.note!r})",
        )
        if bad_list(scenario, plan) and str(node.status) == "failed":
            checker.check(
                "instances",
                "not a sequence" in (node.note or ""),
                lambda: f"{sid} mapped over a string, but its note is {node.note!r}",
            )
        return
    size = int(match.group(1))
    want = map_size(scenario, plan)
    checker.check(
        "instances", size == want, lambda: f"{sid} mapped over {size} items; its list has {want}"
    )
    checker.check(
        "instances",
        sorted(records) == list(range(size)),
        lambda: f"{sid} has records for instances {sorted(records)}, not 0..{size - 1}",
    )
    statuses = [str(records[i].status) for i in sorted(records)]
    checker.check(
        "instances",
        all(s in _TERMINAL for s in statuses),
        lambda: f"{sid}: instances left in {sorted(set(statuses) - _TERMINAL)}",
    )
    _check_summary(checker, sid, node, size, statuses)


def _check_summary(checker: Checker, sid: str, node: Any, size: int, statuses: list[str]) -> None:
    status = str(node.status)
    want = summary_of(statuses)
    checker.check(
        "map-summary",
        status == want,
        lambda: f"{sid} ended {status}; its instances ({dict(Counter(statuses))}) sum up to {want}",
    )
    checker.check(
        "map-summary",
        (status == "succeeded") == all(s == "succeeded" for s in statuses),
        lambda: f"{sid} ended {status}, its instances {dict(Counter(statuses))}",
    )
    counts = ", ".join(f"{n} {name}" for name, n in sorted(Counter(statuses).items()))
    note = f"mapped over {size} items" + (f": {counts}" if counts else "")
    checker.check(
        "map-summary",
        node.note == note,
        lambda: f"{sid}'s note is {node.note!r}; its instances say {note!r}",
    )
    checker.check(
        "map-summary", not node.attempts, f"{sid} has attempts of its own: {node.attempts}"
    )


def _check_listing(checker: Checker, scenario: Scenario, outcome: Outcome) -> None:
    """Each id once; a mapped step's instances right after it, in index order."""
    ids = list(outcome.ids)
    twice = sorted(uid for uid, n in Counter(ids).items() if n > 1)
    checker.check("instances", not twice, lambda: f"listed more than once: {twice[:5]}")
    for plan in scenario.steps:
        if plan.mapped and plan.id in ids:
            count = len(instance_records(outcome.steps, plan.id))
            _check_listed_after(checker, ids, plan.id, count)


def _check_listed_after(checker: Checker, ids: list[str], sid: str, count: int) -> None:
    at = ids.index(sid)
    got = ids[at + 1 : at + 1 + count]
    want = [instance_id(sid, i) for i in range(count)]
    checker.check(
        "instances",
        got == want,
        lambda: f"after {sid} the result lists {got[:4]}..., not its instances in order",
    )


def check_map_lists(
    checker: Checker, scenario: Scenario, outcome: Outcome, reference: Mapping[str, Any]
) -> None:
    """``map-list``: a succeeded mapped step's list equals the fault-free run's."""
    for plan in scenario.steps:
        node = outcome.steps.get(plan.id)
        if plan.mapped and node is not None and str(node.status) == "succeeded":
            name = list_name(plan)
            _check_list(
                checker,
                plan.id,
                name,
                outcome.artifacts.get(name),
                reference.get(name),
                map_size(scenario, plan),
            )


def _check_list(checker: Checker, sid: str, name: str, got: Any, want: Any, size: int) -> None:
    checker.check(
        "map-list",
        isinstance(got, list) and len(got) == size,
        lambda: f"{sid}'s list {name} is {got!r:.80}, not a list of {size}",
    )
    checker.check(
        "map-list",
        got == want,
        lambda: (
            f"{sid}'s list {name} differs from the uninterrupted run's: {got!r:.80} != {want!r:.80}"
        ),
    )


def map_ran(scenario: Scenario, outcome: Outcome) -> bool:
    """Whether some mapped step of the run succeeded (its list is then compared)."""
    return any(
        plan.mapped and str(getattr(outcome.steps.get(plan.id), "status", "")) == "succeeded"
        for plan in scenario.steps
    )
