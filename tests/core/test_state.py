"""RunState: the pure reducer, across the chunks its per-step vectors are kept in."""

from __future__ import annotations

import gc
import pickle
import random
from typing import Any

import pytest

from stepvisor.core.state import AttemptRecord, RunState, StepRecord, StepStatus

CHUNK = 512  # stepvisor.core._table.LEAF: tests below cross several leaf boundaries
BLOCK = 64  # stepvisor.core._table.BLOCK: leaves per block


def _initial(n: int) -> RunState:
    order = tuple(f"s{i:06d}" for i in range(n))
    return RunState.initial("run", "wf", order, {sid: i for i, sid in enumerate(order)})


def _done(state: RunState, sid: str, status: StepStatus = StepStatus.SUCCEEDED) -> RunState:
    return state.set_step(StepRecord(sid, status))


def test_records_and_outputs_round_trip_across_chunks_and_old_states_are_untouched() -> None:
    n = 3 * CHUNK + 7
    state = _initial(n)
    before = state
    rng = random.Random(5)
    picked = [*rng.sample(range(n), 200), 0, CHUNK - 1, CHUNK, 2 * CHUNK, n - 1]
    for i in picked:
        sid = state.order[i]
        state = _done(state, sid).set_outputs(sid, {f"a{i}": i})
    for i in picked:
        sid = state.order[i]
        assert state.record(sid).status is StepStatus.SUCCEEDED
        assert dict(state.output(sid)) == {f"a{i}": i}
    assert state.count_status(StepStatus.SUCCEEDED) == len(set(picked))
    assert list(state.steps) == list(state.order)
    assert before.count_status(StepStatus.PENDING) == n  # persistence: nothing shared changed
    assert dict(before.output(state.order[0])) == {}


def test_set_steps_updates_several_chunks_at_once() -> None:
    n = 2 * CHUNK + 3
    state = _initial(n)
    ids = [state.order[i] for i in (1, CHUNK + 1, 2 * CHUNK + 2)]
    after = state.set_steps([StepRecord(sid, StepStatus.SKIPPED) for sid in ids])
    assert [after.record(sid).status for sid in ids] == [StepStatus.SKIPPED] * 3
    assert after.count_status(StepStatus.SKIPPED) == 3
    assert state.count_status(StepStatus.SKIPPED) == 0


def test_commits_fold_only_the_contiguous_prefix_and_later_steps_win_artifacts() -> None:
    n = CHUNK + 10
    state = _initial(n)
    order = state.order
    # Finish everything except one step just past the first chunk, in reverse order.
    gap = CHUNK + 2
    for i in reversed(range(n)):
        if i == gap:
            continue
        status = StepStatus.FAILED if i == 3 else StepStatus.SUCCEEDED
        state = _done(state, order[i], status)
        if status is StepStatus.SUCCEEDED:
            state = state.set_outputs(order[i], {"shared": i, f"own{i}": i})
        state, _ = state.commit_ready()
    assert state.committed == gap
    assert state.commits == order[:gap]
    assert state.artifacts["shared"] == gap - 1  # the last committed step wins
    assert "own3" not in state.artifacts  # a failed step contributes nothing
    assert f"own{gap + 1}" not in state.artifacts  # finished but not yet folded
    state = _done(state, order[gap]).set_outputs(order[gap], {"shared": -1})
    state, done = state.commit_ready()
    assert done == list(order[gap:])
    assert state.all_terminal
    assert state.artifacts["shared"] == n - 1
    assert len(state.artifacts) == 1 + (n - 2)  # "shared", then each own but 3's and gap's


