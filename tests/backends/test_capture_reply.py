"""A captured process attempt's reply rides in the end mark of its output (or follows it).

The end mark tells the parent where one attempt's output ends and the next
one's begins; a small reply goes in the same frame, so a step that writes
nothing costs one write in the child and one wake-up in the parent, as one
that is not captured.  These tests hold the guarantees that must not move:
each log is exactly what its attempt wrote, whichever way its reply came.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
from typing import Any

import pytest

import stepvisor as sv
from stepvisor.backends import _child
from stepvisor.backends._capture import AttemptLog
from stepvisor.backends._frames import MAGIC, frame
from stepvisor.backends._wire import Ready
from stepvisor.backends.process._output import ChildOutput
from stepvisor.backends.process._worker import Child
from tests.backends.test_capture import attempt_of

_REPLY = _child.encode_message([_child.RETURNED_NOTHING])


def _end_mark(step_id: str, attempt: int, reply: bytes) -> bytes:
    key = f"r\x00{step_id}\x00{attempt}".encode()  # of run "r"
    return frame(b"F", b"%08x%s%s" % (len(key), key, reply))


@pytest.mark.parametrize("chunk", [1, 5, 13, 4096])
def test_a_reply_in_the_end_mark_is_kept_apart_from_the_output_however_it_is_cut(
    chunk: int,
) -> None:
    output = ChildOutput()
    log = AttemptLog("s", 1, limit=1 << 20, tee=False)
    output.bind(attempt_of(log))
    data = b"one\n" + _end_mark("s", 1, _REPLY) + b"the next one's\n"
    for start in range(0, len(data), chunk):
        output.feed(data[start : start + chunk])
    assert output.replies == {("r", "s", 1): _REPLY}
    assert output.ended == set()
    assert log.text() == "one\n"
    after = AttemptLog("s", 2, limit=1 << 20, tee=False)
    output.bind(attempt_of(after))
    assert after.text() == "the next one's\n"
    assert MAGIC not in log.text().encode()


def _capture_on_a_pipe() -> tuple[Any, int, int]:
    from stepvisor.backends._child_output import ChildCapture  # noqa: PLC0415 - child side

    read, write = os.pipe()
    return ChildCapture(write), read, write


def _read_all(fd: int) -> bytes:
    data = b""
    while select.select([fd], [], [], 0)[0]:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.parametrize("size", [10, 3000, 5000])
def test_the_child_puts_a_reply_in_its_end_mark_only_when_the_frame_is_written_whole(
    size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stepvisor.backends import _child_output  # noqa: PLC0415 - the child's side

    capture, read, write = _capture_on_a_pipe()
    real = _child_output._write_all
    # The child writes to its fd 1 (the output pipe there); here, to this pipe.
    monkeypatch.setattr(_child_output, "_write_all", lambda _fd, data: real(write, data))
    try:
        capture._key = b"r\x00s\x001"  # what begin() sets for run r, step s, attempt 1
        reply = b"r" * size
        went = capture.end(reply)
        data = _read_all(read)
    finally:
        os.close(read)
        os.close(write)
        for fd in capture._original:
            os.close(fd)
    assert went is (size < 4000)
    if went:  # one frame, within what the pipe writes whole
        assert len(data) <= select.PIPE_BUF
    output = ChildOutput()
    output.feed(data)
    if went:
        assert output.replies == {("r", "s", 1): reply}
    else:
        assert (output.ended, output.replies) == ({("r", "s", 1)}, {})


def _child_with(res: bytes, out: bytes) -> Child:
    """A Child's parsing half only: ``res`` in its reply buffer, ``out`` fed to its output."""
    child = Child.__new__(Child)
    child.buf = bytearray(res)
    child.output = ChildOutput()
    child.output.feed(out)
    child.ready = False
    return child


def test_a_captured_attempt_never_takes_a_later_attempts_reply_from_the_reply_pipe() -> None:
    greeting = _child.encode_message([pickle.dumps(Ready(1))])
    later = _child.encode_message([b"later"])  # a large reply of attempt 2, on the pipe
    child = _child_with(greeting + later, b"")
    assert child.take_reply(("r", "s", 1)) is None  # no end mark of attempt 1 yet
    assert child.ready  # the greeting was taken on the way, the later reply left
    assert bytes(child.buf) == later
    child.output.feed(_end_mark("s", 1, _REPLY))
    received = child.take_reply(("r", "s", 1))
    assert received is not None
    assert received[1] == [_child.RETURNED_NOTHING]
    assert bytes(child.buf) == later


def test_a_reply_after_an_e_mark_comes_from_the_reply_pipe() -> None:
    reply = _child.encode_message([_child.RETURNED_NOTHING])
    child = _child_with(reply, frame(b"E", b"r\x00s\x001"))
    received = child.take_reply(("r", "s", 1))
    assert received is not None
    assert received[1] == [_child.RETURNED_NOTHING]
    assert child.output.ended == set()
    assert child.take_reply(("r", "s", 2)) is None


