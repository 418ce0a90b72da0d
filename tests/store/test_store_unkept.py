"""A run given no store keeps its records in its own state only (store/_unkept.py)."""

from __future__ import annotations

import pytest

import stepvisor as sv
from stepvisor.errors import RunNotFoundError
from stepvisor.store._unkept import Unkept


def _make(ctx: sv.StepContext) -> dict[str, int]:
    return {"rows": 3}


def _use(ctx: sv.StepContext) -> None:
    assert ctx.inputs["rows"] == 3


WF = sv.Workflow(
    "kept-nowhere",
    [sv.Step("make", _make, creates=["rows"]), sv.Step("use", _use, requires=["rows"])],
)


@pytest.mark.parametrize("store", [None, ":memory:"])
def test_a_run_given_no_store_still_returns_every_record(store: str | None) -> None:
    result = sv.run(WF, store=store)
    assert result.status is sv.RunStatus.SUCCEEDED
    assert {sid: r.status for sid, r in result.steps.items()} == {
        "make": sv.StepStatus.SUCCEEDED,
        "use": sv.StepStatus.SUCCEEDED,
    }
    assert dict(result.artifacts) == {"rows": 3}
    assert result.steps["make"].attempts[0].outcome == "succeeded"


def test_its_shell_writes_no_step_transition(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("a store that keeps nothing was written to")

    monkeypatch.setattr(Unkept, "save_step", refuse)
    monkeypatch.setattr(Unkept, "save_step_batch", refuse)
    assert sv.run(WF).status is sv.RunStatus.SUCCEEDED


def test_asking_it_for_a_run_says_why_there_is_none() -> None:
    store = Unkept()
    assert not store.exists("r1")
    assert store.list_runs() == []
    assert not store.cancel_requested("r1")
    with pytest.raises(RunNotFoundError, match="given no store"):
        store.load("r1")
    with pytest.raises(RunNotFoundError, match="RunHandle"):
        store.request_cancel("r1")
