"""Output validation: one rule for what a step may return, on every backend and store.

A step returns a mapping of artifact names (non-empty strings) to values, or
``None``.  Anything else fails the step with the same error type whichever
backend ran it and whichever store keeps the run; the reference is the thread
backend with the memory store.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import stepvisor as sv
from tests.contract import steps
from tests.contract.conftest import Backend, attempts_of

BAD = {
    "non-mapping": steps.return_list,
    "non-string-name": steps.return_int_name,
    "empty-name": steps.return_empty_name,
}


@pytest.mark.parametrize("bad", BAD)
def test_bad_outputs_fail_the_step_with_one_error_type(
    backend: Backend, store: Path | None, bad: str
) -> None:
    wf = sv.Workflow("out", [backend.step("out", BAD[bad])])
    result = backend.run(wf, store=store)
    assert result.status is sv.RunStatus.FAILED
    assert result.steps["out"].status is sv.StepStatus.FAILED
    assert dict(result.artifacts) == {}
    error = result.errors["out"]
    assert isinstance(error, TypeError), f"{type(error).__name__}: {error}"
    assert "'out'" in str(error), "the error must name the step"

    on_thread = sv.Step("out", BAD[bad], executor="thread", params={"dir": "."})
    reference = sv.run(sv.Workflow("out", [on_thread]))
    assert type(error) is type(reference.errors["out"])
    assert attempts_of(result, "out") == attempts_of(reference, "out")


@pytest.mark.parametrize(
    ("fn", "artifacts"),
    [(steps.return_mapping, {"made_by": "out"}), (steps.return_none, {})],
    ids=["mapping", "none"],
)
def test_a_mapping_or_none_succeeds(
    backend: Backend, store: Path | None, fn: steps.SyncStep, artifacts: dict[str, str]
) -> None:
    wf = sv.Workflow("out", [backend.step("out", fn)])
    result = backend.run(wf, store=store)
    assert result.status is sv.RunStatus.SUCCEEDED, result.error
    assert dict(result.artifacts) == artifacts
    if store is not None:
        with sv.SQLiteStore(store) as kept:
            stored = kept.load(result.run_id)
        assert stored.steps["out"].status is sv.StepStatus.SUCCEEDED
        assert dict(stored.outputs.get("out", {})) == artifacts
