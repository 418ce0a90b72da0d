"""stepvisor: run the steps of a workflow in parallel, safely.

Independent steps run at the same time under a bound; every step has a
deadline that really stops it; transient failures are retried with backoff and
jitter; outcomes fold into state in a canonical order, so the result never
depends on which step finished first; run state can be kept durably and
resumed.  The README has a first example; the docs site (docs/, make docs) has the rest.
"""

import importlib
from typing import TYPE_CHECKING, Any

# Every error is public, and errors.py imports nothing: its __all__ is the list.
from stepvisor import errors as _errors
from stepvisor.errors import *  # noqa: F403

#: The rest of the public API, each name once, under the module that defines it.
#: Importing stepvisor imports none of these modules: a process worker's child
#: imports this package on every start, and the command line should answer --help
#: without loading the engine.  A name's module is imported when it is first used.
_EXPORTS: dict[str, tuple[str, ...]] = {
    "stepvisor._runtime": ("RunHandle", "resume", "resume_start", "run", "run_async", "start"),
    "stepvisor.cache": ("Cache",),
    "stepvisor.clock": ("Clock", "FakeClock", "RealClock"),
    "stepvisor.config": ("Resolved", "resolve"),
    "stepvisor.context": ("StepContext",),
    "stepvisor.core.events": (
        "Event",
        "RunFinished",
        "RunStarted",
        "StepCommitted",
        "StepDispatched",
        "StepExpanded",
        "StepFinished",
        "StepRetrying",
    ),
    "stepvisor.core.model": ("Settings", "Step", "Workflow"),
    "stepvisor.engine": ("Engine",),
    "stepvisor.futures": ("Executor",),
    "stepvisor.core.result": ("RunResult",),
    "stepvisor.core.state": ("AttemptRecord", "RunStatus", "StepRecord", "StepStatus"),
    "stepvisor.policies.retry": ("Backoff", "RetryPolicy"),
    "stepvisor.store.base": ("RunStore",),
    "stepvisor.store.memory": ("MemoryStore",),
    "stepvisor.store.sqlite": ("SQLiteStore",),
    "stepvisor.workflow_file": ("load_workflow",),
}
_LAZY: dict[str, str] = {name: module for module, names in _EXPORTS.items() for name in names}

if TYPE_CHECKING:
    # What mypy and IDEs read: the same names from the same modules (``X as X`` marks a
    # re-export); tests/test_exported_members.py holds this block to _EXPORTS.
    from stepvisor._runtime import RunHandle as RunHandle
    from stepvisor._runtime import resume as resume
    from stepvisor._runtime import resume_start as resume_start
    from stepvisor._runtime import run as run
    from stepvisor._runtime import run_async as run_async
    from stepvisor._runtime import start as start
    from stepvisor.cache import Cache as Cache
    from stepvisor.clock import Clock as Clock
    from stepvisor.clock import FakeClock as FakeClock
    from stepvisor.clock import RealClock as RealClock
    from stepvisor.config import Resolved as Resolved
    from stepvisor.config import resolve as resolve
    from stepvisor.context import StepContext as StepContext
    from stepvisor.core.events import Event as Event
    from stepvisor.core.events import RunFinished as RunFinished
    from stepvisor.core.events import RunStarted as RunStarted
    from stepvisor.core.events import StepCommitted as StepCommitted
    from stepvisor.core.events import StepDispatched as StepDispatched
    from stepvisor.core.events import StepExpanded as StepExpanded
    from stepvisor.core.events import StepFinished as StepFinished
    from stepvisor.core.events import StepRetrying as StepRetrying
    from stepvisor.core.model import Settings as Settings
    from stepvisor.core.model import Step as Step
    from stepvisor.core.model import Workflow as Workflow
    from stepvisor.core.result import RunResult as RunResult
    from stepvisor.core.state import AttemptRecord as AttemptRecord
    from stepvisor.core.state import RunStatus as RunStatus
    from stepvisor.core.state import StepRecord as StepRecord
    from stepvisor.core.state import StepStatus as StepStatus
    from stepvisor.engine import Engine as Engine
    from stepvisor.futures import Executor as Executor
    from stepvisor.policies.retry import Backoff as Backoff
    from stepvisor.policies.retry import RetryPolicy as RetryPolicy
    from stepvisor.store.base import RunStore as RunStore
    from stepvisor.store.memory import MemoryStore as MemoryStore
    from stepvisor.store.sqlite import SQLiteStore as SQLiteStore
    from stepvisor.workflow_file import load_workflow as load_workflow


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'stepvisor' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__version__ = "0.1.0"

# Derived, not written out again: the errors' __all__ and _EXPORTS (and, for type
# checkers, the TYPE_CHECKING block, which a test holds to the same names).
__all__ = sorted([*_errors.__all__, *_LAZY, "__version__"])  # noqa: PLE0605 - a sorted list, built once
