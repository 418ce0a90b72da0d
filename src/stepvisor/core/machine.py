"""The run machine: every decision of one run, made from messages, returned as effects.

::

    shell (Supervisor actor)                      RunMachine.handle(message, now, wall)
      Start ─────────────────────────────────▶   BeginRun, AddSlot…, SetTimer
      SlotReady (the shell has a Worker) ────▶   Dispatch… (or ReleaseSlot, if idle)
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
from types import MappingProxyType
from typing import Any

from stepvisor._log import log
from stepvisor.core._caching import Caching
from stepvisor.core._events import Emitter
from stepvisor.core._finish import finish_effects, supervisor_failed_result
from stepvisor.core._inputs import Inputs
from stepvisor.core._mapping import Mapped, MapRun
from stepvisor.core._plan import Plan
from stepvisor.core._reclaim import Reclaiming
from stepvisor.core._retries import Retries
from stepvisor.core._settle import BACKEND_GRACE_MARGIN, Inflight, Settling
from stepvisor.core._slots import Slots
from stepvisor.core.attempt import AttemptSpec
from stepvisor.core.effects import (
    AddSlot,
    AttemptOrder,
    BeginRun,
    CancelTimer,
    Dispatch,
    Effect,
    ReleaseSlot,
    RetireSlot,
    SaveStep,
    SaveSteps,
    SetTimer,
    StopAttempt,
)
from stepvisor.core.messages import (
    AttemptDone,
    AttemptsDone,
    CacheAnswer,
    CancelRun,
    DeadlineReached,
    GraceExpired,
    Message,
    OutputsSaved,
    Reclaimed,
    RetryDue,
    RunDeadline,
    SlotReady,
    Start,
)
from stepvisor.core.model import Step
from stepvisor.core.result import RunResult
from stepvisor.core.state import RunState, RunStatus, StepRecord, StepStatus, new
from stepvisor.policies.concurrency import Scheduler
from stepvisor.policies.retry import RetryPolicy

__all__ = ["BACKEND_GRACE_MARGIN", "Plan", "RunMachine"]

#: Prefetch (attempts queued behind a running one on a slot) is used only while
#: attempts take less than this on average: see ``_fill``.
PREFETCH_BELOW = 0.002
#: The most attempts handed to one slot in one Dispatch while prefetching.
#: Fewer batches mean fewer messages and Worker wake-ups per step: 10,000
#: no-op thread steps, 8 slots, cost 19.6-20.1 us each at 8, 16.4-17.4 at 16,
#: and 18.4 at 32, where the attempts in flight set the cyclic GC off.
PREFETCH_BATCH = 16

_NO_INPUTS: Mapping[str, Any] = MappingProxyType({})
_FAILED = (StepStatus.FAILED, StepStatus.TIMED_OUT)
_ANY = 1 << 62


class RunMachine(Mapped, Settling, Reclaiming, Caching):
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
            hold=plan.cached,
        )
        self._init_caching(plan.cached)
        self._store_may_refuse = plan.store_may_refuse
        self._payloads = plan.payloads
        self._inflight: dict[str, Inflight] = {}
        self._map_runs: dict[int, MapRun] = {}
        self._skip_cause: dict[int, int] = {}
        self._saving: dict[str, Inflight] = {}
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
            and not plan.unqueued.intersection(plan.executors)
            and all(step.timeout is None for step in self.wf.steps)
        )
        self._avg_duration = 0.0
        self._done_count = 0
        self._asked: dict[str, int] = {}
        self._dry: set[str] = set()
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
            AttemptsDone: self._on_batch,
            OutputsSaved: self._on_saved,
            CacheAnswer: self._on_cache_answer,
            DeadlineReached: self._on_deadline,
            GraceExpired: self._on_grace,
            RetryDue: self._on_retry_due,
            RunDeadline: self._on_run_deadline,
            CancelRun: self._on_cancel,
            SlotReady: self._on_slot_ready,
            Reclaimed: self._on_reclaimed,
            Start: self._on_start,
        }

    # -- the one entry point ---------------------------------------------------------

    def handle(self, message: Message, *, now: float, wall: float) -> list[Effect]:
        """Apply ``message`` at monotonic time ``now`` (wall clock ``wall``); return effects."""
        self._now = now
        self._wall = wall
        fx = self._fx = []
        if self.finished:
            kind = type(message)
            if kind is AttemptDone:
                self._retire_late(message)  # type: ignore[arg-type]
            elif kind is AttemptsDone:
                for done in message.outcomes:  # type: ignore[union-attr]
                    self._retire_late(done)
            return fx
        handler = self._handlers.get(type(message))
        if handler is None:
            log.warning("the run machine ignored an unexpected message %r", message)
            return fx
        handler(message)
        if self.sched.lookups:
            self._look_up()
        if self.sched.expandable:
            self._expand_ready()
        self._fill()
        self._maybe_finish()
        return fx

    def _retire_late(self, done: AttemptDone) -> None:
        """An outcome after the run finished: retire its slot if it was the last one out."""
        if self._slots.returned(done.worker):
            self._fx.append(RetireSlot(done.worker))

    def _on_batch(self, batch: AttemptsDone) -> None:
        for done in batch.outcomes:
            self._on_done(done)

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
    def abandoned_slots(self) -> frozenset[str]:
        """Slots whose attempt was abandoned and has not returned."""
        return self._slots.abandoned

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
                if restored[-1] in self.graph.maps:
                    self._restore_map(restored[-1], sid)
        for r in sorted(restored):
            self._inputs.publish(r, self.state.output(self.graph.order[r]))
        records = tuple(self.state.all_records())  # in canonical order, without a lookup each
        fx.append(BeginRun(self._wall, records, bool(restored)))
        self._events.started(
            fx,
            workflow_id=self.wf.id,
            seed=plan.seed,
            settings=self.cfg.jsonable(),
            resumed=bool(restored),
            wall=self._wall,
        )
        self.sched.initial_ready(restored)
        self._commit()
        if self.cfg.deadline is not None:
            self._run_deadline = self._now + self.cfg.deadline
            fx.append(
                SetTimer(("run",), self.cfg.deadline, RunDeadline(), self._now + self.cfg.deadline)
            )

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
                # A free slot runs one more whatever is queued elsewhere: it is
                # what bounds the attempts *running*; the limit bounds prefetch.
                r = self.sched.take(limit=self.cfg.max_parallel * batch if orders else _ANY)
                if r is None:
                    break
                orders.append(self._dispatch(r, slot))
            if not orders:
                break
            free.pop()
            if self._dry:
                self._dry.discard(slot)
            self._fx.append(Dispatch(slot, tuple(orders)))
        if self._prefetch_capable:
            self._reclaim_for_idle()
        self._balance_slots()

    def _balance_slots(self) -> None:
        """Ask for slots while ready work outnumbers them; lend idle ones back.

        The slots a run wants are the busy ones plus one per ready step, up to
        ``max_parallel``: a chain of steps holds one slot, a fan as many as it
        has branches ready.
        """
        slots, fx = self._slots, self._fx
        if self.stopping:
            want = 0
        else:
            busy = slots.held - slots.pending - len(slots.free)
            want = min(self.cfg.max_parallel, busy + self.sched.ready_count)
        for _slot in range(want - slots.held):
            fx.append(AddSlot(slots.add()))
        if self.plan.lend_slots and not self._asked:  # not one an answer may fill
            while slots.free and slots.held > want:
                slot = slots.free[-1]
                slots.release(slot)
                fx.append(ReleaseSlot(slot))

    def _on_slot_ready(self, msg: SlotReady) -> None:
        self._slots.ready(msg.slot)

    def _dispatch(self, r: int, slot: str) -> AttemptOrder:
        """Record the start of ``r``'s next attempt on ``slot``; return its order.

        This runs once per attempt on the shell's one thread, so it is written
        for speed: positional constructors, lookups by rank rather than by id,
        and no work for features the run does not use (events, deadlines).
        """
        step = self.wf.steps[self.graph.step_at_rank[r]]
        cfg = self.cfg
        index, sid, record, seen = self._begin_attempt(r, step, slot)
        attempt = len(record.attempts)
        now = self._now
        timeout = step.timeout if step.timeout is not None else cfg.step_timeout
        deadline = None if timeout is None else now + timeout
        on_run_deadline = False
        run_deadline = self._run_deadline
        if run_deadline is not None and (deadline is None or run_deadline < deadline):
            deadline = run_deadline
            on_run_deadline = True
        self._slots.load[slot] += 1
        spec = new(
            AttemptSpec,
            (
                self.plan.run_id,
                sid,
                attempt,
                (step.retry or cfg.retry).max_attempts,
                step.fn,
                step.is_async,
                seen,
                step.params,
                None,
                cfg.kill_grace,
                self._payloads.get(sid) if self._payloads else None,
                step.resources,
                None,
                None,
            ),
        )
        executor = self.plan.executors[r]
        inf = Inflight(
            r, attempt, slot, executor, cfg.deadline if on_run_deadline else timeout,
            on_run_deadline, deadline, index=index,
        )  # fmt: skip
        self._inflight[sid] = inf
        fx = self._fx
        fx.append(new(SaveStep, (record, None)))
        if self._events.on:
            self._events.dispatched(fx, sid, attempt, slot, self._wall)
        if deadline is None:
            may_hold = not self.graph.dependents[r] and not self.sched.chained_to(r)
            return new(AttemptOrder, (spec, executor, None, may_hold))
        budget = deadline - now
        key = ("deadline", sid, attempt)
        inf.timers.append(key)
        fx.append(SetTimer(key, budget, DeadlineReached(sid, attempt), now + budget))
        return AttemptOrder(spec, executor, budget)

    def _begin_attempt(
        self, r: int, step: Step, slot: str
    ) -> tuple[int, str, StepRecord, Mapping[str, Any]]:
        """Record the start of an attempt of ``r`` (or of the instance just taken).

        Returns its index (-1 for a step), its id, its record and its inputs.
        """
        if self._map_runs and r in self._map_runs:
            index = self.sched.taken_index
            self.state, record = self.state.start_instance_at(r, index, self._wall, slot)
            return index, record.step_id, record, self._instance_inputs(r, index)
        self.state, record = self.state.start_attempt_at(r, self._wall, slot)
        inputs = self._inputs.of(r) if self.graph.deps[r] else None  # a root sees nothing
        seen = (
            MappingProxyType({name: value for name, (_, value) in inputs.items()})
            if inputs
            else _NO_INPUTS
        )
        return -1, step.id, record, seen

    # -- deadlines, retries, cancel -------------------------------------------------

    def _request_stop(self, sid: str, inf: Inflight, reason: str) -> None:
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
        self._fx.append(SetTimer(key, grace, GraceExpired(sid, inf.attempt), self._now + grace))

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

    def _on_retry_due(self, msg: RetryDue) -> None:
        if not self.stopping and self._retries.due(msg.step_id, msg.attempt):
            r, index = self._unit(msg.step_id)
            self.sched.push(r, max(index, 0))

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
        if self._inflight or self._saving or self._looking:
            return
        if not self.stopping and (self.sched.ready_count or self._retries.waiting):
            return
        self.finished = True
        note = f"cancelled: {self.stop_note}" if self.stopping else "cancelled: never became ready"
        if self._map_runs:
            self._finish_maps(note)
        leftovers = [
            record.with_status(StepStatus.CANCELLED, note) for record in self.state.unfinished()
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