def test_a_transition_creates_no_object_that_refers_to_every_step() -> None:
    """The GC traverses every young object in full: none may grow with the run.

    With one vector for the whole run, each transition built an object with
    one reference per step, and a run's cost grew with the square of its size;
    with one tuple of chunks, one with a reference per 512 steps (at a million
    steps, 2,000 references copied per transition and visited per GC pass).
    """
    n = 100_000
    before = _initial(n)
    state = _done(before, "s050000").set_outputs("s050000", {"a": 1})
    old = {id(obj) for obj in _containers(before)}
    new_objects = [obj for obj in _containers(state) if id(obj) not in old]
    assert 0 < len(new_objects) <= 2 * 3  # records and outputs: a path of three each
    largest = max(len(gc.get_referents(obj)) for obj in new_objects)
    assert largest <= CHUNK, largest
    paths = [obj for obj in new_objects if isinstance(obj, tuple)]
    assert max(len(obj) for obj in paths) <= BLOCK  # not n // CHUNK (195 here)
    assert sum(len(block) for block in state.records) == -(-n // CHUNK)


def _containers(state: RunState) -> list[object]:
    """The objects that hold a state's per-step values: tables, blocks, leaves."""
    out: list[object] = []
    for table in (state.records, state.outputs):
        out.append(table)
        for block in table:
            out.append(block)
            out.extend(block)
    return out


def test_empty_outputs_keep_no_map_and_read_back_empty() -> None:
    state = _initial(3)
    after = _done(state, "s000001")
    assert after.set_outputs("s000001", {}) is after  # nothing to record: no transition
    assert dict(after.output("s000001")) == {}
    made = after.set_outputs("s000001", {"x": 1})
    assert dict(made.output("s000001")) == {"x": 1}
    assert dict(made.set_outputs("s000001", {}).output("s000001")) == {}


def _finished(sid: str, attempts: int = 1, **last: Any) -> StepRecord:
    tries = tuple(
        AttemptRecord(
            i + 1, 100.0 + i, 100.5 + i, 0.5, "failed", "OSError", "down", "tb", 0.25, "t-1", None
        )
        for i in range(attempts - 1)
    )
    final = AttemptRecord(attempts, 200.0, 200.25, 0.25, "succeeded", worker="t-2")
    return StepRecord(sid, StepStatus.SUCCEEDED, (*tries, final._replace(**last)), "n", False)


def test_every_shape_of_record_reads_back_equal_from_every_way_of_setting_it() -> None:
    state = _initial(6)
    records = [
        _finished("s000000"),
        _finished("s000001", attempts=3),
        _finished("s000002", error_traceback="tb", note="late", delay_after=None),
        StepRecord("s000003", StepStatus.SKIPPED, (), "skipped: upstream", False),
        StepRecord("s000004", StepStatus.RUNNING, (AttemptRecord(1, 5.0),)),
        _finished("s000005")._replace(restored=True),
    ]
    one_by_one = state
    for record in records:
        one_by_one = one_by_one.set_step(record)
    by_rank, _ = state.succeed_at(0, records[0], {})
    together = state.set_steps(records)
    for after in (one_by_one, together):
        assert [after.record(r.step_id) for r in records] == records
        assert [after.record_at(i) for i in range(6)] == records
        assert list(after.all_records()) == records
        assert after.steps == {r.step_id: r for r in records}
        assert after.unfinished() == [records[4]]
        assert after.first_with((StepStatus.SKIPPED, StepStatus.RUNNING)) == "s000003"
    assert by_rank.record_at(0) == records[0]
    assert type(one_by_one.record_at(0)) is StepRecord
    assert type(one_by_one.record_at(0).attempts[0]) is AttemptRecord


def test_a_finished_record_with_one_attempt_is_kept_as_one_object_for_the_gc() -> None:
    # A StepRecord, its attempts tuple and its AttemptRecord are three objects
    # the cyclic GC tracks; a big run's heap is mostly these, and every full GC
    # pass visits all of them.  The state keeps a finished one as one.
    n = 2_000
    state = _initial(n)
    gc.collect()
    before = len(gc.get_objects())
    records = [_finished(sid) for sid in state.order]
    kept = state.set_steps(records)
    del records
    gc.collect()
    grown = len(gc.get_objects()) - before
    assert grown < 1.2 * n, grown  # kept as StepRecords, 3 * n
    assert kept.record("s000007") == _finished("s000007")


def test_the_steps_view_is_a_read_only_mapping_in_canonical_order() -> None:
    state = _initial(CHUNK + 2).set_steps([_finished("s000001"), _finished(f"s{CHUNK:06d}")])
    view = state.steps_view()
    plain = state.steps
    assert view == plain
    assert list(view) == list(state.order) == list(view.keys())
    assert list(view.items()) == list(plain.items())
    assert list(view.values()) == list(plain.values())
    assert len(view) == CHUNK + 2
    assert "s000001" in view
    assert "nope" not in view
    assert view.get("nope") is None
    assert view["s000001"] == _finished("s000001")
    with pytest.raises(KeyError):
        view["nope"]
    assert repr(view) == repr(plain)
    copied = pickle.loads(pickle.dumps(view))
    assert type(copied) is dict
    assert copied == plain
    later = state.set_step(StepRecord("s000000", StepStatus.SKIPPED))
    assert view["s000000"].status is StepStatus.PENDING  # a view of the state it came from
    assert later.steps_view()["s000000"].status is StepStatus.SKIPPED


def test_a_table_grown_holds_what_a_table_made_whole_holds() -> None:
    from stepvisor.core._table import table_grow, table_len, table_of  # noqa: PLC0415

    for n in (0, 1, 511, 512, 513, 32767, 32768, 32769):
        for k in (0, 1, 511, 512, 1000, 33000):
            grown = table_grow(table_of(list(range(n))), k)
            assert grown == table_of([*range(n), *([None] * k)]), (n, k)
            assert table_len(grown) == n + k


def test_a_map_table_is_read_only_and_set_gives_a_new_one() -> None:
    from stepvisor.core.records import NO_MAPS, MapVec  # noqa: PLC0415

    table = NO_MAPS.set(5, MapVec("b", 10, 2)).set(1, MapVec("a", 12, 3))
    assert list(table) == [1, 5]
    assert table[5] == MapVec("b", 10, 2)
    assert NO_MAPS == {}
    with pytest.raises(TypeError, match="immutable"):
        table[2] = MapVec("c", 0, 0)
    with pytest.raises(TypeError, match="immutable"):
        table.pop(1)
    assert hash(table) == hash(NO_MAPS.set(1, MapVec("a", 12, 3)).set(5, MapVec("b", 10, 2)))
