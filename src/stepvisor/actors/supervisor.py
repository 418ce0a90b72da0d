"""The Supervisor actor: owns one run's state and decides everything about it.

All decisions happen here, on one thread, in reaction to messages::

    Start ──> queue ready steps ──> RunAttempt ──> Worker ──> AttemptDone ──┐
      ^                                                                      │
      └── fill free slots <── commit in canonical order <── settle outcome <─┘
                                        │
    DeadlineReached / GraceExpired / RetryDue / RunDeadline / CancelRun / Heartbeat

* Every dispatch is fenced by ``(step_id, attempt)``: an outcome for an
  attempt that already timed out, was cancelled or abandoned is discarded.
* A deadline (or a cancel) *asks* the backend to stop the attempt, then waits
  for the Worker to report; a thread step that ignores the request past the
  grace period is abandoned and its Worker replaced, so the bound holds.
* Step transitions are written to the store as they happen; the merged
  artifacts and the commit sequence follow canonical order.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import pykka
from pyrsistent import pmap
from pyrsistent.typing import PMap

from stepvisor._log import log
from stepvisor.actors.messages import (
    AttemptDone,
    CancelRun,
    DeadlineReached,
    GraceExpired,
    Heartbeat,
    RetryDue,
    RunAttempt,
    RunBatch,
    RunDeadline,
    Start,
)
from stepvisor.actors.worker import Worker, WorkerServices
from stepvisor.backends.base import AttemptSpec
from stepvisor.clock import Clock, TimerHandle
from stepvisor.config import Resolved
from stepvisor.context import AttemptControl
from stepvisor.core.events import (
    Event,
    RunFinished,
    RunStarted,
    StepCommitted,
    StepDispatched,
    StepFinished,
    StepRetrying,
)
from stepvisor.core.model import Step, Workflow
from stepvisor.core.result import RunResult
from stepvisor.core.state import (
    AttemptRecord,
    RunState,
    RunStatus,
    StepRecord,
    StepStatus,
)
from stepvisor.errors import (
    ArtifactCodecError,
    StepCancelledError,
    StepTimeoutError,
    WorkerCrashedError,
)
from stepvisor.policies.concurrency import Scheduler
from stepvisor.policies.retry import FailureKind, RetryPolicy
from stepvisor.store.base import RunInfo, RunStore

__all__ = ["RunPlan", "Supervisor"]


#: A merged view of artifacts: name -> (canonical rank of its creator, value).
Visible = PMap[str, tuple[int, Any]]
_EMPTY: Visible = pmap()
_NO_INPUTS: Mapping[str, Any] = MappingProxyType({})

#: How often the Supervisor writes a heartbeat and looks for cancel requests.
HEARTBEAT_INTERVAL = 0.5
#: Prefetch (a second attempt queued behind a running one on a Worker) is used
#: only while attempts take less than this on average: see ``_fill``.
PREFETCH_BELOW = 0.002
#: The most attempts handed to one Worker in one message while prefetching.
PREFETCH_BATCH = 8
#: Extra time given to process/async/Ray backends past ``kill_grace`` before the
#: Supervisor abandons their Worker: their own kill path should win the race.
BACKEND_GRACE_MARGIN = 2.0
#: The note on an attempt whose failure the policy might have retried, had the
#: run not been stopping (fail-fast, cancel or run deadline) when it ended.
NOT_RETRIED_STOPPING = "not retried: the run is stopping"


@dataclass(frozen=True, slots=True)
class RunPlan:
    """Everything one run needs, prepared and validated by the runtime."""

    workflow: Workflow
    settings: Resolved
    run_id: str
    seed: int
    clock: Clock
    store: RunStore
    fingerprint: str
    executors: tuple[str, ...]  # by canonical rank
    payloads: Mapping[str, bytes] = field(default_factory=dict)
    on_event: Callable[[Event], None] | None = None
    restored: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    restored_records: Mapping[str, StepRecord] = field(default_factory=dict)
    source: str | None = None


@dataclass(slots=True)
class _Inflight:
    rank: int
    attempt: int
    control: AttemptControl
    worker: str
    executor: str
    limit: float | None
    limit_is_run_deadline: bool
    #: When the attempt's deadline is due, on the run's clock (None: no deadline).
    deadline_at: float | None = None
    timers: list[TimerHandle] = field(default_factory=list)
    reason: str | None = None  # "timeout" or "cancel" once a stop was requested


class Supervisor(pykka.ThreadingActor):
    """Owns the run: scheduling, deadlines, retries, state, store, events."""

    use_daemon_thread = True

    def __init__(
        self,
        plan: RunPlan,
        *,
        complete: Callable[[RunResult], None],
        services: Callable[[pykka.ActorRef[Any]], WorkerServices],
        register_thread: Callable[[threading.Thread], None],
    ) -> None:
        super().__init__()
        self.plan = plan
        self.wf = plan.workflow
        self.graph = plan.workflow.graph
        self.cfg = plan.settings
        self.clock = plan.clock
        self.store = plan.store
        self._complete = complete
        self._services_factory = services
        self._register_thread = register_thread
        order = self.graph.order
        self.state = RunState.initial(plan.run_id, self.wf.id, order, self.graph.rank)
        self.sched = Scheduler(
            self.graph,
            max_parallel=self.cfg.max_parallel,
            pool_of=[self._step(r).pool for r in range(len(order))],
            pool_limits=self.cfg.pools,
        )
        self._inflight: dict[str, _Inflight] = {}
        self._workers: dict[str, pykka.ActorRef[Any]] = {}
        self._free: list[str] = []
        self._load: dict[str, int] = {}
        # Prefetch is safe only where queueing cannot change what an attempt
        # means: thread and process steps with no deadline of any kind.
        self._prefetch_capable = (
            self.cfg.deadline is None
            and self.cfg.step_timeout is None
            and all(ex in ("thread", "process") for ex in plan.executors)
            and all(step.timeout is None for step in self.wf.steps)
        )
        self._avg_duration = 0.0
        self._done_count = 0
        self._abandoned: dict[str, pykka.ActorRef[Any]] = {}
        self._retry_timers: dict[str, TimerHandle] = {}
        self._visible: dict[int, Visible] = {}
        self._users_left = [len(ds) for ds in self.graph.dependents]
        self._inputs: dict[int, Visible] = {}
        self._errors: dict[str, list[BaseException]] = {}
        self._crashes: dict[str, int] = {}
        self._retries_used = 0
        self._stopping = False
        self._stop_status = RunStatus.FAILED
        self._stop_note = ""
        self._deadline_passed = False
        self._finished = False
        self._run_deadline: float | None = None
        self._timers: list[TimerHandle] = []
        self._worker_seq = 0
        self._started_wall = 0.0
        self._discarded = 0
        self._services: WorkerServices | None = None

    # -- helpers -------------------------------------------------------------------

    def _step(self, rank: int) -> Step:
        return self.wf.steps[self.graph.step_at_rank[rank]]

    def _emit(self, event: Event) -> None:
        hook = self.plan.on_event
        if hook is None:
            return
        try:
            hook(event)
        except Exception:
            log.exception("the on_event hook raised on %r; ignoring it", type(event).__name__)

    def _tell_self(self, message: object) -> Callable[[], None]:
        ref = self.actor_ref

        def tell() -> None:
            with contextlib.suppress(pykka.ActorDeadError):
                ref.tell(message)

        return tell

    def _later(self, delay: float, message: object) -> TimerHandle:
        return self.clock.call_later(delay, self._tell_self(message))

    def _policy(self, step: Step) -> RetryPolicy:
        return step.retry or self.cfg.retry

    # -- actor hooks -------------------------------------------------------------

    def on_start(self) -> None:
        self._register_thread(threading.current_thread())

    def on_failure(self, *_: object) -> None:
        # A bug in the Supervisor itself: stop everything, and still give the
        # caller a result rather than leave it waiting forever.
        log.error("the supervisor of run %s failed; cancelling everything", self.plan.run_id)
        for inf in self._inflight.values():
            inf.control.cancel("cancel")
        self._stop_workers()
        if not self._finished:
            self._finished = True
            now = self.clock.wall()
            self._complete(
                RunResult(
                    run_id=self.plan.run_id,
                    workflow_id=self.wf.id,
                    status=RunStatus.FAILED,
                    steps={sid: self.state.record(sid) for sid in self.graph.order},
                    artifacts=self.state.artifacts,
                    seed=self.plan.seed,
                    commits=tuple(self.state.commits),
                    started=self._started_wall,
                    ended=now,
                    error=RuntimeError(
                        "stepvisor's supervisor failed (a bug: please report it with the log)"
                    ),
                )
            )

    def on_receive(self, message: Any) -> None:
        if self._finished:
            if isinstance(message, AttemptDone):
                self._worker_returned(message.worker)
            return
        if isinstance(message, AttemptDone):
            self._on_done(message)
        elif isinstance(message, DeadlineReached):
            self._on_deadline(message)
        elif isinstance(message, GraceExpired):
            self._on_grace(message)
        elif isinstance(message, RetryDue):
            self._on_retry_due(message)
        elif isinstance(message, Heartbeat):
            self._on_heartbeat()
        elif isinstance(message, CancelRun):
            self._begin_stop(RunStatus.CANCELLED, f"cancelled: {message.reason}")
        elif isinstance(message, RunDeadline):
            self._on_run_deadline()
        elif isinstance(message, Start):
            self._on_start_run()
        else:
            log.warning("supervisor ignored an unexpected message %r", message)
            return
        self._fill()
        self._maybe_finish()

    # -- start ---------------------------------------------------------------------

    def _on_start_run(self) -> None:
        plan = self.plan
        self._services = self._services_factory(self.actor_ref)
        self._started_wall = self.clock.wall()
        restored_ranks: list[int] = []
        records: list[StepRecord] = []
        for sid in self.graph.order:
            old = plan.restored_records.get(sid)
            if old is not None and sid in plan.restored:
                record = old._replace(status=StepStatus.SUCCEEDED, restored=True)
                self.state = self.state.set_step(record).set_outputs(sid, plan.restored[sid])
                restored_ranks.append(self.graph.rank[sid])
            records.append(self.state.record(sid))
        for r in sorted(restored_ranks):
            self._visible[r] = self._own_visible(r, self.state.output(self.graph.order[r]))
        info = RunInfo(
            run_id=plan.run_id,
            workflow_id=self.wf.id,
            fingerprint=plan.fingerprint,
            settings=self.cfg.jsonable(),
            seed=plan.seed,
            status=RunStatus.RUNNING,
            started=self._started_wall,
            heartbeat=self._started_wall,
            source=plan.source,
        )
        self.store.begin_run(info, records)
        self._emit(
            RunStarted(
                run_id=plan.run_id,
                workflow_id=self.wf.id,
                seed=plan.seed,
                settings=self.cfg.jsonable(),
                resumed=bool(restored_ranks),
                time=self._started_wall,
            )
        )
        n_workers = min(self.cfg.max_parallel, max(1, len(self.graph.order) - len(restored_ranks)))
        for _ in range(n_workers):
            self._add_worker()
        self.sched.initial_ready(restored_ranks)
        self._commit()
        if self.cfg.deadline is not None:
            self._run_deadline = self.clock.monotonic() + self.cfg.deadline
            self._timers.append(self._later(self.cfg.deadline, RunDeadline()))
        self._timers.append(self._later(HEARTBEAT_INTERVAL, Heartbeat()))

    def _add_worker(self) -> str:
        self._worker_seq += 1
        wid = f"w{self._worker_seq}"
        assert self._services is not None
        self._workers[wid] = Worker.start(wid, self.actor_ref, self._services)
        self._load[wid] = 0
        self._free.append(wid)
        return wid

    # -- dispatch ------------------------------------------------------------------

    def _fill(self) -> None:
        """Hand ready steps to idle Workers; for tiny steps, several at a time.

        Waking an idle Worker costs a futex wake, which on a virtual machine
        (a cross-CPU interrupt) costs more than running a no-op step: profiling
        10,000 no-op steps showed half the Supervisor's time in that wake.  So
        when a run has only thread or process steps without deadlines and its
        attempts take under ``PREFETCH_BELOW`` on average, an idle Worker is
        handed a batch of up to ``PREFETCH_BATCH`` attempts in one message (a
        fair share of what is ready), which it runs one after the other (a
        process Worker on its one child).  At most ``max_parallel``
        attempts still *run* at once (one per Worker), pools stay strict (queued
        attempts count against them), and attempts with a deadline are never
        queued, so their deadline starts when they do.
        """
        while not self._stopping and self._free:
            batch = 1
            if self._prefetching():
                share = -(-self.sched.ready_count // len(self._free))
                batch = max(1, min(PREFETCH_BATCH, share))
            wid = self._free[-1]
            messages: list[RunAttempt] = []
            while len(messages) < batch:
                r = self.sched.take(limit=self.cfg.max_parallel * batch)
                if r is None:
                    break
                messages.append(self._dispatch(r, wid))
            if not messages:
                return
            self._free.pop()
            ref = self._workers[wid]
            ref.tell(messages[0] if len(messages) == 1 else RunBatch(tuple(messages)))

    def _prefetching(self) -> bool:
        return (
            self._prefetch_capable
            and self._done_count >= self.cfg.max_parallel
            and self._avg_duration < PREFETCH_BELOW
        )

    def _inputs_for(self, r: int) -> Visible:
        cached = self._inputs.get(r)
        if cached is not None:
            return cached
        merged = self._merge([self._visible[d] for d in self.graph.deps[r]])
        self._inputs[r] = merged
        for d in self.graph.deps[r]:
            self._users_left[d] -= 1
            if self._users_left[d] == 0:
                self._visible.pop(d, None)
        return merged

    @staticmethod
    def _merge(maps: list[Visible]) -> Visible:
        maps = [m for m in maps if m]
        if not maps:
            return _EMPTY
        base = max(maps, key=len)
        if len(maps) == 1:
            return base
        ev = base.evolver()
        for m in maps:
            if m is base:
                continue
            for name, entry in m.items():
                try:
                    current = ev[name]
                except KeyError:
                    ev[name] = entry
                    continue
                if current[0] < entry[0]:
                    ev[name] = entry
        return ev.persistent()

    def _own_visible(self, r: int, outputs: Mapping[str, Any]) -> Visible:
        base = self._inputs_for(r) if self.graph.deps[r] else _EMPTY
        if not outputs:
            return base
        ev = base.evolver()
        for name, value in outputs.items():
            ev[name] = (r, value)
        return ev.persistent()

    def _dispatch(self, r: int, wid: str) -> RunAttempt:
        """Record the start of ``r``'s next attempt on ``wid``; return its message."""
        step = self._step(r)
        sid = step.id
        record = self.state.record(sid)
        attempt = record.attempt_count + 1
        policy = self._policy(step)
        executor = self.plan.executors[r]
        now = self.clock.monotonic()
        timeout = step.timeout if step.timeout is not None else self.cfg.step_timeout
        deadline = now + timeout if timeout is not None else None
        limit_is_run = False
        if self._run_deadline is not None and (deadline is None or self._run_deadline < deadline):
            deadline = self._run_deadline
            limit_is_run = True
        inputs = self._inputs_for(r)
        control = AttemptControl()
        self._load[wid] += 1
        real_deadline = None
        if deadline is not None:
            import time  # noqa: PLC0415 - the step sees the real monotonic clock

            real_deadline = time.monotonic() + (deadline - now)
        spec = AttemptSpec(
            run_id=self.plan.run_id,
            step_id=sid,
            attempt=attempt,
            max_attempts=policy.max_attempts,
            fn=step.fn,
            is_async=step.is_async,
            inputs=MappingProxyType({name: value for name, (_, value) in inputs.items()})
            if inputs
            else _NO_INPUTS,
            params=step.params,
            deadline=real_deadline,
            kill_grace=self.cfg.kill_grace,
            fn_payload=self.plan.payloads.get(sid),
            resources=step.resources,
        )
        inflight = _Inflight(
            rank=r,
            attempt=attempt,
            control=control,
            worker=wid,
            executor=executor,
            limit=(self.cfg.deadline if limit_is_run else timeout),
            limit_is_run_deadline=limit_is_run,
            deadline_at=deadline,
        )
        self._inflight[sid] = inflight
        started = AttemptRecord(number=attempt, started=self.clock.wall(), worker=wid)
        record = record.with_attempt_started(started)
        self.state = self.state.set_step(record)
        self.store.save_step(self.plan.run_id, record)
        if self.plan.on_event is not None:
            self._emit(
                StepDispatched(
                    run_id=self.plan.run_id,
                    step_id=sid,
                    attempt=attempt,
                    worker=wid,
                    time=started.started,
                )
            )
        if deadline is not None:
            inflight.timers.append(self._later(deadline - now, DeadlineReached(sid, attempt)))
        return RunAttempt(spec=spec, control=control, executor=executor)

    # -- outcomes ------------------------------------------------------------------

    def _worker_returned(self, wid: str) -> None:
        load = self._load[wid] = self._load[wid] - 1
        if wid in self._abandoned:
            if load == 0:
                self._abandoned.pop(wid).stop(block=False)
        elif load == 0 and wid in self._workers:
            self._free.append(wid)

    def _fenced(self, step_id: str, attempt: int) -> _Inflight | None:
        inf = self._inflight.get(step_id)
        if inf is None or inf.attempt != attempt:
            return None
        return inf

    def _on_done(self, msg: AttemptDone) -> None:
        self._worker_returned(msg.worker)
        self._done_count += 1
        self._avg_duration += (msg.duration - self._avg_duration) / min(self._done_count, 10)
        inf = self._fenced(msg.step_id, msg.attempt)
        if inf is None or inf.worker != msg.worker:
            self._discarded += 1
            log.info(
                "discarded a late outcome (%s) of step %r attempt %d: that attempt already ended",
                msg.result.kind,
                msg.step_id,
                msg.attempt,
            )
            return
        self._close_inflight(msg.step_id, inf)
        result = msg.result
        step = self._step(inf.rank)
        base = {"started": msg.started_wall, "ended": msg.ended_wall, "duration": msg.duration}
        if result.kind == "ok" and inf.reason != "timeout":
            self._succeed(inf, result.outputs or {}, base)
            return
        if inf.reason == "timeout":
            what = result.note or _STOP_WORDS.get(inf.executor, "it was stopped")
            if result.kind == "ok":
                what = "it returned after its deadline; the result was discarded"
            error: BaseException = self._timeout_error(step, inf, what)
            if result.error is not None:
                error.__cause__ = result.error
            self._fail(
                inf,
                error,
                FailureKind.TIMEOUT,
                StepStatus.TIMED_OUT,
                outcome="timed_out",
                base=base,
            )
            return
        if inf.reason == "cancel":
            error = StepCancelledError(
                f"step {step.id!r} was cancelled on attempt {inf.attempt} "
                f"({self._stop_note or 'the run stopped'}); "
                + (result.note or _STOP_WORDS.get(inf.executor, "it was stopped")),
                step_id=step.id,
                attempt=inf.attempt,
            )
            if result.error is not None:
                error.__cause__ = result.error
            self._fail(inf, error, None, StepStatus.CANCELLED, outcome="cancelled", base=base)
            return
        if result.kind == "crash":
            error = result.error or WorkerCrashedError(
                f"the worker running step {step.id!r} died", step_id=step.id, attempt=inf.attempt
            )
            self._fail(
                inf, error, FailureKind.CRASH, StepStatus.FAILED, outcome="crashed", base=base
            )
            return
        error = result.error or RuntimeError(f"step {step.id!r} failed without an exception")
        kind = None if result.kind == "unsendable" else FailureKind.ERROR
        self._fail(
            inf,
            error,
            kind,
            StepStatus.FAILED,
            outcome="failed",
            base=base,
            traceback=result.traceback,
        )

    def _close_inflight(self, sid: str, inf: _Inflight) -> None:
        del self._inflight[sid]
        for timer in inf.timers:
            timer.cancel()
        self.sched.release(inf.rank)

    def _timeout_error(self, step: Step, inf: _Inflight, what: str) -> StepTimeoutError:
        policy = self._policy(step)
        limit = f"{inf.limit:g}" if inf.limit is not None else "?"
        which = (
            f"the run's {limit} s deadline"
            if inf.limit_is_run_deadline
            else f"its {limit} s timeout"
        )
        return StepTimeoutError(
            f"step {step.id!r} exceeded {which} on attempt {inf.attempt} of "
            f"{policy.max_attempts}; {what}",
            step_id=step.id,
            attempt=inf.attempt,
        )

    def _succeed(self, inf: _Inflight, outputs: Mapping[str, Any], base: dict[str, Any]) -> None:
        step = self._step(inf.rank)
        record = self.state.record(step.id)
        attempt = _closed(record.attempts[-1], outcome="succeeded", **base)
        record = record.with_last_attempt(attempt, StepStatus.SUCCEEDED)
        try:
            self.store.save_step(self.plan.run_id, record, outputs)
        except ArtifactCodecError as exc:
            self._fail(inf, exc, None, StepStatus.FAILED, outcome="failed", base=base)
            return
        self.state = self.state.set_step(record).set_outputs(step.id, outputs)
        self._visible[inf.rank] = self._own_visible(inf.rank, outputs)
        self._inputs.pop(inf.rank, None)
        self.sched.succeeded(inf.rank)
        self._finished_event(record)
        self._commit()

    def _fail(
        self,
        inf: _Inflight,
        error: BaseException,
        kind: FailureKind | None,
        status: StepStatus,
        *,
        outcome: str,
        base: dict[str, Any],
        traceback: str | None = None,
    ) -> None:
        """Record a failed attempt, then retry it or end the step with ``status``.

        ``kind`` is ``None`` for failures that are never retried (cancelled,
        abandoned, unsendable, codec errors).
        """
        step = self._step(inf.rank)
        sid = step.id
        self._errors.setdefault(sid, []).append(error)
        delay: float | None = None
        reason = ""
        if kind is not None and not self._stopping:
            delay, reason = self._retry_delay(step, inf, error, kind)
        elif kind is not None:
            # The step keeps the status its attempt earned, but the record says
            # why a failure its policy might have retried was not: the run is
            # stopping, and a retry would start new work in a run being torn down.
            reason = f"{NOT_RETRIED_STOPPING} ({self._stop_note or 'the run stopped'})"
        record = self.state.record(sid)
        attempt = _closed(
            record.attempts[-1],
            outcome=outcome,
            error_type=_type_name(error),
            error_message=str(error),
            error_traceback=traceback or _traceback_text(error),
            delay_after=delay,
            note=reason or None,
            **base,
        )
        if delay is not None:
            record = record.with_last_attempt(attempt, StepStatus.WAITING_RETRY)
            self.state = self.state.set_step(record)
            self.store.save_step(self.plan.run_id, record)
            self._retry_timers[sid] = self._later(delay, RetryDue(sid, inf.attempt))
            self._emit(
                StepRetrying(
                    run_id=self.plan.run_id,
                    step_id=sid,
                    attempt=inf.attempt,
                    delay=delay,
                    error_type=_type_name(error),
                    error_message=str(error),
                    time=self.clock.wall(),
                )
            )
            return
        record = record.with_last_attempt(attempt, status)
        self._end_step(inf.rank, record)

    def _retry_delay(
        self, step: Step, inf: _Inflight, error: BaseException, kind: FailureKind
    ) -> tuple[float | None, str]:
        sid = step.id
        if kind is FailureKind.CRASH:
            self._crashes[sid] = self._crashes.get(sid, 0) + 1
            if self._crashes[sid] >= self.cfg.max_worker_crashes:
                note = (
                    f"not retried: step {sid!r} crashed its worker {self._crashes[sid]} times "
                    f"(max_worker_crashes={self.cfg.max_worker_crashes}); it is treated as "
                    "poisonous and not run again"
                )
                _add_note(error, note)
                return None, note
        decision = self._policy(step).decide(
            error=error, kind=kind, attempt=inf.attempt, seed=self.plan.seed, step_id=sid
        )
        if not decision.retry:
            return None, decision.reason
        budget = self.cfg.max_retries_total
        if budget is not None and self._retries_used >= budget:
            note = f"not retried: the run's retry budget (max_retries_total={budget}) is spent"
            _add_note(error, note)
            return None, note
        self._retries_used += 1
        return decision.delay, decision.reason

    def _end_step(self, r: int, record: StepRecord) -> None:
        """Give a step its terminal (non-success) status and apply the failure policy."""
        sid = record.step_id
        self._retry_timers.pop(sid, None)
        errors = self._errors.get(sid, [])
        if len(errors) > 1:
            final = errors[-1]
            for i, earlier in enumerate(errors[:-1], start=1):
                _add_note(final, f"attempt {i} failed: {_type_name(earlier)}: {earlier}")
        self.state = self.state.set_step(record)
        self.store.save_step(self.plan.run_id, record)
        self._inputs.pop(r, None)
        self._finished_event(record)
        if record.status in (StepStatus.FAILED, StepStatus.TIMED_OUT):
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
            if current.terminal or dep_id in self._inflight:
                continue
            records.append(
                current.with_status(
                    StepStatus.SKIPPED, f"skipped: it depends on {sid!r}, which {status.value}"
                )
            )
        if records:
            self.state = self.state.set_steps(records)
            self.store.save_steps(self.plan.run_id, records)
            for rec in records:
                self._finished_event(rec)

    def _finished_event(self, record: StepRecord) -> None:
        if self.plan.on_event is None:
            return
        last = record.last_attempt
        self._emit(
            StepFinished(
                run_id=self.plan.run_id,
                step_id=record.step_id,
                status=record.status.value,
                attempts=record.attempt_count,
                error_type=last.error_type if last else None,
                error_message=last.error_message if last else None,
                time=self.clock.wall(),
            )
        )

    def _commit(self) -> None:
        self.state, done = self.state.commit_ready()
        if not done or self.plan.on_event is None:
            return
        start = self.state.committed - len(done)
        for i, sid in enumerate(done):
            record = self.state.record(sid)
            created = tuple(sorted(self.state.output(sid).keys()))
            self._emit(
                StepCommitted(
                    run_id=self.plan.run_id,
                    step_id=sid,
                    index=start + i,
                    status=record.status.value,
                    attempts=record.attempt_count,
                    created=created,
                )
            )

    # -- deadlines, retries, cancel -------------------------------------------------

    def _grace_for(self, executor: str) -> float:
        if executor == "thread":
            return self.cfg.kill_grace
        return self.cfg.kill_grace + BACKEND_GRACE_MARGIN

    def _request_stop(self, sid: str, inf: _Inflight, reason: str) -> None:
        if inf.reason is not None:
            return
        inf.reason = reason
        inf.control.cancel(reason)
        grace = self._grace_for(inf.executor)
        if reason == "timeout" and inf.deadline_at is not None:
            # Count the grace from when the deadline was due, not from when this
            # message was handled: a busy Supervisor must not stretch it.
            grace = max(0.0, inf.deadline_at + grace - self.clock.monotonic())
        inf.timers.append(self._later(grace, GraceExpired(sid, inf.attempt)))

    def _on_deadline(self, msg: DeadlineReached) -> None:
        inf = self._fenced(msg.step_id, msg.attempt)
        if inf is not None:
            self._request_stop(msg.step_id, inf, "timeout")

    def _on_run_deadline(self) -> None:
        self._deadline_passed = True
        for sid, inf in list(self._inflight.items()):
            self._request_stop(sid, inf, "timeout")
        limit = f"{self.cfg.deadline:g}"
        self._begin_stop(RunStatus.FAILED, f"the run exceeded its {limit} s deadline")

    def _on_grace(self, msg: GraceExpired) -> None:
        inf = self._fenced(msg.step_id, msg.attempt)
        if inf is None:
            return
        self._close_inflight(msg.step_id, inf)
        wid = inf.worker
        if wid in self._workers:
            self._abandoned[wid] = self._workers.pop(wid)
            self._add_worker()
        grace = self._grace_for(inf.executor)
        what = (
            f"its {inf.executor} did not stop within the {grace:g} s grace period and was "
            "abandoned (it runs on as a daemon thread; not retried, so it cannot overlap a retry)"
            if inf.executor == "thread"
            else f"its {inf.executor} worker did not stop within {grace:g} s and was abandoned"
        )
        step = self._step(inf.rank)
        now = self.clock.wall()
        record = self.state.record(step.id)
        started = record.attempts[-1].started if record.attempts else now
        base = {"ended": now, "duration": max(0.0, now - started)}
        log.warning("step %r attempt %d: %s", step.id, inf.attempt, what)
        if inf.reason == "timeout":
            error: BaseException = self._timeout_error(step, inf, what)
            self._fail(inf, error, None, StepStatus.TIMED_OUT, outcome="timed_out", base=base)
        else:
            error = StepCancelledError(
                f"step {step.id!r} was cancelled on attempt {inf.attempt}; {what}",
                step_id=step.id,
                attempt=inf.attempt,
            )
            self._fail(inf, error, None, StepStatus.CANCELLED, outcome="cancelled", base=base)
        last = self.state.record(step.id)
        if last.attempts:
            noted = last.attempts[-1]._replace(note="abandoned")
            self.state = self.state.set_step(last.with_last_attempt(noted, last.status))
            self.store.save_step(self.plan.run_id, self.state.record(step.id))

    def _on_retry_due(self, msg: RetryDue) -> None:
        if self._stopping:
            return
        timer = self._retry_timers.pop(msg.step_id, None)
        if timer is None:
            return
        self.sched.push(self.graph.rank[msg.step_id])

    def _on_heartbeat(self) -> None:
        self.store.heartbeat(self.plan.run_id, self.clock.wall())
        if not self._stopping and self.store.cancel_requested(self.plan.run_id):
            self._begin_stop(RunStatus.CANCELLED, "cancelled through the store")
        self._timers.append(self._later(HEARTBEAT_INTERVAL, Heartbeat()))
        self._timers = list(self._timers[-4:])

    def _begin_stop(self, status: RunStatus, note: str) -> None:
        if self._stopping:
            if status is RunStatus.CANCELLED and self._stop_status is not RunStatus.CANCELLED:
                # A cancel during a fail-fast stop: it is still a cancelled run.
                self._stop_status = status
            return
        self._stopping = True
        self._stop_status = status
        self._stop_note = note
        log.info("run %s stopping: %s", self.plan.run_id, note)
        for timer in self._retry_timers.values():
            timer.cancel()
        self.sched.drain_ready()
        for sid, inf in list(self._inflight.items()):
            self._request_stop(sid, inf, "cancel")

    # -- finish --------------------------------------------------------------------

    def _maybe_finish(self) -> None:
        if self._finished or self._inflight:
            return
        if not self._stopping and (self.sched.ready_count or self._retry_timers):
            return
        self._finish()

    def _finish(self) -> None:
        self._finished = True
        for timer in self._timers:
            timer.cancel()
        for timer in self._retry_timers.values():
            timer.cancel()
        leftovers: list[StepRecord] = []
        note = (
            f"cancelled: {self._stop_note}" if self._stopping else "cancelled: never became ready"
        )
        for sid in self.graph.order:
            record = self.state.record(sid)
            if not record.terminal:
                leftovers.append(record.with_status(StepStatus.CANCELLED, note))
        if leftovers:
            self.state = self.state.set_steps(leftovers)
            self.store.save_steps(self.plan.run_id, leftovers)
            for record in leftovers:
                self._finished_event(record)
        self._commit()
        failed_step: str | None = None
        for sid in self.graph.order:
            if self.state.record(sid).status in (StepStatus.FAILED, StepStatus.TIMED_OUT):
                failed_step = sid
                break
        if self._stopping and self._stop_status is RunStatus.CANCELLED:
            status = RunStatus.CANCELLED
        elif failed_step is not None or self._deadline_passed:
            status = RunStatus.FAILED
        else:
            status = RunStatus.SUCCEEDED
        error: BaseException | None = None
        if failed_step is not None and self._errors.get(failed_step):
            error = self._errors[failed_step][-1]
        elif status is RunStatus.FAILED:
            error = StepTimeoutError(self._stop_note or "the run failed")
        error_text = None
        if failed_step is not None and error is not None:
            error_text = f"step {failed_step!r} failed: {_type_name(error)}: {error}"
        elif error is not None:
            error_text = str(error)
        elif status is RunStatus.CANCELLED:
            error_text = self._stop_note or "cancelled"
        ended = self.clock.wall()
        self.state = self.state.finish(status, error_text)
        self.store.finish_run(self.plan.run_id, status, ended=ended, error=error_text)
        errors = {
            sid: errs[-1]
            for sid, errs in self._errors.items()
            if self.state.record(sid).status is not StepStatus.SUCCEEDED
        }
        result = RunResult(
            run_id=self.plan.run_id,
            workflow_id=self.wf.id,
            status=status,
            steps={sid: self.state.record(sid) for sid in self.graph.order},
            artifacts=self.state.artifacts,
            seed=self.plan.seed,
            commits=tuple(self.state.commits),
            started=self._started_wall,
            ended=ended,
            error=error,
            failed_step=failed_step,
            errors=errors,
            settings=self.cfg.jsonable(),
            discarded_outcomes=self._discarded,
        )
        self._emit(
            RunFinished(run_id=self.plan.run_id, status=status.value, error=error_text, time=ended)
        )
        self._stop_workers()
        self._complete(result)
        self.stop()

    def _stop_workers(self) -> None:
        for ref in self._workers.values():
            with contextlib.suppress(pykka.ActorDeadError):
                ref.stop(block=False)
        for ref in self._abandoned.values():
            with contextlib.suppress(pykka.ActorDeadError):
                ref.stop(block=False)


