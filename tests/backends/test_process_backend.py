"""The process backend on real processes: one reused child per slot, and deadlines that kill.

Every test drives a :class:`ProcessSlot` directly, without the engine.  Steps tell
the test what they are doing through files they write (their pid, a grandchild's
pid), and the test waits for those files with a bounded poll; no test sleeps in
the hope that something has happened.  Every attempt has a safety deadline, so a
broken backend fails a test instead of hanging it.

The step functions are built inside :func:`_make_steps` so that cloudpickle sends
them *by value*: a module-level function of this file would make each fresh
child import this module, and pytest with it (about 0.3 s per child).
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from stepvisor.backends.base import AttemptResult, AttemptSpec
from stepvisor.backends.process import ProcessSlot, check_sendable, prepare_payload
from stepvisor.context import AttemptControl
from stepvisor.errors import (
    RemoteStepError,
    StepCancelledError,
    StepNotSerializableError,
    StepTimeoutError,
    WorkerCrashedError,
)
from tests.conftest import pid_gone, wait_for

#: Seconds after which an attempt that should have ended some other way is stopped.
SAFETY_DEADLINE = 20.0


def _make_steps() -> SimpleNamespace:
    """Step functions for the tests, pickled by value (see the module docstring)."""

    def publish(ctx: Any, name: str, value: object) -> None:
        """Write ``value`` to ``<dir>/<name>`` atomically, so a reader never sees half."""
        folder = ctx.params["dir"]
        tmp = os.path.join(folder, f".{name}.tmp")
        with open(tmp, "w") as fh:
            fh.write(str(value))
        os.replace(tmp, os.path.join(folder, name))

    def spin() -> None:
        while True:
            pass

    def noop(ctx: Any) -> None:
        return None

    def whoami(ctx: Any) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "run_id": ctx.run_id,
            "step_id": ctx.step_id,
            "attempt": ctx.attempt,
            "max_attempts": ctx.max_attempts,
            "inputs": dict(ctx.inputs),
            "params": dict(ctx.params),
            "deadline": ctx.deadline,
            "cancelled": ctx.cancelled,
        }

    def echo_blob(ctx: Any) -> dict[str, Any]:
        return {"blob": ctx.inputs["blob"], "size": len(ctx.inputs["blob"])}

    async def async_step(ctx: Any) -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"doubled": ctx.inputs["n"] * 2, "loop": asyncio.get_running_loop() is not None}

    def busy_with_grandchildren(ctx: Any) -> None:
        """Start a plain and a SIGTERM-immune ``sleep 60``, publish pids, spin."""
        plain = subprocess.Popen(["sleep", "60"])
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited across exec
        immune = subprocess.Popen(["sleep", "60"])
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        publish(ctx, "grandchildren", f"{plain.pid} {immune.pid}")
        publish(ctx, "pid", os.getpid())
        spin()

    def busy(ctx: Any) -> None:
        publish(ctx, "pid", os.getpid())
        spin()

    def term_recorder(ctx: Any) -> None:
        """Record SIGTERM in a file and carry on, so only SIGKILL can stop it."""

        def on_term(signum: int, frame: object) -> None:
            publish(ctx, "got-sigterm", signum)

        signal.signal(signal.SIGTERM, on_term)
        publish(ctx, "pid", os.getpid())
        spin()

    def exit_3(ctx: Any) -> None:
        os._exit(3)

    def mark(ctx: Any) -> dict[str, Any]:
        """Append this attempt to ``<dir>/ran``; return who ran it, and where."""
        with open(os.path.join(ctx.params["dir"], "ran"), "a") as fh:
            fh.write(f"{ctx.step_id}\n")
        return {"step_id": ctx.step_id, "pid": os.getpid()}

    def echo_text(ctx: Any) -> dict[str, Any]:
        return {"text": ctx.inputs["text"] + "!"}

    def die_once_next_starts(ctx: Any) -> dict[str, int]:
        """Return, and SIGKILL this process (from a thread) once the next step published."""

        def kill_when_published() -> None:
            path = os.path.join(ctx.params["dir"], "pid")
            while not os.path.exists(path):
                time.sleep(0.001)
            os.kill(os.getpid(), signal.SIGKILL)

        threading.Thread(target=kill_when_published, daemon=True).start()
        return {"pid": os.getpid()}

    def segfault(ctx: Any) -> None:
        ctypes.string_at(0)

    def raise_value_error(ctx: Any) -> None:
        raise ValueError(f"bad rows in {ctx.step_id}")

    class LockedError(Exception):
        """An exception that holds a lock, so it cannot be pickled."""

        def __init__(self, message: str) -> None:
            super().__init__(message)
            self.lock = threading.Lock()

    def raise_unpicklable(ctx: Any) -> None:
        raise LockedError("the lock is mine")

    class TwoArgError(Exception):
        """Pickles, but cannot be unpickled: ``args`` does not match ``__init__``."""

        def __init__(self, left: str, right: str) -> None:
            super().__init__(f"{left}/{right}")

    def raise_unloadable(ctx: Any) -> None:
        raise TwoArgError("left", "right")

    def return_unpicklable(ctx: Any) -> dict[str, Any]:
        return {"fine": 1, "conn": threading.Lock()}

    def return_int(ctx: Any) -> int:
        return 42

    def leave_grandchild(ctx: Any) -> dict[str, int]:
        child = subprocess.Popen(["sleep", "60"])
        return {"grandchild": child.pid}

    return SimpleNamespace(**{k: v for k, v in locals().items() if callable(v)})


STEPS = _make_steps()


# -- helpers -----------------------------------------------------------------------------


def _spec(
    fn: Callable[..., Any],
    *,
    step_id: str = "step",
    attempt: int = 1,
    timeout: float = SAFETY_DEADLINE,
    kill_grace: float = 1.0,
    inputs: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
    is_async: bool = False,
) -> AttemptSpec:
    return AttemptSpec(
        run_id="run-1",
        step_id=step_id,
        attempt=attempt,
        max_attempts=3,
        fn=fn,
        is_async=is_async,
        inputs=inputs or {},
        params=params or {},
        deadline=time.monotonic() + timeout,
        kill_grace=kill_grace,
    )


def _read_pid_file(path: Path, *, timeout: float = 10.0) -> list[int]:
    wait_for(path.exists, timeout=timeout, what=f"{path.name} to be written")
    return [int(p) for p in path.read_text().split()]


def _assert_reaped(pid: int) -> None:
    """``pid`` was our child: it must be gone *and reaped*, not left a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return
    fields = stat.rsplit(b")", 1)[1].split()
    assert int(fields[1]) != os.getpid(), f"child {pid} is still ours (state {fields[0]!r})"


