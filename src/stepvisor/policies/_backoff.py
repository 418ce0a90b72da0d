"""How long a retry waits: the :class:`Backoff` value and its seeded jitter.

A backoff is a frozen value that turns into a tenacity wait strategy
(:meth:`Backoff._wait`) for one delay; the jitter draws from a ``Random`` the
policy seeds per (run seed, step id, attempt), never from the global ``random``.
"""

from __future__ import annotations

import _random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

import tenacity
from tenacity.wait import wait_base

from stepvisor.errors import InvalidRetryPolicyError
from stepvisor.policies._checks import check_choice, check_multiplier, check_seconds

Jitter = Literal["none", "full", "equal"]
BackoffKind = Literal["exponential", "fixed", "none"]

_JITTERS: Final = ("none", "full", "equal")
BACKOFF_KINDS: Final = ("exponential", "fixed", "none")
#: Where each jitter's draw starts, as a fraction of the backoff delay d.
_JITTER_LOW: Final[Mapping[str, float]] = {"full": 0.0, "equal": 0.5}


class _SeededUniformWait(wait_base):
    """Wait a uniform time in ``[low * d, d]``, ``d = peak(state)``, from a seeded ``Random``.

    Written beside tenacity on purpose: tenacity's random waits (``wait_random``,
    ``wait_random_exponential``, ``wait_exponential_jitter``) draw from the
    global ``random`` module, so their delays cannot be reproduced from a run's
    seed.  The peak is itself a tenacity strategy, and subclassing ``wait_base``
    keeps tenacity's ``+`` composition working.  ``low`` = 0 is full jitter and
    0.5 equal jitter (``d/2 + uniform(0, d/2)``); it is one draw from one peak,
    not ``half + uniform(half)`` built from a halved strategy, because halving
    tenacity's inputs can round differently from halving its output.
    """

    def __init__(self, peak: wait_base, *, rng: _random.Random, low: float) -> None:
        self._peak = peak
        self._rng = rng
        self._low = low

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        peak = self._peak(retry_state)
        low = self._low * peak
        # random.Random.uniform(low, peak), written out: the source is the bare C
        # generator (seeding a random.Random goes through Python code first).
        return low + (peak - low) * self._rng.random()


@dataclass(frozen=True, slots=True, kw_only=True)
class Backoff:
    """How long to wait before the next attempt.

    Build one with :meth:`exponential`, :meth:`fixed` or :meth:`none`.  The delay
    after attempt *n* (before jitter) is ``min(cap, initial * multiplier**(n-1))``;
    a fixed backoff holds its delay in ``initial`` (``multiplier`` 1, ``cap`` =
    delay) and ``none`` is all zeros, so fields that do not apply to a kind are
    set to neutral values and equal backoffs compare equal.

    Jitter spreads retries of many steps apart: ``full`` draws the delay
    uniformly in ``[0, d]``, ``equal`` in ``[d/2, d]``, ``none`` uses ``d``.
    """

    kind: BackoffKind = "exponential"
    initial: float = 1.0
    multiplier: float = 2.0
    cap: float = 60.0
    jitter: Jitter = "full"

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        check_choice(self.kind, BACKOFF_KINDS, what="backoff")
        set_(self, "jitter", check_choice(self.jitter, _JITTERS, what="jitter"))
        set_(self, "initial", check_seconds(self.initial, what="initial"))
        if self.kind == "exponential":
            set_(self, "multiplier", check_multiplier(self.multiplier))
            set_(self, "cap", check_seconds(self.cap, what="cap"))
            if self.cap < self.initial:
                raise InvalidRetryPolicyError(
                    f"cap must be >= initial, got cap={self.cap:g} below "
                    f"initial={self.initial:g}; raise cap or lower initial"
                )
            return
        if self.kind == "none":
            set_(self, "initial", 0.0)
            set_(self, "jitter", "none")
        set_(self, "multiplier", 1.0)
        set_(self, "cap", self.initial)

    @classmethod
    def exponential(
        cls,
        *,
        initial: float = 1.0,
        multiplier: float = 2.0,
        cap: float = 60.0,
        jitter: Jitter = "full",
    ) -> Backoff:
        """Delays ``initial``, ``initial * multiplier``, ... up to ``cap`` seconds."""
        return cls(
            kind="exponential", initial=initial, multiplier=multiplier, cap=cap, jitter=jitter
        )

    @classmethod
    def fixed(cls, delay: float, *, jitter: Jitter = "none") -> Backoff:
        """The same ``delay`` (seconds) before every retry."""
        return cls(kind="fixed", initial=check_seconds(delay, what="delay"), jitter=jitter)

    @classmethod
    def none(cls) -> Backoff:
        """Retry at once."""
        return cls(kind="none", jitter="none")

    def _peak(self) -> wait_base:
        """The tenacity strategy for the delay before jitter."""
        if self.kind == "exponential":
            return tenacity.wait_exponential(
                multiplier=self.initial, max=self.cap, exp_base=self.multiplier
            )
        if self.kind == "fixed":
            return tenacity.wait_fixed(self.initial)
        return tenacity.wait_none()

    def _wait(self, *, rng: _random.Random) -> wait_base:
        """The full wait strategy, jitter included, drawing from ``rng``."""
        if self.jitter == "none":
            return self._peak()
        return _SeededUniformWait(self._peak(), rng=rng, low=_JITTER_LOW[self.jitter])

    def _to_mapping(self) -> dict[str, Any]:
        if self.kind == "exponential":
            return {
                "backoff": "exponential",
                "initial": self.initial,
                "multiplier": self.multiplier,
                "cap": self.cap,
                "jitter": self.jitter,
            }
        if self.kind == "fixed":
            return {"backoff": "fixed", "delay": self.initial, "jitter": self.jitter}
        return {"backoff": "none"}


DEFAULT_BACKOFF: Final = Backoff()
