"""With OpenTelemetry active, a captured record names its attempt's trace and span."""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("opentelemetry.sdk", reason="tracing tests need the test extra's SDK")

import stepvisor as sv
from tests.test_otel import Spans, spans

__all__ = ["spans"]  # the fixture, used by name below


def log_a_warning(ctx: sv.StepContext) -> None:
    logging.getLogger("traced.step").warning("traced %s", ctx.step_id)


async def log_a_warning_async(ctx: sv.StepContext) -> None:
    logging.getLogger("traced.step").warning("traced %s", ctx.step_id)


@pytest.mark.parametrize("executor", ["thread", "async", "process"])
def test_a_captured_record_carries_its_attempts_trace_and_span(spans: Spans, executor: str) -> None:
    if executor == "async":
        step = sv.Step("s", log_a_warning_async)
    else:
        step = sv.Step("s", log_a_warning, executor="process" if executor == "process" else None)
    result = sv.run(sv.Workflow("traced", [step]))
    assert result.ok, result.error
    attempt = spans.attempt("s", 1).get_span_context()
    assert attempt is not None
    ids = f"[trace_id={attempt.trace_id:032x} span_id={attempt.span_id:016x}]"
    assert f"WARNING traced.step: traced s {ids}\n" in result.logs("s")


def test_an_untraced_run_names_no_trace() -> None:
    result = sv.run(sv.Workflow("untraced", [sv.Step("s", log_a_warning)]))
    assert "trace_id=" not in result.logs("s")
    assert "WARNING traced.step: traced s\n" in result.logs("s")
