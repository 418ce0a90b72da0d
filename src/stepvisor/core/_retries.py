"""Whether a failed attempt is retried, and the run-wide accounting behind it.

The step's :class:`~stepvisor.policies.retry.RetryPolicy` decides first-hand
(what failed, how many attempts are left, the backoff).  Two limits sit above
it: a step that crashed its worker ``max_worker_crashes`` times is poisonous
and not run again, and a run spends at most ``max_retries_total`` retries.
"""

from __future__ import annotations

from stepvisor.config import Resolved
from stepvisor.core._outcomes import add_note
from stepvisor.policies.retry import FailureKind, RetryPolicy

__all__ = ["Retries"]


class Retries:
    """Crash counts, the retry budget, and the steps waiting out a backoff."""

    __slots__ = ("_cfg", "_crashes", "_seed", "_used", "waiting")

    def __init__(self, cfg: Resolved, seed: int) -> None:
        self._cfg = cfg
        self._seed = seed
        self._crashes: dict[str, int] = {}
        self._used = 0
        #: step id -> the attempt whose backoff it is waiting out.
        self.waiting: dict[str, int] = {}

    @property
    def used(self) -> int:
        return self._used

    def delay(
        self,
        sid: str,
        policy: RetryPolicy,
        error: BaseException,
        kind: FailureKind,
        attempt: int,
        *,
        late: float = 0.0,
    ) -> tuple[float | None, str]:
        """``(delay, reason)`` to retry after, or ``(None, reason)`` not to retry.

        ``late``: seconds since the attempt ended (see :meth:`RetryPolicy.decide`).
        """
        cfg = self._cfg
        if kind is FailureKind.CRASH:
            crashes = self._crashes[sid] = self._crashes.get(sid, 0) + 1
            if crashes >= cfg.max_worker_crashes:
                note = (
                    f"not retried: step {sid!r} crashed its worker {crashes} times "
                    f"(max_worker_crashes={cfg.max_worker_crashes}); it is treated as "
                    "poisonous and not run again"
                )
                add_note(error, note)
                return None, note
        decision = policy.decide(
            error=error, kind=kind, attempt=attempt, seed=self._seed, step_id=sid, late=late
        )
        if not decision.retry:
            return None, decision.reason
        budget = cfg.max_retries_total
        if budget is not None and self._used >= budget:
            note = f"not retried: the run's retry budget (max_retries_total={budget}) is spent"
            add_note(error, note)
            return None, note
        self._used += 1
        return decision.delay, decision.reason

    def due(self, sid: str, attempt: int) -> bool:
        """The backoff of ``(sid, attempt)`` is over: True if it was still awaited."""
        if self.waiting.get(sid) != attempt:
            return False
        del self.waiting[sid]
        return True
