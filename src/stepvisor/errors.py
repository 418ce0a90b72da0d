"""Every error stepvisor raises, under one base class.

Each message says what was wrong and what to do about it.  The hierarchy::

    StepvisorError
    ├── ValidationError                     bad input, found before anything runs
    │   ├── InvalidStepIdError                  empty or non-string step id
    │   ├── StepFunctionError                   ``fn`` is not callable
    │   ├── DuplicateStepError                  two steps share one id
    │   ├── UnknownDependencyError              ``needs`` names a step that does not exist
    │   ├── MissingArtifactError                ``requires`` names an artifact no step creates
    │   ├── CycleError                          the dependencies form a cycle
    │   ├── InvalidMaxParallelError             ``max_parallel`` < 1 or not an integer
    │   ├── InvalidTimeoutError                 a timeout/deadline that is not a positive number
    │   ├── InvalidSettingError                 any other setting with a bad value
    │   │   └── InvalidCacheError                   a ``cache`` value that is not true/false/Cache
    │   ├── InvalidRetryPolicyError             a retry policy that cannot work
    │   └── WorkflowFileError                   a workflow file that cannot be loaded
    ├── StepError                           a step attempt did not succeed
    │   ├── StepTimeoutError (+ TimeoutError)   it ran past its deadline and was stopped
    │   ├── StepCancelledError                  the run was cancelled while it ran
    │   ├── WorkerCrashedError                  the process running it died
    │   ├── StepNotSerializableError            it cannot be sent to a process
    │   ├── RemoteStepError                     an exception from a child that could not travel back
    │   ├── MapOverError (+ TypeError)          a mapped step's list is not a sequence
    │   └── RetryBudgetExhaustedError           the run's retry budget was spent
    ├── RetryableError                      raised by a step: retry me (optionally after N s)
    ├── FatalError                          raised by a step: never retry me
    ├── StoreError                          the run store cannot be used as asked
    │   ├── NotAStoreError                      the file is not a stepvisor store
    │   ├── SchemaVersionError                  the store was written by a newer stepvisor
    │   ├── RunNotFoundError                    no run with that id
    │   ├── FingerprintMismatchError            resume with a workflow that changed
    │   ├── ArtifactCodecError                  an artifact the codec cannot hold
    │   ├── RunOwnedError                       another live program owns the run
    │   └── StoreFaultError                     the store failed under a run (disk, lock, file)
    ├── BackendUnavailableError             an optional backend (Ray) cannot be used
    └── ExecutorShutdownError (+ RuntimeError)  submit() after Executor.shutdown()

Validation errors also derive from ``ValueError`` (or ``TypeError`` where the type
is wrong) so that generic callers catching those still see them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stepvisor.store.base import RunOwner

__all__ = [
    "ArtifactCodecError",
    "BackendUnavailableError",
    "CycleError",
    "DuplicateStepError",
    "ExecutorShutdownError",
    "FatalError",
    "FingerprintMismatchError",
    "InvalidCacheError",
    "InvalidMaxParallelError",
    "InvalidRetryPolicyError",
    "InvalidSettingError",
    "InvalidStepIdError",
    "InvalidTimeoutError",
    "MapOverError",
    "MissingArtifactError",
    "NotAStoreError",
    "RemoteStepError",
    "RetryBudgetExhaustedError",
    "RetryableError",
    "RunNotFoundError",
    "RunOwnedError",
    "SchemaVersionError",
    "StepCancelledError",
    "StepError",
    "StepFunctionError",
    "StepNotSerializableError",
    "StepTimeoutError",
    "StepvisorError",
    "StoreError",
    "StoreFaultError",
    "UnknownDependencyError",
    "ValidationError",
    "WorkerCrashedError",
    "WorkflowFileError",
]


class StepvisorError(Exception):
    """Base class of every error stepvisor raises on its own account."""


# -- validation ---------------------------------------------------------------


class ValidationError(StepvisorError, ValueError):
    """Input that cannot describe a runnable workflow; raised before anything runs."""


class InvalidStepIdError(ValidationError, TypeError):
    """A step id that is empty or not a string."""


class StepFunctionError(ValidationError, TypeError):
    """A step whose ``fn`` is not callable."""


class DuplicateStepError(ValidationError):
    """Two steps in one workflow share an id."""


class UnknownDependencyError(ValidationError):
    """A step's ``needs`` names a step that is not in the workflow."""