_STOP_WORDS = {
    "thread": "it stopped when told to through its context",
    "async": "its task was cancelled",
    "process": "its process group was killed",
    "ray": "its Ray task was force-cancelled",
}


def _closed(
    attempt: AttemptRecord,
    *,
    started: float | None = None,
    ended: float,
    duration: float,
    outcome: str,
    error_type: str | None = None,
    error_message: str | None = None,
    error_traceback: str | None = None,
    delay_after: float | None = None,
    note: str | None = None,
) -> AttemptRecord:
    """The attempt, ended.  (A direct constructor: this is on the hot path.)"""
    return AttemptRecord(
        attempt.number,
        attempt.started if started is None else started,
        ended,
        duration,
        outcome,
        error_type,
        error_message,
        error_traceback,
        delay_after,
        attempt.worker,
        note,
    )


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    if cls.__module__ in ("builtins", "__main__"):
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _traceback_text(exc: BaseException) -> str | None:
    remote = getattr(exc, "remote_traceback", None)
    if isinstance(remote, str) and remote:
        return remote
    if exc.__traceback__ is None:
        return None
    from stepvisor.backends.thread import format_error  # noqa: PLC0415

    return format_error(exc)


def _add_note(exc: BaseException, note: str) -> None:
    notes = getattr(exc, "__notes__", None)
    if notes is not None and note in notes:
        return
    with contextlib.suppress(AttributeError, TypeError):
        exc.add_note(note)