def _wait_gone(pid: int, *, timeout: float = 5.0) -> None:
    """``pid`` was not our child: wait (bounded) until it is gone or a zombie of someone else."""
    wait_for(lambda: pid_gone(pid), timeout=timeout, what=f"pid {pid} to disappear")
    _assert_reaped(pid)


class _InThread:
    """Run ``fn`` on a helper thread; ``result()`` joins it with a bound."""

    def __init__(self, fn: Callable[[], object]) -> None:
        self._value: object = None
        self._thread = threading.Thread(target=self._main, args=(fn,), name="test-helper")
        self._thread.start()

    def _main(self, fn: Callable[[], object]) -> None:
        self._value = fn()

    def result(self, *, timeout: float = 15.0) -> object:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "helper thread did not finish in time"
        return self._value


@pytest.fixture
def slot() -> Iterator[ProcessSlot]:
    with ProcessSlot(name="test-slot") as the_slot:
        yield the_slot


@pytest.fixture
def pub(tmp_path: Path) -> dict[str, Any]:
    """Params telling a step where to publish its pids."""
    return {"dir": str(tmp_path)}


# -- round trips ----------------------------------------------------------------------------


def test_noop_round_trips_reuse_one_child(slot: ProcessSlot) -> None:
    pids = set()
    for attempt in (1, 2, 3):
        result = slot.run(_spec(STEPS.whoami, attempt=attempt), AttemptControl())
        assert result.kind == "ok", result
        assert result.outputs is not None
        assert result.outputs["attempt"] == attempt
        pids.add(result.outputs["pid"])
    assert pids == {slot.pid}
    assert slot.run(_spec(STEPS.noop), AttemptControl()) == AttemptResult(kind="ok")


def test_large_inputs_and_outputs_cross_the_pipes(slot: ProcessSlot) -> None:
    blob = os.urandom(3 * 1024 * 1024)  # far above the 64 KiB a pipe holds
    result = slot.run(_spec(STEPS.echo_blob, inputs={"blob": blob}), AttemptControl())
    assert result.kind == "ok", result
    assert result.outputs == {"blob": blob, "size": len(blob)}


def test_large_values_without_buffers_cross_the_pipes_in_many_reads(slot: ProcessSlot) -> None:
    text = "x" * (3 * 1024 * 1024)  # a str pickles in band: through the pipe, 64 KiB a read
    result = slot.run(_spec(STEPS.echo_text, inputs={"text": text}), AttemptControl())
    assert result.kind == "ok", result
    assert result.outputs == {"text": text + "!"}


def test_late_cancel_of_a_finished_attempt_leaves_the_child_alone(slot: ProcessSlot) -> None:
    control = AttemptControl()
    assert slot.run(_spec(STEPS.noop), control).kind == "ok"
    pid = slot.pid
    control.cancel("timeout")  # the engine's deadline timer firing just too late
    after = slot.run(_spec(STEPS.whoami), AttemptControl())
    assert after.kind == "ok", after
    assert after.outputs is not None
    assert after.outputs["pid"] == pid == slot.pid


