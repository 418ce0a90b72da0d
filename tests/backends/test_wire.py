"""The wire format between the engine and a process child or Ray task (backends/_wire.py).

An exception is packed where the step ran (pickle, cloudpickle, else text) and
rebuilt in the engine as itself or as a RemoteStepError; nothing an exception
does may escape packing.
"""

from __future__ import annotations

import pickle
import threading

import pytest

from stepvisor.backends._child import RETURNED_NOTHING, dump_attempt, load_attempt
from stepvisor.backends._wire import (
    Attempt,
    PackedError,
    Raised,
    RayCall,
    Ready,
    Returned,
    Unsendable,
    check_outputs,
    pack_error,
    rebuild_error,
)
from stepvisor.errors import RemoteStepError


class CustomBaseError(BaseException):
    """A BaseException subclass (like KeyboardInterrupt): must travel as itself."""


class LockedError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


class TwoArgError(Exception):
    def __init__(self, left: str, right: str) -> None:
        super().__init__(f"{left}/{right}")


class ReduceRaisesError(Exception):
    def __reduce__(self) -> tuple[object, ...]:
        raise RuntimeError("no reducing me")


class ReduceExitsError(Exception):
    def __reduce__(self) -> tuple[object, ...]:
        raise SystemExit("reduce exits")


class StrRaisesError(Exception):
    def __str__(self) -> str:
        raise ValueError("no str either")


def _raised(exc: BaseException) -> BaseException:
    """``exc`` with a real traceback, as a step would leave it."""
    try:
        raise exc
    except BaseException as caught:
        return caught


def _round_trip(exc: BaseException) -> tuple[PackedError, BaseException]:
    packed = pickle.loads(pickle.dumps(pack_error(_raised(exc), where="worker process 42")))
    return packed, rebuild_error(packed, step_id="s", attempt=2, origin="worker process")


def test_a_picklable_exception_comes_back_as_itself_with_the_remote_traceback() -> None:
    packed, error = _round_trip(ValueError("bad rows"))
    assert packed.blob is not None
    assert packed.why_not == ""
    assert type(error) is ValueError
    assert str(error) == "bad rows"
    assert "in _raised" in packed.traceback
    assert any(note.startswith("Traceback in worker process 42:") for note in error.__notes__)


@pytest.mark.parametrize(
    "exc",
    [KeyboardInterrupt(), SystemExit(3), CustomBaseError("mine"), GeneratorExit()],
    ids=["KeyboardInterrupt", "SystemExit", "custom", "GeneratorExit"],
)
def test_base_exception_subclasses_come_back_as_themselves(exc: BaseException) -> None:
    _, error = _round_trip(exc)
    assert type(error) is type(exc)
    assert error.args == exc.args


@pytest.mark.parametrize(
    ("exc", "why"),
    [
        (LockedError("the lock is mine"), "TypeError"),
        (TwoArgError("left", "right"), "TypeError"),
        (ReduceRaisesError("reducing"), "RuntimeError: no reducing me"),
        (ReduceExitsError("exiting"), "SystemExit: reduce exits"),
    ],
    ids=["unpicklable", "unloadable", "reduce-raises", "reduce-exits"],
)
def test_an_exception_that_cannot_travel_becomes_remote_step_error(
    exc: BaseException, why: str
) -> None:
    packed, error = _round_trip(exc)
    assert packed.blob is None
    assert packed.why_not.startswith(why), packed.why_not
    assert isinstance(error, RemoteStepError)
    assert error.remote_type == f"{__name__}.{type(exc).__qualname__}"
    assert error.step_id == "s"
    assert error.attempt == 2
    assert f"step 's' raised {error.remote_type}: {exc}" in str(error)
    assert "from its worker process" in str(error)
    assert error.remote_traceback == packed.traceback
    assert type(exc).__name__ in error.remote_traceback


def test_an_exception_whose_str_raises_still_travels_as_text() -> None:
    packed, error = _round_trip(StrRaisesError())
    assert packed.message == "<str() of the StrRaisesError failed>"
    assert type(error) is StrRaisesError


def test_bytes_that_do_not_load_in_the_engine_give_remote_step_error() -> None:
    packed = PackedError("mod.Gone", "it left", "Traceback...\n", b"not a pickle", "", "there")
    error = rebuild_error(packed, step_id="s", attempt=1, origin="Ray worker")
    assert isinstance(error, RemoteStepError)
    assert "while loading it here" in str(error)
    assert "from its Ray worker" in str(error)


def test_messages_are_typed_values_that_survive_pickling() -> None:
    packed = pack_error(_raised(ValueError("x")), where="here")
    messages = [
        Attempt("run", "s", 1, 3, None, False, ["/path"]),
        Ready(123),
        Returned(names=("a", "b"), leftovers=(7,)),
        Returned(outputs={"a": 1}),
        Raised(packed, (8, 9)),
        Unsendable("cannot", "tb"),
        RayCall(Attempt("run", "s", 1, 1, 5.0, True), 0, {"p": 1}, {"i": 2}, (("x", 1, "k"),)),
    ]
    for message in messages:
        again = pickle.loads(pickle.dumps(message))
        assert again == message
        assert type(again) is type(message)
    assert Returned().names is None
    assert Returned().leftovers == ()


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (5, "returned int"),
        ([("a", 1)], "returned list"),
        ({1: "x"}, "artifact name 1"),
        ({"": 1}, "artifact name ''"),
        ({"ok": 1, None: 2}, "artifact name None"),
    ],
)
def test_check_outputs_rejects_what_is_not_a_mapping_of_names(value: object, fragment: str) -> None:
    with pytest.raises(TypeError) as caught:
        check_outputs("load", value)
    message = str(caught.value)
    assert "step 'load'" in message
    assert fragment in message
    assert "non-empty strings" in message or "mapping of artifact names" in message


def test_check_outputs_accepts_a_mapping_or_none_and_copies_it() -> None:
    assert check_outputs("s", None) is None
    given = {"rows": [1]}
    checked = check_outputs("s", given)
    assert checked == given
    assert checked is not given


def test_a_traceback_keeps_frames_causes_and_notes_but_no_caret_lines() -> None:
    from stepvisor.backends.base import format_error  # noqa: PLC0415

    def inner() -> None:
        raise ValueError("inner")

    try:
        try:
            inner()
        except ValueError as exc:
            raise KeyError("outer") from exc
    except KeyError as exc:
        exc.add_note("a note")
        text = format_error(exc)
    assert 'raise ValueError("inner")' in text  # the source line, as the standard text has it
    assert "in inner" in text
    assert "ValueError: inner" in text
    assert "The above exception was the direct cause" in text
    assert text.rstrip().endswith("a note")
    assert "^" not in text


def test_an_attempt_travels_to_the_child_as_a_plain_tuple_and_comes_back_whole() -> None:
    meta = Attempt("run", "s", 2, 3, 12.5, True, ["/a", "/b"], fds=2, trace={"traceparent": "t"})
    part = dump_attempt(meta)
    assert type(pickle.loads(part)) is tuple  # no class to look up at either end
    again = load_attempt(part)
    assert again == meta
    assert type(again) is Attempt


def test_the_reply_made_once_for_a_step_that_returned_nothing_is_such_a_reply() -> None:
    assert pickle.loads(RETURNED_NOTHING) == Returned()
