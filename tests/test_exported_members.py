"""The public surface is exactly ``stepvisor.__all__``, sorted, and every name exists."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import stepvisor as sv

PUBLIC_API = {
    # running
    "run", "start", "run_async", "resume", "resume_start", "RunHandle", "RunResult", "Engine",
    "Executor",
    # model
    "Step", "Workflow", "Settings", "StepContext", "RetryPolicy", "Backoff",
    "resolve", "Resolved", "load_workflow", "Cache",
    # state and events
    "RunStatus", "StepStatus", "StepRecord", "AttemptRecord", "Event", "RunStarted",
    "StepDispatched", "StepRetrying", "StepFinished", "StepCommitted", "RunFinished",
    "StepExpanded",
    # time
    "Clock", "RealClock", "FakeClock",
    # stores
    "RunStore", "MemoryStore", "SQLiteStore",
    # errors
    "StepvisorError", "ValidationError", "InvalidStepIdError", "StepFunctionError",
    "DuplicateStepError", "UnknownDependencyError", "MissingArtifactError", "CycleError",
    "InvalidMaxParallelError", "InvalidTimeoutError", "InvalidSettingError", "MapOverError",
    "InvalidRetryPolicyError", "InvalidCacheError", "WorkflowFileError", "StepError",
    "StepTimeoutError",
    "StepCancelledError", "WorkerCrashedError", "StepNotSerializableError", "RemoteStepError",
    "RetryBudgetExhaustedError", "RetryableError", "FatalError", "StoreError", "NotAStoreError",
    "SchemaVersionError", "RunNotFoundError", "FingerprintMismatchError", "ArtifactCodecError",
    "BackendUnavailableError", "RunOwnedError", "StoreFaultError", "ExecutorShutdownError",
    "__version__",
}  # fmt: skip


def test_all_is_exactly_the_public_api() -> None:
    assert set(sv.__all__) == PUBLIC_API


def test_all_is_sorted_and_every_name_exists() -> None:
    assert sv.__all__ == sorted(sv.__all__)
    for name in sv.__all__:
        assert hasattr(sv, name), name


def test_errors_derive_from_one_base() -> None:
    for name in sv.__all__:
        obj = getattr(sv, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert issubclass(obj, sv.StepvisorError), name


def test_importing_stepvisor_imports_no_optional_backend_and_only_the_errors() -> None:
    code = (
        "import sys, stepvisor\n"
        "heavy = {'ray', 'dask', 'cloudpickle', 'sqlite3'} & set(sys.modules)\n"
        "assert not heavy - {'sqlite3'}, heavy\n"
        "mine = {m for m in sys.modules if m.startswith('stepvisor')}\n"
        "assert mine == {'stepvisor', 'stepvisor.errors'}, mine\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_process_child_boots_without_logging_and_the_engine_installs_its_null_handler() -> None:
    # A process Worker's child imports stepvisor.backends._child at every boot
    # (again after each kill); logging was about half of that boot.
    child = (
        "import sys, stepvisor.backends._child\n"
        "assert 'logging' not in sys.modules, 'the child boot imported logging'\n"
    )
    subprocess.run([sys.executable, "-c", child], check=True, timeout=60)
    engine = (
        "import logging, stepvisor as sv\n"
        "sv.run(sv.Workflow('w', [sv.Step('a', lambda ctx: None)]))\n"
        "handlers = logging.getLogger('stepvisor').handlers\n"
        "assert any(isinstance(h, logging.NullHandler) for h in handlers), handlers\n"
    )
    subprocess.run([sys.executable, "-c", engine], check=True, timeout=60)


def test_the_type_checkers_view_names_the_same_modules_as_the_lazy_table() -> None:
    """``__init__.py`` lists each public name once for runtime (``_EXPORTS``) and once for
    type checkers (its ``if TYPE_CHECKING:`` imports): the two must agree exactly."""
    tree = ast.parse(Path(sv.__file__).read_text(encoding="utf-8"))
    typed: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for stmt in node.body:
                assert isinstance(stmt, ast.ImportFrom), ast.unparse(stmt)
                for alias in stmt.names:
                    assert alias.asname == alias.name, "re-export as `X as X`"
                    typed[alias.name] = str(stmt.module)
    assert typed == sv._LAZY
