"""The run machine: every decision of one run, made from messages, returned as effects.

::

    shell (Supervisor actor)                      RunMachine.handle(message, now, wall)
      Start ─────────────────────────────────▶   BeginRun, AddSlot (n), Dispatch…, SetTimer
      AttemptDone (from a Worker) ───────────▶   classify ─▶ succeed | retry | end step
      DeadlineReached / GraceExpired ────────▶   StopAttempt, SetTimer(grace) | abandon slot
      RetryDue / RunDeadline / CancelRun ────▶   queue again | stop the run
      OutputsSaved (the store wrote, or not) ─▶  success final | failed step
                                          ◀───   SaveStep…, Emit…, Dispatch…, Finish

It decides dispatch (which ready step, on which slot, how many at once),
what an outcome means (success, a timeout, a cancel, a crash, an error), retry
or not (the step's policy, the crash limit, the run's retry budget), skips,
commits in canonical order, stopping and the final result.  It is *sans-I/O*:
it starts no thread, reads no clock (the time comes with each message), sets
no timer and touches no store; the shell carries out the effects in order.

State: the run's records, outputs and commit sequence are a persistent
:class:`~stepvisor.core.state.RunState` (``machine.state``: a snapshot that
never changes under its holder).  The working set (ready heaps, the in-flight
table, slot loads) is private and mutable: a persistent heap would cost more
per step than the whole dispatch does today.  ``snapshot()`` gives all of it
as a value, for tests that check a message changed nothing.

The rules that need a word:

* **Fencing.**  Every attempt is ``(step_id, attempt)`` on one slot; an outcome
  or timer for anything else changes nothing but a counter.
* **One rule for a stopped attempt.**  Once an attempt was asked to stop (its
  deadline, a cancel, a fail-fast stop, the run's deadline), it ends as the stop
  says (``timed_out`` or ``cancelled``) whatever it returns; what it returned is
  discarded and its record says so, so a resume runs the step again.
* **No retry while stopping**: a failure the policy would retry keeps its
  status, with a note saying why it was not retried.
* **Abandonment.**  An attempt still running a grace period after its stop
  request is abandoned; its slot is replaced so the bound holds, and retired
  when the attempt finally returns.  It is never retried (it may still run).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from stepvisor._log import log
from stepvisor.backends.base import AttemptResult, AttemptSpec
from stepvisor.config import Resolved
from stepvisor.core import _outcomes as oc
from stepvisor.core._events import Emitter
from stepvisor.core._finish import finish_effects, supervisor_failed_result
from stepvisor.core._inputs import Inputs
from stepvisor.core._retries import Retries
from stepvisor.core._slots import Slots
from stepvisor.core.effects import (
    AddSlot,
    AttemptOrder,
    BeginRun,
    CancelTimer,
    Dispatch,
    Effect,
    RetireSlot,
    SaveOutputs,
    SaveStep,
    SaveSteps,
    SetTimer,
    StopAttempt,
)
from stepvisor.core.messages import (
    AttemptDone,
    CancelRun,
    DeadlineReached,
    GraceExpired,
    Message,
    OutputsSaved,
    RetryDue,
    RunDeadline,
    Start,
)
from stepvisor.core.model import Step, Workflow
from stepvisor.core.result import RunResult
from stepvisor.core.state import AttemptRecord, RunState, RunStatus, StepRecord, StepStatus
from stepvisor.errors import StepTimeoutError, WorkerCrashedError
from stepvisor.policies.concurrency import Scheduler
from stepvisor.policies.retry import FailureKind, RetryPolicy

__all__ = ["BACKEND_GRACE_MARGIN", "Plan", "RunMachine"]

#: Prefetch (attempts queued behind a running one on a slot) is used only while
#: attempts take less than this on average: see ``_fill``.
PREFETCH_BELOW = 0.002
#: The most attempts handed to one slot in one Dispatch while prefetching.
PREFETCH_BATCH = 8
#: Extra time given to process/async/Ray backends past ``kill_grace`` before the
#: machine abandons their slot: their own kill path should win the race.
BACKEND_GRACE_MARGIN = 2.0

_NO_INPUTS: Mapping[str, Any] = MappingProxyType({})
_FAILED = (StepStatus.FAILED, StepStatus.TIMED_OUT)


@dataclass(frozen=True, slots=True)
class Plan:
    """What the machine needs to know about one run: values only."""

    workflow: Workflow
    settings: Resolved
    run_id: str
    seed: int
    executors: tuple[str, ...]  # by canonical rank
    payloads: Mapping[str, bytes] = field(default_factory=dict)
    restored: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    restored_records: Mapping[str, StepRecord] = field(default_factory=dict)
    #: Build events (the caller gave an ``on_event`` hook): skipped otherwise.
    emit_events: bool = False
    #: The store may refuse a step's outputs (it encodes them): a success with
    #: outputs is final only once ``OutputsSaved`` reports the write.
    store_may_refuse: bool = True


@dataclass(slots=True)
class _Inflight:
    rank: int
    attempt: int
    slot: str
    executor: str
    limit: float | None
    limit_is_run_deadline: bool
    #: When the attempt's deadline is due, on the machine's clock (None: no deadline).
    deadline_at: float | None = None
    reason: str | None = None  # "timeout" or "cancel" once a stop was requested
    timers: list[tuple[Any, ...]] = field(default_factory=list)
    #: A success waiting for its outputs to be written: (record, outputs, base).
    saving: tuple[StepRecord, Mapping[str, Any], dict[str, Any]] | None = None


class RunMachine:
    """One run's decisions.  Feed it messages with :meth:`handle`; carry out what it returns."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.wf = plan.workflow
        self.graph = graph = plan.workflow.graph
        self.cfg = cfg = plan.settings
        self.state = RunState.initial(plan.run_id, self.wf.id, graph.order, graph.rank)
        self.sched = Scheduler(
            graph,
            max_parallel=cfg.max_parallel,
            pool_of=[self._step(r).pool for r in range(len(graph.order))],
            pool_limits=cfg.pools,
        )
        self._inflight: dict[str, _Inflight] = {}
        self._saving: dict[str, _Inflight] = {}
        self._slots = Slots()
        self._inputs = Inputs(graph)
        self._retries = Retries(cfg, plan.seed)
        self._events = Emitter(plan.run_id, on=plan.emit_events)
        # Prefetch is safe only where queueing cannot change what an attempt
        # means: thread and process steps with no deadline of any kind.
        self._prefetch_capable = (
            cfg.deadline is None
            and cfg.step_timeout is None
            and all(ex in ("thread", "process") for ex in plan.executors)
            and all(step.timeout is None for step in self.wf.steps)
        )
        self._avg_duration = 0.0
        self._done_count = 0
        self._errors: dict[str, list[BaseException]] = {}
        self.stopping = False
        self._stop_status = RunStatus.FAILED
        self.stop_note = ""
        self._deadline_passed = False
        self.finished = False
        self._run_deadline: float | None = None
        self._started_wall = 0.0
        self.discarded = 0
        self._now = 0.0
        self._wall = 0.0
        self._fx: list[Effect] = []
        self._handlers: dict[type, Callable[[Any], None]] = {
            AttemptDone: self._on_done,
            OutputsSaved: self._on_saved,
            DeadlineReached: self._on_deadline,
            GraceExpired: self._on_grace,
            RetryDue: self._on_retry_due,
            RunDeadline: self._on_run_deadline,
            CancelRun: self._on_cancel,
            Start: self._on_start,
        }

    # -- the one entry point ---------------------------------------------------------

    def handle(self, message: Message, *, now: float, wall: float) -> list[Effect]:
        """Apply ``message`` at monotonic time ``now`` (wall clock ``wall``); return effects."""
        self._now = now
        self._wall = wall
        fx = self._fx = []
        if self.finished:
            if type(message) is AttemptDone and self._slots.returned(message.worker):
                fx.append(RetireSlot(message.worker))
            return fx
        handler = self._handlers.get(type(message))
        if handler is None:
            log.warning("the run machine ignored an unexpected message %r", message)
            return fx
        handler(message)
        self._fill()
        self._maybe_finish()
        return fx

    def failed_result(self, error: BaseException, *, wall: float) -> RunResult:
        """The result to give the caller if the shell itself broke (a stepvisor bug)."""
        self.finished = True
        return supervisor_failed_result(
            self.state, error, seed=self.plan.seed, started=self._started_wall, ended=wall
        )

    def snapshot(self) -> tuple[Any, ...]:
        """Everything the machine knows, as a comparable value (for tests)."""
        return (
            self.state,
            sorted((sid, repr(inf)) for sid, inf in self._inflight.items()),
            sorted(self._saving),
            self._slots.snapshot(),
            tuple(sorted(self._retries.waiting.items())),
            self._retries.used,
            self.sched.ready_count,
            self.sched.running,
            self.stopping,
            self.finished,
        )

    @property
    def running(self) -> int:
        """Attempts counted against the bound right now."""
        return self.sched.running

    def _step(self, rank: int) -> Step:
        return self.wf.steps[self.graph.step_at_rank[rank]]

    def _policy(self, step: Step) -> RetryPolicy:
        return step.retry or self.cfg.retry

    # -- start and dispatch ------------------------------------------------------------

    def _on_start(self, _: Start) -> None:
        plan, fx = self.plan, self._fx
        self._started_wall = self._wall
        restored: list[int] = []
        for sid in self.graph.order:
            old = plan.restored_records.get(sid)
            if old is not None and sid in plan.restored:
                record = old._replace(status=StepStatus.SUCCEEDED, restored=True)
                self.state = self.state.set_step(record).set_outputs(sid, plan.restored[sid])
                restored.append(self.graph.rank[sid])
        for r in sorted(restored):
            self._inputs.publish(r, self.state.output(self.graph.order[r]))
        records = tuple(self.state.record(sid) for sid in self.graph.order)
        fx.append(BeginRun(self._wall, records, bool(restored)))
        self._events.started(
            fx,
            workflow_id=self.wf.id,
            seed=plan.seed,
            settings=self.cfg.jsonable(),
            resumed=bool(restored),
            wall=self._wall,
        )
        left = len(self.graph.order) - len(restored)
        for _slot in range(min(self.cfg.max_parallel, max(1, left))):
            fx.append(AddSlot(self._slots.add()))
        self.sched.initial_ready(restored)
        self._commit()
        if self.cfg.deadline is not None:
            self._run_deadline = self._now + self.cfg.deadline
            fx.append(SetTimer(("run",), self.cfg.deadline, RunDeadline()))

    def _fill(self) -> None:
        """Hand ready steps to idle slots; for tiny steps, several at a time.

        Waking an idle Worker costs a futex wake, which on a virtual machine
        costs more than running a no-op step.  So when a run has only thread or
        process steps without deadlines and its attempts take under
        ``PREFETCH_BELOW`` on average, an idle slot is handed a batch of up to
        ``PREFETCH_BATCH`` attempts (a fair share of what is ready), which its
        Worker runs one after the other.  At most ``max_parallel`` attempts
        still *run* at once (one per slot), pools stay strict (queued attempts
        count against them), and attempts with a deadline are never queued.
        """
        free = self._slots.free
        while not self.stopping and free:
            batch = 1
            if (
                self._prefetch_capable
                and self._done_count >= self.cfg.max_parallel
                and self._avg_duration < PREFETCH_BELOW
            ):
                batch = max(1, min(PREFETCH_BATCH, -(-self.sched.ready_count // len(free))))
            slot = free[-1]
            orders: list[AttemptOrder] = []
            while len(orders) < batch:
                r = self.sched.take(limit=self.cfg.max_parallel * batch)
                if r is None:
                    break
                orders.append(self._dispatch(r, slot))
            if not orders:
                return
            free.pop()
            self._fx.append(Dispatch(slot, tuple(orders)))

    def _dispatch(self, r: int, slot: str) -> AttemptOrder:
        """Record the start of ``r``'s next attempt on ``slot``; return its order."""
        step = self._step(r)
        sid = step.id
        record = self.state.record(sid)
        attempt = record.attempt_count + 1
        now = self._now
        timeout = step.timeout if step.timeout is not None else self.cfg.step_timeout
        deadline = now + timeout if timeout is not None else None
        on_run_deadline = False
        if self._run_deadline is not None and (deadline is None or self._run_deadline < deadline):
            deadline = self._run_deadline
            on_run_deadline = True
        inputs = self._inputs.of(r)
        self._slots.load[slot] += 1
        spec = AttemptSpec(
            run_id=self.plan.run_id,
            step_id=sid,
            attempt=attempt,
            max_attempts=self._policy(step).max_attempts,
            fn=step.fn,
            is_async=step.is_async,
            inputs=MappingProxyType({name: value for name, (_, value) in inputs.items()})
            if inputs
            else _NO_INPUTS,
            params=step.params,
            deadline=None,
            kill_grace=self.cfg.kill_grace,
            fn_payload=self.plan.payloads.get(sid),
            resources=step.resources,
        )
        executor = self.plan.executors[r]
        inf = _Inflight(
            rank=r,
            attempt=attempt,
            slot=slot,
            executor=executor,
            limit=(self.cfg.deadline if on_run_deadline else timeout),
            limit_is_run_deadline=on_run_deadline,
            deadline_at=deadline,
        )
        self._inflight[sid] = inf
        record = record.with_attempt_started(
            AttemptRecord(number=attempt, started=self._wall, worker=slot)
        )
        self.state = self.state.set_step(record)
        self._fx.append(SaveStep(record))
        self._events.dispatched(self._fx, sid, attempt, slot, self._wall)
        budget = None
        if deadline is not None:
            budget = deadline - now
            key = ("deadline", sid, attempt)
            inf.timers.append(key)
            self._fx.append(SetTimer(key, budget, DeadlineReached(sid, attempt)))
        return AttemptOrder(spec, executor, budget)

    # -- outcomes ------------------------------------------------------------------

    def _fenced(self, step_id: str, attempt: int) -> _Inflight | None:
        inf = self._inflight.get(step_id)
        if inf is None or inf.attempt != attempt:
            return None
        return inf

    def _close(self, sid: str, inf: _Inflight) -> None:
        del self._inflight[sid]
        for key in inf.timers:
            self._fx.append(CancelTimer(key))
        self.sched.release(inf.rank)

    def _on_done(self, msg: AttemptDone) -> None:
        if self._slots.returned(msg.worker):
            self._fx.append(RetireSlot(msg.worker))
        self._done_count += 1
        self._avg_duration += (msg.duration - self._avg_duration) / min(self._done_count, 10)
        inf = self._fenced(msg.step_id, msg.attempt)
        if inf is None or inf.slot != msg.worker:
            self.discarded += 1
            log.info(
                "discarded a late outcome (%s) of step %r attempt %d: that attempt already ended",
                msg.result.kind,
                msg.step_id,
                msg.attempt,
            )
            return
        self._close(msg.step_id, inf)
        result = msg.result
        base = {"started": msg.started_wall, "ended": msg.ended_wall, "duration": msg.duration}
        reason = inf.reason
        if reason is None and result.kind == "cancelled":
            # The backend stopped it on its own: its safety net at the deadline
            # (a StepTimeoutError), or a cancel it saw before the machine asked.
            reason = "timeout" if isinstance(result.error, StepTimeoutError) else "cancel"
        if reason is not None:
            self._stopped(inf, reason, result, base)
        elif result.kind == "ok":
            self._on_ok(msg.step_id, inf, result.outputs or {}, base)
        elif result.kind == "crash":
            error = result.error or WorkerCrashedError(
                f"the worker running step {msg.step_id!r} died",
                step_id=msg.step_id,
                attempt=inf.attempt,
            )
            self._fail(inf, error, FailureKind.CRASH, StepStatus.FAILED, "crashed", base=base)
        else:
            error = result.error or RuntimeError(
                f"step {msg.step_id!r} failed without an exception"
            )
            kind = None if result.kind == "unsendable" else FailureKind.ERROR
            self._fail(
                inf, error, kind, StepStatus.FAILED, "failed", base=base, traceback=result.traceback
            )

    def _stopped(
        self, inf: _Inflight, reason: str, result: AttemptResult, base: dict[str, Any]
    ) -> None:
        """The one rule for an attempt that ended after it was asked to stop."""
        step = self._step(inf.rank)
        discarded = result.kind == "ok"
        what = oc.stop_outcome(reason, inf.executor, result.note, result.outputs, discarded)
        error: BaseException
        kind: FailureKind | None = None
        if reason == "timeout":
            error = oc.timeout_error(
                step.id,
                inf.attempt,
                self._policy(step).max_attempts,
                limit=inf.limit,
                run_deadline=inf.limit_is_run_deadline,
                what=what,
            )
            kind, status, outcome = FailureKind.TIMEOUT, StepStatus.TIMED_OUT, "timed_out"
        else:
            why = self.stop_note or "the run stopped"
            error = oc.cancelled_error(step.id, inf.attempt, what, why=why)
            status, outcome = StepStatus.CANCELLED, "cancelled"
        if result.error is not None:
            error.__cause__ = result.error
        extra = oc.DISCARDED_AFTER_STOP if discarded else None
        self._fail(inf, error, kind, status, outcome, base=base, extra_note=extra)

    def _on_ok(
        self, sid: str, inf: _Inflight, outputs: Mapping[str, Any], base: dict[str, Any]
    ) -> None:
        record = self.state.record(sid)
        attempt = oc.closed(record.attempts[-1], outcome="succeeded", **base)
        record = record.with_last_attempt(attempt, StepStatus.SUCCEEDED)
        if outputs and self.plan.store_may_refuse:
            inf.saving = (record, outputs, base)
            self._saving[sid] = inf
            self._fx.append(SaveOutputs(record, outputs, inf.attempt))
            return
        self._fx.append(SaveStep(record, outputs))
        self._succeeded(inf.rank, record, outputs)

    def _on_saved(self, msg: OutputsSaved) -> None:
        inf = self._saving.get(msg.step_id)
        if inf is None or inf.attempt != msg.attempt or inf.saving is None:
            return
        del self._saving[msg.step_id]
        record, outputs, base = inf.saving
        if msg.error is None:
            self._succeeded(inf.rank, record, outputs)
        else:
            self._fail(inf, msg.error, None, StepStatus.FAILED, "failed", base=base)

    def _succeeded(self, r: int, record: StepRecord, outputs: Mapping[str, Any]) -> None:
        self.state = self.state.set_step(record).set_outputs(record.step_id, outputs)
        self._inputs.publish(r, outputs)
        self.sched.succeeded(r)
        self._events.finished(self._fx, record, self._wall)
        self._commit()

    def _fail(
        self,
        inf: _Inflight,
        error: BaseException,
        kind: FailureKind | None,
        status: StepStatus,
        outcome: str,
        *,
        base: dict[str, Any],
        traceback: str | None = None,
        extra_note: str | None = None,
    ) -> None:
        """Record a failed attempt, then retry it or end the step with ``status``.

        ``kind`` is ``None`` for failures that are never retried (cancelled,
        abandoned, unsendable, refused by the store).
        """
        step = self._step(inf.rank)
        sid = step.id
        self._errors.setdefault(sid, []).append(error)
        delay: float | None = None
        reason = ""
        if kind is not None and not self.stopping:
            delay, reason = self._retries.delay(sid, self._policy(step), error, kind, inf.attempt)
        elif kind is not None:
            # The step keeps the status its attempt earned, but the record says
            # why a failure its policy might have retried was not: the run is
            # stopping, and a retry would start new work in a run being torn down.
            reason = f"{oc.NOT_RETRIED_STOPPING} ({self.stop_note or 'the run stopped'})"
        if extra_note:
            reason = f"{reason}; {extra_note}" if reason else extra_note
        record = self.state.record(sid)
        described = (oc.type_name(error), str(error))
        attempt = oc.closed(
            record.attempts[-1],
            outcome=outcome,
            error_type=described[0],
            error_message=described[1],
            error_traceback=traceback or oc.traceback_text(error),
            delay_after=delay,
            note=reason or None,
            **base,
        )
        if delay is None:
            self._end_step(inf.rank, record.with_last_attempt(attempt, status))
            return
        record = record.with_last_attempt(attempt, StepStatus.WAITING_RETRY)
        self.state = self.state.set_step(record)
        self._fx.append(SaveStep(record))
        self._retries.waiting[sid] = inf.attempt
        self._fx.append(SetTimer(("retry", sid, inf.attempt), delay, RetryDue(sid, inf.attempt)))
        self._events.retrying(
            self._fx, sid, inf.attempt, delay=delay, error=described, wall=self._wall
        )

    def _end_step(self, r: int, record: StepRecord) -> None:
        """Give a step its terminal (non-success) status and apply the failure policy."""
        sid = record.step_id
        self._retries.waiting.pop(sid, None)
        errors = self._errors.get(sid, [])
        for i, earlier in enumerate(errors[:-1], start=1):
            oc.add_note(errors[-1], f"attempt {i} failed: {oc.type_name(earlier)}: {earlier}")
        self.state = self.state.set_step(record)
        self._fx.append(SaveStep(record))
        self._inputs.forget(r)
        self._events.finished(self._fx, record, self._wall)
        if record.status in _FAILED:
            if self.cfg.on_failure == "fail_fast":
                self._begin_stop(
                    RunStatus.FAILED,
                    f"step {sid!r} {record.status.value} and on_failure is fail_fast",
                )
            else:
                self._skip_dependents(r, sid, record.status)
        self._commit()

    def _skip_dependents(self, r: int, sid: str, status: StepStatus) -> None:
        records: list[StepRecord] = []
        for d in sorted(self.graph.descendants(r)):
            dep_id = self.graph.order[d]
            current = self.state.record(dep_id)
            if current.terminal or dep_id in self._inflight or dep_id in self._saving:
                continue
            records.append(
                current.with_status(
                    StepStatus.SKIPPED, f"skipped: it depends on {sid!r}, which {status.value}"
                )
            )
        if records:
            self.state = self.state.set_steps(records)
            self._fx.append(SaveSteps(tuple(records)))
            for rec in records:
                self._events.finished(self._fx, rec, self._wall)

    def _commit(self) -> None:
        self.state, done = self.state.commit_ready()
        self._events.committed(self._fx, self.state, done)

    # -- deadlines, retries, cancel -------------------------------------------------

    def _grace_for(self, executor: str) -> float:
        if executor == "thread":
            return self.cfg.kill_grace
        return self.cfg.kill_grace + BACKEND_GRACE_MARGIN

    def _request_stop(self, sid: str, inf: _Inflight, reason: str) -> None:
        if inf.reason is not None:
            return
        inf.reason = reason
        self._fx.append(StopAttempt(sid, inf.attempt, reason))
        grace = self._grace_for(inf.executor)
        if reason == "timeout" and inf.deadline_at is not None:
            # Count the grace from when the deadline was due, not from when this
            # message was handled: a busy shell must not stretch it.
            grace = max(0.0, inf.deadline_at + grace - self._now)
        key = ("grace", sid, inf.attempt)
        inf.timers.append(key)
        self._fx.append(SetTimer(key, grace, GraceExpired(sid, inf.attempt)))

    def _on_deadline(self, msg: DeadlineReached) -> None:
        inf = self._fenced(msg.step_id, msg.attempt)
        if inf is not None:
            self._request_stop(msg.step_id, inf, "timeout")

    def _on_run_deadline(self, _: RunDeadline) -> None:
        self._deadline_passed = True
        for sid, inf in list(self._inflight.items()):
            self._request_stop(sid, inf, "timeout")
        self._begin_stop(RunStatus.FAILED, f"the run exceeded its {self.cfg.deadline:g} s deadline")

    def _on_cancel(self, msg: CancelRun) -> None:
        if not msg.through_store:
            self._begin_stop(RunStatus.CANCELLED, f"cancelled: {msg.reason}")
        elif not self.stopping:
            self._begin_stop(RunStatus.CANCELLED, "cancelled through the store")

    def _on_grace(self, msg: GraceExpired) -> None:
        inf = self._fenced(msg.step_id, msg.attempt)
        if inf is None:
            return
        self._close(msg.step_id, inf)
        if self._slots.abandon(inf.slot):
            self._fx.append(AddSlot(self._slots.add()))
        step = self._step(inf.rank)
        what = oc.abandoned_what(inf.executor, self._grace_for(inf.executor))
        record = self.state.record(step.id)
        started = record.attempts[-1].started if record.attempts else self._wall
        base = {"ended": self._wall, "duration": max(0.0, self._wall - started)}
        log.warning("step %r attempt %d: %s", step.id, inf.attempt, what)
        error: BaseException
        if inf.reason == "timeout":
            error = oc.timeout_error(
                step.id,
                inf.attempt,
                self._policy(step).max_attempts,
                limit=inf.limit,
                run_deadline=inf.limit_is_run_deadline,
                what=what,
            )
            status, outcome = StepStatus.TIMED_OUT, "timed_out"
        else:
            error = oc.cancelled_error(step.id, inf.attempt, what)
            status, outcome = StepStatus.CANCELLED, "cancelled"
        self._fail(inf, error, None, status, outcome, base=base)
        last = self.state.record(step.id)
        if last.attempts:
            noted = last.attempts[-1]._replace(note="abandoned")
            self.state = self.state.set_step(last.with_last_attempt(noted, last.status))
            self._fx.append(SaveStep(self.state.record(step.id)))

    def _on_retry_due(self, msg: RetryDue) -> None:
        if not self.stopping and self._retries.due(msg.step_id, msg.attempt):
            self.sched.push(self.graph.rank[msg.step_id])

    def _begin_stop(self, status: RunStatus, note: str) -> None:
        if self.stopping:
            if status is RunStatus.CANCELLED and self._stop_status is not RunStatus.CANCELLED:
                # A cancel during a fail-fast stop: it is still a cancelled run.
                self._stop_status = status
            return
        self.stopping = True
        self._stop_status = status
        self.stop_note = note
        log.info("run %s stopping: %s", self.plan.run_id, note)
        for sid, attempt in self._retries.waiting.items():
            self._fx.append(CancelTimer(("retry", sid, attempt)))
        self.sched.drain_ready()
        for sid, inf in list(self._inflight.items()):
            self._request_stop(sid, inf, "cancel")

    # -- finish --------------------------------------------------------------------

    def _maybe_finish(self) -> None:
        if self._inflight or self._saving:
            return
        if not self.stopping and (self.sched.ready_count or self._retries.waiting):
            return
        self.finished = True
        note = f"cancelled: {self.stop_note}" if self.stopping else "cancelled: never became ready"
        leftovers = [
            record.with_status(StepStatus.CANCELLED, note)
            for record in map(self.state.record, self.graph.order)
            if not record.terminal
        ]
        if leftovers:
            self.state = self.state.set_steps(leftovers)
            self._fx.append(SaveSteps(tuple(leftovers)))
            for record in leftovers:
                self._events.finished(self._fx, record, self._wall)
        self._commit()
        self.state, effects = finish_effects(
            self.state,
            stop=self._stop_status if self.stopping else None,
            stop_note=self.stop_note,
            deadline_passed=self._deadline_passed,
            errors=self._errors,
            started=self._started_wall,
            ended=self._wall,
            discarded=self.discarded,
            emit_events=self.plan.emit_events,
            seed=self.plan.seed,
            settings=self.cfg.jsonable(),
        )
        self._fx.extend(effects)
