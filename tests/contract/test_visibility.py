"""Artifact visibility: a step sees exactly its ancestors' artifacts, merged in canonical order.

The DAG::

    early            (unrelated; first in canonical order, finished before sink starts)
    top -> left  \\
        -> right  -> sink

Every step creates ``x``.  ``left`` waits until ``right`` and ``early`` have
finished (the test's event hook writes ``<step>.finished`` when the engine
reports a step finished), so ``right`` finishes before ``left`` although it
comes after it in canonical order (``early, top, left, right, sink``): the
``x`` that ``sink`` sees must be ``right``'s, whatever the completion order,
and nothing of ``early``'s.
"""

from __future__ import annotations

from typing import Any

import stepvisor as sv
from tests.contract import steps
from tests.contract.conftest import Backend


def created_by(*step_ids: str) -> list[str]:
    """The artifact names the ``emit`` steps ``step_ids`` create, sorted."""
    names = {"x"}
    for sid in step_ids:
        names |= {sid, f"saw_{sid}", f"x_at_{sid}"}
    return sorted(names)


def test_a_step_sees_exactly_its_ancestors_and_the_later_creator_wins(backend: Backend) -> None:
    def made(name: str, **more: Any) -> dict[str, Any]:
        return {"params": {"out": {name: True, "x": name}, **more}}

    wf = sv.Workflow(
        "visible",
        [
            backend.step("early", steps.emit, **made("early")),
            backend.step("top", steps.emit, **made("top")),
            backend.step(
                "left",
                steps.emit,
                needs=["top"],
                **made("left", wait_for=["right.finished", "early.finished"]),
            ),
            backend.step("right", steps.emit, needs=["top"], **made("right")),
            backend.step("sink", steps.emit, needs=["left", "right"], **made("sink")),
        ],
        settings=sv.Settings(max_parallel=3),
    )

    def hook(event: sv.Event) -> None:
        if isinstance(event, sv.StepFinished):
            (backend.signals / f"{event.step_id}.finished").touch()

    result = backend.run(wf, on_event=hook)
    assert result.status is sv.RunStatus.SUCCEEDED, result.error
    art = result.artifacts
    assert art["saw_early"] == art["saw_top"] == []
    assert art["saw_left"] == art["saw_right"] == created_by("top")
    assert art["x_at_left"] == art["x_at_right"] == "top"
    assert art["saw_sink"] == created_by("top", "left", "right"), "sink saw a non-ancestor's"
    assert art["x_at_sink"] == "right", "the later creator in canonical order must win"
    assert art["x"] == "sink"
    assert result.commits == ("early", "top", "left", "right", "sink")
