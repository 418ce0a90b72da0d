"""CPython's own ``concurrent.futures`` tests, run against ``sv.Executor``: the adapter.

The tests are not copied here: they are loaded from the interpreter's installed
test suite and given ``sv.Executor`` in place of the standard library's pools.

* **Python 3.11** (the default interpreter): Debian's ``libpython3.11-testsuite``
  installs ``/usr/lib/python3.11/test/test_concurrent_futures.py`` (``.ci/run``
  installs it), loaded by path as ``test.test_concurrent_futures``: an
  interpreter built apart (pyenv's, this project's venv) has no such module.
  ``STEPVISOR_CPYTHON_FUTURES`` names another file.
* **Python 3.12 and later** ship ``test.test_concurrent_futures`` as a package,
  imported as it is.

Each test class of the suite that runs an executor is made again here with
:class:`SvThreadPoolExecutor` or :class:`SvProcessPoolExecutor` as its
``executor_type`` (``tests/cpython_futures/test_cpython_futures.py``).  The
tests that start an interpreter of their own (``assert_python_ok``) import the
executor by name from ``concurrent.futures``: their script is run after a
prelude that puts these two classes there (:func:`prepare_child`).
"""

from __future__ import annotations

import importlib
import importlib.util
import multiprocessing
import os
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import stepvisor as sv

__all__ = [
    "EXCLUDED",
    "SvProcessPoolExecutor",
    "SvThreadPoolExecutor",
    "load",
    "prepare_child",
]

#: Where Debian's libpython3.11-testsuite puts the 3.11 suite (one module).
DEBIAN_311: Final = "/usr/lib/python3.11/test/test_concurrent_futures.py"
_NAME: Final = "test.test_concurrent_futures"
_REPO: Final = str(Path(__file__).resolve().parents[2])


class SvThreadPoolExecutor(sv.Executor):
    """``sv.Executor`` with thread calls, built as the suite builds ``ThreadPoolExecutor``."""

    def __init__(self, max_workers: int | None = None, **kwargs: Any) -> None:
        super().__init__(max_workers, executor="thread", **kwargs)


class SvProcessPoolExecutor(sv.Executor):
    """``sv.Executor`` with process calls, built as the suite builds ``ProcessPoolExecutor``.

    A call's child is a fresh interpreter (fork+exec), what the ``spawn``
    start method gives: so the suite runs its process tests with that
    context, and any other one is refused rather than ignored.
    """

    def __init__(
        self, max_workers: int | None = None, mp_context: Any = None, **kwargs: Any
    ) -> None:
        method = None if mp_context is None else mp_context.get_start_method()
        if method not in (None, "spawn"):
            raise ValueError(f"stepvisor's process calls start like 'spawn', not {method!r}")
        super().__init__(max_workers, executor="process", **kwargs)


#: The tests left out, each with the private attribute of the standard
#: library's pools it reads (the only reason accepted): name -> attribute.
#: ``test_cpython_futures.py`` checks that each one's source reads it.
EXCLUDED: Final[dict[str, str]] = {
    # ThreadPoolShutdownTest
    "test_threads_terminate": "_threads",
    "test_context_manager_shutdown": "._threads|._processes",
    "test_del_shutdown": "._threads|._processes",
    "test_shutdown_no_wait": "._threads|._processes",
    "test_thread_names_assigned": "._threads",
    "test_thread_names_default": "._threads",
    # ThreadPoolExecutorTest
    "test_default_workers": "._max_workers",
    "test_saturation": "._max_workers",
    "test_idle_thread_reuse": "._threads",
    # ProcessPoolShutdownTest
    "test_processes_terminate": "._processes",
    # ProcessPoolExecutorTest
    "test_killed_child": "._processes",
    "test_traceback": "futures.process._RemoteTraceback",
    "test_idle_process_reuse_one": "._max_workers",
    "test_idle_process_reuse_multiple": "._max_workers",
    "test_max_tasks_per_child": "._processes",
    "test_max_tasks_per_child_defaults_to_spawn_context": "._mp_context",
    # 3.13's ProcessPoolExecutorTest: lets the pool's first private thread
    # (_ExecutorManagerThread) start and fails the second (its queue feeder),
    # through threading's private thread starter.
    "test_python_finalization_error": "threading._start_joinable_thread",
}


def _load_module(name: str, path: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    package = sys.modules.get("test")
    if package is not None:
        setattr(package, name.rpartition(".")[2], module)
    return module


def load() -> dict[str, types.ModuleType]:
    """The suite's modules by role (``util``, ``shutdown``, ``wait``, ...); ImportError if absent.

    On 3.11 every role is the one module; on 3.12+ each is its own module of
    the package.
    """
    if sys.version_info >= (3, 12):
        names = {
            "util": "util",
            "executor": "executor",
            "shutdown": "test_shutdown",
            "wait": "test_wait",
            "as_completed": "test_as_completed",
            "thread_pool": "test_thread_pool",
            "process_pool": "test_process_pool",
        }
        return {role: importlib.import_module(f"{_NAME}.{n}") for role, n in names.items()}
    module = sys.modules.get(_NAME)
    if module is None:
        path = os.environ.get("STEPVISOR_CPYTHON_FUTURES", DEBIAN_311)
        if not Path(path).is_file():
            raise ImportError(
                f"CPython 3.11's concurrent.futures tests are not at {path}: install Debian's "
                "libpython3.11-testsuite (apt-get install libpython3.11-testsuite; .ci/run "
                "does), or name the file in STEPVISOR_CPYTHON_FUTURES"
            )
        module = _load_module(_NAME, path)
        # Loaded from a file no process child can import: its functions (the
        # calls the tests submit) travel by value, as a script's own do.
        import cloudpickle  # noqa: PLC0415

        cloudpickle.register_pickle_by_value(module)
    roles = ("util", "executor", "shutdown", "wait", "as_completed", "thread_pool", "process_pool")
    return dict.fromkeys(roles, module)


def prepare_child() -> None:
    """In an interpreter a test starts: the executors by name, the suite importable."""
    import concurrent.futures  # noqa: PLC0415

    concurrent.futures.SvThreadPoolExecutor = SvThreadPoolExecutor  # type: ignore[attr-defined]
    concurrent.futures.SvProcessPoolExecutor = SvProcessPoolExecutor  # type: ignore[attr-defined]
    load()


#: What a test's own interpreter runs before the test's script.
PRELUDE: Final = (
    f"import sys; sys.path.insert(0, {_REPO!r}); "
    "import tests.cpython_futures as _sv_adapter; _sv_adapter.prepare_child(); "
    "del sys.path[0]\n"
)


def with_prelude(run: Callable[..., Any]) -> Callable[..., Any]:
    """``assert_python_ok``, its ``-c`` script run after :data:`PRELUDE`."""

    def assert_python_ok(*args: Any, **env: Any) -> Any:
        if len(args) >= 2 and args[0] == "-c":
            args = ("-c", PRELUDE + args[1], *args[2:])
        return run(*args, **env)

    assert_python_ok.sv_prelude = True  # type: ignore[attr-defined]
    return assert_python_ok


def spawn_context() -> Any:
    return multiprocessing.get_context("spawn")
