"""Whose code is this: the user's own (tracked by the code digest) or a library's (not).

The user's code is every module that is not in the standard library, not installed
(site-packages, dist-packages, the interpreter's or the virtualenv's library folders) and
not stepvisor itself: the scripts and packages of the project being run, ``__main__``
(a script, ``python -c``, a notebook) and code made by ``exec`` outside any library.
A package installed in editable mode lives in the user's tree and counts as the user's.

Answers are remembered per file and per module name: a module does not move.
"""

from __future__ import annotations

import importlib.machinery
import os
import site
import sys
import sysconfig
from functools import cache
from types import ModuleType
from typing import Final

__all__ = [
    "is_user_file",
    "is_user_function",
    "is_user_module",
    "is_user_module_object",
    "user_module_file",
]

#: Top-level packages that are never the user's, wherever they are installed from.
_NEVER_USER: Final = frozenset({"stepvisor"})
_INSTALLED_DIRS: Final = ("site-packages", "dist-packages")


@cache
def _library_roots() -> tuple[str, ...]:
    """The folders that hold the standard library and installed packages, resolved."""
    roots: set[str] = set()
    for scheme_vars in (None, {"base": sys.base_prefix, "platbase": sys.base_exec_prefix}):
        paths = sysconfig.get_paths(vars=scheme_vars)
        roots.update(paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib"))
    try:
        roots.update(site.getsitepackages())
        roots.add(site.getusersitepackages())
    except AttributeError:  # pragma: no cover - an embedded interpreter's trimmed site module
        pass
    return tuple(sorted({os.path.join(os.path.realpath(r), "") for r in roots if r}))


@cache
def is_user_file(filename: str) -> bool:
    """Whether code from ``filename`` (a ``co_filename`` or a ``__file__``) is the user's.

    A pseudo-file such as ``<string>`` or ``<stdin>`` is the user's (``python -c``,
    ``exec``), except ``<frozen ...>``, the standard library frozen into the interpreter.
    """
    if filename.startswith("<"):
        return not filename.startswith("<frozen")
    path = os.path.realpath(filename)
    parts = path.split(os.sep)
    if any(part in _INSTALLED_DIRS for part in parts):
        return False
    return not path.startswith(_library_roots())


def _top_is_library(name: str) -> bool:
    top = name.partition(".")[0]
    return top in sys.stdlib_module_names or top in sys.builtin_module_names or top in _NEVER_USER


def _module_is_user(name: str) -> bool:
    if name == "__main__":
        return True
    module = sys.modules.get(name)
    if module is None:
        return False
    return _module_object_is_user(module)


def _module_object_is_user(module: ModuleType) -> bool:
    namespace = vars(module)
    filename = namespace.get("__file__")
    if isinstance(filename, str):
        return is_user_file(filename)
    paths = namespace.get("__path__")  # a namespace package has folders, no file
    if paths is not None:
        folders = [p for p in paths if isinstance(p, str)]
        return bool(folders) and all(is_user_file(os.path.join(p, "")) for p in folders)
    return False  # a built-in or synthetic module: nothing to read the code of


def is_user_module(name: object) -> bool:
    """Whether the module named ``name`` (a ``__module__`` value) holds the user's code."""
    if not isinstance(name, str) or _top_is_library(name):
        return False
    return _module_is_user(name)


def is_user_module_object(module: ModuleType) -> bool:
    """Whether ``module`` holds the user's code (by its own ``__name__`` and file)."""
    name = vars(module).get("__name__")
    if not isinstance(name, str) or _top_is_library(name):
        return False
    if name == "__main__":
        return True
    return _module_object_is_user(module)


def is_user_function(module: object, filename: str) -> bool:
    """Whether a function of module ``module`` whose code is from ``filename`` is the user's.

    Code made by ``exec`` (``<string>``, as for a dataclass's ``__init__``) belongs to the
    module it was made for, when that module is known.
    """
    if isinstance(module, str) and _top_is_library(module):
        return False
    if filename.startswith("<") and isinstance(module, str) and module in sys.modules:
        return is_user_module(module)
    return is_user_file(filename)


def user_module_file(name: str) -> str | None:
    """The source file of the user's module ``name``, found WITHOUT importing anything;
    ``None`` for a library's, a built-in, or a module that cannot be found that way.

    A module imported already gives its ``__file__``; another is searched for on
    ``sys.path`` (``PathFinder``: no import hooks run, no package ``__init__`` runs).
    """
    if not name or _top_is_library(name):
        return None
    module = sys.modules.get(name)
    filename: object = None
    if module is not None:
        filename = vars(module).get("__file__")
    else:
        path: list[str] | None = None
        spec = None
        for part in name.split("."):
            try:
                spec = importlib.machinery.PathFinder.find_spec(part, path)
            except (ImportError, ValueError):
                return None
            if spec is None:
                return None
            locations = spec.submodule_search_locations
            path = list(locations) if locations is not None else None
        filename = spec.origin if spec is not None and spec.has_location else None
    if not isinstance(filename, str) or not is_user_file(filename):
        return None
    return filename
