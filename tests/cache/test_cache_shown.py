"""Where reuse and its reasons are shown: status, the live view, the report, trace spans."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import stepvisor as sv
from stepvisor.cli._output import one_run, one_step
from stepvisor.cli._progress import Progress
from stepvisor.cli._report import render_html

pytest.importorskip("opentelemetry.sdk", reason="the span test needs the test extra's SDK")

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

from tests.test_otel import Spans, attr


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[Spans]:
    """As tests/test_otel.py's: a provider of our own, its spans kept in memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    yield Spans(exporter)
    provider.shutdown()


def make(ctx: sv.StepContext) -> dict[str, Any]:
    return {"rows": [1, 2]}


def double(ctx: sv.StepContext) -> dict[str, Any]:
    return {"out": [r * ctx.params["k"] for r in ctx.inputs["rows"]]}


def workflow(k: int) -> sv.Workflow:
    return sv.Workflow(
        "shown",
        [
            sv.Step("make", make, creates=["rows"], cache=True),
            sv.Step("double", double, requires=["rows"], params={"k": k}, cache=True),
        ],
    )


def two_runs() -> tuple[sv.MemoryStore, sv.RunResult, sv.RunResult]:
    store = sv.MemoryStore()
    first = sv.run(workflow(2), store=store)
    second = sv.run(workflow(3), store=store)
    return store, first, second


def test_status_counts_reused_steps_and_says_why_each_was_computed() -> None:
    store, first, second = two_runs()
    text = one_run(store, second.run_id)
    assert "cache     1 reused, 1 computed" in text
    lines = {
        line.split()[0]: line for line in text.splitlines() if line.startswith(("make", "double"))
    }
    assert "succeeded (reused)" in lines["make"]
    assert lines["make"].endswith(f"reused from run {first.run_id}")
    assert lines["double"].endswith("computed: parameter k changed")
    step = one_step(store, second.run_id, "make")
    assert f"cache     reused from run {first.run_id}" in step
    assert "status    succeeded (reused)" in step
    # A run that cached nothing shows no cache line nor column.
    plain = sv.run(sv.Workflow("p", [sv.Step("a", make)]), store=store)
    assert "CACHE" not in one_run(store, plain.run_id)
    assert "cache " not in one_run(store, plain.run_id)


def test_the_report_marks_reused_steps_with_their_note() -> None:
    store, first, second = two_runs()
    page = render_html(store.load(second.run_id), now=0.0)
    assert "(reused)" in page
    assert f"reused from run {first.run_id}" in page
    assert "computed: parameter k changed" in page


def test_the_live_view_counts_reused_steps_apart() -> None:
    store = sv.MemoryStore()
    sv.run(workflow(2), store=store)
    progress = Progress(["make", "double"])
    result = sv.run(workflow(3), store=store, on_event=progress.apply)
    assert result.status == "succeeded"
    assert progress.reused == {"make"}
    assert progress.summary() == "2 succeeded (1 reused)"


def test_spans_carry_the_cache_note_and_where_a_result_came_from(spans: Spans) -> None:
    store = sv.MemoryStore()
    first = sv.run(workflow(2), store=store)
    spans.exporter.clear()
    sv.run(workflow(3), store=store)
    made, doubled = spans.one("step make"), spans.one("step double")
    assert attr(made, "cache.reused") is True
    assert attr(made, "cache.reused_from") == first.run_id
    assert attr(made, "cache.note") == f"reused from run {first.run_id}"
    assert attr(doubled, "cache.reused") is False
    assert attr(doubled, "cache.note") == "computed: parameter k changed"
    assert not spans.named("attempt make")  # reused: no attempt, so no attempt span
