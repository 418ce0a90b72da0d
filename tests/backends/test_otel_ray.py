"""Tracing across Ray: a Ray step's own span nests under its attempt span.

The task code itself is checked without Ray (``attempt_task`` called here,
with a carrier), and once end to end on a local Ray instance of this module's
own (``ray_session``, from the Ray backend's tests).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

pytest.importorskip("opentelemetry.sdk", reason="tracing tests need the test extra's SDK")

from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider

import stepvisor as sv
from stepvisor.backends._wire import Attempt, RayCall, Returned
from stepvisor.backends.ray._task import attempt_task
from tests.backends.test_ray_backend import ray_session
from tests.test_otel import Spans, spans  # the in-memory exporter fixture

__all__ = ["ray_session", "spans"]


def _make_step() -> Any:
    """A step sent by value (a Ray worker need not import this module)."""

    def span_in_worker(ctx: Any) -> dict[str, Any]:
        from opentelemetry.sdk.trace import TracerProvider as WorkerProvider  # noqa: PLC0415

        with WorkerProvider().get_tracer("w").start_as_current_span("in worker") as span:
            parent = span.parent  # type: ignore[attr-defined]
            return {
                "trace_id": span.get_span_context().trace_id,
                "parent": parent.span_id if parent is not None else None,
                "pid": os.getpid(),
            }

    return span_in_worker


span_in_worker = _make_step()


def test_the_ray_task_attaches_its_carrier_around_the_step() -> None:
    provider = TracerProvider()
    try:
        with provider.get_tracer("test").start_as_current_span("attempt") as attempt:
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
        meta = Attempt("r", "s", 1, 1, None, False, trace=carrier)
        payload = bytes(cloudpickle.dumps(span_in_worker))
        reply = attempt_task(RayCall(meta, payload, {}, {}, ()))
        assert isinstance(reply, Returned)
        assert reply.outputs is not None
        assert reply.outputs["parent"] == attempt.get_span_context().span_id
        assert reply.outputs["trace_id"] == attempt.get_span_context().trace_id
        untraced = attempt_task(RayCall(meta._replace(trace=None), payload, {}, {}, ()))
        assert isinstance(untraced, Returned)
        assert untraced.outputs is not None
        assert untraced.outputs["parent"] is None
        assert trace.get_current_span() is trace.INVALID_SPAN  # nothing left attached
    finally:
        provider.shutdown()


@pytest.mark.ray
def test_a_ray_steps_own_span_nests_under_its_attempt(
    ray_session: Any, spans: Spans, chdir_tmp: Path
) -> None:
    wf = sv.Workflow("on-ray", [sv.Step("r", span_in_worker, executor="ray")])
    result = sv.run(wf)
    assert result.ok, result.error
    attempt = spans.attempt("r", 1)
    assert attempt.attributes is not None
    assert attempt.attributes["stepvisor.executor"] == "ray"
    assert result.artifacts["pid"] != os.getpid()
    assert result.artifacts["parent"] == attempt.context.span_id
    assert result.artifacts["trace_id"] == attempt.context.trace_id