def test_step_context_is_built_in_the_child(slot: ProcessSlot) -> None:
    spec = _spec(STEPS.whoami, step_id="ctx", inputs={"rows": [1, 2]}, params={"k": "v"})
    result = slot.run(spec, AttemptControl())
    assert result.kind == "ok", result
    assert result.outputs == {
        "pid": slot.pid,
        "run_id": "run-1",
        "step_id": "ctx",
        "attempt": 1,
        "max_attempts": 3,
        "inputs": {"rows": [1, 2]},
        "params": {"k": "v"},
        "deadline": spec.deadline,
        "cancelled": False,
    }


def test_async_step_runs_on_an_event_loop_in_the_child(slot: ProcessSlot) -> None:
    spec = _spec(STEPS.async_step, inputs={"n": 21}, is_async=True)
    result = slot.run(spec, AttemptControl())
    assert result.kind == "ok", result
    assert result.outputs == {"doubled": 42, "loop": True}


def test_step_returning_a_non_mapping_is_a_type_error(slot: ProcessSlot) -> None:
    result = slot.run(_spec(STEPS.return_int, step_id="count"), AttemptControl())
    assert result.kind == "error"
    assert isinstance(result.error, TypeError)
    assert "step 'count' returned int" in str(result.error)
    assert "mapping of artifact names to values" in str(result.error)