# -- end to end ------------------------------------------------------------------------


def _speak(ctx: sv.StepContext) -> dict[str, Any]:
    n = int(ctx.step_id[1:])
    print(f"line of {ctx.step_id}")
    os.write(1, f"fd line of {ctx.step_id}\n".encode())
    # Every third one's reply is too large for its end mark: it follows on the reply pipe.
    return {f"v_{ctx.step_id}": ("x" * 10_000 if n % 3 == 0 else "small") + ctx.step_id}


def test_replies_in_and_after_end_marks_keep_every_log_its_own() -> None:
    steps = [sv.Step(f"s{i:02d}", _speak, executor="process") for i in range(24)]
    result = sv.run(sv.Workflow("replies", steps), max_parallel=1, capture="store")
    assert result.ok, result.error
    for step in steps:
        sid = step.id
        assert result.logs(sid) == f"line of {sid}\nfd line of {sid}\n"
        big = int(sid[1:]) % 3 == 0
        assert result.artifacts[f"v_{sid}"] == ("x" * 10_000 if big else "small") + sid


def _silent(ctx: sv.StepContext) -> dict[str, int]:
    return {f"n_{ctx.step_id}": int(ctx.step_id[1:])}


def test_steps_that_write_nothing_get_no_log_and_their_values() -> None:
    steps = [sv.Step(f"q{i}", _silent, executor="process") for i in range(10)]
    result = sv.run(sv.Workflow("quiet", steps), max_parallel=1, capture="tee")
    assert result.ok, result.error
    for i in range(10):
        assert result.logs(f"q{i}") == ""
        assert result.artifacts[f"n_q{i}"] == i


class _Unloadable:
    """A step whose function cannot be loaded in the worker process."""

    def __call__(self, ctx: sv.StepContext) -> None:
        raise AssertionError("never runs")

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return _refuse_to_load, ()


def _refuse_to_load() -> None:
    raise RuntimeError("refuses to load")


def test_a_captured_attempt_whose_function_cannot_load_still_ends_its_output() -> None:
    wf = sv.Workflow(
        "unloadable",
        [sv.Step("u", _Unloadable(), executor="process"), sv.Step("after", _silent_after)],
    )
    result = sv.run(wf, capture="store", on_failure="continue")
    record = result.steps["u"]
    assert record.status is sv.StepStatus.FAILED
    assert "could not be loaded in the worker process" in str(result.errors["u"])
    assert result.logs("u") == ""


def _silent_after(ctx: sv.StepContext) -> None:
    return None


def _set_own_term_handler(ctx: sv.StepContext) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _term_handler(ctx: sv.StepContext) -> dict[str, str]:
    handler = signal.getsignal(signal.SIGTERM)
    return {"handler": "default" if handler == signal.SIG_DFL else type(handler).__name__}


@pytest.mark.parametrize("capture", ["off", "store"])
def test_a_steps_own_sigterm_handler_is_undone_before_the_next_attempt(capture: str) -> None:
    steps = [
        sv.Step("set", _set_own_term_handler, executor="process"),
        sv.Step("look", _term_handler, executor="process", needs=["set"]),
    ]
    result = sv.run(sv.Workflow("handlers", steps), max_parallel=1, capture=capture)
    assert result.ok, result.error
    # Off: the default again; captured: the capture's own (it sends the stacks, then dies).
    assert result.artifacts["handler"] == ("default" if capture == "off" else "method")


def test_a_read_that_is_one_end_mark_or_starts_with_one_parses_the_same() -> None:
    output = ChildOutput()
    log = AttemptLog("s", 1, limit=1 << 20, tee=False)
    output.bind(attempt_of(log))
    output.feed(_end_mark("s", 1, _REPLY))  # the whole read: one frame
    assert output.replies == {("r", "s", 1): _REPLY}
    output.bind(attempt_of(AttemptLog("s", 2, limit=1 << 20, tee=False)))
    output.feed(_end_mark("s", 2, _REPLY) + b"next\n")  # a frame, then more
    assert output.replies[("r", "s", 2)] == _REPLY
    third = AttemptLog("s", 3, limit=1 << 20, tee=False)
    output.bind(attempt_of(third))
    assert third.text() == "next\n"
    assert log.text() == ""


def test_attempts_of_two_runs_with_one_step_id_keep_their_own_replies() -> None:
    # An Executor's calls of one function share a step id and an attempt number.
    output = ChildOutput()
    first, second = _child.encode_message([b"first"]), _child.encode_message([b"second"])
    for run, reply in (("call-1", first), ("call-2", second)):
        key = f"{run}\x00fn\x001".encode()
        output.feed(frame(b"F", b"%08x%s%s" % (len(key), key, reply)))
    assert output.replies == {("call-1", "fn", 1): first, ("call-2", "fn", 1): second}
