"""OpenTelemetry tracing: one span per run, step and attempt, nested, with what happened.

The spans go to the SDK's in-memory exporter through the global tracer
provider, as a user's would (no opt-in call).  A global provider can be set
only once per process, so the ``spans`` fixture puts one in place for a test
and takes it away again, as OpenTelemetry's own test utilities do
(``_TRACER_PROVIDER`` is the API's module global); every other test of the
suite runs untraced.  What must hold in a fresh interpreter (nothing imported
without the extra, nothing done with the API alone) is checked in one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk", reason="tracing tests need the test extra's SDK")

from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import stepvisor as sv
from stepvisor._otel import to_ns
from stepvisor.cli._report import _attempts
from tests.conftest import REPO_ROOT, pump_until, wait_for


def user_tracer() -> trace.Tracer:
    # Looked up at each use: a proxy tracer kept from import time would hold on
    # to the first provider it saw (an earlier test's).
    return trace.get_tracer("user-code")


class Spans:
    """The spans one test's runs produced, found by name."""

    def __init__(self, exporter: InMemorySpanExporter) -> None:
        self.exporter = exporter

    @property
    def all(self) -> tuple[ReadableSpan, ...]:
        return tuple(self.exporter.get_finished_spans())

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.all if s.name == name]

    def one(self, name: str) -> ReadableSpan:
        found = self.named(name)
        assert len(found) == 1, (name, [s.name for s in self.all])
        return found[0]

    def attempt(self, step_id: str, number: int) -> ReadableSpan:
        found = [s for s in self.named(f"attempt {step_id}") if attr(s, "attempt") == number]
        assert len(found) == 1, (step_id, number)
        return found[0]


def attr(span: ReadableSpan, name: str) -> Any:
    assert span.attributes is not None
    return span.attributes.get(f"stepvisor.{name}")


def events(span: ReadableSpan) -> list[str]:
    return [e.name for e in span.events]


def event(span: ReadableSpan, name: str) -> dict[str, Any]:
    found = [dict(e.attributes or {}) for e in span.events if e.name == name]
    assert len(found) == 1, (name, events(span))
    return found[0]


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[Spans]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    yield Spans(exporter)
    provider.shutdown()


# -- step functions (module level: process steps are pickled by reference) -----------------


def make_user_span(ctx: sv.StepContext) -> dict[str, Any]:
    with user_tracer().start_as_current_span(f"user {ctx.step_id}"):
        return {ctx.step_id: baggage.get_baggage("tenant")}


async def make_user_span_async(ctx: sv.StepContext) -> None:
    with user_tracer().start_as_current_span(f"user {ctx.step_id}"):
        return


def flaky(ctx: sv.StepContext) -> None:
    if ctx.attempt == 1:
        raise ConnectionError("try again")


def user_span_in_child(ctx: sv.StepContext) -> dict[str, Any]:
    """A span made in the process child with an SDK of its own; what it nested under."""
    from opentelemetry.sdk.trace import TracerProvider as ChildProvider  # noqa: PLC0415

    with ChildProvider().get_tracer("child").start_as_current_span("in child") as span:
        assert isinstance(span, ReadableSpan)
        assert span.parent is not None
        return {
            "trace_id": span.get_span_context().trace_id,
            "parent": span.parent.span_id,
            "pid": os.getpid(),
        }


def kill_self(ctx: sv.StepContext) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def cooperative(ctx: sv.StepContext) -> None:
    ctx.wait_cancelled(30.0)
    ctx.raise_if_cancelled()


# -- structure ------------------------------------------------------------------------------


def test_run_step_and_attempt_spans_nest_and_a_step_span_nests_under_its_attempt(
    spans: Spans, chdir_tmp: Path
) -> None:
    wf = sv.Workflow(
        "nest",
        steps=[
            sv.Step("a", make_user_span),
            sv.Step("b", make_user_span_async, needs=["a"]),
        ],
    )
    result = sv.run(wf)
    assert result.ok
    run = spans.one("run nest")
    assert run.parent is None
    assert attr(run, "run_id") == result.run_id
    assert attr(run, "workflow") == "nest"
    assert attr(run, "outcome") == "succeeded"
    for sid, executor in (("a", "thread"), ("b", "async")):
        step = spans.one(f"step {sid}")
        attempt = spans.attempt(sid, 1)
        user = spans.one(f"user {sid}")
        assert parent_of(step) == run.context.span_id
        assert parent_of(attempt) == step.context.span_id
        assert parent_of(user) == attempt.context.span_id
        assert {s.context.trace_id for s in (run, step, attempt, user)} == {run.context.trace_id}
        for span in (step, attempt):
            assert attr(span, "run_id") == result.run_id
            assert attr(span, "workflow") == "nest"
            assert attr(span, "step_id") == sid
            assert attr(span, "executor") == executor
            assert attr(span, "outcome") == "succeeded"
            assert span.status.status_code is StatusCode.UNSET
        assert attr(attempt, "attempt") == 1
        assert attr(attempt, "worker") == result.steps[sid].attempts[0].worker
        assert attr(step, "attempts") == 1
    assert len(spans.all) == 7


