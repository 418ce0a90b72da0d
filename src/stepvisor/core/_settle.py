"""What an attempt's end means: the outcome half of the run machine.

:class:`Settling` is the part of :class:`~stepvisor.core.machine.RunMachine`
that turns an ended attempt into the step's next state: success (final once
its outputs are written), a retry after a backoff, or a terminal failure and
what the failure policy makes of it (fail fast, or skip the dependants); and
the one rule for an attempt that ended after it was asked to stop.  It is a
base class of the machine, kept in its own module so that each reads in one
sitting; the attributes it uses are the machine's, declared here for mypy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

from stepvisor._log import log
from stepvisor.core import _outcomes as oc
from stepvisor.core.attempt import AttemptResult
from stepvisor.core.effects import (
    AbandonSlot,
    CancelTimer,
    Effect,
    RetireSlot,
    SaveOutputs,
    SaveStep,
    SaveSteps,
    SetTimer,
)
from stepvisor.core.messages import AttemptDone, GraceExpired, OutputsSaved, RetryDue
from stepvisor.core.state import AttemptRecord, RunState, RunStatus, StepRecord, StepStatus, new
from stepvisor.errors import StepTimeoutError, WorkerCrashedError
from stepvisor.policies.retry import FailureKind, RetryPolicy

if TYPE_CHECKING:
    from stepvisor.config import Resolved
    from stepvisor.core._events import Emitter
    from stepvisor.core._inputs import Inputs
    from stepvisor.core._retries import Retries
    from stepvisor.core._slots import Slots
    from stepvisor.core.graph import Graph
    from stepvisor.core.model import Step
    from stepvisor.policies.concurrency import Scheduler

__all__ = ["BACKEND_GRACE_MARGIN", "Inflight", "Settling"]

#: Extra time given to process/async/Ray backends past ``kill_grace`` before the
#: machine abandons their slot: their own kill path should win the race.
BACKEND_GRACE_MARGIN = 2.0
_FAILED = (StepStatus.FAILED, StepStatus.TIMED_OUT)


#: What a success that created nothing publishes (one shared empty view, not a dict each).
_NO_OUTPUTS: Final[Mapping[str, Any]] = MappingProxyType({})


@dataclass(slots=True)
class Inflight:
    """One attempt the machine has started and not yet settled."""

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
    #: The instance's index, for an instance of a mapped step; -1 for a step.
    index: int = -1


class Settling:
    """How ended attempts settle into state (a base of ``RunMachine``)."""

    graph: Graph
    cfg: Resolved
    state: RunState
    sched: Scheduler
    stopping: bool
    stop_note: str
    discarded: int
    _inflight: dict[str, Inflight]
    _saving: dict[str, Inflight]
    _slots: Slots
    _inputs: Inputs
    _retries: Retries
    _events: Emitter
    _errors: dict[str, list[BaseException]]
    #: A skipped step's rank -> the rank of the failed step its note names.
    _skip_cause: dict[int, int]
    _store_may_refuse: bool
    _to_cache: set[tuple[int, int]]
    _done_count: int
    _avg_duration: float
    _now: float
    _wall: float
    _fx: list[Effect]

    def _step(self, rank: int) -> Step:
        raise NotImplementedError

    def _policy(self, step: Step) -> RetryPolicy:
        raise NotImplementedError

    def _begin_stop(self, status: RunStatus, note: str) -> None:
        raise NotImplementedError

    if TYPE_CHECKING:  # a cache miss's result: stepvisor.core._caching.Caching keeps it

        def _cache_result(self, r: int, index: int, outputs: Mapping[str, Any]) -> None: ...

    if TYPE_CHECKING:  # addressing and instances: stepvisor.core._mapping.Mapped has them

        def _uid(self, r: int, index: int) -> str: ...

        def _record_of(self, r: int, index: int) -> StepRecord: ...

        def _put_record(self, r: int, index: int, record: StepRecord) -> None: ...

        def _instance_succeeded(
            self, r: int, index: int, record: StepRecord, outputs: Mapping[str, Any]
        ) -> None: ...

        def _instance_ended(self, r: int, index: int, status: StepStatus) -> None: ...

    # -- outcomes ------------------------------------------------------------------

    def _fenced(self, step_id: str, attempt: int) -> Inflight | None:
        inf = self._inflight.get(step_id)
        if inf is None or inf.attempt != attempt:
            return None
        return inf

    def _close(self, sid: str, inf: Inflight) -> None:
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
        reason = inf.reason
        if reason is None and result.kind == "ok":
            self._on_ok(msg.step_id, inf, result.outputs or _NO_OUTPUTS, msg)
            return
        base = {"started": msg.started_wall, "ended": msg.ended_wall, "duration": msg.duration}
        if reason is None and result.kind == "cancelled":
            # The backend stopped it on its own: its safety net at the deadline
            # (a StepTimeoutError), or a cancel it saw before the machine asked.
            reason = "timeout" if isinstance(result.error, StepTimeoutError) else "cancel"
        if reason is not None:
            self._stopped(inf, reason, result, base)
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
        self, inf: Inflight, reason: str, result: AttemptResult, base: dict[str, Any]
    ) -> None:
        """The one rule for an attempt that ended after it was asked to stop."""
        step = self._step(inf.rank)
        discarded = result.kind == "ok"
        what = oc.stop_outcome(reason, inf.executor, result.note, result.outputs, discarded)
        error: BaseException
        kind: FailureKind | None = None
        if reason == "timeout":
            error = self._timeout_error(step, inf, what)
            kind, status, outcome = FailureKind.TIMEOUT, StepStatus.TIMED_OUT, "timed_out"
        else:
            why = self.stop_note or "the run stopped"
            uid = self._uid(inf.rank, inf.index)
            error = oc.cancelled_error(uid, inf.attempt, what, why=why)
            status, outcome = StepStatus.CANCELLED, "cancelled"
        if result.error is not None:
            error.__cause__ = result.error
        extra = oc.DISCARDED_AFTER_STOP if discarded else None
        # The backend's text: for an attempt stopped at its deadline, where it was then.
        self._fail(
            inf, error, kind, status, outcome, base=base, extra_note=extra,
            traceback=result.traceback,
        )  # fmt: skip

    def _on_ok(self, sid: str, inf: Inflight, outputs: Mapping[str, Any], msg: AttemptDone) -> None:
        record = self._record_of(inf.rank, inf.index)
        last = record.attempts[-1]
        attempt = new(AttemptRecord, (
            last.number, msg.started_wall, msg.ended_wall, msg.duration, "succeeded",
            None, None, None, None, last.worker, last.note,
        ))  # fmt: skip
        record = record.with_last_attempt(attempt, StepStatus.SUCCEEDED)
        if outputs and self._store_may_refuse:
            base = {"started": msg.started_wall, "ended": msg.ended_wall, "duration": msg.duration}
            inf.saving = (record, outputs, base)
            self._saving[sid] = inf
            self._fx.append(SaveOutputs(record, outputs, inf.attempt))
            return
        self._fx.append(new(SaveStep, (record, outputs)))
        if inf.index < 0:
            self._succeeded(inf.rank, record, outputs)
        else:
            self._instance_succeeded(inf.rank, inf.index, record, outputs)

    def _on_saved(self, msg: OutputsSaved) -> None:
        inf = self._saving.get(msg.step_id)
        if inf is None or inf.attempt != msg.attempt or inf.saving is None:
            return
        del self._saving[msg.step_id]
        record, outputs, base = inf.saving
        if msg.error is None and inf.index >= 0:
            self._instance_succeeded(inf.rank, inf.index, record, outputs)
        elif msg.error is None:
            self._succeeded(inf.rank, record, outputs)
        else:
            self._fail(inf, msg.error, None, StepStatus.FAILED, "failed", base=base)

    def _succeeded(self, r: int, record: StepRecord, outputs: Mapping[str, Any]) -> None:
        # A step succeeds once: there are no earlier outputs to clear.
        self.state, done = self.state.succeed_at(r, record, outputs)
        if self._to_cache and (r, -1) in self._to_cache:
            self._cache_result(r, -1, outputs)
        self._inputs.publish(r, outputs)
        self.sched.succeeded(r)
        if self._events.on:
            self._events.finished(self._fx, record, self._wall)
            self._events.committed(self._fx, self.state, done)

    def _fail(
        self,
        inf: Inflight,
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
        sid = self._uid(inf.rank, inf.index)
        self._errors.setdefault(sid, []).append(error)
        delay: float | None = None
        reason = ""
        # How long ago the attempt ended (the Worker's clock): the backoff counts
        # from then, not from when this message is handled.  In a storm of
        # failures the shell takes them in one by one, and must not add its
        # queueing to every step's wait.
        late = max(0.0, self._wall - base["ended"])
        if kind is not None and not self.stopping:
            delay, reason = self._retries.delay(
                sid, self._policy(step), error, kind, inf.attempt, late=late
            )
        elif kind is not None:
            # The step keeps the status its attempt earned, but the record says
            # why a failure its policy might have retried was not: the run is
            # stopping, and a retry would start new work in a run being torn down.
            reason = f"{oc.NOT_RETRIED_STOPPING} ({self.stop_note or 'the run stopped'})"
        if extra_note:
            reason = f"{reason}; {extra_note}" if reason else extra_note
        record = self._record_of(inf.rank, inf.index)
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
            self._end_step(inf.rank, record.with_last_attempt(attempt, status), inf.index)
            return
        record = record.with_last_attempt(attempt, StepStatus.WAITING_RETRY)
        self._put_record(inf.rank, inf.index, record)
        self._fx.append(SaveStep(record))
        self._retries.waiting[sid] = inf.attempt
        waited = min(delay, late)
        self._fx.append(
            SetTimer(
                ("retry", sid, inf.attempt),
                delay - waited,
                RetryDue(sid, inf.attempt),
                self._now + delay - waited,
            )
        )
        self._events.retrying(
            self._fx, sid, inf.attempt, delay=delay, error=described, wall=self._wall
        )

    def _end_step(self, r: int, record: StepRecord, index: int = -1) -> None:
        """Give a step (or an instance) its terminal, non-success status; apply the policy.

        A failed instance stops a fail-fast run like a step; under ``continue``
        it skips what is chained to it, and its mapped step sums it up later.
        """
        sid = record.step_id
        self._retries.waiting.pop(sid, None)
        errors = self._errors.get(sid, [])
        for i, earlier in enumerate(errors[:-1], start=1):
            oc.add_note(errors[-1], f"attempt {i} failed: {oc.type_name(earlier)}: {earlier}")
        self._put_record(r, index, record)
        self._fx.append(SaveStep(record))
        self._events.finished(self._fx, record, self._wall)
        if index >= 0:
            if record.status in _FAILED and self.cfg.on_failure == "fail_fast":
                self._begin_stop(
                    RunStatus.FAILED,
                    f"step {sid!r} {record.status.value} and on_failure is fail_fast",
                )
            self._instance_ended(r, index, record.status)
            return
        self._inputs.forget(r)
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
        """Skip what depends on ``r``, which failed; each names its first failed ancestor.

        A step below two failures names the one first in canonical order, whichever
        failed first in time: its record must not depend on completion order.
        """
        records: list[StepRecord] = []
        renamed: list[StepRecord] = []  # skipped already, for a failure later in order
        note = f"skipped: it depends on {sid!r}, which {status.value}"
        causes = self._skip_cause
        pointwise = self._chained_closure(r)
        for d in sorted(self.graph.descendants(r)):
            if d in pointwise:  # it will expand, then skip exactly the instances of r that failed
                continue
            dep_id = self.graph.order[d]
            current = self.state.record_at(d)
            if current.status is StepStatus.SKIPPED and causes.get(d, r) > r:
                renamed.append(current.with_status(StepStatus.SKIPPED, note))
                causes[d] = r
                continue
            if current.terminal or dep_id in self._inflight or dep_id in self._saving:
                continue
            if d in self.state.maps:  # an expanded map runs its instances to their end
                continue
            records.append(current.with_status(StepStatus.SKIPPED, note))
            causes[d] = r
        if records or renamed:
            self.state = self.state.set_steps(records + renamed)
            self._fx.append(SaveSteps(tuple(records + renamed)))
            for rec in records:  # a renamed one finished already
                self._events.finished(self._fx, rec, self._wall)

    def _chained_closure(self, r: int) -> set[int]:
        """The maps chained to ``r`` instance by instance (directly or through other
        chains) and waiting for nothing else that ``r``'s failure skips.

        Only once ``r`` expanded: its chains then expand whatever ``r`` ended with
        (the scheduler counted ``r`` for them), and a failed summary concerns
        them one instance at a time.  Skipping them whole would let them expand
        later all the same: ended twice, run after they were committed.  A map
        that also needs ``r`` (or a step after it) as a whole is skipped as before.
        """
        if r not in self.state.maps:
            return set()
        chained: set[int] = set()
        todo = [r]
        while todo:
            for c in self.sched.chained_to(todo.pop()):
                if c not in chained:
                    chained.add(c)
                    todo.append(c)
        whole: set[int] = set()
        for x in (r, *chained):
            pointwise = self.sched.chained_to(x)
            for c in self.graph.dependents[x]:
                if c not in pointwise and c not in whole:
                    whole.add(c)
                    whole.update(self.graph.descendants(c))
        return chained - whole

    def _commit(self) -> None:
        self.state, done = self.state.commit_ready()
        self._events.committed(self._fx, self.state, done)

    def _timeout_error(self, step: Step, inf: Inflight, what: str) -> BaseException:
        return oc.timeout_error(
            self._uid(inf.rank, inf.index),
            inf.attempt,
            self._policy(step).max_attempts,
            limit=inf.limit,
            run_deadline=inf.limit_is_run_deadline,
            what=what,
        )

    # -- abandonment ---------------------------------------------------------------

    def _grace_for(self, executor: str) -> float:
        if executor == "thread":
            return self.cfg.kill_grace
        return self.cfg.kill_grace + BACKEND_GRACE_MARGIN

    def _on_grace(self, msg: GraceExpired) -> None:
        inf = self._fenced(msg.step_id, msg.attempt)
        if inf is None:
            return
        self._close(msg.step_id, inf)
        if self._slots.abandon(inf.slot):  # a fresh slot is asked for if work waits
            self._fx.append(AbandonSlot(inf.slot))
        step = self._step(inf.rank)
        uid = self._uid(inf.rank, inf.index)
        what = oc.abandoned_what(inf.executor, self._grace_for(inf.executor))
        record = self._record_of(inf.rank, inf.index)
        started = record.attempts[-1].started if record.attempts else self._wall
        base = {"ended": self._wall, "duration": max(0.0, self._wall - started)}
        log.warning("step %r attempt %d: %s", uid, inf.attempt, what)
        error: BaseException
        if inf.reason == "timeout":
            error = self._timeout_error(step, inf, what)
            status, outcome = StepStatus.TIMED_OUT, "timed_out"
        else:
            error = oc.cancelled_error(uid, inf.attempt, what)
            status, outcome = StepStatus.CANCELLED, "cancelled"
        traceback = None
        if msg.stack:  # the stack at the deadline (see GraceExpired)
            traceback = f"Stack at the deadline (most recent call last):\n{msg.stack}"
        self._fail(inf, error, None, status, outcome, base=base, traceback=traceback)
        last = self._record_of(inf.rank, inf.index)
        if last.attempts:
            noted = last.attempts[-1]._replace(note="abandoned")
            self._put_record(inf.rank, inf.index, last.with_last_attempt(noted, last.status))
            self._fx.append(SaveStep(self._record_of(inf.rank, inf.index)))