class MissingArtifactError(ValidationError):
    """A step ``requires`` an artifact that no step ``creates``."""


class CycleError(ValidationError):
    """The dependencies between steps form a cycle.

    ``cycle`` holds the step ids along the cycle, first id repeated at the end.
    """

    def __init__(self, message: str, cycle: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.cycle = cycle


class InvalidMaxParallelError(ValidationError):
    """``max_parallel`` (or a pool size) that is not an integer >= 1."""


class InvalidTimeoutError(ValidationError):
    """A timeout, deadline or grace period that is not a positive finite number."""


class InvalidSettingError(ValidationError):
    """A setting with a value outside what it accepts."""


class InvalidCacheError(InvalidSettingError):
    """A ``cache`` value (run-wide, per step or in a workflow file) that is not one of
    ``True``, ``False`` or ``stepvisor.Cache(version=..., expire=...)``."""


class InvalidRetryPolicyError(ValidationError):
    """A retry policy that cannot work (``max_attempts`` < 1, negative delays, ...)."""


class WorkflowFileError(ValidationError):
    """A workflow file that cannot be parsed, validated or imported.

    The message starts with the file name, then the step and key at fault.
    """


# -- step failures ------------------------------------------------------------


class StepError(StepvisorError):
    """A step attempt ended without success for a reason stepvisor observed.

    ``step_id`` and ``attempt`` say which attempt; both may be empty when the
    error is raised before an attempt exists.
    """

    def __init__(self, message: str, *, step_id: str = "", attempt: int = 0) -> None:
        super().__init__(message)
        self.step_id = step_id
        self.attempt = attempt

    def __reduce__(self) -> tuple[object, ...]:
        # Keep the keyword fields when an error travels between processes.
        return (_rebuild_step_error, (type(self), str(self), self.step_id, self.attempt))


def _rebuild_step_error(
    cls: type[StepError], message: str, step_id: str, attempt: int
) -> StepError:
    return cls(message, step_id=step_id, attempt=attempt)


class StepTimeoutError(StepError, TimeoutError):
    """The attempt ran past its deadline and was stopped by its backend."""


class StepCancelledError(StepError):
    """The attempt was stopped because the run was cancelled or failed fast."""


def stop_error(
    reason: str, *, step_id: str, attempt: int, how: str | None = None
) -> StepTimeoutError | StepCancelledError:
    """The error of an attempt that was asked to stop: by its deadline (``reason``
    ``"timeout"``) or else by a cancel.  ``how`` says how it was stopped, when known.

    One place for both messages, so a step that raises it (``ctx.raise_if_cancelled()``)
    and a backend that stops the step report the stop the same way.
    """
    if reason == "timeout":
        message = f"step {step_id!r} passed its deadline on attempt {attempt}"
        if how:
            message += f": {how}; raise its timeout, or make it finish sooner"
        return StepTimeoutError(message, step_id=step_id, attempt=attempt)
    message = f"step {step_id!r} was cancelled on attempt {attempt}"
    return StepCancelledError(
        f"{message}: {how}" if how else message, step_id=step_id, attempt=attempt
    )


class WorkerCrashedError(StepError):
    """The worker process running the attempt died (signal, ``os._exit``, crash)."""

    def __init__(
        self,
        message: str,
        *,
        step_id: str = "",
        attempt: int = 0,
        exitcode: int | None = None,
    ) -> None:
        super().__init__(message, step_id=step_id, attempt=attempt)
        self.exitcode = exitcode

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild_crash,
            (str(self), self.step_id, self.attempt, self.exitcode),
        )


def _rebuild_crash(
    message: str, step_id: str, attempt: int, exitcode: int | None
) -> WorkerCrashedError:
    return WorkerCrashedError(message, step_id=step_id, attempt=attempt, exitcode=exitcode)


class StepNotSerializableError(StepError):
    """The step's function, inputs or result cannot be sent to or from a process."""


