"""CPython's ``concurrent.futures`` tests against ``sv.Executor``, thread and process calls.

The executor, wait, as_completed and shutdown tests of the interpreter's own
suite (see :mod:`tests.cpython_futures` for where it comes from), each class
made again with ``sv.Executor`` as its executor.  The only tests left out are
in :data:`tests.cpython_futures.EXCLUDED`: each reads a private attribute of
the standard library's pools, checked below.
"""

from __future__ import annotations

import inspect
import multiprocessing.util
import re
import sys
import types
import unittest
from typing import Any

import pytest

from tests import cpython_futures as adapter

try:
    SUITE = adapter.load()
except ImportError as exc:  # a clear failure, not a skip: CI installs the suite
    if sys.version_info[:2] == (3, 12):
        # The one exception: this machine's Python 3.12 (pyenv's build) has a test package
        # without concurrent.futures' tests, and no package installs them for 3.12.  The
        # suite runs on 3.11 (Debian's libpython3.11-testsuite) and on 3.13 (its own).
        pytest.skip(
            f"Python {sys.version.split()[0]}'s test package has no concurrent.futures "
            f"tests ({exc}); CPython's suite runs against sv.Executor on 3.11 and 3.13",
            allow_module_level=True,
        )
    SUITE = {}
    MISSING = str(exc)
else:
    MISSING = ""


def test_the_suite_is_installed() -> None:
    assert not MISSING, MISSING


def _excluding(cls: type[Any]) -> type[Any]:
    for name in adapter.EXCLUDED:
        if hasattr(cls, name):
            reason = f"reads the standard library pool's private {adapter.EXCLUDED[name]}"
            setattr(cls, name, unittest.skip(reason)(getattr(cls, name)))
    return cls


def _made(name: str, bases: tuple[type[Any], ...], executor_type: type[Any]) -> type[Any]:
    attrs: dict[str, Any] = {"executor_type": executor_type, "__module__": __name__}
    return _excluding(type(name, bases, attrs))


def _process_mixin(util: types.ModuleType) -> type[Any]:
    """The suite's executor mixin for process calls.

    No ``ctx``: a stepvisor process child has one way to start (a fresh
    interpreter), so the executor is made without ``mp_context`` and the
    interpreter-exit scripts with none.  ``get_context()``, for the tests that
    make their own semaphores and managers, gives the ``spawn`` context.
    """

    class SvProcessMixin(util.ExecutorMixin):  # type: ignore[name-defined,misc]
        def get_context(self) -> Any:
            return adapter.spawn_context()

        def tearDown(self) -> None:
            super().tearDown()
            # The cleanup the suite's setUpModule registers for the whole module
            # (it stops the resource tracker a test's Manager started), run after
            # each test: this project checks for leftover processes per test.
            multiprocessing.util._cleanup_tests()  # type: ignore[attr-defined]

    return SvProcessMixin


def _classes(suite: dict[str, types.ModuleType]) -> dict[str, type[Any]]:
    util = suite["util"]
    base = util.BaseTestCase
    thread_mixin = util.ThreadPoolMixin
    process_mixin = _process_mixin(util)
    sv_thread, sv_process = adapter.SvThreadPoolExecutor, adapter.SvProcessPoolExecutor
    shutdown, wait = suite["shutdown"], suite["wait"]
    done, thread_pool = suite["as_completed"], suite["thread_pool"]
    process_pool = suite["process_pool"]
    for module in set(suite.values()):  # the tests that start an interpreter
        run = getattr(module, "assert_python_ok", None)
        if run is not None and not getattr(run, "sv_prelude", False):
            setattr(module, "assert_python_ok", adapter.with_prelude(run))  # noqa: B010
    thread = (thread_mixin, base)
    process = (process_mixin, base)
    return {
        # Thread calls: the suite's ThreadPoolExecutor classes (generic tests and its own).
        "TestSvThreadShutdown": _made(
            "TestSvThreadShutdown", (shutdown.ThreadPoolShutdownTest,), sv_thread
        ),
        "TestSvThreadWait": _made("TestSvThreadWait", (wait.ThreadPoolWaitTests,), sv_thread),
        "TestSvThreadAsCompleted": _made(
            "TestSvThreadAsCompleted", (done.AsCompletedTests, *thread), sv_thread
        ),
        "TestSvThreadExecutor": _made(
            "TestSvThreadExecutor", (thread_pool.ThreadPoolExecutorTest,), sv_thread
        ),
        # Process calls: the suite's ProcessPoolExecutor mixins, with the spawn context.
        "TestSvProcessShutdown": _made(
            "TestSvProcessShutdown", (shutdown.ProcessPoolShutdownTest, *process), sv_process
        ),
        "TestSvProcessWait": _made("TestSvProcessWait", (wait.WaitTests, *process), sv_process),
        "TestSvProcessAsCompleted": _made(
            "TestSvProcessAsCompleted", (done.AsCompletedTests, *process), sv_process
        ),
        "TestSvProcessExecutor": _made(
            "TestSvProcessExecutor", (process_pool.ProcessPoolExecutorTest, *process), sv_process
        ),
    }


if SUITE:
    globals().update(_classes(SUITE))


@pytest.mark.skipif(not SUITE, reason="the suite is not installed: see test_the_suite_is_installed")
@pytest.mark.parametrize("name", sorted(adapter.EXCLUDED))
def test_each_excluded_test_reads_a_private_attribute_of_the_pools(name: str) -> None:
    sources = [
        inspect.getsource(getattr(cls, name))
        for module in set(SUITE.values())
        for cls in vars(module).values()
        if isinstance(cls, type) and name in vars(cls)
    ]
    if not sources:  # EXCLUDED covers the suites of 3.11 and 3.13: some tests are in one
        pytest.skip(f"{name} is not in Python {sys.version_info[0]}.{sys.version_info[1]}'s suite")
    pattern = "|".join(re.escape(a) for a in adapter.EXCLUDED[name].split("|"))
    for source in sources:
        assert re.search(pattern, source), f"{name} reads none of {adapter.EXCLUDED[name]}"
