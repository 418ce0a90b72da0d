"""``RetryConfig``: the asyncio executor's retry settings, run as a stepvisor policy.

Why lenient in one place: callers keep switches such as ``enabled`` in the
same mapping as the retry fields (``step.metadata["retry"]``), and the
asyncio executor read its fields from that mapping and ignored the rest.
So unknown keys are ignored (with a debug log naming them); a known key
with a wrong value is still refused, with the field and the fix named.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import stepvisor as sv
from stepvisor.errors import InvalidRetryPolicyError, StepTimeoutError

_log = logging.getLogger("stepvisor.compat")


def _seconds(value: object, *, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
        raise InvalidRetryPolicyError(
            f"RetryConfig.{what} must be a finite number of seconds >= 0, got {value!r}; "
            "use 0 for no delay"
        )
    return float(value)


def _classes(value: object, *, what: str) -> tuple[type[BaseException], ...]:
    items = (value,) if isinstance(value, type) else value
    if not isinstance(items, tuple | list) or not all(
        isinstance(c, type) and issubclass(c, BaseException) for c in items
    ):
        raise InvalidRetryPolicyError(
            f"RetryConfig.{what} must be a tuple of exception classes, got {value!r}; "
            f"write e.g. {what}=(ConnectionError, TimeoutError)"
        )
    return tuple(items)


def _matches(cls: type[BaseException], classes: tuple[type[BaseException], ...]) -> bool:
    return any(issubclass(cls, c) for c in classes)


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryConfig:
    """Retries of one step, in the asyncio executor's terms.

    ``max_attempts`` counts every attempt (1 = no retries).  An error is
    retried when it is an instance of ``retryable_errors`` (empty: any
    error) and not of ``non_retryable_errors``; a timeout counts as a
    ``TimeoutError`` for that test.  The delay before attempt *n+1* is drawn
    uniformly from ``[0, get_backoff_seconds(n)]`` ("full jitter", so steps
    failing together do not retry together); during that wait the step
    holds no slot.
    """

    max_attempts: int = 1
    initial_backoff_seconds: float = 1.0
    max_backoff_seconds: float = 60.0
    backoff_multiplier: float = 2.0
    retryable_errors: tuple[type[BaseException], ...] = (Exception,)
    non_retryable_errors: tuple[type[BaseException], ...] = ()

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if (
            isinstance(self.max_attempts, bool)
            or not isinstance(self.max_attempts, int)
            or self.max_attempts < 1
        ):
            raise InvalidRetryPolicyError(
                f"RetryConfig.max_attempts must be an integer >= 1, got {self.max_attempts!r}; "
                "use 1 for no retries"
            )
        initial = _seconds(self.initial_backoff_seconds, what="initial_backoff_seconds")
        cap = _seconds(self.max_backoff_seconds, what="max_backoff_seconds")
        if cap < initial:
            raise InvalidRetryPolicyError(
                f"RetryConfig.max_backoff_seconds ({cap:g}) is below initial_backoff_seconds "
                f"({initial:g}); raise max_backoff_seconds or lower initial_backoff_seconds"
            )
        multiplier = self.backoff_multiplier
        if isinstance(multiplier, bool) or not isinstance(multiplier, int | float):
            multiplier = math.nan
        if not 1 <= multiplier < math.inf:
            raise InvalidRetryPolicyError(
                f"RetryConfig.backoff_multiplier must be a finite number >= 1, got "
                f"{self.backoff_multiplier!r}; use 1 for a constant delay"
            )
        set_(self, "initial_backoff_seconds", initial)
        set_(self, "max_backoff_seconds", cap)
        set_(self, "backoff_multiplier", float(multiplier))
        set_(self, "retryable_errors", _classes(self.retryable_errors, what="retryable_errors"))
        set_(
            self,
            "non_retryable_errors",
            _classes(self.non_retryable_errors, what="non_retryable_errors"),
        )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, where: str = "retry") -> RetryConfig:
        """Build one from a dict of its fields, such as ``step.metadata["retry"]``.

        Keys that are not fields are ignored (logged at debug level); a
        field with a wrong value raises ``InvalidRetryPolicyError``.
        """
        if not isinstance(data, Mapping):
            raise InvalidRetryPolicyError(
                f"{where}: retry must be a RetryConfig or a dict of its fields such as "
                f'{{"max_attempts": 3}}, got {type(data).__name__}'
            )
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(str(key) for key in data if key not in names)
        if unknown:
            _log.debug(
                "%s: ignoring %s (not RetryConfig fields; the fields are %s)",
                where,
                ", ".join(unknown),
                ", ".join(names),
            )
        try:
            return cls(**{key: value for key, value in data.items() if key in names})
        except InvalidRetryPolicyError as exc:
            raise InvalidRetryPolicyError(f"{where}: {exc}") from exc

    def should_retry(self, attempt: int, error: BaseException) -> bool:
        """Whether attempt ``attempt`` (1-based), failed with ``error``, is followed by another."""
        if attempt >= self.max_attempts:
            return False
        if self.non_retryable_errors and isinstance(error, self.non_retryable_errors):
            return False
        return not self.retryable_errors or isinstance(error, self.retryable_errors)

    def get_backoff_seconds(self, attempt: int) -> float:
        """The longest delay after attempt ``attempt`` (1-based); the delay is drawn up to it."""
        delay = self.initial_backoff_seconds * self.backoff_multiplier ** (attempt - 1)
        return min(delay, self.max_backoff_seconds)

    def to_policy(self) -> sv.RetryPolicy:
        """The same retries as a stepvisor ``RetryPolicy`` (one per distinct config, kept)."""
        return _policy(self)


@functools.lru_cache(maxsize=256)
def _policy(config: RetryConfig) -> sv.RetryPolicy:
    """Why kept: every step of every call converts its config, mostly the executor's default.

    Both are immutable values, so equal configs share one policy.
    """
    retryable = config.retryable_errors or (Exception,)
    timeouts = _matches(StepTimeoutError, retryable) and not _matches(
        StepTimeoutError, config.non_retryable_errors
    )
    return sv.RetryPolicy(
        max_attempts=config.max_attempts,
        backoff=sv.Backoff.exponential(
            initial=config.initial_backoff_seconds,
            multiplier=config.backoff_multiplier,
            cap=config.max_backoff_seconds,
            jitter="full",
        ),
        retry_on=retryable,
        give_up_on=config.non_retryable_errors,
        retry_timeouts=timeouts,
    )
