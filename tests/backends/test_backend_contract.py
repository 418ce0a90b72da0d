"""The edges every backend shares, checked on each: thread, async, process and Ray.

* the guard (``run_guarded``): an attempt cancelled, or past its deadline,
  before it started does not run; a backend bug is one kind of result;
* the check of outputs: a bad return fails with the same ``TypeError`` on
  every backend, with the memory store and with SQLite;
* exceptions, picklable or not, and ``BaseException`` subclasses.

Ray runs where it is installed (``ray`` marker; skipped, saying so, where it
is not).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import stepvisor as sv
from stepvisor.backends import asyncio as asyncio_backend
from stepvisor.backends import thread as thread_backend
from stepvisor.backends.asyncio import LoopThread
from stepvisor.backends.base import AttemptSpec, Backend, run_guarded
from stepvisor.backends.process import ProcessSlot
from stepvisor.backends.thread import ThreadBackend
from stepvisor.context import AttemptControl
from stepvisor.errors import RemoteStepError, StepCancelledError, StepError, StepTimeoutError
from tests.backends.test_ray_backend import ray_session

__all__ = ["ray_session"]  # a fixture, used by name

BACKENDS = ["thread", "async", "process", pytest.param("ray", marks=pytest.mark.ray)]
#: Where a step runs away from the engine, its exceptions must cross a boundary.
REMOTE = {"process", "ray"}


def _make_steps() -> SimpleNamespace:
    """Step functions defined in a function, so they travel by value (Ray needs that)."""
    import threading  # noqa: PLC0415 - inside: travels with the functions

    shapes: dict[str, object] = {
        "int_key": {1: "x"},
        "empty_name": {"": 1},
        "not_a_mapping": 5,
    }

    class Locked(Exception):  # noqa: N818 - a step's own exception
        def __init__(self, message: str) -> None:
            super().__init__(message)
            self.lock = threading.Lock()

    def touch(ctx: Any) -> None:
        Path(ctx.params["path"]).write_text("ran")

    async def touch_async(ctx: Any) -> None:
        touch(ctx)

    def bad(ctx: Any) -> object:
        return shapes[ctx.params["shape"]]

    async def bad_async(ctx: Any) -> object:
        return bad(ctx)

    def exits(ctx: Any) -> None:
        raise SystemExit(3)

    async def exits_async(ctx: Any) -> None:
        exits(ctx)

    def locked(ctx: Any) -> None:
        raise Locked("the lock is mine")

    async def locked_async(ctx: Any) -> None:
        locked(ctx)

    return SimpleNamespace(
        touch=touch,
        touch_async=touch_async,
        bad=bad,
        bad_async=bad_async,
        exits=exits,
        exits_async=exits_async,
        locked=locked,
        locked_async=locked_async,
    )


STEPS = _make_steps()


def _fn(backend_name: str, name: str) -> Callable[..., Any]:
    fn: Callable[..., Any] = getattr(STEPS, f"{name}_async" if backend_name == "async" else name)
    return fn


def _spec(
    backend_name: str, name: str, *, deadline: float | None = None, **params: Any
) -> AttemptSpec:
    return AttemptSpec(
        run_id="contract",
        step_id=name,
        attempt=1,
        max_attempts=1,
        fn=_fn(backend_name, name),
        is_async=backend_name == "async",
        inputs={},
        params=params,
        deadline=deadline,
    )


@pytest.fixture(scope="module", params=BACKENDS)
def executor(request: pytest.FixtureRequest) -> str:
    """The backend under test, by executor name.  Module-scoped, so that Ray (one
    instance for the module) starts before the leak check of the test needing it."""
    name: str = request.param
    if name == "ray":
        request.getfixturevalue("ray_session")
    return name


@pytest.fixture
def backend(executor: str) -> Iterator[tuple[str, Backend]]:
    name = executor
    made: Backend
    if name == "thread":
        made = ThreadBackend()
    elif name == "async":
        made = LoopThread()
    elif name == "process":
        made = ProcessSlot(name="contract")
    else:
        from stepvisor.backends.ray import RayBackend  # noqa: PLC0415

        made = RayBackend.connect(address=None)
    try:
        yield name, made
    finally:
        made.close()


# -- the guard -----------------------------------------------------------------------------


def test_an_attempt_cancelled_before_it_starts_does_not_run(
    backend: tuple[str, Backend], tmp_path: Path
) -> None:
    name, impl = backend
    control = AttemptControl()
    control.cancel("cancel")
    result = run_guarded(impl, _spec(name, "touch", path=str(tmp_path / "ran")), control)
    assert result.kind == "cancelled", result
    assert isinstance(result.error, StepCancelledError)
    assert not (tmp_path / "ran").exists()


def test_an_attempt_past_its_deadline_does_not_run_and_times_out(
    backend: tuple[str, Backend], tmp_path: Path
) -> None:
    name, impl = backend
    control = AttemptControl()
    spec = _spec(name, "touch", deadline=time.monotonic() - 1.0, path=str(tmp_path / "ran"))
    result = run_guarded(impl, spec, control)
    assert result.kind == "cancelled", result
    assert isinstance(result.error, StepTimeoutError)
    assert control.reason == "timeout"
    assert not (tmp_path / "ran").exists()


def test_the_guard_lets_a_live_attempt_run(backend: tuple[str, Backend], tmp_path: Path) -> None:
    name, impl = backend
    spec = _spec(name, "touch", deadline=time.monotonic() + 60.0, path=str(tmp_path / "ran"))
    result = run_guarded(impl, spec, AttemptControl())
    assert result.kind == "ok", result
    assert (tmp_path / "ran").read_text() == "ran"


def _break(name: str, impl: Backend, monkeypatch: pytest.MonkeyPatch, bug: Exception) -> None:
    """Make ``impl`` fail inside itself, the way a bug in it would."""

    def boom(*_: object, **__: object) -> Any:
        raise bug

    if name == "thread":
        monkeypatch.setattr(thread_backend, "call_step", boom)
    elif name == "async":
        monkeypatch.setattr(asyncio_backend, "make_context", boom)
    elif name == "process":
        monkeypatch.setattr(ProcessSlot, "_run", boom)
    else:
        monkeypatch.setattr(impl._placement, "task_args", boom)  # type: ignore[attr-defined]


def test_a_backend_bug_is_one_kind_of_result_on_every_backend(
    backend: tuple[str, Backend], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, impl = backend
    bug = RuntimeError("a bug in the backend")
    with monkeypatch.context() as patch:
        _break(name, impl, patch, bug)
        result = run_guarded(impl, _spec(name, "touch", path=str(tmp_path / "a")), AttemptControl())
    assert result.kind == "error", result
    assert type(result.error) is StepError
    assert result.error.__cause__ is bug
    assert "stepvisor bug" in str(result.error)
    assert result.note == "its backend failed (a stepvisor bug)"
    assert result.traceback is not None
    assert "a bug in the backend" in result.traceback
    # The backend still works afterwards (a process slot replaced its child).
    after = run_guarded(impl, _spec(name, "touch", path=str(tmp_path / "b")), AttemptControl())
    assert after.kind == "ok", after


# -- exceptions ---------------------------------------------------------------------------------


def test_a_base_exception_subclass_fails_the_step_as_itself(backend: tuple[str, Backend]) -> None:
    name, impl = backend
    result = run_guarded(impl, _spec(name, "exits"), AttemptControl())
    assert result.kind == "error", result
    assert type(result.error) is SystemExit
    assert result.error.args == (3,)


def test_an_unpicklable_exception_is_itself_locally_and_remote_step_error_remotely(
    backend: tuple[str, Backend],
) -> None:
    name, impl = backend
    result = run_guarded(impl, _spec(name, "locked"), AttemptControl())
    assert result.kind == "error", result
    if name in REMOTE:
        assert isinstance(result.error, RemoteStepError)
        assert result.error.remote_type.endswith("Locked")
        assert "the lock is mine" in str(result.error)
    else:
        assert type(result.error).__name__ == "Locked"


# -- the check of outputs, through a whole run ---------------------------------------------------

SHAPES = {
    "int_key": "artifact name 1",
    "empty_name": "artifact name ''",
    "not_a_mapping": "returned int",
}


@pytest.mark.parametrize("store", ["memory", "sqlite"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_a_bad_return_fails_with_type_error_on_every_backend_and_store(
    executor: str, shape: str, store: str, chdir_tmp: Path
) -> None:
    step = sv.Step(
        "bad",
        _fn(executor, "bad"),
        executor=None if executor == "async" else executor,  # type: ignore[arg-type]
        params={"shape": shape},
    )
    result = sv.run(
        sv.Workflow("outputs", [step]),
        store=None if store == "memory" else chdir_tmp / "r.db",
    )
    assert result.status is sv.RunStatus.FAILED
    attempts = result.steps["bad"].attempts
    assert [(a.outcome, a.error_type) for a in attempts] == [("failed", "TypeError")]
    message = attempts[0].error_message or ""
    assert "step 'bad'" in message
    assert SHAPES[shape] in message
    assert "bad" not in result.artifacts
