"""The RunStore contract, checked against every store.

Whatever store holds a run, the Supervisor and ``stepvisor status`` must read
back exactly what was written: these tests run unchanged on MemoryStore and on
SQLiteStore.  Values are plain JSON data, which every store holds as it is.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from stepvisor.clock import FakeClock
from stepvisor.core.state import AttemptRecord, RunStatus, StepRecord, StepStatus
from stepvisor.errors import ArtifactCodecError, RunNotFoundError
from stepvisor.store.base import RunInfo, RunStore, save_step_batch
from stepvisor.store.memory import MemoryStore
from stepvisor.store.sqlite import SQLiteStore

#: Wall time of every record in these tests: what the SQLite store's clock reads,
#: so that a ``running`` run is fresh, never judged interrupted.
T0 = 1_700_000_000.0


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunStore]:
    made: RunStore
    if request.param == "memory":
        made = MemoryStore()
    else:
        made = SQLiteStore(tmp_path / "runs.db", clock=FakeClock(wall_start=T0))
    yield made
    made.close()


def run_info(run_id: str = "run-1", **changes: object) -> RunInfo:
    fields: dict[str, object] = {
        "run_id": run_id,
        "workflow_id": "etl",
        "fingerprint": "sha256:abc",
        "settings": {"max_parallel": 4, "on_failure": "fail_fast", "timeout": 2.5, "x": None},
        "seed": 12345,
        "status": RunStatus.RUNNING,
        "started": T0,
        "heartbeat": T0,
        "source": "flows/etl.yaml",
    }
    fields.update(changes)
    return RunInfo(**fields)  # type: ignore[arg-type]


def full_attempt(number: int, *, outcome: str | None = "failed") -> AttemptRecord:
    """An attempt with every field set, so a lost column shows."""
    return AttemptRecord(
        number=number,
        started=T0 + number,
        ended=T0 + number + 0.5,
        duration=0.4999,
        outcome=outcome,
        error_type="builtins.ValueError",
        error_message=f"bad row {number} — ünïcode",
        error_traceback='Traceback (most recent call last):\n  File "x.py"\nValueError',
        delay_after=1.25,
        worker="thread-3",
        note="retried",
    )


def running(step_id: str, number: int = 1) -> StepRecord:
    return StepRecord(step_id).with_attempt_started(AttemptRecord(number, T0 + number))


def succeeded(step_id: str) -> StepRecord:
    return StepRecord(
        step_id,
        StepStatus.SUCCEEDED,
        (full_attempt(1), full_attempt(2, outcome="succeeded")),
    )


def test_begin_run_stores_every_run_field(store: RunStore) -> None:
    info = run_info(ended=T0 + 9, error="it broke", status=RunStatus.FAILED)
    store.begin_run(info, [])
    assert store.load("run-1").info == info


def test_begin_run_stores_every_step_field_with_its_attempts(store: RunStore) -> None:
    steps = [
        StepRecord("extract"),
        StepRecord(
            "transform",
            StepStatus.WAITING_RETRY,
            (full_attempt(1),),
            note="waiting",
            restored=True,
        ),
    ]
    store.begin_run(run_info(), steps)
    loaded = store.load("run-1")
    assert loaded.steps == {"extract": steps[0], "transform": steps[1]}
    assert list(loaded.steps) == ["extract", "transform"]
    assert loaded.outputs == {}


def test_save_step_replaces_the_record_and_all_its_attempts(store: RunStore) -> None:
    store.begin_run(run_info(), [StepRecord("a"), StepRecord("b")])
    store.save_step("run-1", running("a"))
    assert store.load("run-1").steps["a"] == running("a")
    three = StepRecord("a", StepStatus.FAILED, tuple(full_attempt(n) for n in (1, 2, 3)))
    store.save_step("run-1", three)
    assert store.load("run-1").steps["a"] == three
    # A record with fewer attempts replaces them all (a restored record, say).
    store.save_step("run-1", running("a"))
    loaded = store.load("run-1")
    assert loaded.steps["a"] == running("a")
    assert loaded.steps["b"] == StepRecord("b")


def test_succeeded_step_is_stored_with_its_outputs(store: RunStore) -> None:
    store.begin_run(run_info(), [StepRecord("a"), StepRecord("b")])
    outputs = {
        "rows": [{"id": 1, "name": "ä"}, {"id": 2, "name": None}],
        "count": 2,
        "ratio": 0.5,
        "ok": True,
        "big": 2**80,
        "text": "line\nbreak",
    }
    store.save_step("run-1", succeeded("a"), outputs)
    loaded = store.load("run-1")
    assert loaded.steps["a"] == succeeded("a")
    assert loaded.outputs == {"a": outputs}


def test_outputs_saved_empty_read_back_as_an_empty_mapping(store: RunStore) -> None:
    store.begin_run(run_info(), [StepRecord("a"), StepRecord("b")])
    store.save_step("run-1", succeeded("a"), {})
    store.save_step("run-1", running("b"))
    assert store.load("run-1").outputs == {"a": {}}


def test_saving_a_step_without_outputs_keeps_its_earlier_outputs(store: RunStore) -> None:
    store.begin_run(run_info(), [StepRecord("a")])
    store.save_step("run-1", succeeded("a"), {"x": 1})
    store.save_step("run-1", StepRecord("a", StepStatus.SUCCEEDED, note="seen", restored=True))
    assert store.load("run-1").outputs == {"a": {"x": 1}}


def test_saving_new_outputs_replaces_every_earlier_one(store: RunStore) -> None:
    store.begin_run(run_info(), [StepRecord("a")])
    store.save_step("run-1", succeeded("a"), {"x": 1, "y": 2})
    store.save_step("run-1", succeeded("a"), {"y": 3})
    assert store.load("run-1").outputs == {"a": {"y": 3}}


def test_a_step_batch_reads_back_as_the_same_saves_one_by_one(tmp_path: Path) -> None:
    def items() -> list[tuple[StepRecord, dict[str, object] | None]]:
        return [
            (running("a"), None),
            (succeeded("b"), {}),
            (succeeded("c"), {"rows": [1, 2], "ä": None}),
            (StepRecord("d", StepStatus.FAILED, (full_attempt(1),)), None),
        ]

    loaded = []
    stores: list[tuple[bool, RunStore]] = [
        (True, MemoryStore()),
        (False, MemoryStore()),
        (True, SQLiteStore(tmp_path / "a.db", clock=FakeClock(wall_start=T0))),
        (False, SQLiteStore(tmp_path / "b.db", clock=FakeClock(wall_start=T0))),
    ]
    for batched, made in stores:
        made.begin_run(run_info(), [StepRecord(sid) for sid in "abcd"])
        if batched:
            save_step_batch(made, "run-1", items())
        else:
            for record, outputs in items():
                made.save_step("run-1", record, outputs)
        run = made.load("run-1")
        loaded.append((run.steps, run.outputs))
        made.close()
    assert loaded[0] == loaded[1] == loaded[2] == loaded[3]
    steps, stored_outputs = loaded[0]
    assert steps["d"].status is StepStatus.FAILED
    assert stored_outputs == {"b": {}, "c": {"rows": [1, 2], "ä": None}}


def test_a_step_twice_in_one_batch_keeps_its_last_transition(store: RunStore) -> None:
    # An abandoned attempt's record is written, then its note: back to back, one batch.
    store.begin_run(run_info(), [StepRecord("a")])
    last = StepRecord("a", StepStatus.FAILED, (full_attempt(1), full_attempt(2)))
    save_step_batch(store, "run-1", [(running("a"), None), (last, None)])
    assert store.load("run-1").steps == {"a": last}


def test_a_step_batch_with_a_value_the_codec_refuses_writes_nothing(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "runs.db", clock=FakeClock(wall_start=T0)) as store:
        store.begin_run(run_info(), [StepRecord("a"), StepRecord("b")])
        with pytest.raises(ArtifactCodecError):
            store.save_step_batch(
                "run-1", [(succeeded("a"), {"x": 1}), (succeeded("b"), {"y": object()})]
            )
        run = store.load("run-1")
        assert run.steps == {"a": StepRecord("a"), "b": StepRecord("b")}
        assert run.outputs == {}


def test_a_store_without_step_batches_gets_one_save_per_item() -> None:
    class OneByOne:
        def __init__(self) -> None:
            self.saved: list[tuple[str, object]] = []

        def save_step(self, run_id: str, record: StepRecord, outputs: object = None) -> None:
            self.saved.append((record.step_id, outputs))

    store = OneByOne()
    save_step_batch(store, "run-1", [(running("a"), None), (succeeded("b"), {})])  # type: ignore[arg-type]
    assert store.saved == [("a", None), ("b", {})]


def test_save_steps_writes_every_record(store: RunStore) -> None:
    store.begin_run(run_info(), [StepRecord("a"), StepRecord("b"), StepRecord("c")])
    cancelled = [
        StepRecord("a", StepStatus.CANCELLED, (full_attempt(1, outcome="cancelled"),)),
        StepRecord("c", StepStatus.SKIPPED, note="an ancestor was cancelled"),
    ]
    store.save_steps("run-1", cancelled)
    steps = store.load("run-1").steps
    assert steps == {"a": cancelled[0], "b": StepRecord("b"), "c": cancelled[1]}


def test_finish_run_records_status_end_and_error(store: RunStore) -> None:
    store.begin_run(run_info(), [])
    store.finish_run("run-1", RunStatus.FAILED, ended=T0 + 3.5, error="step a failed")
    info = store.load("run-1").info
    assert (info.status, info.ended, info.error) == (RunStatus.FAILED, T0 + 3.5, "step a failed")
    store.finish_run("run-1", RunStatus.SUCCEEDED, ended=T0 + 4)
    info = store.load("run-1").info
    assert (info.status, info.ended, info.error) == (RunStatus.SUCCEEDED, T0 + 4, None)


def test_heartbeat_is_stored(store: RunStore) -> None:
    store.begin_run(run_info(heartbeat=None), [])
    assert store.load("run-1").info.heartbeat is None
    store.heartbeat("run-1", T0 + 0.75)
    assert store.load("run-1").info.heartbeat == T0 + 0.75


def test_cancel_flag_is_set_per_run(store: RunStore) -> None:
    store.begin_run(run_info("run-1"), [])
    store.begin_run(run_info("run-2"), [])
    assert not store.cancel_requested("run-1")
    store.request_cancel("run-1")
    assert store.cancel_requested("run-1")
    assert not store.cancel_requested("run-2")
    assert not store.cancel_requested("no-such-run")


def test_beginning_a_stored_run_again_resumes_it(store: RunStore) -> None:
    store.begin_run(run_info(), [StepRecord("a"), StepRecord("b")])
    store.save_step("run-1", succeeded("a"), {"x": 1})
    store.save_step("run-1", running("b"))
    store.request_cancel("run-1")
    store.finish_run("run-1", RunStatus.CANCELLED, ended=T0 + 1)

    again = run_info(seed=7, started=T0 + 2, heartbeat=T0 + 2)
    restored_a = StepRecord("a", StepStatus.SUCCEEDED, succeeded("a").attempts, restored=True)
    store.begin_run(again, [restored_a, StepRecord("b")])

    loaded = store.load("run-1")
    assert loaded.info == again
    assert not store.cancel_requested("run-1")
    assert loaded.steps == {"a": restored_a, "b": StepRecord("b")}
    assert loaded.outputs == {"a": {"x": 1}}


def test_list_runs_is_newest_first_ties_in_the_order_begun(store: RunStore) -> None:
    assert store.list_runs() == []
    for run_id, started in [("old", T0 - 60), ("tie-1", T0), ("new", T0 + 60), ("tie-2", T0)]:
        store.begin_run(run_info(run_id, started=started, heartbeat=T0), [])
    assert [r.run_id for r in store.list_runs()] == ["new", "tie-1", "tie-2", "old"]
    assert store.list_runs()[0] == run_info("new", started=T0 + 60, heartbeat=T0)


def test_loading_an_unknown_run_says_how_to_list_runs(store: RunStore) -> None:
    store.begin_run(run_info(), [])
    with pytest.raises(RunNotFoundError, match=r"'nope'.*stepvisor status"):
        store.load("nope")
    with pytest.raises(RunNotFoundError, match="'nope'"):
        store.request_cancel("nope")


def test_writes_to_an_unknown_run_raise_key_error(store: RunStore) -> None:
    store.begin_run(run_info(), [])
    with pytest.raises(KeyError):
        store.save_step("nope", running("a"))
    with pytest.raises(KeyError):
        store.save_step("nope", succeeded("a"), {"x": 1})
    with pytest.raises(KeyError):
        store.save_steps("nope", [])
    with pytest.raises(KeyError):
        store.finish_run("nope", RunStatus.FAILED, ended=T0)
    with pytest.raises(KeyError):
        store.heartbeat("nope", T0)
    assert [r.run_id for r in store.list_runs()] == ["run-1"]


def test_a_loaded_run_does_not_change_with_later_writes(store: RunStore) -> None:
    store.begin_run(run_info(), [StepRecord("a")])
    before = store.load("run-1")
    store.save_step("run-1", succeeded("a"), {"x": 1})
    store.finish_run("run-1", RunStatus.SUCCEEDED, ended=T0 + 1)
    assert before.steps == {"a": StepRecord("a")}
    assert before.outputs == {}
    assert before.info.status is RunStatus.RUNNING


def test_exists_says_whether_a_run_is_stored(store: RunStore) -> None:
    assert not store.exists("run-1")
    store.begin_run(run_info(), [running("a")])
    assert store.exists("run-1")
    assert not store.exists("run-2")