def test_importable_function_travels_by_reference_using_the_parent_sys_path(
    slot: ProcessSlot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = "stepvisor_test_refmod"
    (tmp_path / f"{module}.py").write_text(
        textwrap.dedent(
            """
            import sys

            def step(ctx):
                return {"imported_in_child": __name__ in sys.modules}
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)
    mod = __import__(module)
    payload = prepare_payload("ref", mod.step)
    assert module.encode() in payload
    assert len(payload) < 200, "an importable function must travel as a reference"
    result = slot.run(_spec(mod.step)._replace(fn_payload=payload), AttemptControl())
    monkeypatch.delitem(sys.modules, module)
    assert result.kind == "ok", result
    assert result.outputs == {"imported_in_child": True}


def test_function_the_child_cannot_import_is_unsendable(
    slot: ProcessSlot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = "stepvisor_test_gonemod"
    (tmp_path / f"{module}.py").write_text("def step(ctx):\n    return None\n")
    with monkeypatch.context() as patch:
        patch.syspath_prepend(str(tmp_path))
        mod = __import__(module)
        payload = prepare_payload("gone", mod.step)
        patch.delitem(sys.modules, module)
    # Now only this process ever saw the module: the child cannot import it.
    spec = _spec(mod.step, step_id="gone")._replace(fn_payload=payload)
    result = slot.run(spec, AttemptControl())
    assert result.kind == "unsendable", result
    message = str(result.error)
    assert "step 'gone': its function could not be loaded in the worker process" in message
    assert f"No module named '{module}'" in message
    assert "make its module importable there" in message


# -- deadlines and cancel -----------------------------------------------------------------------


@pytest.mark.realtime
def test_timed_out_process_step_leaves_no_child_running(
    slot: ProcessSlot, tmp_path: Path, pub: dict[str, Any]
) -> None:
    slot.start()
    assert slot.run(_spec(STEPS.noop), AttemptControl()).kind == "ok"  # warm: 0.5 s is for the step
    control = AttemptControl()
    result = slot.run(_spec(STEPS.busy_with_grandchildren, timeout=0.5, params=pub), control)
    child_pid = _read_pid_file(tmp_path / "pid")[0]
    grandchildren = _read_pid_file(tmp_path / "grandchildren")

    assert result.kind == "cancelled", result
    assert control.reason == "timeout"
    assert isinstance(result.error, StepTimeoutError)
    assert result.note is not None
    assert "its process group was killed (SIGTERM)" in result.note
    assert result.extra["signal"] == "SIGTERM"
    _assert_reaped(child_pid)
    for pid in grandchildren:  # the SIGTERM-immune one too
        _wait_gone(pid)

    after = slot.run(_spec(STEPS.whoami), AttemptControl())
    assert after.kind == "ok", after
    assert after.outputs is not None
    assert after.outputs["pid"] == slot.pid != child_pid


@pytest.mark.realtime
def test_sigterm_ignoring_step_gets_sigkill_after_grace(
    slot: ProcessSlot, tmp_path: Path, pub: dict[str, Any]
) -> None:
    control = AttemptControl()
    cancelled_at: list[float] = []

    def cancel_when_running() -> None:
        _read_pid_file(tmp_path / "pid")  # published after its SIGTERM handler is set
        cancelled_at.append(time.monotonic())
        control.cancel("cancel")

    helper = _InThread(cancel_when_running)
    result = slot.run(_spec(STEPS.term_recorder, kill_grace=0.3, params=pub), control)
    ended_at = time.monotonic()
    helper.result()

    assert result.kind == "cancelled", result
    assert (tmp_path / "got-sigterm").read_text() == str(int(signal.SIGTERM))
    assert result.note is not None
    assert "SIGKILL after 0.3 s grace" in result.note
    assert result.extra["signal"] == "SIGKILL"
    assert result.extra["exitcode"] == -signal.SIGKILL
    assert ended_at - cancelled_at[0] >= 0.3
    _assert_reaped(_read_pid_file(tmp_path / "pid")[0])


@pytest.mark.realtime
def test_cancel_from_another_thread_stops_the_step(
    slot: ProcessSlot, tmp_path: Path, pub: dict[str, Any]
) -> None:
    control = AttemptControl()

    def cancel_when_running() -> None:
        _read_pid_file(tmp_path / "pid")
        control.cancel("cancel")

    helper = _InThread(cancel_when_running)
    result = slot.run(_spec(STEPS.busy, params=pub), control)
    helper.result()

    assert result.kind == "cancelled", result
    assert isinstance(result.error, StepCancelledError)
    assert result.extra["reason"] == "cancel"
    _assert_reaped(_read_pid_file(tmp_path / "pid")[0])
    control.cancel("cancel")  # late and repeated: must not touch the fresh child
    assert slot.run(_spec(STEPS.noop), AttemptControl()).kind == "ok"


def test_deadline_already_passed_runs_nothing(slot: ProcessSlot) -> None:
    control = AttemptControl()
    result = slot.run(_spec(STEPS.noop, timeout=-1.0), control)
    assert result.kind == "cancelled"
    assert isinstance(result.error, StepTimeoutError)
    assert control.reason == "timeout"
    assert slot.pid is None


# -- crashes -----------------------------------------------------------------------------------


def test_sigkill_from_outside_is_a_crash_naming_the_signal(
    slot: ProcessSlot, tmp_path: Path, pub: dict[str, Any]
) -> None:
    def kill_when_running() -> int:
        pid = _read_pid_file(tmp_path / "pid")[0]
        os.kill(pid, signal.SIGKILL)
        return pid

    helper = _InThread(kill_when_running)
    result = slot.run(_spec(STEPS.busy, step_id="victim", params=pub), AttemptControl())
    pid = helper.result()

    assert result.kind == "crash", result
    assert isinstance(result.error, WorkerCrashedError)
    assert f"the worker process (pid {pid}) running step 'victim'" in str(result.error)
    assert "died from signal SIGKILL" in str(result.error)
    assert result.error.exitcode == -signal.SIGKILL
    assert isinstance(pid, int)
    _assert_reaped(pid)
    assert slot.run(_spec(STEPS.noop), AttemptControl()).kind == "ok"


def test_os_exit_is_a_crash_with_its_exit_code(slot: ProcessSlot) -> None:
    result = slot.run(_spec(STEPS.exit_3), AttemptControl())
    assert result.kind == "crash", result
    assert isinstance(result.error, WorkerCrashedError)
    assert "exited with code 3" in str(result.error)
    assert result.error.exitcode == 3
    assert slot.run(_spec(STEPS.noop), AttemptControl()).kind == "ok"


def test_segfault_is_a_crash_naming_sigsegv(slot: ProcessSlot) -> None:
    result = slot.run(_spec(STEPS.segfault), AttemptControl())
    assert result.kind == "crash", result
    assert "died from signal SIGSEGV" in str(result.error)
    assert result.extra["signal"] == "SIGSEGV"


# -- exceptions and values that cannot travel ----------------------------------------------------


def test_exception_comes_back_with_type_message_and_remote_traceback(slot: ProcessSlot) -> None:
    result = slot.run(_spec(STEPS.raise_value_error, step_id="load"), AttemptControl())
    assert result.kind == "error"
    assert type(result.error) is ValueError
    assert str(result.error) == "bad rows in load"
    assert result.traceback is not None
    assert "in raise_value_error" in result.traceback
    notes = getattr(result.error, "__notes__", [])
    assert any("in raise_value_error" in note for note in notes)


def test_unpicklable_exception_becomes_remote_step_error(slot: ProcessSlot) -> None:
    result = slot.run(_spec(STEPS.raise_unpicklable, step_id="locky"), AttemptControl())
    assert result.kind == "error"
    error = result.error
    assert isinstance(error, RemoteStepError)
    assert error.remote_type.endswith("LockedError")
    assert "in raise_unpicklable" in error.remote_traceback
    assert "LockedError: the lock is mine" in error.remote_traceback
    assert "step 'locky' raised" in str(error)
    assert result.traceback == error.remote_traceback


def test_exception_that_cannot_be_unpickled_becomes_remote_step_error(slot: ProcessSlot) -> None:
    result = slot.run(_spec(STEPS.raise_unloadable), AttemptControl())
    assert isinstance(result.error, RemoteStepError)
    assert result.error.remote_type.endswith("TwoArgError")
    assert "left/right" in str(result.error)


def test_unpicklable_input_is_named_before_anything_is_sent(slot: ProcessSlot) -> None:
    rows = [1, 2, threading.Lock()]
    with pytest.raises(StepNotSerializableError) as caught:
        check_sendable("load", "inputs['rows']", rows)
    message = str(caught.value)
    assert "step 'load'" in message
    assert "inputs['rows'][2] is a _thread.lock" in message
    assert caught.value.step_id == "load"

    result = slot.run(_spec(STEPS.noop, step_id="load", inputs={"rows": rows}), AttemptControl())
    assert result.kind == "unsendable"
    assert isinstance(result.error, StepNotSerializableError)
    assert "inputs['rows'][2]" in str(result.error)
    assert slot.pid is None, "no worker process should have been started"


def test_file_open_for_writing_is_not_sendable(tmp_path: Path) -> None:
    with (tmp_path / "out.txt").open("w") as out, pytest.raises(StepNotSerializableError) as caught:
        check_sendable("save", "params['out']", {"handle": out})
    assert "params['out']['handle'] is a _io.TextIOWrapper" in str(caught.value)


def test_lambda_holding_a_lock_cannot_be_prepared(slot: ProcessSlot) -> None:
    lock = threading.Lock()

    def fn(ctx: Any) -> bool:
        return lock.locked()

    with pytest.raises(StepNotSerializableError) as caught:
        prepare_payload("guarded", lambda ctx: lock.locked())
    message = str(caught.value)
    assert "step 'guarded'" in message
    assert "closure variable 'lock'" in message
    assert "_thread.lock" in message

    result = slot.run(_spec(fn, step_id="guarded"), AttemptControl())
    assert result.kind == "unsendable"
    assert "closure variable 'lock'" in str(result.error)


def test_unpicklable_result_is_unsendable_naming_the_artifact(slot: ProcessSlot) -> None:
    result = slot.run(_spec(STEPS.return_unpicklable, step_id="conn"), AttemptControl())
    assert result.kind == "unsendable"
    assert isinstance(result.error, StepNotSerializableError)
    assert "step 'conn' returned artifact 'conn' (a lock)" in str(result.error)
    pid = slot.pid
    assert slot.run(_spec(STEPS.noop), AttemptControl()).kind == "ok"
    assert slot.pid == pid, "a result that cannot travel does not cost the worker"


# -- what a step leaves behind, and closing -----------------------------------------------


def test_processes_left_by_a_finished_step_are_killed(slot: ProcessSlot) -> None:
    result = slot.run(_spec(STEPS.leave_grandchild), AttemptControl())
    assert result.kind == "ok", result
    assert result.outputs is not None
    grandchild = result.outputs["grandchild"]
    assert result.extra["leftover_pids"] == (grandchild,)
    assert result.note is not None
    assert "they were killed" in result.note
    _wait_gone(grandchild)


def test_close_kills_and_reaps_the_child_and_is_idempotent() -> None:
    slot = ProcessSlot(name="closing")
    before = slot.pid
    assert before is None, "the child starts lazily"
    assert slot.run(_spec(STEPS.noop), AttemptControl()).kind == "ok"
    pid = slot.pid
    assert isinstance(pid, int)
    slot.close()
    _assert_reaped(pid)
    assert slot.pid is None
    slot.close()
    after = slot.run(_spec(STEPS.noop), AttemptControl())
    assert after.kind == "cancelled"
    assert "was closed" in str(after.error)


def test_forgotten_slot_is_closed_when_collected() -> None:
    slot = ProcessSlot(name="forgotten")
    pid = slot.start()
    del slot
    gc.collect()
    _assert_reaped(pid)


def test_close_during_an_attempt_ends_it_as_cancelled(tmp_path: Path, pub: dict[str, Any]) -> None:
    slot = ProcessSlot(name="closing")
    helper = _InThread(lambda: slot.run(_spec(STEPS.busy, params=pub), AttemptControl()))
    pid = _read_pid_file(tmp_path / "pid")[0]
    slot.close()
    result = helper.result()
    assert isinstance(result, AttemptResult)
    assert result.kind == "cancelled"
    assert isinstance(result.error, StepCancelledError)
    _assert_reaped(pid)
    assert slot.pid is None


_DRIVER = """
import os, subprocess, sys, time
from stepvisor.backends.base import AttemptSpec
from stepvisor.backends.process import ProcessSlot
from stepvisor.context import AttemptControl

folder = sys.argv[1]

def publish(name, value):
    tmp = os.path.join(folder, "." + name)
    with open(tmp, "w") as fh:
        fh.write(str(value))
    os.replace(tmp, os.path.join(folder, name))

def step(ctx):
    grandchild = subprocess.Popen(["sleep", "60"])
    publish("grandchild", grandchild.pid)
    publish("child", os.getpid())
    while True:
        pass

spec = AttemptSpec(
    run_id="r", step_id="s", attempt=1, max_attempts=1, fn=step, is_async=False,
    inputs={}, params={}, deadline=time.monotonic() + 60,
)
ProcessSlot().run(spec, AttemptControl())
"""


@pytest.mark.realtime
def test_child_and_grandchild_die_when_the_parent_is_sigkilled(tmp_path: Path) -> None:
    driver = subprocess.Popen([sys.executable, "-c", _DRIVER, str(tmp_path)])
    try:
        child = _read_pid_file(tmp_path / "child", timeout=30.0)[0]
        grandchild = _read_pid_file(tmp_path / "grandchild")[0]
    finally:
        driver.kill()
        driver.wait(timeout=10)
    _wait_gone(child)
    _wait_gone(grandchild)


# -- attempts sent ahead ----------------------------------------------------------------------


def _queued(fn: Callable[..., Any], step_id: str, params: dict[str, Any]) -> AttemptSpec:
    """A spec as a Worker's batch holds it: no deadline, so it may be sent ahead."""
    return _spec(fn, step_id=step_id, params=params)._replace(deadline=None)


@pytest.fixture
def warm(slot: ProcessSlot) -> ProcessSlot:
    """A slot whose child has booted (as a Worker's is): only then is anything sent ahead."""
    assert slot.run(_spec(STEPS.noop), AttemptControl()).kind == "ok"
    return slot


def _ran(pub: dict[str, Any]) -> list[str]:
    path = Path(pub["dir"]) / "ran"
    return path.read_text().split() if path.exists() else []


def test_an_attempt_sent_ahead_starts_when_the_one_before_replies(
    warm: ProcessSlot, pub: dict[str, Any]
) -> None:
    first, second = _queued(STEPS.mark, "a", pub), _queued(STEPS.mark, "b", pub)
    result = warm.run(first, AttemptControl(), ahead=(second, AttemptControl()))
    assert result.kind == "ok", result
    # "b" runs without another call: its message was in the child's pipe.
    wait_for(lambda: _ran(pub) == ["a", "b"], what="the attempt sent ahead to run")
    after = warm.run(second, AttemptControl())
    assert after.kind == "ok", after
    assert after.outputs == {"step_id": "b", "pid": result.outputs["pid"]}  # type: ignore[index]
    assert _ran(pub) == ["a", "b"]  # taken from the pipe, not sent twice


def test_a_long_chain_of_attempts_sent_ahead_keeps_replies_matched(
    warm: ProcessSlot, pub: dict[str, Any]
) -> None:
    specs = [_queued(STEPS.mark, f"s{i:02d}", pub) for i in range(30)]
    for i, spec in enumerate(specs):
        ahead = (specs[i + 1], AttemptControl()) if i + 1 < len(specs) else None
        result = warm.run(spec, AttemptControl(), ahead=ahead)
        assert result.kind == "ok", result
        assert result.outputs is not None
        assert result.outputs["step_id"] == spec.step_id
    assert _ran(pub) == [s.step_id for s in specs]


def test_a_crash_before_the_reply_sends_the_next_attempt_again(
    warm: ProcessSlot, pub: dict[str, Any]
) -> None:
    crash, after = _queued(STEPS.exit_3, "crash", pub), _queued(STEPS.mark, "after", pub)
    result = warm.run(crash, AttemptControl(), ahead=(after, AttemptControl()))
    assert result.kind == "crash", result
    second = warm.run(after, AttemptControl())
    assert second.kind == "ok", second
    assert _ran(pub) == ["after"]  # it never started in the dead child: run once, here


def test_a_crash_after_the_reply_is_the_crash_of_the_attempt_sent_ahead(
    warm: ProcessSlot, pub: dict[str, Any]
) -> None:
    before, crash = _queued(STEPS.mark, "before", pub), _queued(STEPS.exit_3, "crash", pub)
    result = warm.run(before, AttemptControl(), ahead=(crash, AttemptControl()))
    assert result.kind == "ok", result
    second = warm.run(crash, AttemptControl())
    assert second.kind == "crash", second
    assert isinstance(second.error, WorkerCrashedError)
    assert "exited with code 3" in str(second.error)
    third = warm.run(_queued(STEPS.mark, "next", pub), AttemptControl())
    assert third.kind == "ok", third
    assert _ran(pub) == ["before", "next"]


def test_a_death_right_after_a_reply_is_the_crash_of_the_attempt_sent_ahead(
    warm: ProcessSlot, pub: dict[str, Any]
) -> None:
    # The reply is kept; the death is seen while waiting for the next attempt, which the
    # child had started: that attempt crashed, and a fresh child runs the one after.
    before = _queued(STEPS.die_once_next_starts, "before", pub)
    queued = _queued(STEPS.busy, "queued", pub)
    result = warm.run(before, AttemptControl(), ahead=(queued, AttemptControl()))
    assert result.kind == "ok", result
    assert result.outputs is not None
    crashed = _InThread(lambda: warm.run(queued, AttemptControl())).result()
    assert isinstance(crashed, AttemptResult)
    assert crashed.kind == "crash", crashed
    assert "SIGKILL" in str(crashed.error)
    _assert_reaped(result.outputs["pid"])
    after = warm.run(_queued(STEPS.mark, "after", pub), AttemptControl())
    assert after.kind == "ok", after
    assert after.outputs is not None
    assert after.outputs["pid"] not in (result.outputs["pid"], None)


def test_running_another_attempt_than_the_one_sent_ahead_replaces_the_child(
    warm: ProcessSlot, pub: dict[str, Any]
) -> None:
    first = _queued(STEPS.mark, "first", pub)
    skipped = _queued(STEPS.busy, "skipped", pub)  # publishes its pid, then spins
    result = warm.run(first, AttemptControl(), ahead=(skipped, AttemptControl()))
    assert result.kind == "ok", result
    assert result.outputs is not None
    spinning = _read_pid_file(Path(pub["dir"]) / "pid")[0]
    other = warm.run(_queued(STEPS.mark, "other", pub), AttemptControl())
    assert other.kind == "ok", other
    assert other.outputs is not None
    assert other.outputs["step_id"] == "other"  # its own reply, not the skipped one's
    assert other.outputs["pid"] != result.outputs["pid"]
    _assert_reaped(spinning)
    assert pid_gone(spinning)


def test_an_attempt_sent_ahead_then_cancelled_is_stopped_in_the_child(
    warm: ProcessSlot, pub: dict[str, Any]
) -> None:
    first, spinner = _queued(STEPS.mark, "first", pub), _queued(STEPS.busy, "spin", pub)
    control = AttemptControl()
    result = warm.run(first, AttemptControl(), ahead=(spinner, control))
    assert result.kind == "ok", result
    spinning = _read_pid_file(Path(pub["dir"]) / "pid")[0]  # it started by itself
    control.cancel("cancel")
    stopped = warm.run(spinner, control)
    assert stopped.kind == "cancelled", stopped
    _assert_reaped(spinning)
    assert pid_gone(spinning)


def test_an_attempt_with_a_deadline_is_never_sent_ahead(
    warm: ProcessSlot, pub: dict[str, Any]
) -> None:
    first = _queued(STEPS.mark, "first", pub)
    timed = _spec(STEPS.mark, step_id="timed", params=pub)  # has a deadline
    assert warm.run(first, AttemptControl(), ahead=(timed, AttemptControl())).kind == "ok"
    assert _ran(pub) == ["first"]  # its deadline starts when it is sent, so it was not
    assert warm.run(timed, AttemptControl()).kind == "ok"
    assert _ran(pub) == ["first", "timed"]


# -- several attempts sent ahead --------------------------------------------------------------


def _chain(
    specs: list[AttemptSpec], i: int, controls: list[AttemptControl] | None = None
) -> list[tuple[AttemptSpec, AttemptControl]]:
    """What a Worker running ``specs`` as one batch offers after ``specs[i]``: the rest."""
    controls = controls or [AttemptControl() for _ in specs]
    return list(zip(specs[i + 1 :], controls[i + 1 :], strict=True))


def test_several_attempts_sent_ahead_run_in_order_and_are_not_sent_twice(
    warm: ProcessSlot, pub: dict[str, Any]
) -> None:
    specs = [_queued(STEPS.mark, f"s{i}", pub) for i in range(5)]
    first = warm.run(specs[0], AttemptControl(), ahead=_chain(specs, 0))
    assert first.kind == "ok", first
    # The next ones ran without another call: their messages (the function goes by value)
    # went into the child's pipe in one PIPE_BUF write.  How many fit depends on the
    # pickle's size, which varies with the Python version (1,433 bytes each on 3.11: two
    # fit in 4,096; 1,365 on 3.13: three), so the test asks for at least two, in order.
    wait_for(lambda: len(_ran(pub)) >= 3, what="the attempts sent ahead")
    ran = _ran(pub)
    assert ran == [s.step_id for s in specs[: len(ran)]], ran
    for i, spec in enumerate(specs[1:], start=1):
        result = warm.run(spec, AttemptControl(), ahead=_chain(specs, i))
        assert result.kind == "ok", result
        assert result.outputs == {"step_id": spec.step_id, "pid": first.outputs["pid"]}  # type: ignore[index]
    assert _ran(pub) == [s.step_id for s in specs]


def test_a_long_batch_sent_ahead_keeps_replies_matched(
    warm: ProcessSlot, pub: dict[str, Any]
) -> None:
    specs = [_queued(STEPS.mark, f"s{i:02d}", pub) for i in range(40)]
    for i, spec in enumerate(specs):
        result = warm.run(spec, AttemptControl(), ahead=_chain(specs, i)[:8])
        assert result.kind == "ok", result
        assert result.outputs is not None
        assert result.outputs["step_id"] == spec.step_id
    assert _ran(pub) == [s.step_id for s in specs]


def test_a_crash_with_several_sent_ahead_crashes_the_next_and_runs_the_rest_once(
    warm: ProcessSlot, pub: dict[str, Any]
) -> None:
    # "crash" replied to nothing: the child died in it.  The attempts behind it never
    # started, so they are sent again, in order, to a fresh child, and run once each.
    specs = [
        _queued(STEPS.mark, "before", pub),
        _queued(STEPS.exit_3, "crash", pub),
        _queued(STEPS.mark, "after1", pub),
        _queued(STEPS.mark, "after2", pub),
    ]
    kinds = [
        warm.run(spec, AttemptControl(), ahead=_chain(specs, i)).kind
        for i, spec in enumerate(specs)
    ]
    assert kinds == ["ok", "crash", "ok", "ok"]
    assert _ran(pub) == ["before", "after1", "after2"]


def test_a_cancelled_attempt_deep_in_the_pipe_is_stopped_and_the_rest_still_run(
    warm: ProcessSlot, pub: dict[str, Any]
) -> None:
    specs = [
        _queued(STEPS.mark, "first", pub),
        _queued(STEPS.mark, "second", pub),
        _queued(STEPS.busy, "spin", pub),
        _queued(STEPS.mark, "last", pub),
    ]
    controls = [AttemptControl() for _ in specs]
    assert warm.run(specs[0], controls[0], ahead=_chain(specs, 0, controls)).kind == "ok"
    spinning = _read_pid_file(Path(pub["dir"]) / "pid")[0]  # it started by itself
    controls[2].cancel("cancel")
    results = [warm.run(specs[i], controls[i], ahead=_chain(specs, i, controls)) for i in (1, 2, 3)]
    assert [r.kind for r in results] == ["ok", "cancelled", "ok"]
    _assert_reaped(spinning)
    assert pid_gone(spinning)
    assert _ran(pub) == ["first", "second", "last"]


def test_a_batch_stops_being_sent_ahead_at_an_attempt_with_a_deadline(
    warm: ProcessSlot, pub: dict[str, Any]
) -> None:
    specs = [
        _queued(STEPS.mark, "first", pub),
        _spec(STEPS.mark, step_id="timed", params=pub),  # has a deadline
        _queued(STEPS.mark, "behind", pub),
    ]
    assert warm.run(specs[0], AttemptControl(), ahead=_chain(specs, 0)).kind == "ok"
    assert _ran(pub) == ["first"]  # nothing after "timed" overtakes it
    for i in (1, 2):
        assert warm.run(specs[i], AttemptControl(), ahead=_chain(specs, i)).kind == "ok"
    assert _ran(pub) == ["first", "timed", "behind"]


def test_a_sys_path_change_reaches_the_child_when_its_message_could_not_go_ahead(
    warm: ProcessSlot, pub: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first message built after sys.path changed carries the new path.  Here that is
    # one too large to go ahead: it is not sent then, so the path must still go with it.
    first, second = _queued(STEPS.mark, "first", pub), _queued(STEPS.mark, "second", pub)
    assert warm.run(first, AttemptControl(), ahead=(second, AttemptControl())).kind == "ok"
    module = "stepvisor_test_latepath"
    folder = tmp_path / "late"
    folder.mkdir()
    (folder / f"{module}.py").write_text("def step(ctx):\n    return {'ok': True}\n")
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, module, raising=False)
    late = _queued(__import__(module).step, "late", {"pad": "x" * 8192})  # > PIPE_BUF
    assert warm.run(second, AttemptControl(), ahead=[(late, AttemptControl())]).kind == "ok"
    result = warm.run(late, AttemptControl())
    monkeypatch.delitem(sys.modules, module)
    assert result.kind == "ok", result
    assert result.outputs == {"ok": True}
