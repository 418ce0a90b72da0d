"""Mapped steps beyond the contract suite: bad input, chains without a barrier, resume, views.

The behaviour every backend shares is in ``tests/contract/test_map.py``; this
module holds what is checked once: the errors a workflow gets before it runs,
the workflow-file forms, that a chained map has no barrier, that a resumed run
runs neither the splitter nor a succeeded instance again, and the shapes of
the result (its steps view, commits, fingerprint).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

import stepvisor as sv
from stepvisor._prepare import fingerprint
from stepvisor.core.records import instance_id, parse_instance_id
from stepvisor.store.sqlite import SQLiteStore

BOUND = 10.0


def noop(ctx: sv.StepContext) -> None:
    """A step that does nothing (bad-input tests never run it)."""


def item_twice(ctx: sv.StepContext) -> dict[str, Any]:
    return {"out": ctx.item * 2}


# -- bad input, before anything runs -------------------------------------------------------


def test_map_over_an_artifact_no_step_creates_is_refused() -> None:
    with pytest.raises(
        sv.MissingArtifactError, match=r"step 'work' maps over the artifact 'chunk'"
    ):
        sv.Workflow(
            "w",
            [sv.Step("split", noop, creates=["chunks"]), sv.Step("work", noop, map_over="chunk")],
        )


def test_a_step_mapping_over_an_artifact_it_creates_is_refused() -> None:
    with pytest.raises(sv.InvalidSettingError, match="an artifact it creates itself"):
        sv.Step("work", noop, map_over="out", creates=["out"])


@pytest.mark.parametrize("value", [3, {"a": 1}, {1, 2}, "", b"ab"], ids=repr)
def test_map_over_that_is_neither_a_name_nor_a_list_is_refused(value: object) -> None:
    with pytest.raises(sv.InvalidSettingError, match=r"step 'work': map_over must"):
        sv.Step("work", noop, map_over=value)  # type: ignore[arg-type]


def test_a_step_id_that_is_an_instance_id_is_refused() -> None:
    with pytest.raises(sv.DuplicateStepError, match=r"'work\[1\]' is the id of an instance"):
        sv.Workflow("w", [sv.Step("work", noop, map_over=[1, 2]), sv.Step("work[1]", noop)])


def test_ids_that_only_look_like_instances_are_fine() -> None:
    wf = sv.Workflow(
        "w",
        [
            sv.Step("work", noop, map_over=[1]),
            sv.Step("other[1]", noop),
            sv.Step("work[01]", noop),
            sv.Step("work[x]", noop),
        ],
    )
    assert len(wf.steps) == 4


def test_a_generator_is_not_a_sequence_and_fails_the_step_not_the_run_machinery() -> None:
    def split(ctx: sv.StepContext) -> dict[str, Any]:
        return {"chunks": (i for i in range(3))}

    wf = sv.Workflow(
        "w",
        [
            sv.Step("split", split, creates=["chunks"]),
            sv.Step("work", item_twice, map_over="chunks", creates=["out"]),
        ],
    )
    result = sv.run(wf)
    assert result.status is sv.RunStatus.FAILED
    assert isinstance(result.error, sv.MapOverError)
    assert "for a generator, list(...) it first" in str(result.error)
    assert result.steps["work"].attempts == ()


@pytest.mark.parametrize(
    ("text", "expected"),
    [("map_over: chunks", "chunks"), ("map_over: [0, 1, 2]", (0, 1, 2))],
)
def test_workflow_files_take_map_over_as_a_name_or_a_list(
    tmp_path: Path, text: str, expected: object
) -> None:
    (tmp_path / "wf.yaml").write_text(
        "id: w\nsteps:\n"
        "  - {id: split, run: tests.core.test_map:noop, creates: [chunks]}\n"
        f"  - {{id: work, run: tests.core.test_map:item_twice, {text}, creates: [out]}}\n"
    )
    wf = sv.load_workflow(tmp_path / "wf.yaml")
    assert wf.step("work").map_over == expected


def test_a_workflow_file_map_over_of_another_type_names_the_step(tmp_path: Path) -> None:
    (tmp_path / "wf.yaml").write_text(
        "id: w\nsteps:\n  - {id: work, run: tests.core.test_map:noop, map_over: {a: 1}}\n"
    )
    with pytest.raises(sv.WorkflowFileError, match=r"step 'work'.*map_over must be"):
        sv.load_workflow(tmp_path / "wf.yaml")


def test_the_fingerprint_covers_the_list_a_step_maps_over() -> None:
    def wf(items: list[int]) -> sv.Workflow:
        return sv.Workflow("w", [sv.Step("work", noop, map_over=items)])

    assert fingerprint(wf([1, 2])) == fingerprint(wf([1, 2]))
    assert fingerprint(wf([1, 2])) != fingerprint(wf([1, 2, 3]))


# -- no barrier between chained maps -------------------------------------------------------


def test_a_chained_instance_starts_before_the_first_map_has_ended() -> None:
    """``b[0]`` must start while ``a[1]`` is still running: ``a[1]`` waits for it.

    With a barrier between the maps, ``a[1]`` would wait for ever: it is bounded,
    and then fails the test by failing its step.
    """
    b0_started = threading.Event()

    def first(ctx: sv.StepContext) -> dict[str, Any]:
        if ctx.index == 1 and not b0_started.wait(BOUND):
            raise AssertionError("b[0] did not start while a[1] ran: a barrier")
        return {"x": ctx.item}

    def second(ctx: sv.StepContext) -> dict[str, Any]:
        if ctx.index == 0:
            b0_started.set()
        return {"y": ctx.item + 100}

    wf = sv.Workflow(
        "chain",
        [
            sv.Step("a", first, map_over=[0, 1, 2], creates=["x"]),
            sv.Step("b", second, map_over="x", creates=["y"]),
        ],
        settings=sv.Settings(max_parallel=2),
    )
    result = sv.run(wf)
    assert result.status is sv.RunStatus.SUCCEEDED, result.error
    assert result.artifacts["y"] == [100, 101, 102]


def test_a_step_that_requires_a_mapped_artifact_waits_for_every_instance() -> None:
    seen: list[str] = []
    lock = threading.Lock()

    def work(ctx: sv.StepContext) -> dict[str, Any]:
        with lock:
            seen.append(ctx.step_id)
        return {"x": ctx.item}

    def after(ctx: sv.StepContext) -> dict[str, Any]:
        with lock:
            seen.append(ctx.step_id)
        return {"n": len(ctx.inputs["x"])}

    wf = sv.Workflow(
        "w",
        [
            sv.Step("a", work, map_over=list(range(6)), creates=["x"]),
            sv.Step("t", after, requires=["x"]),
        ],
    )
    result = sv.run(wf, max_parallel=3)
    assert result.artifacts["n"] == 6
    assert seen[-1] == "t"
    assert sorted(seen[:-1]) == [f"a[{i}]" for i in range(6)]


# -- resume ---------------------------------------------------------------------------------


class _Counter:
    """How often each step or instance ran (thread steps share the test's memory)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.runs: dict[str, int] = {}
        self.blocking = threading.Event()
        self.block = True

    def ran(self, sid: str) -> None:
        with self.lock:
            self.runs[sid] = self.runs.get(sid, 0) + 1


@pytest.fixture
def counter() -> _Counter:
    return _Counter()


def _resumable(counter: _Counter) -> sv.Workflow:
    def split(ctx: sv.StepContext) -> dict[str, Any]:
        counter.ran(ctx.step_id)
        return {"chunks": [10, 20, 30, 40, 50]}

    def score(ctx: sv.StepContext) -> dict[str, Any]:
        counter.ran(ctx.step_id)
        if ctx.index == 2 and counter.block:
            counter.blocking.set()
            ctx.wait_cancelled(BOUND)  # the test cancels the run here
            ctx.raise_if_cancelled()
        return {"scores": ctx.item + ctx.index}

    def scale(ctx: sv.StepContext) -> dict[str, Any]:
        counter.ran(ctx.step_id)
        return {"scaled": ctx.item * 10}

    def total(ctx: sv.StepContext) -> dict[str, Any]:
        counter.ran(ctx.step_id)
        return {"total": sum(ctx.inputs["scaled"])}

    return sv.Workflow(
        "resumable",
        [
            sv.Step("split", split, creates=["chunks"]),
            sv.Step("score", score, map_over="chunks", creates=["scores"]),
            sv.Step("scale", scale, map_over="scores", creates=["scaled"]),
            sv.Step("total", total, requires=["scaled"]),
        ],
        settings=sv.Settings(max_parallel=1),
    )


def test_a_cancelled_map_resumes_without_running_the_splitter_or_a_succeeded_instance(
    tmp_path: Path, counter: _Counter
) -> None:
    store = tmp_path / "runs.db"
    wf = _resumable(counter)
    handle = sv.start(wf, store=str(store))
    assert counter.blocking.wait(BOUND), "score[2] never started"
    handle.cancel()
    first = handle.wait(BOUND)
    assert first.status is sv.RunStatus.CANCELLED
    done_before = {sid for sid, rec in first.steps.items() if rec.status is sv.StepStatus.SUCCEEDED}
    assert {"split", "score[0]", "score[1]"} <= done_before
    assert first.steps["score[2]"].status is sv.StepStatus.CANCELLED
    runs_before = dict(counter.runs)

    counter.block = False
    resumed = sv.resume(first.run_id, wf, store=str(store))
    assert resumed.status is sv.RunStatus.SUCCEEDED, resumed.error
    for sid in done_before:
        assert counter.runs[sid] == runs_before[sid], f"{sid} ran again on resume"
        assert resumed.steps[sid].restored
    assert counter.runs["score[2]"] == runs_before["score[2]"] + 1
    with SQLiteStore(store) as stored:
        kept = stored.load(first.run_id).steps
    for sid in done_before:
        assert kept[sid].restored, f"the store does not say {sid} was kept"

    fresh = _Counter()
    fresh.block = False
    uninterrupted = sv.run(_resumable(fresh))
    assert dict(resumed.artifacts) == dict(uninterrupted.artifacts)
    assert resumed.statuses() == uninterrupted.statuses()
    assert resumed.commits == uninterrupted.commits


def test_a_resumed_run_of_a_finished_map_keeps_its_instances_records(
    tmp_path: Path, counter: _Counter
) -> None:
    """A mapped step restored whole still lists its instances, and chains read their items."""
    counter.block = False
    store = str(tmp_path / "runs.db")
    wf = _resumable(counter)
    done = sv.run(wf, store=store)
    assert done.status is sv.RunStatus.SUCCEEDED
    runs = dict(counter.runs)
    with SQLiteStore(store) as kept:
        outputs = kept.load(done.run_id).outputs
    assert not outputs.get("score"), "a mapped step's lists are stored once, by instance"
    assert outputs["score[1]"] == {"scores": 21}
    again = sv.resume(done.run_id, wf, store=store)
    assert counter.runs == runs
    assert list(again.steps) == list(done.steps)
    assert all(record.restored for record in again.steps.values())
    assert dict(again.artifacts) == dict(done.artifacts)


# -- the result's shapes ----------------------------------------------------------------------


def test_instance_ids_round_trip_and_nothing_else_parses() -> None:
    assert parse_instance_id(instance_id("score", 12)) == ("score", 12)
    assert parse_instance_id("a[b][3]") == ("a[b]", 3)
    for sid in ("score", "score[]", "score[x]", "score[-1]", "score[01]", "score]"):
        assert parse_instance_id(sid) is None, sid


def test_the_steps_view_holds_instances_after_their_step() -> None:
    wf = sv.Workflow(
        "w",
        [sv.Step("a", item_twice, map_over=[1, 2], creates=["out"]), sv.Step("b", noop)],
    )
    steps = sv.run(wf).steps
    assert list(steps) == ["a", "a[0]", "a[1]", "b"]
    assert len(steps) == 4
    assert "a[1]" in steps
    assert "a[2]" not in steps
    assert "b[0]" not in steps
    assert steps["a[1]"].step_id == "a[1]"
    with pytest.raises(KeyError):
        steps["a[2]"]
    assert [sid for sid, _ in steps.items()] == list(steps)
    assert [record.step_id for record in steps.values()] == list(steps)


def test_the_runs_bound_and_pools_hold_across_instances() -> None:
    """Six instances in a pool of 2 under a bound of 8: never more than 2 run at once."""
    from tests.machine_sim import Sim, make_plan  # noqa: PLC0415 - the simulator, for this test

    wf = sv.Workflow(
        "w",
        [sv.Step("a", noop, map_over=list(range(6)), pool="db"), sv.Step("b", noop, map_over=[1])],
        settings=sv.Settings(max_parallel=8, pools={"db": 2}),
    )
    sim = Sim(make_plan(wf))
    sim.start()
    running_a = []
    while sim.step_once(lambda options: options[0]):
        running_a.append(sum(1 for q in sim.queues.values() if q and q[0][0].startswith("a[")))
    assert sim.result is not None
    assert sim.result.status is sv.RunStatus.SUCCEEDED
    assert max(running_a) == 2


def test_critical_path_priority_counts_a_fixed_maps_instances_as_its_work() -> None:
    """One slot: a map of 4 items of cost 1 (work 4) goes before a step of cost 2."""
    from stepvisor.core.effects import Dispatch  # noqa: PLC0415
    from tests.machine_sim import Sim, make_plan  # noqa: PLC0415

    wf = sv.Workflow(
        "w",
        [
            sv.Step("p", noop, metadata={"cost": 2}),
            sv.Step("m", noop, map_over=[0, 1, 2, 3]),
            sv.Step("q", noop, map_over=[0]),  # work 1: after both
        ],
        settings=sv.Settings(max_parallel=1),
    )
    sim = Sim(make_plan(wf))
    sim.start()
    sim.run_to_end(lambda options: options[0])
    order = [o.spec.step_id for e in sim.effects if isinstance(e, Dispatch) for o in e.orders]
    assert order == ["m[0]", "m[1]", "m[2]", "m[3]", "p", "q[0]"]


def test_a_step_below_two_failures_names_the_first_in_canonical_order_and_finishes_once() -> None:
    """Whichever parent fails first in time, the skipped step's note is the same."""
    from stepvisor.core.effects import Emit  # noqa: PLC0415
    from tests.machine_sim import Sim, make_plan  # noqa: PLC0415

    wf = sv.Workflow(
        "w",
        [sv.Step("a", noop), sv.Step("b", noop), sv.Step("c", noop, needs=["a", "b"])],
        settings=sv.Settings(on_failure="continue"),
    )
    for last in (0, -1):  # a fails first, then b fails first
        sim = Sim(make_plan(wf), {("a", 1): "fatal", ("b", 1): "fatal"})
        sim.start()
        sim.run_to_end(lambda options, last=last: options[last])
        assert sim.result is not None
        assert sim.result.steps["c"].note == "skipped: it depends on 'a', which failed"
        finished = [
            e.event.step_id
            for e in sim.effects
            if isinstance(e, Emit) and isinstance(e.event, sv.StepFinished)
        ]
        assert finished.count("c") == 1


class _BrokenSequence:
    """Sized and indexable, but reading an item raises."""

    def __len__(self) -> int:
        return 3

    def __getitem__(self, index: int) -> int:
        raise RuntimeError("this sequence cannot be read")


@pytest.mark.parametrize("kind", ["0-d array", "broken sequence"])
def test_a_sequence_that_cannot_be_read_fails_the_mapped_step_at_expansion(kind: str) -> None:
    np = pytest.importorskip("numpy", reason="a 0-d array needs numpy")
    value = np.array(5) if kind == "0-d array" else _BrokenSequence()

    def split(ctx: sv.StepContext) -> dict[str, Any]:
        return {"chunks": value}

    wf = sv.Workflow(
        "w",
        [
            sv.Step("split", split, creates=["chunks"]),
            sv.Step("work", item_twice, map_over="chunks", creates=["out"]),
        ],
    )
    result = sv.run(wf)
    assert result.status is sv.RunStatus.FAILED
    assert result.failed_step == "work"
    assert isinstance(result.error, sv.MapOverError)


def test_a_numpy_array_is_mapped_row_by_row() -> None:
    np = pytest.importorskip("numpy", reason="needs numpy")

    def split(ctx: sv.StepContext) -> dict[str, Any]:
        return {"rows": np.arange(6).reshape(3, 2)}

    def total(ctx: sv.StepContext) -> dict[str, Any]:
        return {"sum": int(ctx.item.sum())}

    wf = sv.Workflow(
        "w",
        [
            sv.Step("split", split, creates=["rows"]),
            sv.Step("work", total, map_over="rows", creates=["sum"]),
        ],
    )
    result = sv.run(wf)
    assert result.ok, result.error
    assert result.artifacts["sum"] == [1, 5, 9]


def test_a_range_or_tuple_is_kept_as_is_and_a_list_is_copied() -> None:
    items = [1, 2]
    step = sv.Step("work", noop, map_over=items)
    items.append(3)  # the step is immutable: what it was made with
    assert step.map_over == (1, 2)
    big = range(1_000_000)
    assert sv.Step("work", noop, map_over=big).map_over is big
    fixed = tuple(range(5))
    assert sv.Step("work", noop, map_over=fixed).map_over is fixed
    result = sv.run(
        sv.Workflow("w", [sv.Step("w", item_twice, map_over=range(3), creates=["out"])])
    )
    assert result.artifacts["out"] == [0, 2, 4]
