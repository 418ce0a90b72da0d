"""Retry policy: which failed attempts run again, and after how long.

A :class:`RetryPolicy` is a frozen value.  After each failed attempt the
Supervisor asks it one question, :meth:`RetryPolicy.decide`, and gets back a
:class:`RetryDecision`: retry or not, the delay, and a reason a user can read.
Deciding is pure (no clock, no global random state, no sleeping) so the whole
policy is tested as arithmetic; the Supervisor owns the loop and the waiting.

Deciding runs on the Supervisor's thread once per failed attempt, and a
storm of failures must not stall it, so the verdict is plain checks; the
waits are tenacity's own strategies, driven with a ``tenacity.RetryCallState``
built for the one attempt being judged::

    failure (error, kind, attempt)
      ├─ classify   TIMEOUT / CRASH: from the flags retry_timeouts / retry_crashes
      │             ERROR: the first matching rule wins, in this order
      │               FatalError ▸ give_up_on ▸ RetryableError ▸ retry_on ▸ retry_if
      │             (the verdict tenacity's retry_all(retry_if_not_exception_type(
      │             give_up_on), retry_any(retry_if_exception_type(retry_on),
      │             retry_if_exception(retry_if))) gives, written as isinstance
      │             checks so the reason can name the rule that fired)
      ├─ stop       after max_attempts attempts (tenacity's stop_after_attempt)
      └─ wait       RetryableError.after if the step gave one, else the backoff:
                    wait_exponential / wait_fixed / wait_none, with jitter drawn
                    from a Random seeded by (run seed, step id, attempt)

Precedence, decided and why:

* ``FatalError`` never retries: the step said so, and nothing overrides that.
* ``give_up_on`` beats everything else, including ``RetryableError``: it is the
  policy owner's "never", written knowing what the code under it raises.
* ``RetryableError`` beats ``retry_on`` (and ``retry_if``): it is the step's
  explicit request, so it retries even when ``retry_on`` does not list it.  Its
  ``after`` replaces the backoff delay and is not capped.
* ``max_attempts`` bounds every retry, requested or not.

The one strategy written by hand rather than taken from tenacity is
``_backoff._SeededUniformWait``: tenacity's random waits draw from the global
``random`` module, so their delays could not be reproduced from a run's seed.
"""

from __future__ import annotations

import _random
import enum
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _json_text
from typing import Any, Final, cast

import tenacity

from stepvisor._validate import is_int
from stepvisor.errors import (
    FatalError,
    InvalidRetryPolicyError,
    InvalidSettingError,
    RetryableError,
)
from stepvisor.policies._backoff import DEFAULT_BACKOFF, Backoff
from stepvisor.policies._checks import check_exception_classes, check_flag, check_max_attempts
from stepvisor.policies._retry_mapping import name_of, policy_kwargs

__all__ = ["Backoff", "FailureKind", "RetryDecision", "RetryPolicy"]

#: One exception class or a tuple of them, as ``isinstance`` takes.
ExceptionClasses = type[BaseException] | tuple[type[BaseException], ...]


class FailureKind(enum.Enum):
    """What ended an attempt without success."""

    ERROR = "error"
    TIMEOUT = "timeout"
    CRASH = "crash"


def _check_decide_args(*, kind: object, attempt: object, seed: object) -> None:
    if not isinstance(kind, FailureKind):
        raise InvalidSettingError(
            f"kind must be a FailureKind (ERROR, TIMEOUT or CRASH), got {kind!r}"
        )
    if not is_int(attempt) or attempt < 1:
        raise InvalidSettingError(
            f"attempt must be the 1-based number of the attempt that failed, got {attempt!r}"
        )
    if not is_int(seed):
        raise InvalidSettingError(f"seed must be an integer (the run's seed), got {seed!r}")


#: A lag between an attempt's end and its failure's decision that the reason mentions.
_LAG_WORTH_SAYING: Final = 0.01


def _call_state(*, attempt: int) -> tenacity.RetryCallState:
    """A tenacity call state for one finished attempt, to drive its wait strategies."""
    # No tenacity Retrying loop exists (the Supervisor owns the loop), so there is
    # no retry object; the waits used here read only attempt_number.
    state = tenacity.RetryCallState(
        retry_object=cast("tenacity.BaseRetrying", None), fn=None, args=(), kwargs={}
    )
    state.attempt_number = attempt
    return state


