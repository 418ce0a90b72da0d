"""Which steps of a workflow may start now: the asyncio executor's readiness rule.

Why this rule: the callers drive their workflows with a loop that asks for
the ready steps, runs them as one ``execute_parallel`` batch, marks them
completed, and asks again.  Their workflows chain steps with ``next:`` and
rely on that chain for order (a final step with no ``requires`` must not
run right after the first one), so the chain is kept.  A step that no
``next:`` names is not left out, as it was before (the workflow then
blocked), but runs as soon as what it requires is available, beside the
others.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import TypeVar

from stepvisor.compat._records import StepLike

StepT = TypeVar("StepT", bound=StepLike)


def names(value: object) -> tuple[str, ...]:
    """Artifact names as a tuple, a bare string counting as one name, duplicates dropped."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, Iterable):
        raise TypeError(f"requires/creates must be a list of artifact names, got {value!r}")
    return tuple(dict.fromkeys(value))


def find_ready_steps(
    workflow_steps: Iterable[StepT],
    completed_step_ids: Collection[str],
    running_step_ids: Collection[str],
    available_artifacts: Collection[str] | None = None,
) -> list[StepT]:
    """The steps, in workflow order, that may start now.

    A step is ready when it is neither completed nor running, every artifact
    it ``requires`` is in ``available_artifacts``, and:

    - if another step's ``next`` names it, one of the steps naming it has
      completed (it waits for its predecessor in the chain);
    - the first step is released by the start of the workflow, even when a
      later step's ``next`` loops back to it;
    - a step that no ``next`` names waits only for what it requires, so
      independent steps are ready together.

    Steps without a ``next`` attribute (plain artifact graphs) are all of
    the last kind.
    """
    steps: Sequence[StepT] = list(workflow_steps)
    artifacts = available_artifacts or ()
    named_by: dict[str, list[str]] = {}
    for step in steps:
        successor = getattr(step, "next", None)
        if successor:
            named_by.setdefault(successor, []).append(step.id)
    first = steps[0].id if steps else None
    ready = []
    for step in steps:
        if step.id in completed_step_ids or step.id in running_step_ids:
            continue
        if not all(name in artifacts for name in names(step.requires)):
            continue
        predecessors = named_by.get(step.id)
        released = (
            predecessors is None
            or step.id == first
            or any(p in completed_step_ids for p in predecessors)
        )
        if released:
            ready.append(step)
    return ready
