"""The shared validators: one test of a number, of seconds, of names and of an import."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

import stepvisor as sv
from stepvisor._validate import (
    duplicates,
    import_module,
    is_int,
    is_number,
    name_list,
    qualified_name,
    seconds,
    type_name,
)


class RefusedError(Exception):
    pass


def test_a_bool_is_neither_a_number_nor_an_int() -> None:
    assert [is_number(v) for v in (1, 1.5, True, "1", None)] == [True, True, False, False, False]
    assert [is_int(v) for v in (1, 1.5, False)] == [True, False, False]


@pytest.mark.parametrize("value", [0, -1, math.nan, math.inf, True, "5", None])
def test_positive_seconds_refuse_zero_negative_nan_inf_and_non_numbers(value: object) -> None:
    with pytest.raises(
        RefusedError, match=r"^t must be a positive (finite )?number of seconds.*; fix$"
    ):
        seconds(value, what="t", fail=RefusedError, fix="fix")


def test_seconds_may_allow_zero_and_return_a_float() -> None:
    assert seconds(0, what="t", fail=RefusedError, allow_zero=True, fix="") == 0.0
    assert isinstance(seconds(2, what="t", fail=RefusedError, fix=""), float)
    with pytest.raises(RefusedError, match=r"finite number of seconds >= 0, got -1"):
        seconds(-1, what="t", fail=RefusedError, allow_zero=True, fix="")


def test_every_door_refuses_a_bool_timeout_with_its_own_error() -> None:
    with pytest.raises(sv.InvalidTimeoutError, match="timeout must be a positive number"):
        sv.Step("a", lambda ctx: None, timeout=True)
    with pytest.raises(sv.InvalidRetryPolicyError, match="delay must be a number of seconds"):
        sv.Backoff.fixed(True)


def test_a_name_list_takes_a_bare_string_as_one_name_and_refuses_non_lists() -> None:
    assert name_list("a") == ("a",)
    assert name_list(["a", "b"]) == ("a", "b")
    assert name_list(5) is None
    assert name_list({"a": 1}) is None
    assert duplicates(["b", "a", "b", "a", "c"]) == ["a", "b"]


def test_a_step_whose_needs_is_not_a_list_gets_a_typed_error() -> None:
    with pytest.raises(sv.InvalidSettingError, match="needs must be a list of names, got 5"):
        sv.Step("a", lambda ctx: None, needs=5)  # type: ignore[arg-type]


def test_type_and_qualified_names() -> None:
    values: tuple[object, ...] = ({}, [], None, 1.0)
    assert [type_name(v) for v in values] == [
        "a mapping",
        "a list",
        "null",
        "a number",
    ]
    assert type_name(b"") == "bytes"
    assert qualified_name(ValueError) == "ValueError"
    assert qualified_name(sv.StepvisorError) == "stepvisor.errors.StepvisorError"
    assert qualified_name(sv.StepvisorError, sep=":") == "stepvisor.errors:StepvisorError"


def test_import_module_tells_a_missing_module_from_a_module_that_fails(tmp_path: Path) -> None:
    with pytest.raises(
        RefusedError, match=r"^x: module 'no_such_mod_q' cannot be imported.*; do it$"
    ):
        import_module("no_such_mod_q", prefix="x: ", fail=RefusedError, fix="do it")
    (tmp_path / "validate_boom_q.py").write_text("raise KeyError('boom')\n")
    (tmp_path / "validate_dep_q.py").write_text("import no_such_dependency_q\n")
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(
            RefusedError, match="importing module 'validate_boom_q' raised KeyError"
        ):
            import_module("validate_boom_q", prefix="", fail=RefusedError, fix="")
        with pytest.raises(
            RefusedError, match="imports 'no_such_dependency_q', which is not installed"
        ):
            import_module("validate_dep_q", prefix="", fail=RefusedError, fix="")
    finally:
        sys.path.remove(str(tmp_path))
        for name in ("validate_boom_q", "validate_dep_q"):
            sys.modules.pop(name, None)
