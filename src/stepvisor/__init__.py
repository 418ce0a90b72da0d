"""stepvisor: run the steps of a workflow in parallel, safely.

Independent steps run at the same time under a bound; every step has a
deadline that really stops it; transient failures are retried with backoff and
jitter; outcomes fold into state in a canonical order, so the result never
depends on which step finished first; run state can be kept durably and
resumed.  See the README for a tour.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stepvisor._runtime import (
        RunHandle,
        resume,
        resume_start,
        run,
        run_async,
        start,
    )
    from stepvisor.clock import (
        Clock,
        FakeClock,
        RealClock,
    )
    from stepvisor.config import (
        Resolved,
        resolve,
    )
    from stepvisor.context import (
        StepContext,
    )
    from stepvisor.core.events import (
        Event,
        RunFinished,
        RunStarted,
        StepCommitted,
        StepDispatched,
        StepFinished,
        StepRetrying,
    )
    from stepvisor.core.model import (
        Settings,
        Step,
        Workflow,
    )
    from stepvisor.core.result import (
        RunResult,
    )
    from stepvisor.core.state import (
        AttemptRecord,
        RunStatus,
        StepRecord,
        StepStatus,
    )
    from stepvisor.errors import (
        ArtifactCodecError,
        BackendUnavailableError,
        CycleError,
        DuplicateStepError,
        FatalError,
        FingerprintMismatchError,
        InvalidMaxParallelError,
        InvalidRetryPolicyError,
        InvalidSettingError,
        InvalidStepIdError,
        InvalidTimeoutError,
        MissingArtifactError,
        NotAStoreError,
        RemoteStepError,
        RetryableError,
        RetryBudgetExhaustedError,
        RunNotFoundError,
        SchemaVersionError,
        StepCancelledError,
        StepError,
        StepFunctionError,
        StepNotSerializableError,
        StepTimeoutError,
        StepvisorError,
        StoreError,
        UnknownDependencyError,
        ValidationError,
        WorkerCrashedError,
        WorkflowFileError,
    )
    from stepvisor.policies.retry import (
        Backoff,
        RetryPolicy,
    )
    from stepvisor.store.base import (
        RunStore,
    )
    from stepvisor.store.memory import (
        MemoryStore,
    )
    from stepvisor.store.sqlite import (
        SQLiteStore,
    )
    from stepvisor.workflow_file import (
        load_workflow,
    )

# Public name -> the module that defines it.  Importing stepvisor imports none of
# them: a process worker's child imports this package on every start, and the
# command line should answer --help without loading the engine.
_LAZY: dict[str, str] = {
    "ArtifactCodecError": "stepvisor.errors",
    "AttemptRecord": "stepvisor.core.state",
    "BackendUnavailableError": "stepvisor.errors",
    "Backoff": "stepvisor.policies.retry",
    "Clock": "stepvisor.clock",
    "CycleError": "stepvisor.errors",
    "DuplicateStepError": "stepvisor.errors",
    "Event": "stepvisor.core.events",
    "FakeClock": "stepvisor.clock",
    "FatalError": "stepvisor.errors",
    "FingerprintMismatchError": "stepvisor.errors",
    "InvalidMaxParallelError": "stepvisor.errors",
    "InvalidRetryPolicyError": "stepvisor.errors",
    "InvalidSettingError": "stepvisor.errors",
    "InvalidStepIdError": "stepvisor.errors",
    "InvalidTimeoutError": "stepvisor.errors",
    "MemoryStore": "stepvisor.store.memory",
    "MissingArtifactError": "stepvisor.errors",
    "NotAStoreError": "stepvisor.errors",
    "RealClock": "stepvisor.clock",
    "RemoteStepError": "stepvisor.errors",
    "Resolved": "stepvisor.config",
    "RetryBudgetExhaustedError": "stepvisor.errors",
    "RetryPolicy": "stepvisor.policies.retry",
    "RetryableError": "stepvisor.errors",
    "RunFinished": "stepvisor.core.events",
    "RunHandle": "stepvisor._runtime",
    "RunNotFoundError": "stepvisor.errors",
    "RunResult": "stepvisor.core.result",
    "RunStarted": "stepvisor.core.events",
    "RunStatus": "stepvisor.core.state",
    "RunStore": "stepvisor.store.base",
    "SQLiteStore": "stepvisor.store.sqlite",
    "SchemaVersionError": "stepvisor.errors",
    "Settings": "stepvisor.core.model",
    "Step": "stepvisor.core.model",
    "StepCancelledError": "stepvisor.errors",
    "StepCommitted": "stepvisor.core.events",
    "StepContext": "stepvisor.context",
    "StepDispatched": "stepvisor.core.events",
    "StepError": "stepvisor.errors",
    "StepFinished": "stepvisor.core.events",
    "StepFunctionError": "stepvisor.errors",
    "StepNotSerializableError": "stepvisor.errors",
    "StepRecord": "stepvisor.core.state",
    "StepRetrying": "stepvisor.core.events",
    "StepStatus": "stepvisor.core.state",
    "StepTimeoutError": "stepvisor.errors",
    "StepvisorError": "stepvisor.errors",
    "StoreError": "stepvisor.errors",
    "UnknownDependencyError": "stepvisor.errors",
    "ValidationError": "stepvisor.errors",
    "WorkerCrashedError": "stepvisor.errors",
    "Workflow": "stepvisor.core.model",
    "WorkflowFileError": "stepvisor.errors",
    "load_workflow": "stepvisor.workflow_file",
    "resolve": "stepvisor.config",
    "resume": "stepvisor._runtime",
    "resume_start": "stepvisor._runtime",
    "run": "stepvisor._runtime",
    "run_async": "stepvisor._runtime",
    "start": "stepvisor._runtime",
}


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

__all__ = [
    "ArtifactCodecError",
    "AttemptRecord",
    "BackendUnavailableError",
    "Backoff",
    "Clock",
    "CycleError",
    "DuplicateStepError",
    "Event",
    "FakeClock",
    "FatalError",
    "FingerprintMismatchError",
    "InvalidMaxParallelError",
    "InvalidRetryPolicyError",
    "InvalidSettingError",
    "InvalidStepIdError",
    "InvalidTimeoutError",
    "MemoryStore",
    "MissingArtifactError",
    "NotAStoreError",
    "RealClock",
    "RemoteStepError",
    "Resolved",
    "RetryBudgetExhaustedError",
    "RetryPolicy",
    "RetryableError",
    "RunFinished",
    "RunHandle",
    "RunNotFoundError",
    "RunResult",
    "RunStarted",
    "RunStatus",
    "RunStore",
    "SQLiteStore",
    "SchemaVersionError",
    "Settings",
    "Step",
    "StepCancelledError",
    "StepCommitted",
    "StepContext",
    "StepDispatched",
    "StepError",
    "StepFinished",
    "StepFunctionError",
    "StepNotSerializableError",
    "StepRecord",
    "StepRetrying",
    "StepStatus",
    "StepTimeoutError",
    "StepvisorError",
    "StoreError",
    "UnknownDependencyError",
    "ValidationError",
    "WorkerCrashedError",
    "Workflow",
    "WorkflowFileError",
    "__version__",
    "load_workflow",
    "resolve",
    "resume",
    "resume_start",
    "run",
    "run_async",
    "start",
]
