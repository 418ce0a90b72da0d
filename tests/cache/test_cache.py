"""The cache (issue 24) end to end on one store: reuse, notes, early cutoff, what enters it.

The change rules of the key itself (closures, helpers, globals) are tested with
the key's own functions; these tests hold the plumbing: a step looked up before
it may run, reused without a dispatch, computed with a note that says why.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import stepvisor as sv
from stepvisor.cache._entry import UnreadableEntryError, pack, unpack
from stepvisor.cache._key import key_of, why_changed
from stepvisor.errors import InvalidCacheError, WorkflowFileError
from stepvisor.store.sqlite import SQLiteStore

T0 = 1_700_000_000.0


class Calls:
    """Which step functions ran, in order (thread steps: one list, appended under the GIL)."""

    def __init__(self) -> None:
        self.ran: list[Any] = []


def pipeline(
    calls: Calls,
    *,
    scale: int = 2,
    rows: list[int] | None = None,
    cache: Any = True,
    version: str | None = None,
    b_cache: Any = None,
) -> sv.Workflow:
    """extract (makes rows) -> total (rows * scale) -> report (text of the total)."""

    def extract(ctx: sv.StepContext) -> dict[str, Any]:
        calls.ran.append("extract")
        return {"rows": list(ctx.params["rows"])}

    def total(ctx: sv.StepContext) -> dict[str, Any]:
        calls.ran.append("total")
        return {"total": sum(ctx.inputs["rows"]) * ctx.params["scale"]}

    def report(ctx: sv.StepContext) -> dict[str, Any]:
        calls.ran.append("report")
        return {"text": f"total={ctx.inputs['total']}"}

    step_cache = sv.Cache(version=version) if version is not None else cache
    return sv.Workflow(
        "etl",
        [
            sv.Step(
                "extract", extract, creates=["rows"], cache=step_cache,
                params={"rows": (1, 2, 3) if rows is None else tuple(rows)},
            ),
            sv.Step(
                "total", total, requires=["rows"], creates=["total"], params={"scale": scale},
                cache=step_cache if b_cache is None else b_cache,
            ),
            sv.Step("report", report, requires=["total"], creates=["text"], cache=step_cache),
        ],
    )  # fmt: skip


def notes(result: sv.RunResult) -> dict[str, tuple[str | None, str | None]]:
    return {sid: (rec.reused_from, rec.cache_note) for sid, rec in result.steps.items()}


# -- settings, API and bad input ----------------------------------------------------------


def test_cache_values_are_checked_with_a_typed_error_naming_the_fix() -> None:
    fn = print
    assert sv.Step("a", fn, cache=True).cache == sv.Cache()
    assert sv.Step("a", fn, cache=False).cache is False
    from_file: Any = {"version": 2}  # as a workflow file gives it
    assert sv.Step("a", fn, cache=from_file).cache == sv.Cache(version="2")
    with pytest.raises(InvalidCacheError, match=r"step 'a': cache must be true, false or a Cache"):
        sv.Step("a", fn, cache="yes")  # type: ignore[arg-type]
    with pytest.raises(InvalidCacheError, match="takes 'version' and 'expire', got versoin"):
        sv.Step("a", fn, cache={"versoin": "2"})  # type: ignore[arg-type]
    with pytest.raises(InvalidCacheError, match=r"version.*non-empty string"):
        sv.Cache(version="")
    with pytest.raises(InvalidCacheError, match=r"expire.*positive number of seconds"):
        sv.Cache(expire=-1)
    with pytest.raises(InvalidCacheError, match="cache must be true or false"):
        sv.Settings(cache="sometimes")  # type: ignore[arg-type]
    assert issubclass(InvalidCacheError, sv.InvalidSettingError)


def test_the_run_setting_resolves_like_every_other_and_is_off_by_default() -> None:
    assert sv.resolve().cache is False
    assert sv.resolve(environ={"STEPVISOR_CACHE": "true"}).cache is True
    assert sv.resolve(sv.Settings(cache=True), environ={"STEPVISOR_CACHE": "0"}).cache is False
    assert sv.resolve(sv.Settings(cache=True)).sources["cache"] == "workflow"
    with pytest.raises(InvalidCacheError, match="environment: cache must be true or false"):
        sv.resolve(environ={"STEPVISOR_CACHE": "maybe"})


def test_workflow_files_take_cache_per_step_and_in_settings(tmp_path: Path) -> None:
    (tmp_path / "cache_steps_mod.py").write_text("def f(ctx):\n    return None\n")
    good = tmp_path / "wf.yaml"
    good.write_text(
        "id: w\nsettings: {cache: true}\nsteps:\n"
        "  - {id: a, run: cache_steps_mod:f, cache: {version: '2', expire: 60}}\n"
        "  - {id: b, run: cache_steps_mod:f, cache: false}\n"
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("id: w\nsteps:\n  - {id: a, run: cache_steps_mod:f, cache: 7}\n")
    sys.path.insert(0, str(tmp_path))
    try:
        wf = sv.load_workflow(good)
        with pytest.raises(WorkflowFileError, match=r"step 'a'.*cache must be true, false"):
            sv.load_workflow(bad)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("cache_steps_mod", None)
    assert wf.settings.cache is True
    assert wf.step("a").cache == sv.Cache(version="2", expire=60.0)
    assert wf.step("b").cache is False


# -- the key and the entry -----------------------------------------------------------------


def test_a_miss_names_the_first_part_that_changed() -> None:
    def key(**kw: Any) -> dict[str, str]:
        args: dict[str, Any] = {
            "code": "c1", "params": {"scale": "p1"}, "inputs": {"rows": "i1"}, "version": None,
        } | kw  # fmt: skip
        return dict(key_of("etl", "features", **args).parts)

    base = key()
    assert why_changed("features", base, key(code="c2")) == "computed: code of features changed"
    assert why_changed("features", base, key(inputs={"rows": "i2"})) == (
        "computed: input rows changed"
    )
    assert why_changed("features", base, key(params={"scale": "p2"})) == (
        "computed: parameter scale changed"
    )
    assert why_changed("features", base, key(version="2")) == "computed: version changed"
    assert why_changed("features", base, key(params={})) == "computed: parameter scale changed"
    assert key_of("etl", "a", code="c", params={}, inputs={}, version=None).digest != (
        key_of("etl", "b", code="c", params={}, inputs={}, version=None).digest
    )


def test_an_entry_that_fails_its_checksum_never_unpacks() -> None:
    entry = pack(
        "k", workflow_id="w", step_id="s", parts={}, run_id="r", outputs={"x": 1},
        digests={"x": "d"}, now=T0,
    )  # fmt: skip
    assert unpack(entry) == {"x": 1}
    flipped = entry.payload[:-2] + bytes([entry.payload[-2] ^ 1]) + entry.payload[-1:]
    for damaged in (
        dataclasses.replace(entry, payload=flipped),
        dataclasses.replace(entry, payload=entry.payload[:5]),
        dataclasses.replace(entry, key="other"),
        dataclasses.replace(entry, digests={"x": "e"}),
    ):
        with pytest.raises(UnreadableEntryError):
            unpack(damaged)


# -- runs on one store -------------------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "memory":
        yield sv.MemoryStore()
        return
    with SQLiteStore(tmp_path / "runs.db", codec="pickle") as s:
        yield s


def test_a_second_run_reuses_every_step_and_gives_equal_artifacts(store: Any) -> None:
    calls = Calls()
    first = sv.run(pipeline(calls), store=store)
    assert calls.ran == ["extract", "total", "report"]
    assert set(notes(first).values()) == {(None, "computed: no entry")}
    second = sv.run(pipeline(calls), store=store)
    assert second.status == "succeeded"
    assert calls.ran == ["extract", "total", "report"]  # nothing ran again
    assert notes(second) == dict.fromkeys(
        ("extract", "total", "report"), (first.run_id, f"reused from run {first.run_id}")
    )
    assert dict(second.artifacts) == dict(first.artifacts) == {
        "rows": [1, 2, 3], "total": 12, "text": "total=12",
    }  # fmt: skip
    stored = store.load(second.run_id)
    assert stored.steps["total"].reused_from == first.run_id
    assert stored.steps["total"].cache_note == f"reused from run {first.run_id}"
    assert stored.steps["total"].attempts == ()  # reused: no attempt was made
    assert stored.outputs["total"] == {"total": 12}


def test_a_changed_parameter_recomputes_that_step_and_says_so(store: Any) -> None:
    calls = Calls()
    first = sv.run(pipeline(calls), store=store)
    calls.ran.clear()
    second = sv.run(pipeline(calls, scale=3), store=store)
    assert calls.ran == ["total", "report"]
    assert notes(second) == {
        "extract": (first.run_id, f"reused from run {first.run_id}"),
        "total": (None, "computed: parameter scale changed"),
        "report": (None, "computed: input total changed"),
    }
    assert second.artifacts["text"] == "total=18"


def test_changed_input_content_and_version_are_named(store: Any) -> None:
    calls = Calls()
    sv.run(pipeline(calls), store=store)
    third = sv.run(pipeline(calls, version="2"), store=store)
    assert {rec.cache_note for rec in third.steps.values()} == {"computed: version changed"}
    calls.ran.clear()
    fourth = sv.run(pipeline(calls, version="2", rows=[5]), store=store)
    assert fourth.steps["extract"].cache_note == "computed: parameter rows changed"
    assert fourth.steps["total"].cache_note == "computed: input rows changed"
    assert fourth.artifacts["total"] == 10


def test_early_cutoff_an_upstream_that_reran_with_equal_content_reuses_what_follows(
    store: Any,
) -> None:
    calls = Calls()
    sv.run(pipeline(calls, b_cache=True, cache=False), store=store)
    assert calls.ran == ["extract", "total", "report"]
    calls.ran.clear()
    second = sv.run(pipeline(calls, b_cache=True, cache=False), store=store)
    # extract is not cached: it ran again, made the same rows, and total was reused.
    assert calls.ran == ["extract", "report"]
    assert second.steps["total"].reused_from is not None
    assert second.steps["extract"].cache_note is None  # not a cached step


def test_a_code_change_names_the_step(store: Any) -> None:
    def make(body: Callable[[sv.StepContext], Any]) -> sv.Workflow:
        return sv.Workflow("w", [sv.Step("features", body, cache=True)])

    def one(ctx: sv.StepContext) -> dict[str, int]:
        return {"x": 1}

    def two(ctx: sv.StepContext) -> dict[str, int]:
        return {"x": 2}

    sv.run(make(one), store=store)
    result = sv.run(make(two), store=store)
    assert result.steps["features"].cache_note == "computed: code of features changed"
    assert result.artifacts["x"] == 2


def test_a_reused_step_is_never_dispatched(store: Any) -> None:
    calls = Calls()
    sv.run(pipeline(calls), store=store)
    events: list[sv.Event] = []
    result = sv.run(pipeline(calls), store=store, on_event=events.append)
    assert result.status == "succeeded"
    assert not [e for e in events if isinstance(e, sv.StepDispatched)]
    finished = [e for e in events if isinstance(e, sv.StepFinished)]
    assert sorted(e.step_id for e in finished) == ["extract", "report", "total"]


def test_only_a_succeeded_attempt_enters_the_cache(store: Any) -> None:
    state = {"fail": True}

    def flaky(ctx: sv.StepContext) -> dict[str, int]:
        if state["fail"]:
            raise ValueError("not yet")
        return {"x": 1}

    wf = sv.Workflow("w", [sv.Step("a", flaky, cache=True)])
    failed = sv.run(wf, store=store)
    assert failed.status == "failed"
    state["fail"] = False
    after = sv.run(wf, store=store)
    assert after.steps["a"].cache_note == "computed: no entry"
    assert sv.run(wf, store=store).steps["a"].reused_from == after.run_id


def test_a_retried_step_that_succeeds_enters_the_cache(store: Any) -> None:
    # Recorded through an object, not a list in the closure: a closure's values are in
    # the key by content, so appending to one would change the step's code digest.
    calls = Calls()
    tries = calls.ran

    def once_flaky(ctx: sv.StepContext) -> dict[str, int]:
        calls.ran.append(ctx.attempt)
        if ctx.attempt == 1:
            raise ValueError("first try")
        return {"x": 1}

    policy = sv.RetryPolicy(max_attempts=2, backoff=sv.Backoff.fixed(0.001))
    wf = sv.Workflow("w", [sv.Step("a", once_flaky, cache=True, retry=policy)])
    first = sv.run(wf, store=store)
    assert first.status == "succeeded"
    assert tries == [1, 2]
    assert first.steps["a"].cache_note == "computed: no entry"
    assert sv.run(wf, store=store).steps["a"].reused_from == first.run_id
    assert tries == [1, 2]


def test_a_corrupted_entry_is_recomputed_and_noted_never_served(
    store: Any, caplog: pytest.LogCaptureFixture
) -> None:
    calls = Calls()
    sv.run(pipeline(calls), store=store)
    (info,) = [e for e in store.cache_list() if e.step_id == "total"]
    entry = store.cache_get(info.key)
    damaged = dataclasses.replace(entry, payload=entry.payload[:-3] + b"\x00\x01\x02")
    store.cache_put(damaged)
    calls.ran.clear()
    with caplog.at_level(logging.WARNING, logger="stepvisor"):
        result = sv.run(pipeline(calls), store=store)
    assert result.status == "succeeded"
    assert calls.ran == ["total"]
    assert result.steps["total"].cache_note == "computed: stored entry unreadable"
    assert result.artifacts["total"] == 12
    assert any("fails its checksum" in r.getMessage() for r in caplog.records)
    # The recomputed result replaced the damaged entry.
    assert sv.run(pipeline(calls), store=store).steps["total"].reused_from == result.run_id


def test_an_expired_entry_is_recomputed(store: Any) -> None:
    calls = Calls()

    def wf(expire: float) -> sv.Workflow:
        def a(ctx: sv.StepContext) -> dict[str, int]:
            calls.ran.append("a")
            return {"x": 1}

        return sv.Workflow("w", [sv.Step("a", a, cache=sv.Cache(expire=expire))])

    sv.run(wf(50), store=store, clock=sv.FakeClock(wall_start=T0))
    later = sv.FakeClock(wall_start=T0 + 100)
    assert str(sv.run(wf(500), store=store, clock=later).steps["a"].cache_note).startswith("reused")
    expired = sv.run(wf(50), store=store, clock=sv.FakeClock(wall_start=T0 + 100))
    assert expired.steps["a"].cache_note == "computed: entry expired"
    assert calls.ran == ["a", "a"]


def test_an_input_that_cannot_be_hashed_makes_the_step_compute_and_is_named(
    store: Any,
) -> None:
    lock = threading.Lock()

    def make(ctx: sv.StepContext) -> dict[str, Any]:
        return {"guard": lock, "n": 1}

    def use(ctx: sv.StepContext) -> dict[str, Any]:
        return {"m": ctx.inputs["n"] + 1}

    wf = sv.Workflow(
        "w",
        [
            sv.Step("make", make, creates=["guard", "n"]),
            sv.Step("use", use, needs=["make"], cache=True),
        ],
    )
    result = sv.run(wf, store=sv.MemoryStore())
    assert result.status == "succeeded"
    note = result.steps["use"].cache_note
    assert note is not None
    assert note.startswith("computed: input guard cannot be hashed")
    assert "lock" in note


def test_a_parameter_that_cannot_be_hashed_makes_the_step_compute(store: Any) -> None:
    def use(ctx: sv.StepContext) -> dict[str, Any]:
        return {"m": 1}

    wf = sv.Workflow("w", [sv.Step("use", use, params={"guard": threading.Lock()}, cache=True)])
    result = sv.run(wf, store=sv.MemoryStore())
    assert result.status == "succeeded"
    assert str(result.steps["use"].cache_note).startswith(
        "computed: parameter guard cannot be hashed"
    )


def test_a_run_without_a_store_computes_and_says_once_that_nothing_is_cached(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = Calls()
    with caplog.at_level(logging.WARNING, logger="stepvisor"):
        result = sv.run(pipeline(calls))
    assert result.status == "succeeded"
    assert calls.ran == ["extract", "total", "report"]
    said = [r for r in caplog.records if "nothing could be cached" in r.getMessage()]
    assert len(said) == 1
    assert {rec.cache_note for rec in result.steps.values()} == {None}


def test_the_run_setting_caches_every_step_but_those_that_say_no(store: Any) -> None:
    calls = Calls()
    wf = pipeline(calls, cache=None, b_cache=False)
    sv.run(wf, store=store, cache=True)
    calls.ran.clear()
    result = sv.run(wf, store=store, cache=True)
    assert calls.ran == ["total"]  # cache=False on total: it always computes
    assert result.steps["total"].cache_note is None
    assert result.steps["report"].reused_from is not None  # total made the same number


def test_each_instance_of_a_mapped_step_is_cached_on_its_own(store: Any) -> None:
    calls = Calls()  # an object, not a list in the closure (whose content is in the key)
    ran = calls.ran

    def square(ctx: sv.StepContext) -> dict[str, int]:
        calls.ran.append(ctx.item)
        return {"sq": ctx.item * ctx.item}

    def plus(ctx: sv.StepContext) -> dict[str, int]:  # chained to square, instance by instance
        calls.ran.append(-ctx.item)
        return {"plus": ctx.item + 1}

    def total(ctx: sv.StepContext) -> dict[str, int]:
        return {"total": sum(ctx.inputs["plus"])}

    def wf(items: list[int]) -> sv.Workflow:
        return sv.Workflow(
            "w",
            [
                sv.Step("sq", square, map_over=items, creates=["sq"], cache=True),
                sv.Step("pl", plus, map_over="sq", creates=["plus"], cache=True),
                sv.Step("total", total, requires=["plus"], cache=True),
            ],
        )

    first = sv.run(wf([1, 2, 3]), store=store)
    assert first.status == "succeeded"
    assert first.steps["sq[1]"].cache_note == "computed: no entry"
    assert sorted(ran) == [-9, -4, -1, 1, 2, 3]
    ran.clear()
    second = sv.run(wf([1, 2, 3]), store=store)
    assert ran == []
    assert {second.steps[f"sq[{i}]"].reused_from for i in range(3)} == {first.run_id}
    assert {second.steps[f"pl[{i}]"].reused_from for i in range(3)} == {first.run_id}
    assert second.steps["total"].reused_from == first.run_id
    assert second.artifacts["total"] == first.artifacts["total"] == 17
    third = sv.run(wf([1, 5, 3]), store=store)
    assert ran == [5, -25]  # only the instance whose item changed, and what it feeds
    assert third.steps["sq[1]"].cache_note == "computed: item changed"
    assert third.steps["pl[1]"].cache_note == "computed: item changed"
    assert third.steps["sq[0]"].reused_from == first.run_id
    assert third.steps["total"].cache_note == "computed: input plus changed"
    assert third.artifacts["total"] == 2 + 26 + 10


def test_a_fail_fast_stop_cancels_cached_steps_not_yet_looked_up(store: Any) -> None:
    def boom(ctx: sv.StepContext) -> None:
        raise ValueError("boom")

    def after(ctx: sv.StepContext) -> None:
        return None

    wf = sv.Workflow(
        "w", [sv.Step("boom", boom), sv.Step("after", after, needs=["boom"], cache=True)]
    )
    result = sv.run(wf, store=store)
    assert result.status == "failed"
    assert result.steps["after"].status in ("cancelled", "skipped")


def test_a_reuse_records_when_the_entry_was_last_used(store: Any) -> None:
    def a(ctx: sv.StepContext) -> dict[str, int]:
        return {"x": 1}

    wf = sv.Workflow("w", [sv.Step("a", a, cache=True)])
    sv.run(wf, store=store, clock=sv.FakeClock(wall_start=T0))
    (made,) = store.cache_list()
    assert made.created == made.last_used == T0
    sv.run(wf, store=store, clock=sv.FakeClock(wall_start=T0 + 50))
    (used,) = store.cache_list()
    assert (used.created, used.last_used) == (T0, T0 + 50)
