"""Retry policy: which failed attempts run again, and after how long.

A :class:`RetryPolicy` is a frozen value.  After each failed attempt the
Supervisor asks it one question, :meth:`RetryPolicy.decide`, and gets back a
:class:`RetryDecision`: retry or not, the delay, and a reason a user can read.
Deciding is pure (no clock, no global random state, no sleeping) so the whole
policy is tested as arithmetic; the Supervisor owns the loop and the waiting.

The strategies are tenacity's own, driven with a real
``tenacity.RetryCallState`` built for the one attempt being judged::

    failure (error, kind, attempt)
      ├─ classify   TIMEOUT / CRASH: retry_always or retry_never, from the flags
      │             ERROR: the first matching rule wins, in this order
      │               FatalError ▸ give_up_on ▸ RetryableError ▸ retry_on ▸ retry_if
      │             (the same verdict as retry_all(retry_if_not_exception_type(
      │             give_up_on), retry_any(retry_on, retry_if)), kept as a list so
      │             the reason can name the rule that fired)
      ├─ stop       tenacity.stop_after_attempt(max_attempts)
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

The one strategy written here rather than taken from tenacity is
:class:`_SeededUniformWait`: tenacity's random waits draw from the global
``random`` module, so their delays could not be reproduced from a run's seed.
"""

from __future__ import annotations

import difflib
import enum
import hashlib
import json
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, cast

import tenacity
from tenacity.wait import wait_base

from stepvisor._validate import import_module, is_int, is_number, qualified_name, seconds
from stepvisor.errors import (
    FatalError,
    InvalidRetryPolicyError,
    InvalidSettingError,
    RetryableError,
)

__all__ = ["Backoff", "FailureKind", "RetryDecision", "RetryPolicy"]

Jitter = Literal["none", "full", "equal"]
BackoffKind = Literal["exponential", "fixed", "none"]
#: One exception class or a tuple of them, as ``isinstance`` takes.
ExceptionClasses = type[BaseException] | tuple[type[BaseException], ...]

_JITTERS: Final = ("none", "full", "equal")
_BACKOFF_KINDS: Final = ("exponential", "fixed", "none")
#: Where each jitter's draw starts, as a fraction of the backoff delay d.
_JITTER_LOW: Final[Mapping[str, float]] = {"full": 0.0, "equal": 0.5}

#: Which mapping keys each backoff kind accepts (``from_mapping``).
_BACKOFF_KEYS: Final[Mapping[str, tuple[str, ...]]] = {
    "exponential": ("initial", "multiplier", "cap", "jitter"),
    "fixed": ("delay", "jitter"),
    "none": (),
}
_MAPPING_KEYS: Final = (
    "backoff",
    "cap",
    "delay",
    "give_up_on",
    "initial",
    "jitter",
    "max_attempts",
    "multiplier",
    "retry_crashes",
    "retry_if",
    "retry_on",
    "retry_timeouts",
)


class FailureKind(enum.Enum):
    """What ended an attempt without success."""

    ERROR = "error"
    TIMEOUT = "timeout"
    CRASH = "crash"


# -- validation helpers ---------------------------------------------------------
# Every message starts with the field name, so ``from_mapping`` can prefix it
# with the file and step ("etl.yaml: step 'load': retry.<message>").


def _seconds(value: object, *, what: str) -> float:
    """``value`` as a float if it is a finite number of seconds >= 0."""
    return seconds(
        value,
        what=what,
        fail=InvalidRetryPolicyError,
        allow_zero=True,
        fix=f"write it as a number such as {what}=1.5, or 0 for no delay",
    )


def _multiplier(value: object) -> float:
    if not is_number(value):
        raise InvalidRetryPolicyError(
            f"multiplier must be a number, got {value!r} ({type(value).__name__}); "
            "use 2 to double the delay after each attempt"
        )
    if not 1 <= value < math.inf:
        raise InvalidRetryPolicyError(
            f"multiplier must be a finite number >= 1, got {value!r}; each delay is the "
            "previous one times multiplier, so use 1 for a constant delay"
        )
    return float(value)


def _choice(value: object, choices: tuple[str, ...], *, what: str) -> str:
    if not isinstance(value, str) or value not in choices:
        raise InvalidRetryPolicyError(
            f"{what} must be one of {', '.join(map(repr, choices))}, got {value!r}"
        )
    return value