def test_an_instance_of_a_mapped_step_nests_under_its_steps_span(
    spans: Spans, chdir_tmp: Path
) -> None:
    wf = sv.Workflow("map", steps=[sv.Step("m", make_user_span, map_over=[0, 1])])
    result = sv.run(wf)
    assert result.ok, result.error
    run = spans.one("run map")
    step = spans.one("step m")
    assert parent_of(step) == run.context.span_id
    assert attr(step, "outcome") == "succeeded"
    assert attr(step, "note") == "mapped over 2 items: 2 succeeded"
    for i in range(2):
        instance = spans.one(f"step m[{i}]")
        attempt = spans.attempt(f"m[{i}]", 1)
        assert parent_of(instance) == step.context.span_id
        assert parent_of(attempt) == instance.context.span_id
        assert parent_of(spans.one(f"user m[{i}]")) == attempt.context.span_id
        assert attr(attempt, "executor") == "thread"
        assert attr(instance, "step_id") == f"m[{i}]"
        assert step.start_time is not None
        assert instance.start_time is not None
        assert step.start_time <= instance.start_time
    assert len(spans.all) == 1 + 1 + 2 * 3


def test_a_run_started_inside_a_users_span_nests_under_it_with_its_baggage(
    spans: Spans, chdir_tmp: Path
) -> None:
    token = otel_context.attach(baggage.set_baggage("tenant", "acme"))
    try:
        with user_tracer().start_as_current_span("request") as request:
            handle = sv.start(sv.Workflow("inside", steps=[sv.Step("a", make_user_span)]))
        result = handle.wait(30)  # the run goes on after the user's span ended
    finally:
        otel_context.detach(token)
    assert result.artifacts["a"] == "acme"  # the caller's baggage reached the step
    run = spans.one("run inside")
    assert parent_of(run) == request.get_span_context().span_id
    assert run.context.trace_id == request.get_span_context().trace_id
    assert spans.one("user a").context.trace_id == request.get_span_context().trace_id


def test_a_process_steps_own_span_nests_under_its_attempt_across_the_process_boundary(
    spans: Spans, chdir_tmp: Path
) -> None:
    wf = sv.Workflow("proc", steps=[sv.Step("p", user_span_in_child, executor="process")])
    result = sv.run(wf)
    assert result.ok, result.error
    attempt = spans.attempt("p", 1)
    assert attr(attempt, "executor") == "process"
    assert result.artifacts["pid"] != os.getpid()
    assert result.artifacts["parent"] == attempt.context.span_id
    assert result.artifacts["trace_id"] == attempt.context.trace_id


# -- outcomes ---------------------------------------------------------------------------------


def test_an_error_and_its_retry_are_an_exception_event_with_status_error_then_a_retry_event(
    spans: Spans, chdir_tmp: Path
) -> None:
    wf = sv.Workflow(
        "retry",
        steps=[
            sv.Step(
                "f", flaky, retry=sv.RetryPolicy(max_attempts=2, backoff=sv.Backoff.fixed(0.01))
            )
        ],
    )
    result = sv.run(wf)
    assert result.ok
    first, second = spans.attempt("f", 1), spans.attempt("f", 2)
    assert attr(first, "outcome") == "failed"
    assert first.status.status_code is StatusCode.ERROR
    assert first.status.description == "ConnectionError: try again"
    assert first.attributes is not None
    assert first.attributes["error.type"] == "ConnectionError"
    exc = event(first, "exception")
    assert exc["exception.type"] == "ConnectionError"
    assert exc["exception.message"] == "try again"
    assert "raise ConnectionError" in exc["exception.stacktrace"]
    assert exc["exception.stacktrace"] == result.steps["f"].attempts[0].error_traceback
    assert attr(second, "outcome") == "succeeded"
    assert second.status.status_code is StatusCode.UNSET
    assert events(second) == []
    step = spans.one("step f")
    retry = event(step, "stepvisor.retry")
    assert retry["stepvisor.attempt"] == 1
    assert retry["error.type"] == "ConnectionError"
    assert retry["stepvisor.retry.delay"] == pytest.approx(0.01)
    assert attr(step, "outcome") == "succeeded"
    assert attr(step, "attempts") == 2
    assert step.status.status_code is StatusCode.UNSET
    assert {parent_of(first), parent_of(second)} == {step.context.span_id}


