"""The small checks every door into stepvisor shares: numbers, seconds, names, imports.

The Python API (``core/model.py``, ``policies/retry.py``), workflow files, the
project config and the command line each refuse bad input with their own error
class and their own advice, but the test itself must be the same everywhere:
``True`` is not a number of seconds on one door and a number on another.  So
the test is written once, here, and the caller passes ``fail``, the function
that turns a message into its typed error (an error class is one).

Nothing here imports the rest of stepvisor, so any module may use it.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import TypeGuard

__all__ = [
    "Fail",
    "duplicates",
    "import_module",
    "is_int",
    "is_number",
    "name_list",
    "qualified_name",
    "seconds",
    "type_name",
]

#: Turns a message into the error to raise (an error class, or a factory that
#: adds the file and step to it).
Fail = Callable[[str], Exception]


def is_number(value: object) -> TypeGuard[int | float]:
    """An int or a float, but not a bool (``True`` is an ``int`` to Python, not to users)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_int(value: object) -> TypeGuard[int]:
    """An int, but not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def seconds(value: object, *, what: str, fail: Fail, allow_zero: bool = False, fix: str) -> float:
    """``value`` as a float if it is a finite number of seconds, > 0 (or >= 0 if ``allow_zero``).

    NaN and infinity are refused: a deadline of ``inf`` is "no deadline", which
    every setting spells ``None``.  ``fix`` ends both messages: what to write instead.
    """
    if allow_zero:
        kind, finite = "a number of seconds", "a finite number of seconds >= 0"
    else:
        kind, finite = "a positive number of seconds", "a positive finite number of seconds"
    if not is_number(value):
        raise fail(f"{what} must be {kind}, got {value!r} ({type(value).__name__}); {fix}")
    if not 0 <= value < math.inf or (value == 0 and not allow_zero):  # NaN fails too
        raise fail(f"{what} must be {finite}, got {value!r}; {fix}")
    return float(value)


_PROSE_TYPES: dict[type, str] = {
    dict: "a mapping",
    list: "a list",
    str: "a string",
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    type(None): "null",
}


def type_name(value: object) -> str:
    """What ``value`` is, in the words of a YAML or JSON file ("a mapping", "null", ...)."""
    return _PROSE_TYPES.get(type(value), type(value).__name__)


def qualified_name(cls: type, *, sep: str = ".") -> str:
    """``module<sep>Qualified.Name`` of a class, or the bare name of a builtin.

    ``sep=":"`` gives the ``module:Name`` form that :func:`import_module` and
    workflow files read back.
    """
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}{sep}{cls.__qualname__}"


def name_list(value: object) -> tuple[object, ...] | None:
    """The names ``value`` lists, a bare string counting as one; ``None`` if it lists nothing.

    A bare string is almost always a forgotten list (``needs="a"`` means
    ``["a"]``), so it is taken as one; a mapping or a number is not a list.
    The items are returned as they are: the caller says what a bad one is.
    """
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Iterable) and not isinstance(value, dict | bytes):
        return tuple(value)
    return None


def duplicates(names: Iterable[str]) -> list[str]:
    """The names listed more than once, sorted."""
    seen: set[str] = set()
    twice: set[str] = set()
    for name in names:
        (twice if name in seen else seen).add(name)
    return sorted(twice)


def import_module(name: str, *, prefix: str, fail: Fail, fix: str) -> ModuleType:
    """Import module ``name``; any failure becomes ``fail(prefix + message)``, chained.

    The message tells apart the module missing, a module it imports missing, a
    syntax error and an error raised while importing, because each has its
    own fix; ``fix`` is the advice for the first.
    """
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing == name or name.startswith(missing + "."):
            raise fail(
                f"{prefix}module {name!r} cannot be imported: there is no module named "
                f"{missing!r}; {fix}"
            ) from exc
        raise fail(
            f"{prefix}importing module {name!r} failed because it imports {missing!r}, "
            "which is not installed; install it"
        ) from exc
    except SyntaxError as exc:
        raise fail(
            f"{prefix}module {name!r} has a syntax error at {exc.filename}:{exc.lineno}: "
            f"{exc.msg}; fix the module"
        ) from exc
    except Exception as exc:
        raise fail(
            f"{prefix}importing module {name!r} raised {type(exc).__name__}: {exc}; fix the module"
        ) from exc