class MapOverError(StepError, TypeError):
    """A mapped step's ``map_over`` value, known at run time, is not a sequence.

    It fails the mapped step (its instances never start), not the run's machinery.
    """


class RemoteStepError(StepError):
    """An exception raised in a child process that could not be sent back as itself.

    ``remote_type`` is the qualified name of the original class and
    ``remote_traceback`` the traceback text formatted in the child.
    """

    def __init__(
        self,
        message: str,
        *,
        step_id: str = "",
        attempt: int = 0,
        remote_type: str = "",
        remote_traceback: str = "",
    ) -> None:
        super().__init__(message, step_id=step_id, attempt=attempt)
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild_remote,
            (str(self), self.step_id, self.attempt, self.remote_type, self.remote_traceback),
        )


def _rebuild_remote(
    message: str, step_id: str, attempt: int, remote_type: str, remote_traceback: str
) -> RemoteStepError:
    return RemoteStepError(
        message,
        step_id=step_id,
        attempt=attempt,
        remote_type=remote_type,
        remote_traceback=remote_traceback,
    )


class RetryBudgetExhaustedError(StepError):
    """A retryable failure that was not retried because the run's budget was spent."""


# -- raised by user steps to steer retries ------------------------------------


class RetryableError(StepvisorError):
    """Raise from a step to ask for a retry, whatever the policy's ``retry_on`` says.

    ``after`` (seconds) replaces the backoff delay for the next attempt.  The
    number of attempts is still bounded by the policy's ``max_attempts``.
    """

    def __init__(self, message: str = "", *, after: float | None = None) -> None:
        super().__init__(message)
        if after is not None and not after >= 0:
            raise InvalidSettingError(
                f"RetryableError(after=...) must be a number >= 0, got {after!r}"
            )
        self.after = after

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_retryable, (type(self), str(self), self.after))


def _rebuild_retryable(
    cls: type[RetryableError], message: str, after: float | None
) -> RetryableError:
    return cls(message, after=after)


class FatalError(StepvisorError):
    """Raise from a step to fail it at once: it is never retried."""


# -- store --------------------------------------------------------------------


class StoreError(StepvisorError):
    """The run store cannot be used as asked."""


class NotAStoreError(StoreError):
    """The file exists but is not a stepvisor run store (it is left untouched)."""


class SchemaVersionError(StoreError):
    """The store's schema is newer than this stepvisor understands."""


class RunNotFoundError(StoreError, KeyError):
    """No run with the given id in the store."""

    def __str__(self) -> str:
        # KeyError would quote the message; keep it readable.
        return str(self.args[0]) if self.args else ""


class FingerprintMismatchError(StoreError):
    """Resume was asked with a workflow whose steps changed since the run started."""


class ArtifactCodecError(StoreError):
    """An artifact value that the store's codec cannot hold."""


class RunOwnedError(StoreError):
    """Another program that is alive owns the run, so this one may not run it.

    ``owner`` is the :class:`~stepvisor.store.base.RunOwner` recorded in the
    store (host, pid, since when), or ``None`` for a run stored by a stepvisor
    that did not record owners and whose heartbeat is fresh.
    """

    def __init__(self, message: str, *, run_id: str, owner: RunOwner | None = None) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.owner = owner


class StoreFaultError(StoreError):
    """The store failed while a run used it: disk full, read-only, locked, file gone.

    ``path`` is the store file and ``fault`` a short name of what failed
    (``"disk full"``, ``"read-only"``, ``"locked"``, ``"file replaced"``, ...),
    so a supervisor or a fault campaign can tell faults apart without parsing text.
    """

    def __init__(self, message: str, *, path: str, fault: str) -> None:
        super().__init__(message)
        self.path = path
        self.fault = fault


# -- optional backends ----------------------------------------------------------


class BackendUnavailableError(StepvisorError):
    """An optional backend (such as Ray) is not installed or cannot be reached."""


# -- the Executor ---------------------------------------------------------------


class ExecutorShutdownError(StepvisorError, RuntimeError):
    """A call submitted to an :class:`~stepvisor.Executor` after its ``shutdown()``.

    A ``RuntimeError``, as the standard library's executors raise.
    """
