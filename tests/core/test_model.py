"""Validation of Step, Settings and Workflow: each bad input gets its own error."""

from __future__ import annotations

import math
from typing import Any

import pytest

import stepvisor as sv


def noop(ctx: sv.StepContext) -> None:
    return None


async def anoop(ctx: sv.StepContext) -> None:
    return None


def test_step_normalizes_lists_to_tuples() -> None:
    step = sv.Step("a", noop, needs=["x"], creates=["r"])
    assert step.needs == ("x",)
    assert step.creates == ("r",)
    assert step.requires == ()


def test_bare_string_needs_means_one_name() -> None:
    assert sv.Step("b", noop, needs="a").needs == ("a",)


@pytest.mark.parametrize("bad_id", ["", "   ", 3, None])
def test_step_id_must_be_a_non_empty_string(bad_id: Any) -> None:
    with pytest.raises(sv.InvalidStepIdError, match="non-empty string"):
        sv.Step(bad_id, noop)


def test_step_fn_must_be_callable() -> None:
    with pytest.raises(sv.StepFunctionError, match=r"step 'a': fn must be callable"):
        sv.Step("a", 42)  # type: ignore[arg-type]


def test_duplicate_step_id_names_the_id() -> None:
    with pytest.raises(sv.DuplicateStepError, match=r"two steps have the id 'a'.*rename"):
        sv.Workflow("wf", steps=[sv.Step("a", noop), sv.Step("a", noop)])


def test_unknown_dependency_names_step_and_suggests() -> None:
    with pytest.raises(
        sv.UnknownDependencyError, match=r"step 'b' needs 'extrct'.*did you mean 'extract'"
    ):
        sv.Workflow("wf", steps=[sv.Step("extract", noop), sv.Step("b", noop, needs=["extrct"])])


def test_required_artifact_nobody_creates() -> None:
    with pytest.raises(
        sv.MissingArtifactError, match=r"step 'b' requires the artifact 'rows'.*no step creates"
    ):
        sv.Workflow("wf", steps=[sv.Step("a", noop), sv.Step("b", noop, requires=["rows"])])


def test_cycle_message_shows_the_cycle() -> None:
    steps = [
        sv.Step("a", noop, needs=["c"]),
        sv.Step("b", noop, needs=["a"]),
        sv.Step("c", noop, needs=["b"]),
        sv.Step("d", noop),
    ]
    with pytest.raises(sv.CycleError, match=r"a -> b -> c -> a") as info:
        sv.Workflow("wf", steps=steps)
    assert info.value.cycle == ("a", "b", "c", "a")


def test_cycle_through_artifacts_is_found() -> None:
    steps = [
        sv.Step("a", noop, requires=["y"], creates=["x"]),
        sv.Step("b", noop, requires=["x"], creates=["y"]),
    ]
    with pytest.raises(sv.CycleError, match=r"a -> b -> a"):
        sv.Workflow("wf", steps=steps)


def test_step_cannot_need_itself() -> None:
    with pytest.raises(sv.InvalidSettingError, match="lists itself"):
        sv.Step("a", noop, needs=["a"])


@pytest.mark.parametrize("bad", [0, -1, 2.5, "4", True, None])
def test_max_parallel_must_be_positive_int(bad: Any) -> None:
    if bad is None:
        assert sv.Settings(max_parallel=None).max_parallel is None
        return
    with pytest.raises(sv.InvalidMaxParallelError, match="max_parallel must be an integer >= 1"):
        sv.Settings(max_parallel=bad)


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf, "5", True])
def test_timeout_must_be_positive_number(bad: Any) -> None:
    with pytest.raises(sv.InvalidTimeoutError, match="positive"):
        sv.Step("a", noop, timeout=bad)
    with pytest.raises(sv.InvalidTimeoutError, match="step_timeout"):
        sv.Settings(step_timeout=bad)


def test_pool_sizes_are_checked() -> None:
    with pytest.raises(sv.InvalidMaxParallelError, match=r"pools\['db'\]"):
        sv.Settings(pools={"db": 0})


def test_unknown_executor_and_on_failure() -> None:
    with pytest.raises(sv.InvalidSettingError, match="executor must be one of"):
        sv.Step("a", noop, executor="gpu")  # type: ignore[arg-type]
    with pytest.raises(sv.InvalidSettingError, match="on_failure must be"):
        sv.Settings(on_failure="ignore")  # type: ignore[arg-type]


def test_async_executor_needs_async_function() -> None:
    with pytest.raises(sv.InvalidSettingError, match="async def"):
        sv.Step("a", noop, executor="async")
    assert sv.Step("a", anoop).is_async


def test_values_are_frozen() -> None:
    step = sv.Step("a", noop)
    with pytest.raises(AttributeError):
        step.id = "b"  # type: ignore[misc]
    wf = sv.Workflow("wf", steps=[step])
    with pytest.raises(AttributeError):
        wf.id = "x"  # type: ignore[misc]


def test_validation_errors_share_one_base() -> None:
    for cls in (
        sv.DuplicateStepError,
        sv.CycleError,
        sv.UnknownDependencyError,
        sv.MissingArtifactError,
        sv.InvalidMaxParallelError,
        sv.StepFunctionError,
        sv.InvalidStepIdError,
    ):
        assert issubclass(cls, sv.ValidationError)
        assert issubclass(cls, sv.StepvisorError)
        assert issubclass(cls, ValueError)