def _flag(value: object, *, what: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidRetryPolicyError(
            f"{what} must be True or False, got {value!r} ({type(value).__name__})"
        )
    return value


def _exception_classes(value: object, *, what: str) -> tuple[type[BaseException], ...]:
    """A tuple of exception classes; a single class becomes a one-class tuple."""
    items = (value,) if isinstance(value, type) else value
    if not isinstance(items, tuple | list):
        raise InvalidRetryPolicyError(
            f"{what} must be an exception class or a tuple of them, got {value!r} "
            f"({type(value).__name__}); write e.g. {what}=(ConnectionError, TimeoutError)"
        )
    for item in items:
        if not (isinstance(item, type) and issubclass(item, BaseException)):
            raise InvalidRetryPolicyError(
                f"{what} must hold exception classes, got {item!r} ({type(item).__name__}); "
                "pass the class itself, e.g. ValueError, not ValueError() or 'ValueError'"
            )
    return tuple(cast("list[type[BaseException]]", items))


def _max_attempts(value: object) -> int:
    if not is_int(value):
        raise InvalidRetryPolicyError(
            f"max_attempts must be an integer, got {value!r} ({type(value).__name__}); "
            "it counts every attempt, e.g. 3 for one try and two retries"
        )
    if value < 1:
        raise InvalidRetryPolicyError(
            f"max_attempts must be >= 1, got {value}; use 1 for no retries"
        )
    return value


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


# -- the strategies -------------------------------------------------------------


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

    def __init__(self, peak: wait_base, *, rng: random.Random, low: float) -> None:
        self._peak = peak
        self._rng = rng
        self._low = low

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        peak = self._peak(retry_state)
        return self._rng.uniform(self._low * peak, peak)


def _call_state(*, attempt: int, error: BaseException | None) -> tenacity.RetryCallState:
    """A tenacity call state for one finished attempt, to drive its strategies."""
    # No tenacity Retrying loop exists (the Supervisor owns the loop), so there is
    # no retry object; the strategies used here read only attempt_number and outcome.
    state = tenacity.RetryCallState(
        retry_object=cast("tenacity.BaseRetrying", None), fn=None, args=(), kwargs={}
    )
    state.attempt_number = attempt
    if error is not None:
        outcome = tenacity.Future(attempt)
        outcome.set_exception(error)
        state.outcome = outcome
    return state


def _jitter_rng(*, seed: int, step_id: str, attempt: int) -> random.Random:
    """The random source of one delay, the same in every process and Python run.

    ``hash()`` of a string changes per process (PYTHONHASHSEED), so the key is
    hashed with SHA-256; two steps, or two attempts, draw different numbers.
    """
    key = json.dumps(["stepvisor.retry", seed, step_id, attempt]).encode()
    return random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))


# -- values -----------------------------------------------------------------------


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
        _choice(self.kind, _BACKOFF_KINDS, what="backoff")
        set_(self, "jitter", _choice(self.jitter, _JITTERS, what="jitter"))
        set_(self, "initial", _seconds(self.initial, what="initial"))
        if self.kind == "exponential":
            set_(self, "multiplier", _multiplier(self.multiplier))
            set_(self, "cap", _seconds(self.cap, what="cap"))
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
        return cls(kind="fixed", initial=_seconds(delay, what="delay"), jitter=jitter)

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

    def _wait(self, *, rng: random.Random) -> wait_base:
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


_DEFAULT_BACKOFF: Final = Backoff()


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """The answer to "retry this failed attempt?": whether, after how long, and why."""

    retry: bool
    delay: float
    reason: str


@dataclass(frozen=True, slots=True)
class _Rule:
    """One classification rule for ERROR failures: a tenacity strategy and its verdict."""

    matches: tenacity.retry_base
    retry: bool
    reason: str  # formatted with {name} (the error's class) and {match} (the listed class)
    classes: tuple[type[BaseException], ...] = ()


