"""Which of joblib's backend tests run here, and the ones stepvisor does not pass, with why."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import stepvisor.joblib
from tests import joblib_loky
from tests.joblib_suite.adapter import BACKEND_ARGS, involves

HERE = Path(__file__).parent

#: Test id -> why it does not pass on "stepvisor" (each is an xfail, strict: one that
#: starts passing fails the run until it is taken off this list).
EXCLUDED: dict[str, str] = {
    "test_auto_memmap_on_arrays_from_generator[stepvisor]": (
        "asserts that each large argument arrives as an np.memmap of joblib's temporary "
        "folder; stepvisor sends it through a sealed shared-memory segment, and the worker "
        "gets a read-only np.ndarray on it (same values, same read-only semantics)"
    ),
    "test_memmapping_leaks[stepvisor]": (
        "asserts np.memmap arguments and then that joblib's temporary folder is removed; "
        "stepvisor makes no folder (its segments are memfds, freed by the kernel)"
    ),
    "test_nested_parallel_warnings[stepvisor-stepvisor-False]": (
        "loky nests loky in its workers without a warning; stepvisor runs a stepvisor "
        "call nested in a stepvisor call sequentially, and says so (a warning), rather "
        "than start n_jobs workers in each worker"
    ),
    "test_nested_parallel_warnings[stepvisor-multiprocessing-True]": (
        "expects multiprocessing's refusal to nest in a loky worker (a warning); a "
        "stepvisor worker runs its call on the main thread of a process that is not "
        "daemonic, where multiprocessing nests without one"
    ),
    **{
        f"test_multiple_generator_call_separated_gc[{first}-{second}-stepvisor-True]": (
            "expects loky's RuntimeError: a dropped generator shuts loky's shared "
            "executor down under the next call; each Parallel call has its own "
            "stepvisor Executor, so the next call succeeds (what the test expects "
            "of the threading backend)"
        )
        for first in ("generator", "generator_unordered")
        for second in ("generator", "generator_unordered")
    },
}


def _backend_values(item: pytest.Item) -> list[object]:
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return []
    return [v for k, v in callspec.params.items() if k in BACKEND_ARGS]


def _keep(item: pytest.Item) -> bool:
    """The cases with "stepvisor" as (one of) their backend(s)."""
    return any(involves(v, ("stepvisor",)) for v in _backend_values(item))


def _on_loky(item: pytest.Item) -> bool:
    values = _backend_values(item)
    return "loky" in values and not any(involves(v, ("stepvisor",)) for v in values)


#: Found at collection, before any -k: the ids of joblib's cases that name "loky", and
#: of their counterparts kept here ("loky" replaced by "stepvisor" in the id).
CASES: dict[str, set[str]] = {"loky": set(), "counterparts": set()}


@pytest.hookimpl(tryfirst=True)  # before -k and -m deselect: the counts are of the whole suite
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    kept: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    ours = [item for item in items if Path(str(item.path)).parent == HERE]
    if ours:
        names = {item.name for item in ours if _keep(item)}
        loky = {item.name for item in ours if _on_loky(item)}
        CASES["loky"] = loky
        CASES["counterparts"] = {n.replace("loky", "stepvisor") for n in loky} & names
    for item in items:
        if Path(str(item.path)).parent != HERE or item.name.startswith("test_adapter_"):
            kept.append(item)
            continue
        (kept if _keep(item) else dropped).append(item)
        # The warnings filter of joblib's own run (and of the loky baseline): joblib's
        # tests let some warnings through (a generator dropped early warns) that
        # this project's filterwarnings=error would turn into failures.
        item.add_marker(pytest.mark.filterwarnings("default"))
        # joblib's own xfail marks are not strict in its run (an XPASS passes there).
        for mark in list(item.iter_markers("xfail")):
            if "strict" not in mark.kwargs:
                lenient = pytest.mark.xfail(*mark.args, **mark.kwargs, strict=False)
                item.add_marker(lenient, append=False)  # the first xfail mark is the one read
        reason = EXCLUDED.get(item.name)
        if reason is not None:
            item.add_marker(pytest.mark.xfail(reason=reason, strict=True))
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = kept


#: Tests that run a script in a new interpreter, which must register the backend as
#: a user's program does (joblib has no entry point for a third-party backend).  The
#: same holds for the loky workers of cases mixing loky and stepvisor: a fresh
#: interpreter each, in which a nested call names "stepvisor".
SCRIPT_TESTS = frozenset(
    {
        "test_parallel_with_interactively_defined_functions",
        "test_parallel_with_unpicklable_functions_in_args",
    }
)


@pytest.fixture(autouse=True)
def register_in_scripts(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A script test's interpreter calls ``stepvisor.joblib.register()`` first (sitecustomize)."""
    item = request.node
    mixed = any(involves(v, ("loky",)) for v in _backend_values(item))
    if item.originalname not in SCRIPT_TESTS and not mixed:
        return
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import stepvisor.joblib\nstepvisor.joblib.register()\n")
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", f"{site}{os.pathsep}{path}" if path else str(site))


@pytest.fixture(autouse=True)
def close_stepvisor_engines(no_leaks: None) -> Iterator[None]:
    """Stop the warm pools before the leak check: they outlive a Parallel call on purpose.

    The backend's engines, and loky's reusable executor, which some of joblib's
    tests start whatever their parameter (a nested call on the default backend).
    """
    yield
    stepvisor.joblib.close()
    joblib_loky.stop()


def pytest_configure(config: pytest.Config) -> None:
    # joblib's suite marks tests that must not run in threads of a free-threaded run.
    config.addinivalue_line("markers", "thread_unsafe: joblib's marker (not run in parallel)")
    config.addinivalue_line("markers", "no_cover: joblib's marker (not run under coverage)")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before each test's leak check looks: loky's and multiprocessing's trackers are running.

    They live for the session (``joblib_loky.prepare`` starts them at collection), but
    a tracker that died since (its pipe closed by a test's children) is started again
    by the next call that needs it, inside a test, where it would count as left behind.
    """
    joblib_loky.prepare()
