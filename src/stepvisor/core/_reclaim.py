"""Work stealing: an idle slot takes back what waits behind a slow attempt.

Tiny attempts are prefetched: an idle slot is handed a batch, which its
Worker runs one after the other (``RunMachine._fill``).  The batch is sized
from how long attempts took *so far*, so an attempt that turns out slow holds
back everything queued behind it on its slot, while the other slots, their
own batches done, have nothing to do.  For a mapped step that is the barrier
the map was meant to avoid: one slow item delaying the items after it.

So when slots sit free with nothing ready, the machine asks the most loaded
slot for the tail of its queue back (``Reclaim``).  The shell takes what the
Worker has not started, atomically (the Worker pops its batch from the left,
the shell from the right, of one deque), and says which attempts it took
(``Reclaimed``).  Those never ran: each goes back to the record it had before
it was dispatched (no attempt counted) and back into the ready queue, from
where ``_fill`` hands it to the idle slots.

A slot asked once and found holding less than asked (its Worker started the
rest, or its backend holds them: a process child is sent up to four attempts
ahead) is not asked again until it is handed new work, so asking never loops.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stepvisor.core.attempt import AttemptResult
from stepvisor.core.effects import Effect, Reclaim, SaveStep
from stepvisor.core.messages import AttemptDone, Reclaimed
from stepvisor.core.state import StepRecord, StepStatus
from stepvisor.errors import stop_error

if TYPE_CHECKING:
    from stepvisor.core._settle import Inflight
    from stepvisor.core._slots import Slots
    from stepvisor.policies.concurrency import Scheduler

__all__ = ["Reclaiming"]


class Reclaiming:
    """The machine's half of work stealing (a base of ``RunMachine``)."""

    sched: Scheduler
    stopping: bool
    _slots: Slots
    _inflight: dict[str, Inflight]
    _fx: list[Effect]
    _wall: float
    #: Slots asked for attempts back: slot -> how many were asked for.
    _asked: dict[str, int]
    #: Slots found holding less than asked: not asked again until given new work.
    _dry: set[str]

    if TYPE_CHECKING:

        def _record_of(self, r: int, index: int) -> StepRecord: ...

        def _put_record(self, r: int, index: int, record: StepRecord) -> None: ...

        def _on_done(self, done: AttemptDone) -> None: ...

    def _reclaim_for_idle(self) -> None:
        """Free slots and nothing ready: ask the most loaded slot for its queue's tail.

        The queued attempts are shared between the idle slots and the slot
        they wait on, so the one that asked keeps its running attempt and its
        share.  Called by ``_fill`` after it handed out all that was ready.
        """
        slots = self._slots
        idle = len(slots.free)
        if not idle or self.stopping or self.sched.ready_count or self._asked:
            return
        victim, most = "", 1
        dry = self._dry
        for slot, load in slots.load.items():
            if load > most and slot not in dry:
                victim, most = slot, load
        if not victim:
            return
        queued = most - 1  # the first is running (or done, its outcome on the way)
        count = max(1, queued * idle // (idle + 1))
        self._asked[victim] = count
        self._fx.append(Reclaim(victim, count))

    def _on_reclaimed(self, msg: Reclaimed) -> None:
        """Attempts taken back unstarted: undo their dispatch and queue them again."""
        asked = self._asked.pop(msg.slot, 0)
        if len(msg.attempts) < asked:
            self._dry.add(msg.slot)
        for sid, attempt in msg.attempts:
            inf = self._inflight.get(sid)
            if inf is None or inf.attempt != attempt or inf.slot != msg.slot:
                continue  # not the machine's to take back (cannot happen: the shell asks)
            if self.stopping:
                # Taken back as the run stops: it ends as a queued attempt asked to stop does.
                how = "stopped before it started; nothing was run"
                error = stop_error("cancel", step_id=sid, attempt=attempt, how=how)
                result = AttemptResult(kind="cancelled", error=error, note=how)
                wall = self._wall
                self._on_done(AttemptDone(sid, attempt, msg.slot, result, wall, wall, 0.0))
                continue
            del self._inflight[sid]
            self._slots.returned(msg.slot)
            record = self._record_of(inf.rank, inf.index)
            before = record.attempts[:-1]
            status = StepStatus.WAITING_RETRY if before else StepStatus.PENDING
            # _replace, not every field by position: a rare path, and one that must not
            # break (or drop a field) when StepRecord grows, as it did for the cache.
            back = record._replace(status=status, attempts=before)
            self._put_record(inf.rank, inf.index, back)
            self._fx.append(SaveStep(back))
            self.sched.release(inf.rank)
            self.sched.push(inf.rank, max(inf.index, 0))
