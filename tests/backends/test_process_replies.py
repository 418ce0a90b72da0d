"""The reply heads a process child reuses, and the parent's memo of them: same bytes, same reply."""

from __future__ import annotations

import os
import pickle
from typing import Any

import pytest

import stepvisor as sv
from stepvisor.backends import _child
from stepvisor.backends._wire import Returned
from stepvisor.backends.process import _worker
from stepvisor.backends.process._worker import Child


def test_a_reply_head_names_what_was_returned_and_what_was_left_running() -> None:
    head = _child._returned(("a", "b"), ())
    assert pickle.loads(head) == Returned(names=("a", "b"))
    assert _child._returned(("a", "b"), ()) is head  # made once
    with_leftovers = _child._returned(("a", "b"), (41, 42))
    assert pickle.loads(with_leftovers) == Returned(names=("a", "b"), leftovers=(41, 42))


def test_the_child_keeps_a_bounded_number_of_reply_heads() -> None:
    for i in range(_child._RETURNED_KEPT + 10):
        assert pickle.loads(_child._returned((f"n{i}",), ())) == Returned(names=(f"n{i}",))
    assert len(_child._RETURNED) <= _child._RETURNED_KEPT


def _parser() -> Child:
    child = Child.__new__(Child)
    child.ready = True
    return child


def test_the_parent_reuses_a_reply_only_for_the_same_bytes_of_names_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An empty memo: it keeps at most _LOADED_KEPT heads, which a whole session fills.
    monkeypatch.setattr(_worker, "_LOADED", {})
    child = _parser()
    plain = pickle.dumps(Returned(names=("x",)))
    first = child._received([plain, b"value"])
    again = child._received([plain, b"other value"])
    assert first is not None
    assert again is not None
    assert first[0] is again[0]
    assert again[1] == [plain, b"other value"]  # the parts are this reply's own
    leftovers = pickle.dumps(Returned(names=("x",), leftovers=(7,)))
    got = child._received([leftovers, b"v"])
    assert got is not None
    assert got[0].leftovers == (7,)
    assert leftovers not in _worker._LOADED  # only a head naming the artifacts alone


def _returns(ctx: sv.StepContext) -> dict[str, Any]:
    return {f"v_{ctx.step_id}": ctx.step_id, "pid_" + ctx.step_id: os.getpid()}


def _returns_other(ctx: sv.StepContext) -> dict[str, Any]:
    return {"other": [ctx.step_id]}


def test_steps_on_one_child_each_get_their_own_values() -> None:
    # Leftovers with values: test_process_backend's test_processes_left_by_a_finished_step...
    steps = [
        sv.Step("a", _returns, executor="process"),
        sv.Step("b", _returns_other, executor="process", needs=["a"]),
        sv.Step("c", _returns, executor="process", needs=["b"]),
    ]
    result = sv.run(sv.Workflow("heads", steps), max_parallel=1, capture="off")
    assert result.ok, result.error
    assert (result.artifacts["v_a"], result.artifacts["v_c"]) == ("a", "c")
    assert result.artifacts["other"] == ["b"]
    assert result.artifacts["pid_a"] == result.artifacts["pid_c"]  # one child ran them
