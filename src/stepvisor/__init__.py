"""stepvisor: run the steps of a workflow in parallel, safely.

Independent steps run at the same time under a bound; every step has a
deadline that really stops it; transient failures are retried with backoff and
jitter; outcomes fold into state in a canonical order, so the result never
depends on which step finished first; run state can be kept durably and
resumed.  See the README for a tour.
"""

import logging

from stepvisor.clock import Clock, FakeClock, RealClock
from stepvisor.config import Resolved, resolve
from stepvisor.context import StepContext
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
from stepvisor.events import (
    Event,
    RunFinished,
    RunStarted,
    StepCommitted,
    StepDispatched,
    StepFinished,
    StepRetrying,
)
from stepvisor.model import Settings, Step, Workflow
from stepvisor.policies.retry import Backoff, RetryPolicy
from stepvisor.result import RunResult
from stepvisor.runtime import RunHandle, resume, resume_start, run, run_async, start
from stepvisor.state import AttemptRecord, RunStatus, StepRecord, StepStatus
from stepvisor.store.base import RunStore
from stepvisor.store.memory import MemoryStore

logging.getLogger("stepvisor").addHandler(logging.NullHandler())

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
    "resolve",
    "resume",
    "resume_start",
    "run",
    "run_async",
    "start",
]