def test_a_timeout_is_a_timeout_event_and_an_error(spans: Spans, chdir_tmp: Path) -> None:
    clock = sv.FakeClock()
    handle = sv.start(
        sv.Workflow("to", steps=[sv.Step("slow", cooperative, timeout=5.0)]), clock=clock
    )
    wait_for(lambda: clock.pending() >= 2, what="the deadline timer")
    clock.advance(5.0)
    result = handle.wait(30)
    assert result.steps["slow"].status is sv.StepStatus.TIMED_OUT
    attempt = spans.attempt("slow", 1)
    assert attr(attempt, "outcome") == "timed_out"
    assert events(attempt) == ["stepvisor.timeout", "exception"]
    assert event(attempt, "exception")["exception.type"] == "stepvisor.errors.StepTimeoutError"
    assert attempt.status.status_code is StatusCode.ERROR
    step = spans.one("step slow")
    assert attr(step, "outcome") == "timed_out"
    assert step.status.status_code is StatusCode.ERROR
    run = spans.one("run to")
    assert attr(run, "outcome") == "failed"
    assert run.status.status_code is StatusCode.ERROR


def test_an_abandoned_attempt_has_an_abandoned_event(spans: Spans, chdir_tmp: Path) -> None:
    clock = sv.FakeClock()
    release = threading.Event()
    entered = threading.Event()

    def ignores(ctx: sv.StepContext) -> None:
        entered.set()
        assert release.wait(30)

    handle = sv.start(
        sv.Workflow(
            "ab", steps=[sv.Step("x", ignores, timeout=1.0)], settings=sv.Settings(kill_grace=1.0)
        ),
        clock=clock,
    )
    try:
        assert entered.wait(10)
        wait_for(lambda: clock.pending() >= 2, what="the deadline timer")
        clock.advance(1.0)  # told to stop; it ignores that
        clock.advance(1.0)  # the grace is counted from the deadline: it is abandoned
        pump_until(clock, handle.done, what="the abandonment")
        result = handle.wait(30)
    finally:
        release.set()
    assert result.steps["x"].attempts[-1].note == "abandoned"
    attempt = spans.attempt("x", 1)
    assert attr(attempt, "note") == "abandoned"
    assert events(attempt) == ["stepvisor.timeout", "stepvisor.abandoned", "exception"]
    assert attempt.status.status_code is StatusCode.ERROR


def test_a_cancel_is_a_cancel_event_on_the_attempt_the_step_and_the_run_not_an_error(
    spans: Spans, chdir_tmp: Path
) -> None:
    entered = threading.Event()

    def waits(ctx: sv.StepContext) -> None:
        entered.set()
        cooperative(ctx)

    handle = sv.start(
        sv.Workflow("cx", steps=[sv.Step("w", waits), sv.Step("later", flaky, needs=["w"])])
    )
    assert entered.wait(10)
    handle.cancel()
    result = handle.wait(30)
    assert result.status is sv.RunStatus.CANCELLED
    attempt = spans.attempt("w", 1)
    assert attr(attempt, "outcome") == "cancelled"
    assert events(attempt) == ["stepvisor.cancelled"]
    assert attempt.status.status_code is StatusCode.UNSET
    assert events(spans.one("step w")) == ["stepvisor.cancelled"]
    never_ran = spans.one("step later")
    assert attr(never_ran, "outcome") == "cancelled"
    assert attr(never_ran, "attempts") == 0
    assert events(never_ran) == ["stepvisor.cancelled"]
    assert never_ran.start_time == never_ran.end_time
    assert spans.named("attempt later") == []
    run = spans.one("run cx")
    assert attr(run, "outcome") == "cancelled"
    assert events(run) == ["stepvisor.cancelled"]
    assert run.status.status_code is StatusCode.UNSET


