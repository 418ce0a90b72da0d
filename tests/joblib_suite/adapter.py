"""Loading joblib's installed ``test_parallel`` module with "stepvisor" in its backend lists."""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from joblib._parallel_backends import LokyBackend, MultiprocessingBackend
from joblib.parallel import BACKENDS

import stepvisor.joblib
from stepvisor.joblib import StepvisorBackend
from tests import joblib_loky

#: The parametrize argument names that take a backend.
BACKEND_ARGS = ("backend", "parent_backend", "child_backend", "outer_backend", "inner_backend")
MODULE = "joblib.test.test_parallel"


def _marks(obj: object) -> list[Any]:
    marks = getattr(obj, "pytestmark", [])
    return marks if isinstance(marks, list) else [marks]


def _add_stepvisor(mark: Any) -> None:
    """Add "stepvisor" to a backend parametrization list that names "loky" (in place).

    A list of names gets "stepvisor" appended; a list of rows (a backend with
    what the test expects of it) gets a copy of each row naming "loky", with
    "stepvisor" in its place and loky's expectations kept.
    """
    if mark.name != "parametrize" or len(mark.args) < 2:
        return
    names = mark.args[0]
    names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    values = mark.args[1]
    positions = [i for i, name in enumerate(names) if name in BACKEND_ARGS]
    if not positions or not isinstance(values, list):
        return
    if len(names) == 1:
        if "loky" in values and "stepvisor" not in values:
            values.append("stepvisor")
        return
    for row in list(values):
        if isinstance(row, tuple) and any(row[i] == "loky" for i in positions):
            ours = tuple(
                "stepvisor" if i in positions and v == "loky" else v for i, v in enumerate(row)
            )
            if ours not in values:
                values.append(ours)


def load_joblib_tests() -> dict[str, Any]:
    """The test functions of joblib's installed ``test_parallel``, "stepvisor" in their lists."""
    stepvisor.joblib.register()
    # loky's resource trackers and multiprocessing's temporary directory live for the
    # session: started before any test, they are not one test's leftovers.
    joblib_loky.prepare()
    if MODULE in sys.modules:
        module = sys.modules[MODULE]
    else:
        try:
            module = importlib.import_module(MODULE)
        except ImportError as exc:
            raise RuntimeError(
                f"{MODULE} is not installed: this joblib wheel does not ship its tests"
            ) from exc
    found: dict[str, Any] = {}
    for name, obj in vars(module).items():
        if name.startswith("test_") and isinstance(obj, types.FunctionType):
            for mark in _marks(obj):
                _add_stepvisor(mark)
            found[name] = obj
    return found


def involves(value: object, names: tuple[str, ...]) -> bool:
    """Whether a backend parameter is of a kind in ``names``: its name, an instance, a subclass.

    (joblib's suite registers ``back_compat_backend``, a loky backend by another name.)
    """
    kinds = {
        "stepvisor": StepvisorBackend,
        "loky": LokyBackend,
        "multiprocessing": MultiprocessingBackend,
    }
    wanted = tuple(kinds[name] for name in names)
    if isinstance(value, str):
        cls = BACKENDS.get(value)
        return isinstance(cls, type) and issubclass(cls, wanted)
    return isinstance(value, wanted)


__all__ = ["BACKEND_ARGS", "involves", "load_joblib_tests"]