def _jitter_rng(*, seed: int, step_id: str, attempt: int) -> _random.Random:
    """The random source of one delay, the same in every process and Python run.

    ``hash()`` of a string changes per process (PYTHONHASHSEED), so the key is
    hashed with SHA-256; two steps, or two attempts, draw different numbers.
    """
    # The text json.dumps(["stepvisor.retry", seed, step_id, attempt]) gives (the
    # key of every earlier version, so delays stay as they were), built directly.
    key = f'["stepvisor.retry", {int(seed)}, {_json_text(step_id)}, {int(attempt)}]'.encode()
    # The C generator seeded with the int directly: the same Mersenne Twister state
    # random.Random(n) gets (its seed() checks types in Python first, then does this).
    return _random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """The answer to "retry this failed attempt?": whether, after how long, and why."""

    retry: bool
    delay: float
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True, init=False)
class RetryPolicy:
    """Which failures of a step are retried, how many times, and after what delay.

    ``max_attempts`` counts every attempt, the first included (1 = no retries).
    A failure of kind ERROR is retried when its exception is an instance of a
    class in ``retry_on`` or ``retry_if(exc)`` is true, and it is not an instance
    of one in ``give_up_on``.  A step can raise ``RetryableError`` (retry, even
    when ``retry_on`` does not list it, optionally ``after`` N seconds) or
    ``FatalError`` (never retry).  Timeouts and crashes follow
    ``retry_timeouts`` and ``retry_crashes``.
    """

    max_attempts: int
    backoff: Backoff
    retry_on: tuple[type[BaseException], ...]
    give_up_on: tuple[type[BaseException], ...]
    retry_if: Callable[[BaseException], bool] | None
    retry_timeouts: bool
    retry_crashes: bool

    # Written by hand so that retry_on/give_up_on accept one class as well as a
    # tuple (typed so), while the fields are always tuples once built.
    def __init__(
        self,
        *,
        max_attempts: int = 1,
        backoff: Backoff = DEFAULT_BACKOFF,
        retry_on: ExceptionClasses = (Exception,),
        give_up_on: ExceptionClasses = (),
        retry_if: Callable[[BaseException], bool] | None = None,
        retry_timeouts: bool = True,
        retry_crashes: bool = True,
    ) -> None:
        set_ = object.__setattr__
        set_(self, "max_attempts", check_max_attempts(max_attempts))
        if not isinstance(backoff, Backoff):
            raise InvalidRetryPolicyError(
                f"backoff must be a Backoff, got {backoff!r}; use Backoff.exponential(), "
                "Backoff.fixed(seconds) or Backoff.none()"
            )
        set_(self, "backoff", backoff)
        set_(self, "retry_on", check_exception_classes(retry_on, what="retry_on"))
        set_(self, "give_up_on", check_exception_classes(give_up_on, what="give_up_on"))
        if retry_if is not None and not callable(retry_if):
            raise InvalidRetryPolicyError(
                f"retry_if must be a function taking the exception and returning a bool, "
                f"got {retry_if!r} ({type(retry_if).__name__})"
            )
        set_(self, "retry_if", retry_if)
        set_(self, "retry_timeouts", check_flag(retry_timeouts, what="retry_timeouts"))
        set_(self, "retry_crashes", check_flag(retry_crashes, what="retry_crashes"))

    # -- deciding -------------------------------------------------------------------

    def decide(
        self,
        *,
        error: BaseException,
        kind: FailureKind,
        attempt: int,
        seed: int,
        step_id: str,
        late: float = 0.0,
    ) -> RetryDecision:
        """Decide whether attempt number ``attempt`` (1-based), which failed, is retried.

        The delay's jitter is drawn from a source seeded by ``seed``, ``step_id``
        and ``attempt``, so a run with the same seed waits the same delays.

        ``late`` is how long after the attempt ended the failure is decided on;
        the delay returned counts from the attempt's end.  A jittered delay is
        drawn for the wait from the decision on (``late`` plus the draw), as a
        client sleeping its own jitter waits from when it saw its failure:
        retries drawn together stay spread however late a busy Supervisor took
        their failures in (counted from the end, the draws shorter than that lag
        would all be past, and start at once).  A delay without jitter, or one
        the step asked for, counts from the end alone, so that the lag does not
        make it later.  ``late`` = 0 leaves every delay as drawn.
        """
        _check_decide_args(kind=kind, attempt=attempt, seed=seed)
        wanted, why = self._classify(error=error, kind=kind)
        if not wanted:
            return RetryDecision(False, 0.0, why)
        if attempt >= self.max_attempts:
            return RetryDecision(
                False, 0.0, f"{why}, but no attempts left ({attempt} of {self.max_attempts})"
            )
        after = error.after if isinstance(error, RetryableError) else None
        if after is not None:
            delay, how = float(after), ", the delay it asked for"
        else:
            delay, how = self._backoff_delay(attempt, seed=seed, step_id=step_id), ""
        wait = delay  # the delay the reason names (a jittered one is waited from now)
        if after is None and self.backoff.jitter != "none" and late > 0.0:
            delay = late + wait
            if late >= _LAG_WORTH_SAYING:
                how = f" from now, {late:.2f} s after the attempt ended"
        return RetryDecision(
            True,
            delay,
            f"{why}; retrying in {wait:.2f} s{how} (attempt {attempt + 1} of {self.max_attempts})",
        )

    def delays(self, n: int, *, seed: int = 0, step_id: str = "step") -> list[float]:
        """The backoff delays after attempts 1..n, ignoring ``max_attempts``."""
        if not is_int(n) or n < 0:
            raise InvalidSettingError(f"n must be an integer >= 0, got {n!r}")
        return [self._backoff_delay(k, seed=seed, step_id=step_id) for k in range(1, n + 1)]

    def _backoff_delay(self, attempt: int, *, seed: int, step_id: str) -> float:
        backoff = self.backoff
        state = _call_state(attempt=attempt)
        if backoff.jitter == "none":
            # No draw, so no seeded source (its seeding is most of a decision's cost).
            return float(backoff._peak()(state))
        rng = _jitter_rng(seed=seed, step_id=step_id, attempt=attempt)
        return float(backoff._wait(rng=rng)(state))

    def _classify(self, *, error: BaseException, kind: FailureKind) -> tuple[bool, str]:
        if kind is FailureKind.TIMEOUT:
            return _by_flag(self.retry_timeouts, "the attempt timed out", "retry_timeouts")
        if kind is FailureKind.CRASH:
            return _by_flag(
                self.retry_crashes, "the worker running the attempt crashed", "retry_crashes"
            )
        return self._classify_error(error)

    def _classify_error(self, error: BaseException) -> tuple[bool, str]:
        name = type(error).__name__
        if isinstance(error, FatalError):
            return False, f"{name}: the step asked never to be retried"
        match = _first_match(error, self.give_up_on)
        if match is not None:
            return False, f"{name} matches give_up_on ({match})"
        if isinstance(error, RetryableError):
            return True, f"{name}: the step asked for a retry"
        match = _first_match(error, self.retry_on)
        if match is not None:
            return True, f"{name} matches retry_on ({match})"
        listed = ", ".join(c.__name__ for c in self.retry_on) or "nothing"
        if self.retry_if is None:
            return False, f"{name} does not match retry_on ({listed})"
        try:
            wanted = bool(self.retry_if(error))
        except Exception as failure:  # a broken predicate means "not retryable", said so
            return False, (
                f"retry_if raised {type(failure).__name__}: {failure} when asked about {name}, "
                "so it is not retried; make retry_if return True or False"
            )
        if wanted:
            return True, f"retry_if returned true for {name}"
        return False, f"{name} matches neither retry_on ({listed}) nor retry_if"

    # -- configuration files --------------------------------------------------------

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, where: str) -> RetryPolicy:
        """Build a policy from a config mapping, such as a workflow file's ``retry:``.

        Keys: ``max_attempts``, ``backoff`` (``exponential`` | ``fixed`` |
        ``none``), ``initial``, ``multiplier``, ``cap`` (exponential), ``delay``
        (fixed), ``jitter``, ``retry_on`` / ``give_up_on`` (lists of class names:
        ``ValueError``, ``builtins.ValueError``, ``pkg.mod.Error`` or
        ``pkg.mod:Error``), ``retry_if`` (``pkg.mod:function``),
        ``retry_timeouts``, ``retry_crashes``.  An error's message starts with
        ``where`` and names the key, e.g. ``etl.yaml: step 'load':
        retry.max_attempts must be >= 1, got 0``.
        """
        if not isinstance(data, Mapping):
            raise InvalidRetryPolicyError(
                f"{where}: retry must be a mapping of settings such as "
                f"{{max_attempts: 3}}, got {type(data).__name__}"
            )
        try:
            return cls(**policy_kwargs(data))
        except InvalidRetryPolicyError as exc:
            raise InvalidRetryPolicyError(f"{where}: retry.{exc}") from exc

    def to_mapping(self) -> dict[str, Any]:
        """The policy as a JSON-able dict that :meth:`from_mapping` reads back.

        ``retry_if`` is written as ``module:name``; a lambda or a local function
        has no importable name, so such a policy is shown but not read back.
        """
        data: dict[str, Any] = {
            "max_attempts": self.max_attempts,
            **self.backoff._to_mapping(),
            "retry_on": [name_of(c) for c in self.retry_on],
            "give_up_on": [name_of(c) for c in self.give_up_on],
            "retry_timeouts": self.retry_timeouts,
            "retry_crashes": self.retry_crashes,
        }
        if self.retry_if is not None:
            data["retry_if"] = name_of(self.retry_if)
        return data


def _by_flag(on: bool, what: str, flag: str) -> tuple[bool, str]:
    return on, f"{what} and {flag} is {'on' if on else 'off'}"


def _first_match(error: BaseException, classes: tuple[type[BaseException], ...]) -> str | None:
    """The name of the first of ``classes`` that ``error`` is an instance of."""
    for cls in classes:
        if isinstance(error, cls):
            return cls.__name__
    return None