def test_a_crashed_process_attempt_is_an_error_naming_the_crash(
    spans: Spans, chdir_tmp: Path
) -> None:
    wf = sv.Workflow(
        "crash",
        steps=[sv.Step("k", kill_self, executor="process"), sv.Step("s", make_user_span)],
        settings=sv.Settings(on_failure="continue"),
    )
    result = sv.run(wf)
    assert result.steps["k"].attempts[0].outcome == "crashed"
    attempt = spans.attempt("k", 1)
    assert attr(attempt, "outcome") == "crashed"
    assert attempt.status.status_code is StatusCode.ERROR
    assert event(attempt, "exception")["exception.type"] == "stepvisor.errors.WorkerCrashedError"
    assert attr(spans.one("step s"), "outcome") == "succeeded"


# -- the report and the trace agree -----------------------------------------------------------


def test_span_times_are_the_attempt_records_the_report_draws(spans: Spans, chdir_tmp: Path) -> None:
    store = sv.SQLiteStore(chdir_tmp / "runs.db")
    wf = sv.Workflow(
        "times",
        steps=[
            sv.Step("a", make_user_span),
            sv.Step(
                "f", flaky, retry=sv.RetryPolicy(max_attempts=2, backoff=sv.Backoff.fixed(0.01))
            ),
            sv.Step("p", user_span_in_child, executor="process", needs=["a"]),
        ],
    )
    try:
        result = sv.run(wf, store=store)
        stored = store.load(result.run_id)
    finally:
        store.close()
    drawn = _attempts(stored, now=0.0)
    assert len(drawn) == 4
    for bar in drawn:
        span = spans.attempt(bar.step_id, bar.record.number)
        assert span.start_time == to_ns(bar.start)
        assert span.end_time == to_ns(bar.end)
    run = spans.one("run times")
    assert run.start_time == to_ns(stored.info.started)
    assert stored.info.ended is not None
    assert run.end_time == to_ns(stored.info.ended)


# -- without an SDK, and without the API -------------------------------------------------------


def _python(*parts: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run the (each indented) ``parts`` in a fresh interpreter; what it printed."""
    done = subprocess.run(
        [sys.executable, "-c", "\n".join(textwrap.dedent(p) for p in parts)],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


_WORKFLOW = """
    import sys
    import stepvisor as sv

    def otel_in_child(ctx):
        return {"child": sorted(m for m in sys.modules if m.startswith("opentelemetry"))}

    def user(ctx):
        from opentelemetry import trace
        with trace.get_tracer("user").start_as_current_span("mine") as span:
            return {"recording": span.is_recording()}

    def run(*steps):
        wf = sv.Workflow("w", steps=[sv.Step("c", otel_in_child, executor="process"), *steps])
        result = sv.run(wf)
        assert result.ok, result.error
        return result.artifacts
"""


def test_without_the_api_nothing_is_imported_and_runs_work(chdir_tmp: Path) -> None:
    blocker = """
        import sys

        class Block:
            tried = []

            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] == "opentelemetry":
                    Block.tried.append(name)
                    raise ModuleNotFoundError(f"No module named {name!r}")
                return None

        sys.meta_path.insert(0, Block())
    """
    check = """
        artifacts = run()
        parent = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
        print(parent, artifacts["child"], Block.tried)
    """
    # Not even tried: no code of this process imported opentelemetry.
    assert _python(blocker, _WORKFLOW, check, cwd=chdir_tmp) == "[] [] []"
    # A provider named in the environment is looked for, and its absence is no error.
    named = _python(
        blocker,
        _WORKFLOW,
        check,
        cwd=chdir_tmp,
        env={"OTEL_PYTHON_TRACER_PROVIDER": "sdk_tracer_provider"},
    )
    assert named == "[] [] ['opentelemetry']"


def test_with_the_api_and_no_sdk_nothing_is_recorded_or_carried(chdir_tmp: Path) -> None:
    check = """
        artifacts = run(sv.Step("u", user))
        parent = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
        print(artifacts["recording"], artifacts["child"], "stepvisor._otel" in sys.modules,
              [m for m in parent if "propagate" in m or "sdk" in m])
    """
    # The tracer was looked at once, found to be the API's no-op, and dropped:
    # no span, no carrier (the propagators were never loaded), the child untouched.
    out = _python("import opentelemetry.trace", _WORKFLOW, check, cwd=chdir_tmp)
    assert out == "False [] True []"


def test_with_no_sdk_in_this_process_no_span_is_exported(chdir_tmp: Path) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()  # made, but not the global provider
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
        result = sv.run(sv.Workflow("quiet", steps=[sv.Step("a", make_user_span)]))
        assert result.ok
        assert exporter.get_finished_spans() == ()
    finally:
        provider.shutdown()
