"""The invariants of captured output: each attempt's log is its own, and whole or cut.

Every campaign step writes ``chaos <step> <attempt> <i>`` lines (0 to
``CHATTY``, past the run's ``log_limit``) before its fault strikes, and
``chaos <step> <attempt> hang`` lines while it hangs; some then crash, get
killed from outside, or are stopped at their deadline while writing.  After
each run:

* a log never holds a line of another step or another attempt;
* an attempt that returned or raised kept exactly what it wrote, or, past the
  limit, its head and tail with the cut marked;
* any other attempt (crashed, killed, stopped, abandoned) kept a prefix of what
  it wrote, or the head and tail of one: its numbered lines run 0, 1, 2, ...
  from the start, and on from wherever the tail begins;
* the store holds the same text as the result.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

from stepvisor.core.records import parse_instance_id
from tests.chaos.oracle import Checker

__all__ = ["check_logs", "expected_log"]

_CUT: Final = re.compile(r"\n\[stepvisor: (\d+) bytes cut here; log_limit is (\d+) bytes\]\n")
_LINE: Final = re.compile(r"chaos (\S+) (\d+) (\d+|hang)")
#: How an attempt ended when it wrote everything it meant to.
_WHOLE: Final = frozenset({"succeeded", "failed"})


def expected_log(data: bytes, limit: int) -> str:
    """What a log of ``data`` reads: all of it, or its head and tail with the cut marked."""
    if len(data) <= limit:
        return data.decode("utf-8", "replace")
    head, keep = limit // 2, limit - limit // 2
    cut = len(data) - head - keep
    return (
        data[:head].decode("utf-8", "replace")
        + f"\n[stepvisor: {cut} bytes cut here; log_limit is {limit} bytes]\n"
        + data[len(data) - keep :].decode("utf-8", "replace")
    )


def _whole_lines(part: str, *, first_may_be_cut: bool) -> list[str]:
    lines = part.split("\n")
    lines.pop()  # after the last newline: a partial line, or nothing
    if first_may_be_cut and lines:
        lines.pop(0)
    return lines


def _numbered_run(numbers: list[int], *, from_zero: bool) -> bool:
    if not numbers:
        return True
    if from_zero and numbers[0] != 0:
        return False
    return numbers == list(range(numbers[0], numbers[0] + len(numbers)))


def check_logs(
    checker: Checker,
    captured: Mapping[tuple[str, int], str],
    steps: Mapping[str, Any],
    chatter: Mapping[str, int],
    limit: int,
    stored: Mapping[tuple[str, int], str | None] | None = None,
) -> None:
    """Check every kept log of a run (see the module docstring)."""
    for (step_id, attempt), text in captured.items():
        where = f"log of {step_id} attempt {attempt}"
        record = steps.get(step_id)
        outcome = None
        if record is not None and 0 < attempt <= len(record.attempts):
            outcome = record.attempts[attempt - 1].outcome
        cut = _CUT.search(text)
        # Cut mid-line: the head's last line and the tail's first are partial, and dropped.
        parts = [text] if cut is None else [text[: cut.start()], text[cut.end() :]]
        numbers: list[list[int]] = []
        foreign: list[str] = []
        for index, part in enumerate(parts):
            found: list[int] = []
            for line in _whole_lines(part, first_may_be_cut=index == 1):
                match = _LINE.fullmatch(line)
                if match is None:
                    continue  # stepvisor's own lines: the stack at a deadline
                if (match[1], int(match[2])) != (step_id, attempt):
                    foreign.append(line)
                elif match[3] != "hang":
                    found.append(int(match[3]))
            numbers.append(found)
        checker.check("logs", not foreign, f"{where} holds others' lines: {foreign[:3]}")
        if cut is not None:
            checker.check(
                "logs",
                int(cut[2]) == limit and len(text.encode()) <= limit + 200,
                f"{where} was cut at {cut[2]} bytes, not log_limit {limit}",
            )
        if outcome in _WHOLE:
            # An instance writes what its mapped step's plan says (``g05[0]``: ``g05``'s).
            parsed = parse_instance_id(step_id)
            lines = chatter[step_id if parsed is None else parsed[0]]
            data = "".join(f"chaos {step_id} {attempt} {i}\n" for i in range(lines))
            want = expected_log(data.encode(), limit)
            checker.check("logs", text == want, f"{where} ({outcome}) is not what it wrote")
        else:
            runs = _numbered_run(numbers[0], from_zero=True) and (
                len(numbers) == 1 or _numbered_run(numbers[1], from_zero=False)
            )
            checker.check(
                "logs", runs, f"{where} ({outcome}) is not a prefix of what it wrote: {text!r}"
            )
        if stored is not None:
            checker.check(
                "logs",
                stored.get((step_id, attempt)) == text,
                f"{where}: the store holds another text than the result",
            )
