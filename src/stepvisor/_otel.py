"""OpenTelemetry spans for a run, its steps and their attempts (the ``otel`` extra).

Imported only when OpenTelemetry's API is importable and a tracer provider may
have been set (see ``_run_tracer`` in :mod:`stepvisor._runtime`), and then used
only when one was: with the API's default (proxy, no SDK) provider a run gets
no :class:`RunTracer` at all, so it pays nothing per step.

::

    sv.start (caller's thread)    Supervisor thread (events, in order)        backends
      run_tracer(): capture  ──▶  RunStarted      → span "run <workflow>"
      the caller's context        StepDispatched  → span "step <id>" (first)
                                                   + span "attempt <id>"
                                  Dispatch        → carrier(step, attempt)  ──▶ spec.trace
                                  StepRetrying    → end the attempt; "retry"    attach around
                                  StepFinished    → end the attempt and step    the step call
                                  RunFinished     → end the run

The spans' times are the attempt records' (``AttemptRecord.started`` and
``ended``, wall-clock seconds), the same values the HTML report draws, so the
trace and the report agree.  An attempt's error is recorded from its record
too: its type, message and traceback as the report shows them (for a process
or Ray step, the traceback from where it ran).  A span's context travels to
the step as a W3C ``traceparent`` carrier made with the API's propagator, so
spans a step creates nest under its attempt, on every backend.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import NoOpTracerProvider, ProxyTracerProvider, Span, StatusCode

from stepvisor._log import log
from stepvisor.core.events import (
    Event,
    RunFinished,
    RunStarted,
    StepCommitted,
    StepDispatched,
    StepExpanded,
    StepFinished,
    StepRetrying,
)
from stepvisor.core.records import parse_instance_id
from stepvisor.core.state import AttemptRecord, RunState

__all__ = ["RecordedError", "RunTracer", "run_tracer", "to_ns"]

#: The instrumentation scope's name, as a collector shows it.
SCOPE: Final = "stepvisor"
#: Attempt outcomes that are failures (status ERROR, an ``exception`` event).
_ERRORS: Final = frozenset({"failed", "timed_out", "crashed"})
#: Step statuses that are failures.
_FAILED_STEPS: Final = frozenset({"failed", "timed_out"})


def to_ns(seconds: float) -> int:
    """Wall-clock seconds (a record's time) as the nanoseconds a span takes."""
    return round(seconds * 1e9)


class RecordedError(Exception):
    """An attempt's error as its record keeps it: the span's ``exception`` event says its type.

    The run's records hold an error's type, message and traceback as text (a
    process step's exception may not even exist in this process), and the
    report shows that text; the trace shows the same.
    """


def run_tracer(run_id: str, workflow_id: str, executors: Mapping[str, str]) -> RunTracer | None:
    """A tracer for one run, or ``None`` when no tracer provider is set (the API's no-op).

    Called on the caller's thread at ``sv.start``: the caller's current
    context (its active span, its baggage) becomes the run span's parent.
    """
    provider = trace.get_tracer_provider()
    if isinstance(provider, ProxyTracerProvider | NoOpTracerProvider):
        return None
    from stepvisor import __version__  # noqa: PLC0415 - the package is loaded by now

    try:
        tracer = provider.get_tracer(SCOPE, __version__)
    except Exception:  # a broken provider must not stop the run
        log.exception("the tracer provider gave no tracer; run %s is not traced", run_id)
        return None
    return RunTracer(
        tracer,
        run_id=run_id,
        workflow_id=workflow_id,
        executors=executors,
        parent=otel_context.get_current(),
    )


class RunTracer:
    """Turns one run's events into spans, and gives each attempt its trace carrier.

    Used only on the Supervisor's thread.  Nothing it does may stop a run: an
    exception here (a broken exporter, a stepvisor bug) is logged and dropped.
    """

    def __init__(
        self,
        tracer: trace.Tracer,
        *,
        run_id: str,
        workflow_id: str,
        executors: Mapping[str, str],
        parent: otel_context.Context,
    ) -> None:
        self._tracer = tracer
        self._executors = executors
        self._parent = parent
        self._base: dict[str, Any] = {
            "stepvisor.run_id": run_id,
            "stepvisor.workflow": workflow_id,
        }
        self._workflow = workflow_id
        self._run: Span | None = None
        self._run_context = parent
        self._steps: dict[str, tuple[Span, otel_context.Context]] = {}
        self._attempts: dict[tuple[str, int], Span] = {}
        self._handlers: dict[type, Any] = {
            RunStarted: self._run_started,
            StepDispatched: self._dispatched,
            StepRetrying: self._retrying,
            StepFinished: self._step_finished,
            StepCommitted: _ignore,
            StepExpanded: _ignore,  # its instances' own events make their spans
            RunFinished: self._run_finished,
        }

    # -- what the Supervisor calls -------------------------------------------------

    def event(self, event: Event, state: RunState) -> None:
        """Start or end the spans ``event`` says; ``state`` holds the attempt records."""
        try:
            self._handlers[type(event)](event, state)
        except Exception:
            log.exception("tracing %s failed; the run goes on", type(event).__name__)

    def carrier(self, step_id: str, attempt: int) -> dict[str, str] | None:
        """The W3C trace context of this attempt's span, for the backend to attach."""
        span = self._attempts.get((step_id, attempt))
        if span is None:
            return None
        from opentelemetry import propagate  # noqa: PLC0415 - loads propagators: only when used

        carrier: dict[str, str] = {}
        try:
            propagate.inject(carrier, context=trace.set_span_in_context(span, self._parent))
        except Exception:
            log.exception("making the trace carrier of %r failed; the step runs untraced", step_id)
            return None
        return carrier

    # -- events ---------------------------------------------------------------------

    def _run_started(self, event: RunStarted, _: RunState) -> None:
        self._run = span = self._tracer.start_span(
            f"run {self._workflow}",
            context=self._parent,
            attributes={**self._base, "stepvisor.resumed": event.resumed},
            start_time=to_ns(event.time),
        )
        self._run_context = trace.set_span_in_context(span, self._parent)

    def _step_span(self, step_id: str, start: float) -> tuple[Span, otel_context.Context]:
        """The span of a step, made at ``start`` when first asked for.

        An instance of a mapped step (``score[7]``) nests under its step's span,
        which begins with its first instance and ends when the step does.
        """
        found = self._steps.get(step_id)
        if found is None:
            parsed = parse_instance_id(step_id)
            parent = self._run_context if parsed is None else self._step_span(parsed[0], start)[1]
            span = self._tracer.start_span(
                f"step {step_id}",
                context=parent,
                attributes={
                    **self._base,
                    "stepvisor.step_id": step_id,
                    "stepvisor.executor": self._executor_of(step_id),
                },
                start_time=to_ns(start),
            )
            found = self._steps[step_id] = (span, trace.set_span_in_context(span, self._parent))
        return found

    def _executor_of(self, step_id: str) -> str:
        """The executor of a step, or of the mapped step an instance belongs to."""
        parsed = parse_instance_id(step_id)
        return self._executors.get(step_id if parsed is None else parsed[0], "")

    def _dispatched(self, event: StepDispatched, state: RunState) -> None:
        sid = event.step_id
        started = _attempt(state, sid, event.attempt).started
        _step, step_context = self._step_span(sid, started)
        self._attempts[sid, event.attempt] = self._tracer.start_span(
            f"attempt {sid}",
            context=step_context,
            attributes={
                **self._base,
                "stepvisor.step_id": sid,
                "stepvisor.attempt": event.attempt,
                "stepvisor.executor": self._executor_of(sid),
                "stepvisor.worker": event.worker,
            },
            start_time=to_ns(started),
        )

    def _retrying(self, event: StepRetrying, state: RunState) -> None:
        self._end_attempt(event.step_id, event.attempt, state)
        found = self._steps.get(event.step_id)
        if found is not None:
            found[0].add_event(
                "stepvisor.retry",
                {
                    "stepvisor.attempt": event.attempt,
                    "stepvisor.retry.delay": event.delay,
                    "error.type": event.error_type,
                },
                timestamp=to_ns(event.time),
            )

    def _step_finished(self, event: StepFinished, state: RunState) -> None:
        sid = event.step_id
        if event.attempts:
            self._end_attempt(sid, event.attempts, state)
        record = state.record(sid)
        span, _ = self._step_span(sid, event.time)  # a step that never ran: a point in time
        span.set_attribute("stepvisor.outcome", event.status)
        span.set_attribute("stepvisor.attempts", event.attempts)
        if record.note:
            span.set_attribute("stepvisor.note", record.note)
        if record.cache_note is not None:  # a cached step: reused (from which run) or why not
            span.set_attribute("stepvisor.cache.note", record.cache_note)
            span.set_attribute("stepvisor.cache.reused", record.reused_from is not None)
            if record.reused_from is not None:
                span.set_attribute("stepvisor.cache.reused_from", record.reused_from)
        if event.status == "cancelled":
            _mark_cancelled(span, record.note, event.time)
        if event.status in _FAILED_STEPS:
            span.set_attribute("error.type", event.error_type or event.status)
            span.set_status(StatusCode.ERROR, f"{event.error_type}: {event.error_message}")
        last = record.last_attempt
        end = max(event.time, last.ended or event.time) if last is not None else event.time
        span.end(end_time=to_ns(end))
        del self._steps[sid]

    def _run_finished(self, event: RunFinished, state: RunState) -> None:
        # Every step ended before the run did; this only guards against a bug.
        for sid, attempt in list(self._attempts):
            self._end_attempt(sid, attempt, state)
        for span, _ in self._steps.values():
            span.end(end_time=to_ns(event.time))
        self._steps.clear()
        run = self._run
        if run is None:
            return
        run.set_attribute("stepvisor.outcome", event.status)
        if event.status == "cancelled":
            _mark_cancelled(run, event.error, event.time)
        elif event.status == "failed":
            run.set_status(StatusCode.ERROR, event.error or "the run failed")
        run.end(end_time=to_ns(event.time))
        self._run = None

    # -- attempts -----------------------------------------------------------------------

    def _end_attempt(self, step_id: str, number: int, state: RunState) -> None:
        span = self._attempts.pop((step_id, number), None)
        if span is None:
            return
        rec = _attempt(state, step_id, number)
        _move_start(span, to_ns(rec.started))
        end = to_ns(rec.ended if rec.ended is not None else rec.started)
        outcome = rec.outcome or "unfinished"
        span.set_attribute("stepvisor.outcome", outcome)
        if rec.note:
            span.set_attribute("stepvisor.note", rec.note)
        if outcome == "timed_out":
            span.add_event("stepvisor.timeout", timestamp=end)
        elif outcome == "cancelled":
            span.add_event(
                "stepvisor.cancelled", {"stepvisor.note": rec.error_message or ""}, timestamp=end
            )
        if rec.note == "abandoned":
            span.add_event("stepvisor.abandoned", timestamp=end)
        if outcome in _ERRORS:
            error_type = rec.error_type or outcome
            span.set_attribute("error.type", error_type)
            span.record_exception(
                RecordedError(rec.error_message or ""),
                attributes={
                    "exception.type": error_type,
                    "exception.message": rec.error_message or "",
                    "exception.stacktrace": rec.error_traceback or "",
                },
                timestamp=end,
            )
            span.set_status(StatusCode.ERROR, f"{error_type}: {rec.error_message or ''}")
        span.end(end_time=end)


def _mark_cancelled(span: Span, note: str | None, when: float) -> None:
    """The moment a step or run was cancelled, with why, as an event on its span."""
    span.add_event("stepvisor.cancelled", {"stepvisor.note": note or ""}, timestamp=to_ns(when))


def _move_start(span: Span, start: int) -> None:
    """Give an attempt span the start its closed record has (when its Worker began it).

    The span must exist from the dispatch on, since its context goes to the
    step; but the record's start moves from the dispatch to the moment the
    Worker began the attempt (later, for an attempt queued behind another),
    and that is the time the report draws.  The API cannot move a span's
    start, so this sets the SDK span's own field: with another implementation
    of the API the span keeps the dispatch time.
    """
    if getattr(span, "_start_time", None) is not None and span.is_recording():
        span._start_time = start  # type: ignore[attr-defined]


def _attempt(state: RunState, step_id: str, number: int) -> AttemptRecord:
    attempts = state.record(step_id).attempts
    if len(attempts) >= number and attempts[number - 1].number == number:
        return attempts[number - 1]
    return next(a for a in reversed(attempts) if a.number == number)


def _ignore(_event: Event, _state: RunState) -> None:
    """Commits are the run's history, not time spent: no span."""
