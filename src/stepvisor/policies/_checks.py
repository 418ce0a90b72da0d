"""Validation of retry settings, shared by :class:`Backoff` and :class:`RetryPolicy`.

Every message starts with the field name, so ``RetryPolicy.from_mapping`` can
prefix it with the file and step ("etl.yaml: step 'load': retry.<message>").
Kept apart from the policy so the policy module reads as the decision it makes.
"""

from __future__ import annotations

import math
from typing import cast

from stepvisor._validate import is_int, is_number, seconds
from stepvisor.errors import InvalidRetryPolicyError


def check_seconds(value: object, *, what: str) -> float:
    """``value`` as a float if it is a finite number of seconds >= 0."""
    return seconds(
        value,
        what=what,
        fail=InvalidRetryPolicyError,
        allow_zero=True,
        fix=f"write it as a number such as {what}=1.5, or 0 for no delay",
    )


def check_multiplier(value: object) -> float:
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


def check_choice(value: object, choices: tuple[str, ...], *, what: str) -> str:
    if not isinstance(value, str) or value not in choices:
        raise InvalidRetryPolicyError(
            f"{what} must be one of {', '.join(map(repr, choices))}, got {value!r}"
        )
    return value


def check_flag(value: object, *, what: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidRetryPolicyError(
            f"{what} must be True or False, got {value!r} ({type(value).__name__})"
        )
    return value


def check_exception_classes(value: object, *, what: str) -> tuple[type[BaseException], ...]:
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


def check_max_attempts(value: object) -> int:
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
