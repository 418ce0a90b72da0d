"""The client has the seams the integration tests use, or the tests say it is absent.

Why a test of its own: when tapps-agents is not installed, this is the one
test collected here, reported as skipped with the reason (so a run of only
tests/client still ends in pytest's summary, not "no tests ran"); when it is
installed, it checks what the other tests take for granted, so a new client
release that moves them fails here by name.
"""

from __future__ import annotations

import importlib
import importlib.util

import pytest

from tests.client import unavailable_reason


def test_the_client_imports_its_executor_by_name_and_wraps_one_step_method() -> None:
    if importlib.util.find_spec("tapps_agents") is None:
        pytest.skip(unavailable_reason())
    parallel = importlib.import_module("tapps_agents.workflow.parallel_executor")
    for name in ("executor", "cursor_executor"):
        module = importlib.import_module(f"tapps_agents.workflow.{name}")
        # `from .parallel_executor import ParallelStepExecutor`: the one name swapped.
        assert module.ParallelStepExecutor is parallel.ParallelStepExecutor
    executor = importlib.import_module("tapps_agents.workflow.executor").WorkflowExecutor
    cursor = importlib.import_module("tapps_agents.workflow.cursor_executor")
    for cls in (executor, cursor.CursorWorkflowExecutor):
        assert callable(cls._execute_step_for_parallel)  # where a step's work is done
