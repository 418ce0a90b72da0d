"""Retry policies in configuration files: names to classes and back.

A workflow file writes exception classes and ``retry_if`` as importable names
(``ValueError``, ``pkg.mod:Error``); this module resolves them for
``RetryPolicy.from_mapping`` and names them for ``RetryPolicy.to_mapping``, and
checks the keys, so a typo is reported with the closest real setting.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any, Final, cast

from stepvisor._validate import import_module, qualified_name
from stepvisor.errors import InvalidRetryPolicyError
from stepvisor.policies._backoff import BACKOFF_KINDS, Backoff
from stepvisor.policies._checks import check_choice

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


def policy_kwargs(data: Mapping[str, Any]) -> dict[str, Any]:
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
    kind = check_choice(data.get("backoff", "exponential"), BACKOFF_KINDS, what="backoff")
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


def name_of(obj: object) -> str:
    """``Name`` for a builtin, else ``module:qualified.name`` (what _import reads)."""
    target = obj if hasattr(obj, "__qualname__") else type(obj)
    return qualified_name(cast("type", target), sep=":")
