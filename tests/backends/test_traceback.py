"""The traceback text of a failed attempt: the standard text, less the caret lines.

``format_error`` builds it without ``linecache.checkcache`` (an ``os.stat`` per
file, which lets go of the GIL); these tests hold it to the standard module's
text for each shape an exception takes.
"""

from __future__ import annotations

import linecache
import re
import sys
import traceback
from collections.abc import Callable

import pytest

from stepvisor.backends.base import format_error

#: A caret line: marks under a source line, after the ``|`` margin in an exception group's text.
_CARETS = re.compile(r"\s*(\|\s*)?[\^~]+\s*")


def _standard_without_carets(exc: BaseException) -> str:
    text = "".join(traceback.format_exception(exc))
    return "".join(line for line in text.splitlines(True) if not _CARETS.fullmatch(line))


def _inner() -> None:
    raise ValueError("inner")


def _recurse(n: int) -> int:
    return _recurse(n + 1)


def _recursion() -> None:
    _recurse(0)


def _caught(make: Callable[[], None]) -> BaseException:
    try:
        make()
    except BaseException as exc:  # the exception is the value under test
        return exc
    raise AssertionError("it did not raise")


def _cause() -> None:
    try:
        _inner()
    except ValueError as exc:
        raise KeyError("outer") from exc


def _context() -> None:
    try:
        _inner()
    except ValueError:
        _ = 1 / 0


def _suppressed() -> None:
    try:
        _inner()
    except ValueError:
        raise RuntimeError("replaced") from None


def _noted() -> None:
    try:
        _cause()
    except KeyError as exc:
        exc.add_note("a note")
        raise


def _noted_alone() -> None:
    error = ValueError("alone")
    error.add_note("first note")
    error.add_note("second\nnote")
    raise error


def _group() -> None:
    raise ExceptionGroup("several", [ValueError("one"), KeyError("two")])


def _cycle() -> None:
    first = ValueError("first")
    second = KeyError("second")
    first.__context__ = second
    second.__context__ = first
    raise first


SHAPES: dict[str, Callable[[], None]] = {
    "plain": _inner,
    "cause": _cause,
    "context": _context,
    "suppressed": _suppressed,
    "notes": _noted,
    "notes, not chained": _noted_alone,
    "recursion": _recursion,
    "group": _group,
    "cycle": _cycle,
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_the_text_is_the_standard_one_without_caret_lines(shape: str) -> None:
    exc = _caught(SHAPES[shape])
    assert format_error(exc) == _standard_without_carets(exc)


def test_recursion_is_folded_as_the_standard_text_folds_it() -> None:
    text = format_error(_caught(_recursion))
    assert "more times]" in text
    assert text.count("in _recurse") < 10


def test_an_exception_never_raised_is_its_type_and_message() -> None:
    assert format_error(ValueError("no traceback")) == "ValueError: no traceback\n"


@pytest.mark.parametrize("shape", ["plain", "suppressed", "notes, not chained"])
def test_source_lines_come_from_memory_without_a_stat_per_file(
    monkeypatch: pytest.MonkeyPatch, shape: str
) -> None:
    exc = _caught(SHAPES[shape])
    format_error(exc)  # the first time may read the file
    checked: list[str | None] = []

    def record(filename: str | None = None) -> None:
        checked.append(filename)

    monkeypatch.setattr(linecache, "checkcache", record)
    text = format_error(exc)
    assert checked == []
    assert text == _standard_without_carets(exc)


def test_a_traceback_limit_set_for_the_process_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    exc = _caught(_recursion)
    monkeypatch.setattr(sys, "tracebacklimit", 2, raising=False)
    text = format_error(exc)
    assert text == _standard_without_carets(exc)
    assert text.count("  File ") == 2
