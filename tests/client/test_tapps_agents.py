"""stepvisor.compat under its real client: tapps-agents' own workflow executors.

Each test runs the same workflow twice, in two fresh project directories:
on the client's own ``ParallelStepExecutor``, and with only the name its
executor modules import swapped for ``stepvisor.compat.ParallelStepExecutor``
(see ``harness.swapped``).  Everything the client leaves must be the same:
the steps it ran and in what order, the statuses, artifacts, errors and
times (naive or aware) of the state in memory, the saved state file, the
timeline, the health report and the files written.

What differs on purpose is named (``DIFFERENCES``, the README's list);
:func:`reconcile` checks that each difference found is exactly one of those,
in the form stated, rewrites it to the original's form, and says which it
found; every test then asserts which differences it expects, so a
difference that appears or disappears fails the test.
"""

from __future__ import annotations

import copy
import difflib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.client import unavailable_reason

pytest.importorskip("tapps_agents", reason=unavailable_reason())

from tests.client.harness import (  # only once the client is known present
    ENGINES,
    PRESETS_DIR,
    Outcome,
    Run,
    Script,
    load_preset,
    normalize,
    run_workflow,
)

MODES = ["headless", "cursor"]  # WorkflowExecutor, CursorWorkflowExecutor
PRESETS = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))

#: The differences on purpose, by name (the README's migration section lists them).
DIFFERENCES = {
    "error-text": (
        "a failed step's record.error is the exception's own message; the original wrote "
        "the client's ErrorEnvelope text ('\\n[ERROR] <message>\\n\\n[NEXT STEPS]...')"
    ),
    "timeout-text": (
        "a timed-out step's record.error says which step ran past which timeout; the "
        "original's envelope had an empty message (str(TimeoutError()) is '')"
    ),
    "completed-error": (
        "a step that succeeded on a retry has record.error None; the original kept the "
        "failed attempt's error on the completed record"
    ),
    "cancel-text": (
        "a cancelled step's record.error names the step and why "
        "('step 'x' was cancelled while it ran: execute_parallel was cancelled'); "
        "the original wrote 'Step execution was cancelled'"
    ),
    "cancel-duration": (
        "a step cancelled while it ran has duration_seconds (the time it ran); "
        "the original left it None"
    ),
}

_ENVELOPE = "\n[ERROR] "


def _pairs(original: Outcome, ours: Outcome) -> list[tuple[Any, Any]]:
    o_ids = [(r.step_id, r.status) for r in original.records]
    s_ids = [(r.step_id, r.status) for r in ours.records]
    assert s_ids == o_ids, "the same records, in the same order, with the same statuses"
    return list(zip(original.records, ours.records, strict=True))


def _classify(o: Any, s: Any) -> str:
    """Which named difference a record pair with different errors is, asserting its form."""
    sid = s.step_id
    if s.status == "failed" and s.error and "timed out" in s.error:
        assert re.fullmatch(
            rf"step '{sid}' timed out: it ran past its [\d.]+ s timeout .*", s.error
        )
        assert o.error.startswith(_ENVELOPE + "\n"), "the original's message was empty"
        return "timeout-text"
    if s.status == "failed":
        assert o.error.startswith(f"{_ENVELOPE}{s.error}\n"), (o.error, s.error)
        return "error-text"
    if s.status == "completed":
        assert s.error is None
        assert o.error.startswith(_ENVELOPE)
        return "completed-error"
    assert s.status == "cancelled"
    assert o.error == "Step execution was cancelled"
    assert s.error == f"step '{sid}' was cancelled while it ran: execute_parallel was cancelled"
    return "cancel-text"


def _each_record_list(data: Any, visit: Callable[[list[dict[str, Any]]], None]) -> None:
    if isinstance(data, dict):
        for value in data.values():
            _each_record_list(value, visit)
    elif isinstance(data, list):
        if data and all(isinstance(d, dict) and {"step_id", "error"} <= d.keys() for d in data):
            visit(data)
        for value in data:
            _each_record_list(value, visit)


def reconcile(original: Outcome, ours: Outcome) -> tuple[dict[str, Any], set[str]]:
    """``ours`` as data with each named difference rewritten to the original's form."""
    found: set[str] = set()
    texts: dict[str, str] = {}
    per_record: dict[tuple[str, int], dict[str, Any]] = {}
    for o, s in _pairs(original, ours):
        fix: dict[str, Any] = {}
        if o.error != s.error:
            kind = _classify(o, s)
            found.add(kind)
            theirs = normalize(o.error)
            fix["error"] = theirs
            if s.error is not None:
                assert texts.setdefault(normalize(s.error), theirs) == theirs
        if s.status == "cancelled" and o.duration_seconds is None and s.duration_seconds:
            found.add("cancel-duration")
            fix["duration_seconds"] = None
            fix["duration_formatted"] = "N/A"
        nth = sum(1 for sid, _ in per_record if sid == s.step_id)
        per_record[s.step_id, nth] = fix
    # Record errors the client copied into its own messages, after a ": "
    # ("Step failed after 3 retries: <error>", the timeline's failed steps).
    text = json.dumps(ours.as_data())
    for mine, theirs in texts.items():
        text = text.replace(json.dumps(": " + mine)[1:-1], json.dumps(": " + theirs)[1:-1])
    data = json.loads(text)

    def visit(records: list[dict[str, Any]]) -> None:
        # A list saved before the last batch is a prefix of the records.
        seen: dict[str, int] = {}
        for record in records:
            nth = seen[record["step_id"]] = seen.get(record["step_id"], -1) + 1
            for key, value in per_record[record["step_id"], nth].items():
                if key in record:
                    record[key] = value

    _each_record_list(data, visit)
    return data, found


