"""``stepvisor logs``, the output tail under a failed run, and step lines above the display.

What each attempt wrote is kept in the store beside its records
(:class:`~stepvisor.store.base.LogStore`).  ``stepvisor logs RUN [STEP]
[--attempt N] [--follow]`` reads it back, from any terminal, while the run goes
or after; ``stepvisor run`` prints the tail of the failed step's output under its
error, as pytest prints "Captured stdout"; and while a run is shown live, the
lines its steps write are put *above* the redrawn progress block (never into it),
through :class:`LineQueue`.
"""

from __future__ import annotations

import argparse
import collections
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Final

from stepvisor.backends import _capture
from stepvisor.cli._output import EXIT_OK
from stepvisor.core.result import RunResult
from stepvisor.core.state import RunStatus
from stepvisor.errors import StepvisorError
from stepvisor.store.base import LogEntry, LogStore
from stepvisor.store.sqlite import SQLiteStore

__all__ = ["TAIL_LINES", "LineQueue", "add_logs_command", "failed_output_lines", "kept_logs"]

#: Lines of the failed step's output printed under a failed run's error.
TAIL_LINES: Final = 20
#: How often ``--follow`` looks at the store.
FOLLOW_EVERY: Final = 0.5


# -- stepvisor logs ------------------------------------------------------------------------


def add_logs_command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    *,
    add_store: Callable[[argparse.ArgumentParser], None],
    open_store: Callable[[str], SQLiteStore],
) -> None:
    """Register ``stepvisor logs`` (its handler opens the store with ``open_store``)."""
    p = sub.add_parser("logs", help="show what a run's steps wrote (stdout, stderr, logging)")
    p.add_argument("run_id", metavar="RUN", help="the run whose output to show")
    p.add_argument("step_id", metavar="STEP", nargs="?", help="only this step")
    p.add_argument(
        "--attempt", type=int, metavar="N", help="this attempt of STEP (default: its last)"
    )
    p.add_argument(
        "--follow", "-f", action="store_true", help="keep printing as a running run writes"
    )
    add_store(p)

    def handler(args: argparse.Namespace) -> int:
        with open_store(args.store) as store:
            return cmd_logs(args, store)

    p.set_defaults(handler=handler)


def cmd_logs(args: argparse.Namespace, store: SQLiteStore) -> int:
    if args.attempt is not None and args.step_id is None:
        raise StepvisorError("--attempt N needs a STEP: stepvisor logs RUN STEP --attempt N")
    stored = store.load(args.run_id)
    if args.step_id is not None and args.step_id not in stored.steps:
        raise StepvisorError(
            f"run {args.run_id!r} has no step {args.step_id!r}; its steps are "
            f"{', '.join(stored.steps) or 'none'}"
        )
    if args.follow:
        _follow(store, args.run_id, args.step_id)
        return EXIT_OK
    entries = _entries(store, args.run_id, args.step_id)
    if args.step_id is not None:
        record = stored.steps[args.step_id]
        attempt = args.attempt
        if attempt is None:
            attempt = record.attempts[-1].number if record.attempts else 0
        text = store.load_log(args.run_id, args.step_id, attempt)
        if text is None:
            what = "has not run" if attempt == 0 else f"wrote nothing on attempt {attempt}"
            print(f"step {args.step_id!r} {what} (or its output was not captured)")
        else:
            sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")
        return EXIT_OK
    if not entries:
        print(f"no step of run {args.run_id} wrote anything (or its output was not captured)")
    for entry in entries:
        _print_whole(store, args.run_id, entry)
    return EXIT_OK


def _entries(store: LogStore, run_id: str, step_id: str | None) -> list[LogEntry]:
    return [e for e in store.list_logs(run_id) if step_id is None or e.step_id == step_id]


def _header(entry: LogEntry) -> str:
    return f"==> step {entry.step_id}, attempt {entry.attempt} <=="


def _print_whole(store: LogStore, run_id: str, entry: LogEntry) -> None:
    text = store.load_log(run_id, entry.step_id, entry.attempt) or ""
    print(_header(entry))
    sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")