class _GuardedPredicate:
    """``retry_if`` made safe: an exception it raises means "not retryable", recorded."""

    def __init__(self, predicate: Callable[[BaseException], bool]) -> None:
        self._predicate = predicate
        self.failure: Exception | None = None

    def __call__(self, error: BaseException) -> bool:
        try:
            return bool(self._predicate(error))
        except Exception as exc:
            self.failure = exc
            return False


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
        backoff: Backoff = _DEFAULT_BACKOFF,
        retry_on: ExceptionClasses = (Exception,),
        give_up_on: ExceptionClasses = (),
        retry_if: Callable[[BaseException], bool] | None = None,
        retry_timeouts: bool = True,
        retry_crashes: bool = True,
    ) -> None:
        set_ = object.__setattr__
        set_(self, "max_attempts", _max_attempts(max_attempts))
        if not isinstance(backoff, Backoff):
            raise InvalidRetryPolicyError(
                f"backoff must be a Backoff, got {backoff!r}; use Backoff.exponential(), "
                "Backoff.fixed(seconds) or Backoff.none()"
            )
        set_(self, "backoff", backoff)
        set_(self, "retry_on", _exception_classes(retry_on, what="retry_on"))
        set_(self, "give_up_on", _exception_classes(give_up_on, what="give_up_on"))
        if retry_if is not None and not callable(retry_if):
            raise InvalidRetryPolicyError(
                f"retry_if must be a function taking the exception and returning a bool, "
                f"got {retry_if!r} ({type(retry_if).__name__})"
            )
        set_(self, "retry_if", retry_if)
        set_(self, "retry_timeouts", _flag(retry_timeouts, what="retry_timeouts"))
        set_(self, "retry_crashes", _flag(retry_crashes, what="retry_crashes"))

    # -- deciding -------------------------------------------------------------------

    def decide(
        self,
        *,
        error: BaseException,
        kind: FailureKind,
        attempt: int,
        seed: int,
        step_id: str,
    ) -> RetryDecision:
        """Decide whether attempt number ``attempt`` (1-based), which failed, is retried.

        The delay's jitter is drawn from a source seeded by ``seed``, ``step_id``
        and ``attempt``, so a run with the same seed waits the same delays.
        """
        _check_decide_args(kind=kind, attempt=attempt, seed=seed)
        state = _call_state(attempt=attempt, error=error)
        wanted, why = self._classify(state, error=error, kind=kind)
        if not wanted:
            return RetryDecision(False, 0.0, why)
        if tenacity.stop_after_attempt(self.max_attempts)(state):
            return RetryDecision(
                False, 0.0, f"{why}, but no attempts left ({attempt} of {self.max_attempts})"
            )
        after = error.after if isinstance(error, RetryableError) else None
        if after is not None:
            delay, how = float(after), ", the delay it asked for"
        else:
            delay, how = self._backoff_delay(state, seed=seed, step_id=step_id), ""
        return RetryDecision(
            True,
            delay,
            f"{why}; retrying in {delay:.2f} s{how} (attempt {attempt + 1} of {self.max_attempts})",
        )

    def delays(self, n: int, *, seed: int = 0, step_id: str = "step") -> list[float]:
        """The backoff delays after attempts 1..n, ignoring ``max_attempts``."""
        if not is_int(n) or n < 0:
            raise InvalidSettingError(f"n must be an integer >= 0, got {n!r}")
        return [
            self._backoff_delay(_call_state(attempt=k, error=None), seed=seed, step_id=step_id)
            for k in range(1, n + 1)
        ]

    def _backoff_delay(self, state: tenacity.RetryCallState, *, seed: int, step_id: str) -> float:
        rng = _jitter_rng(seed=seed, step_id=step_id, attempt=state.attempt_number)
        return float(self.backoff._wait(rng=rng)(state))

    def _classify(
        self, state: tenacity.RetryCallState, *, error: BaseException, kind: FailureKind
    ) -> tuple[bool, str]:
        if kind is FailureKind.TIMEOUT:
            return self._by_flag(
                state, on=self.retry_timeouts, what="the attempt timed out", flag="retry_timeouts"
            )
        if kind is FailureKind.CRASH:
            return self._by_flag(
                state,
                on=self.retry_crashes,
                what="the worker running the attempt crashed",
                flag="retry_crashes",
            )
        return self._classify_error(state, error=error)

    @staticmethod
    def _by_flag(
        state: tenacity.RetryCallState, *, on: bool, what: str, flag: str
    ) -> tuple[bool, str]:
        strategy = tenacity.retry_always if on else tenacity.retry_never
        return strategy(state), f"{what} and {flag} is {'on' if on else 'off'}"

    def _error_rules(self, guard: Callable[[BaseException], bool]) -> tuple[_Rule, ...]:
        """The ERROR rules in precedence order; the first that matches decides."""
        is_a = tenacity.retry_if_exception_type
        return (
            _Rule(is_a(FatalError), False, "{name}: the step asked never to be retried"),
            _Rule(
                is_a(self.give_up_on), False, "{name} matches give_up_on ({match})", self.give_up_on
            ),
            _Rule(is_a(RetryableError), True, "{name}: the step asked for a retry"),
            _Rule(is_a(self.retry_on), True, "{name} matches retry_on ({match})", self.retry_on),
            _Rule(tenacity.retry_if_exception(guard), True, "retry_if returned true for {name}"),
        )

    def _classify_error(
        self, state: tenacity.RetryCallState, *, error: BaseException
    ) -> tuple[bool, str]:
        name = type(error).__name__
        guard = _GuardedPredicate(self.retry_if or _never)
        for rule in self._error_rules(guard):
            if rule.matches(state):
                match = next((c.__name__ for c in rule.classes if isinstance(error, c)), "")
                return rule.retry, rule.reason.format(name=name, match=match)
        if guard.failure is not None:
            failure = guard.failure
            return False, (
                f"retry_if raised {type(failure).__name__}: {failure} when asked about {name}, "
                "so it is not retried; make retry_if return True or False"
            )
        listed = ", ".join(c.__name__ for c in self.retry_on) or "nothing"
        if self.retry_if is None:
            return False, f"{name} does not match retry_on ({listed})"
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
            return cls(**_policy_kwargs(data))
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
            "retry_on": [_name_of(c) for c in self.retry_on],
            "give_up_on": [_name_of(c) for c in self.give_up_on],
            "retry_timeouts": self.retry_timeouts,
            "retry_crashes": self.retry_crashes,
        }
        if self.retry_if is not None:
            data["retry_if"] = _name_of(self.retry_if)
        return data


