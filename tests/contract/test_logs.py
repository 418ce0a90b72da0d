"""Output capture: each attempt's stdout, stderr and logging records, kept per attempt.

What a backend cannot see is a row below, and the test asserts what it does
instead:

* ``FD_CAPTURED``: writes to file descriptors 1 and 2 (C extensions,
  subprocesses).  A process child's fds are a pipe to the engine; a thread or
  async step shares the engine's own fds with every other step, so its fd
  writes go where the program's go, uncaptured; a Ray task's fds belong to its
  worker, which Ray redirects itself: the task keeps what it sees (its
  ``sys.stdout``, ``sys.stderr`` and records).
* ``STACK_AT_DEADLINE``: a Ray task stopped at its deadline is force-cancelled
  (its worker killed), so neither a stack nor its output comes back.
* A Ray task that crashes its worker keeps nothing: what it wrote comes back
  with its reply, which dies with it.
* ``RECORDS_AGAIN``: a process child's records are emitted again in the engine
  through the program's logging (a thread or async step's are the program's own
  already); a Ray task's are kept in its log only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

import stepvisor as sv
from stepvisor.store.sqlite import SQLiteStore
from tests.contract import steps
from tests.contract.conftest import NO_WAIT, Backend

FD_CAPTURED = {"thread": False, "async": False, "process": True, "ray": False}
STACK_AT_DEADLINE = {"thread": True, "async": True, "process": True, "ray": False}
RECORDS_AGAIN = {"thread": True, "async": True, "process": True, "ray": False}


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, object, object]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(
            (
                record.getMessage(),
                getattr(record, "stepvisor_step", None),
                getattr(record, "stepvisor_attempt", None),
            )
        )


@pytest.fixture
def records() -> Iterator[_Records]:
    """Records of ``contract.chatter`` as the program's own logging sees them."""
    handler = _Records()
    logger = logging.getLogger("contract.chatter")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def test_each_attempt_keeps_what_it_wrote(backend: Backend, records: _Records) -> None:
    retry = sv.RetryPolicy(max_attempts=2, backoff=NO_WAIT)
    step = backend.step("talk", steps.chatter, retry=retry, params={"fail_first": True})
    result = backend.run(sv.Workflow("logs", [step]))
    assert result.ok, result.error
    first, second = result.logs("talk", 1), result.logs("talk", 2)
    assert result.logs("talk") == second  # the last attempt's when none is named
    for text, attempt in ((first, 1), (second, 2)):
        tag = f"talk {attempt}"
        assert f"out {tag} 0\n" in text
        assert f"err {tag}\n" in text
        assert f"WARNING contract.chatter: record {tag}\n" in text
        assert (f"fd {tag}\n" in text) is FD_CAPTURED[backend.name]
    assert "talk 2" not in first
    assert "talk 1" not in second
    # In order: what it printed before the record comes before it.
    assert second.index("out talk 2 0") < second.index("record talk 2")
    if RECORDS_AGAIN[backend.name]:
        assert ("record talk 1", "talk", 1) in records.seen
        assert ("record talk 2", "talk", 2) in records.seen
    else:
        assert not [seen for seen in records.seen if seen[1] == "talk"]


def test_parallel_steps_never_get_each_others_lines(backend: Backend) -> None:
    names = [f"p{i}" for i in range(4)]
    wf = sv.Workflow(
        "parallel-logs",
        [backend.step(name, steps.chatter, params={"lines": 200}) for name in names],
    )
    result = backend.run(wf, max_parallel=4)
    assert result.ok, result.error
    for name in names:
        text = result.logs(name)
        lines = [line for line in text.splitlines() if line.startswith("out ")]
        assert lines == [f"out {name} 1 {i}" for i in range(200)]
        others = [other for other in names if other != name]
        assert not any(f" {other} " in text for other in others), text


def test_the_store_keeps_each_attempts_log_beside_the_records(
    backend: Backend, tmp_path: Path
) -> None:
    db = tmp_path / "runs.db"
    retry = sv.RetryPolicy(max_attempts=2, backoff=NO_WAIT)
    step = backend.step("talk", steps.chatter, retry=retry, params={"fail_first": True})
    result = backend.run(sv.Workflow("kept-logs", [step]), store=str(db))
    assert result.ok, result.error
    with SQLiteStore(db, create=False) as store:
        listed = [(e.step_id, e.attempt, e.cut) for e in store.list_logs(result.run_id)]
        assert listed == [("talk", 1, 0), ("talk", 2, 0)]
        for attempt in (1, 2):
            assert store.load_log(result.run_id, "talk", attempt) == result.logs("talk", attempt)
        # The records stay as they were: the logs are not inside them.
        assert [a.number for a in store.load(result.run_id).steps["talk"].attempts] == [1, 2]


def test_a_step_stopped_at_its_deadline_keeps_its_output_and_stack(backend: Backend) -> None:
    step = backend.step("stuck", steps.print_then_block, timeout=0.5)
    result = backend.run(sv.Workflow("stack", [step]))
    assert result.steps["stuck"].status is sv.StepStatus.TIMED_OUT
    text = result.logs("stuck")
    error_text = result.steps["stuck"].attempts[-1].error_traceback or ""
    if not STACK_AT_DEADLINE[backend.name]:
        assert text == ""
        assert "Stack at the deadline" not in error_text
        return
    assert text.startswith("before the deadline stuck\n")
    for where in (text, error_text):
        assert "Stack at the deadline (most recent call last):" in where
        # The frame of the step's own function, where it waited.
        assert "print_then_block" in where
        assert "tests/contract/steps.py" in where


def test_a_step_that_crashes_keeps_what_it_wrote_until_then(backend: Backend) -> None:
    step = backend.step("crash", steps.print_then_crash, params={"can_crash": backend.can_crash})
    result = backend.run(sv.Workflow("crash-logs", [step]))
    assert result.steps["crash"].status is sv.StepStatus.FAILED
    if backend.name == "ray":  # its output comes back with its reply, which died with it
        assert result.logs("crash") == ""
    else:
        assert result.logs("crash") == "last words of crash\n"


def test_capture_off_keeps_nothing(backend: Backend) -> None:
    step = backend.step("talk", steps.chatter)
    result = backend.run(sv.Workflow("no-capture", [step]), capture="off")
    assert result.ok, result.error
    assert result.logs("talk") == ""
    assert result.captured == {}


def test_store_mode_keeps_the_output(backend: Backend) -> None:
    step = backend.step("talk", steps.chatter)
    result = backend.run(sv.Workflow("quiet", [step]), capture="store")
    assert result.ok, result.error
    assert "out talk 1 0\n" in result.logs("talk")