def _follow(store: SQLiteStore, run_id: str, step_id: str | None) -> None:
    """Print each attempt's output as it grows, until the run is no longer running."""
    shown: dict[tuple[str, int], int] = {}
    last: tuple[str, int] | None = None
    while True:
        running = store.load(run_id).info.status is RunStatus.RUNNING
        for entry in _entries(store, run_id, step_id):
            key = (entry.step_id, entry.attempt)
            printed = shown.get(key, 0)
            if entry.chars == printed:
                continue
            text = store.load_log(run_id, entry.step_id, entry.attempt) or ""
            if key != last:
                print(_header(entry))
                last = key
            if entry.cut and printed:
                # Past log_limit the middle moves: the rest is read once the run ends.
                sys.stdout.write(text[printed:] if len(text) > printed else "")
            else:
                sys.stdout.write(text[printed:])
            shown[key] = len(text)
        sys.stdout.flush()
        if not running:
            return
        time.sleep(FOLLOW_EVERY)


def kept_logs(store: object, run_id: str) -> dict[tuple[str, int], str]:
    """Every log the store kept for ``run_id`` (none from a store that keeps no logs)."""
    if not isinstance(store, LogStore):
        return {}
    return {
        (entry.step_id, entry.attempt): store.load_log(run_id, entry.step_id, entry.attempt) or ""
        for entry in store.list_logs(run_id)
    }


# -- the tail under a failed run -------------------------------------------------------------


def failed_output_lines(result: RunResult, *, lines: int = TAIL_LINES) -> list[str]:
    """The last ``lines`` lines the failed step wrote, indented, under a heading."""
    step_id = result.failed_step
    if step_id is None or step_id not in result.steps:
        return []
    text = result.logs(step_id)
    if not text.strip():
        return []
    record = result.steps[step_id]
    attempt = record.attempts[-1].number if record.attempts else 0
    tail = text.rstrip("\n").split("\n")
    cut = len(tail) > lines
    head = f"  ---- output of step {step_id} (attempt {attempt}"
    head += f", last {lines} lines" if cut else ""
    head += f"; all of it: stepvisor logs {result.run_id} {step_id}) ----"
    return [head, *(f"  | {line}" for line in tail[-lines:])]


# -- step lines above the live display ----------------------------------------------------------


class LineQueue:
    """Lines that steps write while the run is drawn live: queued, printed above the block.

    Installed as the tee's destination (``_capture.TEE_TO``) and as a handler on
    the root logger for the records steps emit (when the program configured no
    logging of its own: otherwise its handlers show them as it says).
    """

    def __init__(self) -> None:
        self._lines: collections.deque[str] = collections.deque()
        self._lock = threading.Lock()
        self._handler: logging.Handler | None = None

    def put(self, text: str) -> None:
        with self._lock:
            self._lines.extend(text.rstrip("\n").split("\n"))

    def drain(self) -> list[str]:
        with self._lock:
            lines = list(self._lines)
            self._lines.clear()
        return lines

    def __enter__(self) -> LineQueue:
        _capture.TEE_TO[:] = [self.put]
        root = logging.getLogger()
        if not root.handlers:
            self._handler = _QueueHandler(self)
            root.addHandler(self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        _capture.TEE_TO.clear()
        if self._handler is not None:
            logging.getLogger().removeHandler(self._handler)


class _QueueHandler(logging.Handler):
    """Records of steps, as ``[step] LEVEL name: message``; others as ``LEVEL name: message``."""

    def __init__(self, queue: LineQueue) -> None:
        super().__init__(logging.WARNING)
        self._queue = queue

    def emit(self, record: logging.LogRecord) -> None:
        step = getattr(record, "stepvisor_step", None)
        line = _capture.format_record_line(record).split(" ", 1)[1]
        self._queue.put(f"[{step}] {line}" if step else line)


def iter_lines(queue: LineQueue | None) -> Iterator[str]:
    """What the queue holds now (nothing without one)."""
    if queue is not None:
        yield from queue.drain()
