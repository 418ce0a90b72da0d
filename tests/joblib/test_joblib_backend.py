"""The joblib backend: Parallel calls on stepvisor behave as on loky, and stop what overran.

Process calls by default (thread calls on request), a warm engine per n_jobs
kept across Parallel calls, large arrays through shared memory with
``max_nbytes``'s meaning, joblib's ``timeout=`` and the backend's own that stop
the batch that overran, retries, crashes that fail the call with
WorkerCrashedError, and nested calls that do not oversubscribe.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from joblib import Parallel, delayed, parallel_config

import stepvisor as sv
import stepvisor.joblib
from stepvisor.joblib._engines import ENGINES, Engines
from tests import joblib_calls as calls
from tests import joblib_loky
from tests.conftest import wait_for
from tests.procfs import pid_gone

joblib_loky.prepare()


@pytest.fixture(autouse=True)
def registered(no_leaks: None) -> Iterator[None]:
    stepvisor.joblib.register()
    yield
    stepvisor.joblib.close()
    joblib_loky.stop()


def test_importing_stepvisor_or_its_joblib_module_does_not_import_joblib() -> None:
    code = (
        "import sys, stepvisor, stepvisor.joblib, stepvisor.futures\n"
        "assert 'joblib' not in sys.modules, 'joblib was imported'\n"
        "stepvisor.joblib.register()\n"
        "assert 'joblib' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("executor", ["process", "thread"])
def test_results_are_loky_s_in_order(executor: str) -> None:
    xs = list(range(40))
    with parallel_config(backend="loky", n_jobs=2):
        expected = Parallel()(delayed(calls.square)(x) for x in xs)
    with parallel_config(backend="stepvisor", n_jobs=2, executor=executor):
        got = Parallel()(delayed(calls.square)(x) for x in xs)
    assert got == expected == [x * x for x in xs]


def test_process_calls_by_default_thread_calls_on_request_or_hint() -> None:
    here = os.getpid()
    with parallel_config(backend="stepvisor", n_jobs=2):
        assert here not in Parallel()(delayed(calls.pid_of)(i) for i in range(4))
        assert set(Parallel(prefer="threads")(delayed(calls.pid_of)(i) for i in range(4))) == {here}
        assert set(Parallel(require="sharedmem")(delayed(calls.pid_of)(i) for i in range(4))) == {
            here
        }
    with parallel_config(backend="stepvisor", n_jobs=2, executor="thread"):
        assert set(Parallel()(delayed(calls.pid_of)(i) for i in range(4))) == {here}


def test_an_exception_is_re_raised_with_its_type_and_the_worker_traceback() -> None:
    with parallel_config(backend="stepvisor", n_jobs=2), pytest.raises(ValueError) as info:
        Parallel()(delayed(calls.fail_on)(x, 3) for x in range(8))
    assert str(info.value) == "bad value 3"
    assert "fail_on" in "".join(getattr(info.value, "__notes__", []))


def test_the_warm_engine_is_reused_across_parallel_calls_and_n_jobs_is_its_bound() -> None:
    with parallel_config(backend="stepvisor", n_jobs=3):
        first = set(Parallel()(delayed(calls.pid_of)(i) for i in range(12)))
        second = set(Parallel()(delayed(calls.pid_of)(i) for i in range(12)))
    assert ENGINES.running() == {3: 0}  # one engine, bound 3, no call holding it
    assert len(first | second) <= 3  # the same children served both calls
    with parallel_config(backend="stepvisor", n_jobs=2):
        Parallel()(delayed(calls.square)(i) for i in range(4))
    assert ENGINES.running() == {3: 0, 2: 0}


def test_large_arguments_come_through_shared_memory_read_only_as_with_memmapping() -> None:
    big = np.ones(400_000)  # 3.2 MB, past max_nbytes' default of 1M
    with parallel_config(backend="stepvisor", n_jobs=2):
        shared = Parallel()(delayed(calls.describe_array)(big) for _ in range(2))
        copied = Parallel(max_nbytes=None)(delayed(calls.describe_array)(big) for _ in range(2))
        writable = Parallel(mmap_mode="c")(delayed(calls.describe_array)(big) for _ in range(2))
    assert shared == [(400_000.0, False, True)] * 2
    assert [(s, w) for s, w, _ in copied] == [(400_000.0, True)] * 2
    assert [(s, w) for s, w, _ in writable] == [(400_000.0, True)] * 2


def test_max_nbytes_below_the_default_makes_smaller_arrays_read_only_too() -> None:
    small = np.ones(1000)  # 8 kB
    with parallel_config(backend="stepvisor", n_jobs=2):
        default = Parallel()(delayed(calls.describe_array)(small) for _ in range(2))
        low = Parallel(max_nbytes="4K")(delayed(calls.describe_array)(small) for _ in range(2))
    assert [w for _, w, _ in default] == [True, True]
    assert [w for _, w, _ in low] == [False, False]


def test_a_large_result_comes_back_equal() -> None:
    with parallel_config(backend="stepvisor", n_jobs=2):
        (result,) = Parallel()(delayed(calls.big_result)(500_000) for _ in range(1))
    np.testing.assert_array_equal(result, np.arange(500_000, dtype=np.float64))


@pytest.mark.realtime
def test_parallel_timeout_stops_the_batch_that_overran_and_the_engine_goes_on(
    tmp_path: Path,
) -> None:
    pidfile = tmp_path / "pid"
    with parallel_config(backend="stepvisor", n_jobs=2):
        # joblib's own watch or the batch's deadline, whichever comes first: both stop it.
        with pytest.raises(multiprocessing.TimeoutError):
            Parallel(timeout=1.0)(
                [delayed(calls.hang_after_writing_pid)(str(pidfile)), delayed(calls.square)(3)]
            )
        pid = int(pidfile.read_text())
        wait_for(lambda: pid_gone(pid), timeout=10, what="the overrunning child to be killed")
        assert Parallel()(delayed(calls.square)(x) for x in range(4)) == [0, 1, 4, 9]


@pytest.mark.realtime
def test_the_backend_timeout_raises_step_timeout_error(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    with (
        parallel_config(backend="stepvisor", n_jobs=2, timeout=1.0),
        pytest.raises(sv.StepTimeoutError),
    ):
        Parallel()([delayed(calls.hang_after_writing_pid)(str(pidfile))] * 1)
    wait_for(lambda: pid_gone(int(pidfile.read_text())), timeout=10, what="the child killed")


def test_retries_from_the_backend_parameters(tmp_path: Path) -> None:
    marker = str(tmp_path / "marker")
    retry = sv.RetryPolicy(max_attempts=2, backoff=sv.Backoff(initial=0.01, jitter="none"))
    with parallel_config(backend="stepvisor", n_jobs=2, retry=retry):
        assert Parallel()(delayed(calls.flaky)(marker) for _ in range(1)) == ["ok"]


def test_a_crashed_call_raises_worker_crashed_error_and_the_worker_is_replaced() -> None:
    with parallel_config(backend="stepvisor", n_jobs=2):
        with pytest.raises(sv.WorkerCrashedError):
            Parallel()(delayed(calls.kill_self)() for _ in range(1))
        assert Parallel()(delayed(calls.square)(x) for x in range(4)) == [0, 1, 4, 9]


def test_nested_calls_use_joblib_s_nested_backend_and_native_threads_are_bounded() -> None:
    with parallel_config(backend="stepvisor", n_jobs=2, inner_max_num_threads=1):
        nested = Parallel()(delayed(calls.nested_backend)(i) for i in range(2))
        threads = Parallel()(delayed(calls.native_threads)(i) for i in range(2))
    assert nested == [("ThreadingBackend", 1)] * 2
    assert threads == ["1", "1"]


def test_stepvisor_nested_inside_a_stepvisor_call_runs_sequentially() -> None:
    def inner(_: object) -> list[int]:
        with pytest.warns(UserWarning, match="cannot be nested"):
            got: list[int] = Parallel(n_jobs=2, backend="stepvisor")(map(delayed(abs), [0, 1, 2]))
        return got

    with parallel_config(backend="stepvisor", n_jobs=2, executor="thread"):
        assert Parallel()(delayed(inner)(i) for i in range(2)) == [[0, 1, 2]] * 2


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({"colour": "blue"}, sv.InvalidSettingError),
        ({"executor": "ray"}, sv.InvalidSettingError),
        ({"timeout": -1}, sv.InvalidTimeoutError),
        ({"retry": 3}, sv.InvalidSettingError),
        ({"initializer": "not callable"}, sv.InvalidSettingError),
        ({"kill_grace": 0}, sv.InvalidTimeoutError),
    ],
)
def test_bad_backend_parameters_raise_a_clear_typed_error(
    params: dict[str, object], error: type[Exception]
) -> None:
    with pytest.raises(error), parallel_config(backend="stepvisor", **params):
        pass


def test_register_without_joblib_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "joblib", None)
    with pytest.raises(ImportError, match=r"stepvisor\[joblib\]"):
        stepvisor.joblib.register()


def test_idle_engines_beyond_the_limit_are_closed_least_recently_used_first() -> None:
    engines = Engines(keep_idle=1)
    two = engines.acquire(2)
    three = engines.acquire(3)
    engines.release(2)
    assert [two.closed, three.closed] == [False, False]  # idle, and within the limit
    engines.release(3)
    assert [two.closed, three.closed] == [True, False]  # the least recently used went
    assert engines.acquire(3) is three  # warm: the same engine
    engines.release(3)
    engines.close_all()
    assert [two.closed, three.closed] == [True, True]