def _never(error: BaseException) -> bool:
    return False


# -- mapping helpers ------------------------------------------------------------------


def _policy_kwargs(data: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments for RetryPolicy from a config mapping, names resolved."""
    for key in data:
        if key not in _MAPPING_KEYS:
            close = difflib.get_close_matches(str(key), _MAPPING_KEYS, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise InvalidRetryPolicyError(
                f"{key} is not a retry setting; {hint}the settings are {', '.join(_MAPPING_KEYS)}"
            )
    kwargs: dict[str, Any] = {"backoff": _backoff_from(data)}
    for key in ("max_attempts", "retry_timeouts", "retry_crashes"):
        if key in data:
            kwargs[key] = data[key]
    for key in ("retry_on", "give_up_on"):
        if key in data:
            kwargs[key] = _classes_from_names(data[key], what=key)
    if "retry_if" in data:
        kwargs["retry_if"] = _import(data["retry_if"], what="retry_if")
    return kwargs


def _backoff_from(data: Mapping[str, Any]) -> Backoff:
    kind = _choice(data.get("backoff", "exponential"), _BACKOFF_KINDS, what="backoff")
    for key in ("initial", "multiplier", "cap", "delay", "jitter"):
        if key in data and key not in _BACKOFF_KEYS[kind]:
            kinds = [k for k, keys in _BACKOFF_KEYS.items() if key in keys]
            raise InvalidRetryPolicyError(
                f"{key} does not apply to backoff {kind!r}; remove it, or set backoff "
                f"to {' or '.join(map(repr, kinds))}"
            )
    options = {key: data[key] for key in _BACKOFF_KEYS[kind] if key in data}
    if kind == "exponential":
        return Backoff.exponential(**options)
    if kind == "fixed":
        if "delay" not in options:
            raise InvalidRetryPolicyError(
                "delay is required with backoff 'fixed'; give the seconds between attempts"
            )
        return Backoff.fixed(**options)
    return Backoff.none()


def _classes_from_names(value: object, *, what: str) -> tuple[type[BaseException], ...]:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list | tuple):
        raise InvalidRetryPolicyError(
            f"{what} must be a list of exception class names such as "
            f"[ConnectionError, 'mypkg.errors:MyError'], got {value!r}"
        )
    classes = []
    for index, name in enumerate(names):
        item = _import(name, what=f"{what}[{index}]")
        if not (isinstance(item, type) and issubclass(item, BaseException)):
            raise InvalidRetryPolicyError(
                f"{what}[{index}] names {name!r}, which is not an exception class; "
                "name a class derived from Exception"
            )
        classes.append(item)
    return tuple(classes)


def _import(name: object, *, what: str) -> object:
    """Resolve ``Name`` (builtins), ``pkg.mod.Name`` or ``pkg.mod:Outer.Name``."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidRetryPolicyError(
            f"{what} must be a name such as 'ValueError' or 'mypkg.errors:MyError', got {name!r}"
        )
    if ":" in name:
        module_name, _, path = name.partition(":")
    elif "." in name:
        module_name, _, path = name.rpartition(".")
    else:
        module_name, path = "builtins", name
    found: object = import_module(
        module_name,
        prefix=f"{what} names {name!r}, but ",
        fail=InvalidRetryPolicyError,
        fix="check the spelling and that the package is installed",
    )
    for part in path.split("."):
        try:
            found = getattr(found, part)
        except AttributeError as exc:
            problem = "is not a builtin" if module_name == "builtins" else "is not found"
            raise InvalidRetryPolicyError(
                f"{what} names {name!r}, which {problem}; write 'package.module:Name' "
                "for a class or function of your own"
            ) from exc
    return found


def _name_of(obj: object) -> str:
    """``Name`` for a builtin, else ``module:qualified.name`` (what _import reads)."""
    target = obj if hasattr(obj, "__qualname__") else type(obj)
    return qualified_name(cast("type", target), sep=":")