def compare(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    make_workflow: Callable[[], Any],
    run: Run,
    plan: dict[str, list[str]] | None = None,
) -> tuple[Outcome, Outcome, set[str]]:
    """Run on both engines; assert the outcomes equal but for the named differences."""
    outcomes = {
        engine: run_workflow(
            engine,
            tmp_path / engine,
            make_workflow(),
            Script(copy.deepcopy(plan or {})),
            run,
            monkeypatch,
        )
        for engine in ENGINES
    }
    original, ours = outcomes["original"], outcomes["stepvisor"]
    data, found = reconcile(original, ours)
    expected = json.loads(json.dumps(original.as_data()))
    if data != expected:
        diff = difflib.unified_diff(
            json.dumps(expected, indent=1, sort_keys=True).splitlines(),
            json.dumps(data, indent=1, sort_keys=True).splitlines(),
            "original",
            "stepvisor (named differences reconciled)",
            lineterm="",
        )
        pytest.fail("the client left different results:\n" + "\n".join(diff))
    return original, ours, found


# -- every preset, every step succeeding ---------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("preset", PRESETS)
def test_every_shipped_preset_runs_the_same_steps_in_the_same_order(
    preset: str, mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original, ours, found = compare(tmp_path, monkeypatch, lambda: load_preset(preset), Run(mode))
    assert found == set()
    assert ours.calls == original.calls
    workflow = load_preset(preset)
    if not workflow.steps:
        # brownfield-analysis uses a 'sequence:' layout this client's parser reads as
        # no steps: nothing runs, on either engine.
        assert ours.calls == []
        return
    assert ours.raised is None
    assert {r.status for r in ours.records} == {"completed"}
    assert all(r.started_at.tzinfo is None for r in ours.records)  # naive local, as before
    if mode == "cursor":
        # The cursor executor checks a step's `requires` (artifact names) against the
        # ids of the steps completed in the same batch, so it skips every step that
        # requires something and then blocks: its own behaviour, on either engine.
        assert ours.calls == [s.id for s in workflow.steps][: len(ours.calls)]
        assert ours.state["status"] == ours.saved["status"] == "failed"
        assert ours.state["error"].startswith("Workflow blocked")
        return
    assert ours.calls == [s.id for s in workflow.steps]  # the next: chain, in order
    assert ours.state["status"] == ours.saved["status"] == "completed"
    assert ours.timeline_md is not None
    assert "| complete | orchestrator | finalize |" in ours.timeline_md


# -- steps that fail, time out, retry, get cancelled ---------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_step_that_always_fails_ends_the_workflow_the_same_way(
    mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original, ours, found = compare(
        tmp_path, monkeypatch, lambda: load_preset("fix"), Run(mode), {"debug": ["fail"] * 10}
    )
    # The headless executor retries a failed step 3 times; the cursor one halts.
    assert (
        ours.calls.count("debug")
        == original.calls.count("debug")
        == (4 if mode == "headless" else 1)
    )
    assert ours.state["status"] == original.state["status"] != "completed"
    assert any(r.status == "failed" for r in ours.records)
    failed = [r for r in ours.records if r.status == "failed"]
    assert failed
    assert all(r.error.startswith("debug: compile error in fixed.py") for r in failed)
    assert found == {"error-text"}


@pytest.mark.parametrize("mode", MODES)
def test_a_step_that_times_out_once_is_retried_by_the_client_and_completes(
    mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _original, ours, found = compare(
        tmp_path, monkeypatch, lambda: load_preset("quality"), Run(mode, timeout=0.3),
        {"initial_review": ["hang"]},
    )  # fmt: skip
    assert ours.calls.count("initial_review") == 2
    first = [r.status for r in ours.records if r.step_id == "initial_review"]
    assert first == ["failed", "completed"]
    if mode == "headless":
        assert ours.state["status"] == "completed"
    assert found == {"timeout-text"}


def _with_executor_retries() -> Any:
    workflow = load_preset("fix")
    debug = next(s for s in workflow.steps if s.id == "debug")
    # 'enabled' sits beside the retry fields, as the client keeps it: it is ignored.
    debug.metadata["retry"] = {
        "enabled": True,
        "max_attempts": 3,
        "initial_backoff_seconds": 0.01,
        "max_backoff_seconds": 0.01,
    }
    return workflow


@pytest.mark.parametrize("mode", MODES)
def test_executor_retries_from_step_metadata_run_inside_one_call(
    mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _original, ours, found = compare(
        tmp_path, monkeypatch, _with_executor_retries, Run(mode),
        {"debug": ["flaky", "flaky"]},
    )  # fmt: skip
    assert ours.calls.count("debug") == 3  # two failures, then success: one batch
    debug = [r for r in ours.records if r.step_id == "debug"]
    assert [r.status for r in debug] == ["completed"]
    assert found == {"completed-error"}


@pytest.mark.parametrize("mode", MODES)
def test_cancelling_the_workflow_while_a_step_runs_ends_its_record_cancelled(
    mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original, ours, found = compare(
        tmp_path, monkeypatch, lambda: load_preset("fix"), Run(mode, cancel_when_hung=True),
        {"debug": ["hang"]},
    )  # fmt: skip
    assert ours.raised == original.raised == "CancelledError"
    assert ours.calls == ["enhance", "debug"]
    assert [(r.step_id, r.status) for r in ours.records] == [
        ("enhance", "completed"),
        ("debug", "cancelled"),
    ]
    assert found == {"cancel-text", "cancel-duration"}


def test_every_named_difference_is_seen_by_some_test() -> None:
    # The tests above assert the exact set each finds; together they cover the list.
    seen = {"error-text", "timeout-text", "completed-error", "cancel-text", "cancel-duration"}
    assert seen == set(DIFFERENCES)
