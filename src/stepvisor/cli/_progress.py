"""Showing a run's progress on the command line, without slowing the run down.

Events arrive on the Supervisor's thread, which must never wait for a
terminal.  So the hook does one thing, ``deque.append`` (O(1), thread-safe),
and everything else happens on the main thread, which wakes on a timer::

    Supervisor thread                    main thread (every TICK seconds, and at the end)
    on_event ─▶ Inbox.append ─▶ deque ─▶ Inbox.drain ─▶ Progress.apply ─▶ display.refresh
                                                         (statuses, running steps)

Two displays share that model:

* :class:`LiveDisplay`, for a terminal: a block of three lines (elapsed time,
  counts by status, the steps running) redrawn in place with ANSI escapes at
  most ``1 / TICK`` times a second, with a permanent line above it for each
  retry or failure.
* :class:`LogDisplay`, for pipes and files: one plain line per step that
  finished or is retrying, plus a start and an end line naming the run.

A mapped step is one step here too (:mod:`stepvisor.cli._maps`): the block has
a line for each mapped step running (``score  730/1000 succeeded, 8
running``), and its end is one line with those counts.  Its instances get a
line of their own only when they fail or retry, at most ``INSTANCE_LINES`` for
one step, so a map over 100,000 items cannot flood the terminal.  The final
counts name what they count: ``6 steps: 6 succeeded; 4 instances: 4 succeeded``.
"""

from __future__ import annotations

import collections
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Final, Protocol, TextIO

from stepvisor.cli._maps import (
    COUNT_ORDER,
    MapProgress,
    Running,
    counts_by_status,
    note_counts,
)
from stepvisor.cli._maps import (
    LABELS as _LABELS,
)
from stepvisor.core.events import (
    Event,
    RunStarted,
    StepDispatched,
    StepExpanded,
    StepFinished,
    StepRetrying,
)
from stepvisor.core.result import RunResult
from stepvisor.core.state import RunStatus, StepStatus

__all__ = [
    "TICK",
    "Display",
    "Inbox",
    "LiveDisplay",
    "LogDisplay",
    "Progress",
    "end_lines",
    "make_display",
    "one_line",
]

#: Seconds between redraws (so at most 10 a second).
TICK: Final = 0.1

#: Statuses in the order the counts are shown: the one order of the command line.
STATUS_ORDER: Final = COUNT_ORDER
_COLORS: Final = {
    "succeeded": "32",
    "failed": "31",
    "timed_out": "35",
    "cancelled": "33",
    "skipped": "2",
    "running": "36",
    "waiting_retry": "33",
    "pending": "2",
}
_TERMINAL: Final = frozenset({"succeeded", "failed", "timed_out", "cancelled", "skipped"})
#: Mapped steps the live block shows a line for at once.
_MAP_LINES: Final = 4


def one_line(text: str | None, *, limit: int = 160) -> str:
    """``text`` on one line, shortened to ``limit`` characters."""
    flat = " ".join((text or "").split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


class Inbox:
    """The ``on_event`` hook: stores events for the main thread; O(1), never blocks."""

    def __init__(self) -> None:
        self._events: collections.deque[Event] = collections.deque()

    def __call__(self, event: Event) -> None:
        self._events.append(event)

    def drain(self) -> list[Event]:
        """Every event received since the last drain, in order (main thread)."""
        out: list[Event] = []
        while self._events:
            out.append(self._events.popleft())
        return out


class Progress:
    """Where each step is, folded from events on the main thread.

    ``status`` holds the steps (a mapped step is one of them); ``maps`` counts
    the instances of each mapped step.  ``kept`` are the steps a resumed run
    restores from the store: they count as succeeded from the start and are
    never reported as finishing; ``kept_sizes`` gives ``N`` of each kept mapped
    step, all of whose instances are kept too.
    """

    def __init__(
        self,
        step_ids: Sequence[str],
        *,
        mapped: Iterable[str] = (),
        kept: Iterable[str] = (),
        kept_sizes: Mapping[str, int] | None = None,
    ) -> None:
        self.status: dict[str, str] = dict.fromkeys(step_ids, StepStatus.PENDING.value)
        self.kept = frozenset(kept) & self.status.keys()
        for sid in self.kept:
            self.status[sid] = StepStatus.SUCCEEDED.value
        self.maps: dict[str, MapProgress] = {
            sid: MapProgress() for sid in mapped if sid in self.status
        }
        for sid, size in (kept_sizes or {}).items():
            if sid in self.maps and sid in self.kept:
                self.maps[sid].size = size
                self.maps[sid].ended[StepStatus.SUCCEEDED.value] = size
        #: Plain steps running now (instances are counted under their map).
        self.running: dict[str, Running] = {}
        #: Steps that reused a cached result (counted apart within the succeeded).
        self.reused: set[str] = set()
        #: Duration of each plain step's last attempt, once it finished (wall seconds).
        self.last_duration: dict[str, float] = {}
        #: The last event's id and what ``instance_of`` said of it (a display asks again).
        self._last: tuple[str, tuple[str, MapProgress] | None] = ("", None)

    def instance_line(self, event: StepRetrying | StepFinished, *, run_id: str) -> str | None:
        """What an instance's failure or retry prints instead of its own line; see ``quiet``."""
        sid, found = self._last
        if sid is not event.step_id:
            found = self.instance_of(event.step_id)
        return None if found is None else found[1].quiet(found[0], event, run_id=run_id)

    def instance_of(self, step_id: str) -> tuple[str, MapProgress] | None:
        """``(step, its map)`` if ``step_id`` is an instance of a mapped step, else ``None``.

        Any id that is not a step's and reads ``step[...]`` for a mapped step is
        an instance: only the run machine makes such ids (a step may not be
        named like an instance of a mapped step).  Checked without parsing the
        index, since this runs twice per instance on the main thread.
        """
        if not self.maps or step_id in self.status:
            return None
        cut = step_id.rfind("[")
        found = self.maps.get(step_id[:cut]) if cut > 0 else None
        return None if found is None else (step_id[:cut], found)

    def apply(self, event: Event) -> float | None:
        """Fold ``event`` in; -> how long the attempt or map it ended ran, if it ended one."""
        if isinstance(event, StepExpanded):
            m = self.maps.setdefault(event.step_id, MapProgress())
            m.size, m.since = event.size, event.time
            m.ended[StepStatus.SUCCEEDED.value] += event.kept
            if self.status.get(event.step_id) == StepStatus.PENDING.value:
                self.status[event.step_id] = StepStatus.RUNNING.value
            return None
        if not isinstance(event, StepDispatched | StepRetrying | StepFinished):
            return None
        found = self.instance_of(event.step_id)
        self._last = (event.step_id, found)
        if found is not None:
            return found[1].apply(event)
        sid = event.step_id
        if isinstance(event, StepDispatched):
            self.status[sid] = StepStatus.RUNNING.value
            self.running[sid] = Running(event.attempt, event.time)
        elif isinstance(event, StepRetrying):
            self.status[sid] = StepStatus.WAITING_RETRY.value
            self.running.pop(sid, None)
        else:
            self.status[sid] = event.status
            if event.reused_from is not None:
                self.reused.add(sid)
            run = self.running.pop(sid, None)
            if run is not None:
                self.last_duration[sid] = max(0.0, event.time - run.since)
                return self.last_duration[sid]
            mapped = self.maps.get(sid)
            if mapped is not None and mapped.since is not None:
                return max(0.0, event.time - mapped.since)
        return None

    def settle(self, result: RunResult) -> None:
        """Take the final statuses from the result (steps stopped without an event)."""
        steps = result.steps
        for sid in self.status:
            record = steps.get(sid)
            if record is not None:
                self.status[sid] = record.status.value
                if record.reused_from is not None:
                    self.reused.add(sid)
                summed = note_counts(record) if sid in self.maps else None
                if summed is not None:  # the machine's own count of the instances
                    m = self.maps[sid]
                    m.size, m.ended = summed
                    m.running.clear()
                    m.retrying.clear()
        self.running.clear()

    def counts(self) -> list[tuple[str, int]]:
        """``(status, count)`` for every status some step has, in display order."""
        tally = collections.Counter(self.status.values())
        return [(s, tally[s]) for s in STATUS_ORDER if tally[s]]

    def status_count(self, status: str) -> int:
        return sum(1 for s in self.status.values() if s == status)

    @property
    def done(self) -> int:
        return sum(1 for s in self.status.values() if s in _TERMINAL)

    def summary(self) -> str:
        """Counts as plain text: ``9 succeeded, 1 failed``.

        With mapped steps, steps and instances are counted apart, each saying
        what it counts: ``6 steps: 5 succeeded, 1 failed; 4 instances: 3
        succeeded, 1 failed`` (a mapped step is one of the steps).
        """
        steps = ", ".join(f"{n} {_LABELS.get(s, s)}" for s, n in self.counts())
        if self.reused:  # "3 succeeded (2 reused), 1 failed": reused steps counted apart
            ok = StepStatus.SUCCEEDED.value
            done = f"{self.status_count(ok)} {_LABELS.get(ok, ok)}"
            steps = steps.replace(done, f"{done} ({len(self.reused)} reused)", 1)
        if not self.maps:
            return steps
        instances: Counter[str] = Counter()
        for m in self.maps.values():
            instances.update(m.counts())
        total = sum(m.size or 0 for m in self.maps.values())
        text = f"{len(self.status)} steps: {steps}; {total} instances"
        return text + (f": {counts_by_status(instances)}" if total else "")


class Display(Protocol):
    """What the command line tells about a run, as it goes."""

    def begin(self, *, run_id: str, headline: str) -> None: ...

    def refresh(self, events: Sequence[Event]) -> None: ...

    def note(self, text: str) -> None: ...

    def end(self, lines: Sequence[str]) -> None: ...

    def abort(self) -> None: ...


class LogDisplay:
    """Plain lines, one per finished or retrying step, for pipes and log files."""

    def __init__(self, stream: TextIO, progress: Progress) -> None:
        self.stream = stream
        self.progress = progress
        self._origin = time.time()
        self._run_id = ""

    def _print(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def begin(self, *, run_id: str, headline: str) -> None:
        self._origin = time.time()
        self._run_id = run_id
        self._print(f"stepvisor: run {run_id} started: {headline}")

    def refresh(self, events: Sequence[Event]) -> None:
        for event in events:
            took = self.progress.apply(event)
            if isinstance(event, RunStarted):
                self._origin = event.time  # times are the run's own, not when drained
            line = self._line(event, took)
            if line is not None:
                at = getattr(event, "time", time.time()) - self._origin
                self._print(f"[{at:7.2f}s] {line}")

    def _line(self, event: Event, took: float | None) -> str | None:
        if isinstance(event, StepRetrying | StepFinished):
            instead = self.progress.instance_line(event, run_id=self._run_id)
            if instead is not None:
                return f"{'counting':<10} {instead}" if instead else None
        if isinstance(event, StepRetrying):
            error = one_line(f"{event.error_type}: {event.error_message}")
            return (
                f"{'retrying':<10} {event.step_id}: attempt {event.attempt} failed "
                f"({error}); next attempt in {event.delay:.2f} s"
            )
        if isinstance(event, StepFinished):
            return f"{_LABELS.get(event.status, event.status):<10} " + _finished(
                event, self.progress, took
            )
        return None

    def note(self, text: str) -> None:
        self._print(f"stepvisor: {text}")

    def end(self, lines: Sequence[str]) -> None:
        for line in lines:
            self._print(line)

    def abort(self) -> None:
        self.stream.flush()


def _finished(event: StepFinished, progress: Progress, took: float | None) -> str:
    """``step: attempt 2, 0.31 s`` (+ the error for a step that did not succeed).

    A mapped step: ``score: 5/6 succeeded, 1 failed, 0.42 s`` (its instances'
    counts, and the time since its list was known).
    """
    m = progress.maps.get(event.step_id)
    if m is not None:
        text = f"{event.step_id}: {m.text()}"
        return text if took is None else text + f", {took:.2f} s"
    if event.reused_from is not None:
        return f"{event.step_id}: reused from run {event.reused_from}"
    attempts = f"attempt {event.attempts}" if event.attempts <= 1 else f"{event.attempts} attempts"
    text = f"{event.step_id}: {attempts}"
    if took is not None:
        text += f", {took:.2f} s"
    if event.status != StepStatus.SUCCEEDED.value and event.error_type:
        text += f" ({one_line(f'{event.error_type}: {event.error_message}')})"
    return text


class LiveDisplay:
    """A few lines redrawn in place on a terminal, and a line above for each mishap.

    The cursor is left at the end of the block; a redraw goes back to its first
    line (``ESC[nA``), clears to the end of the screen (``ESC[J``) and writes
    the block again, each line cut to the terminal's width so none wraps.
    """

    def __init__(self, stream: TextIO, progress: Progress, *, color: bool = True) -> None:
        self.stream = stream
        self.progress = progress
        self.color = color
        self._drawn = 0
        self._start = time.monotonic()
        self._run_id = ""
        self._note = ""
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
        self._bar = ("█", "░") if encoding.startswith("utf") else ("#", "-")

    def _paint(self, text: str, status: str) -> str:
        return _paint(text, status, color=self.color)

    def begin(self, *, run_id: str, headline: str) -> None:
        self._start = time.monotonic()
        self._run_id = run_id
        self.stream.write("\x1b[?25l")  # hide the cursor while redrawing
        self._above(f"stepvisor: run {run_id} started: {headline}")

    def refresh(self, events: Sequence[Event]) -> None:
        for event in events:
            took = self.progress.apply(event)
            line = self._mishap(event, took)
            if line is not None:
                self._above(line)
        self._draw()

    def _mishap(self, event: Event, took: float | None) -> str | None:
        if isinstance(event, StepRetrying | StepFinished):
            instead = self.progress.instance_line(event, run_id=self._run_id)
            if instead is not None:
                return self._paint("counting", "pending") + f" {instead}" if instead else None
        if isinstance(event, StepRetrying):
            error = one_line(f"{event.error_type}: {event.error_message}")
            return (
                self._paint("retrying", "waiting_retry")
                + f" {event.step_id}: attempt {event.attempt} failed ({error}); "
                f"next attempt in {event.delay:.2f} s"
            )
        if isinstance(event, StepFinished) and event.status != StepStatus.SUCCEEDED.value:
            label = _LABELS.get(event.status, event.status)
            return self._paint(label, event.status) + " " + _finished(event, self.progress, took)
        return None

    def note(self, text: str) -> None:
        self._note = text
        self._draw()

    def above(self, lines: Sequence[str]) -> None:
        """Lines the steps wrote: printed above the block, which is drawn again below."""
        if lines:
            self.stream.write(self._home() + "".join(f"{line}\x1b[K\n" for line in lines))
            self._drawn = 0
            self._draw()

    def end(self, lines: Sequence[str]) -> None:
        self._note = ""
        self._draw()
        self.stream.write("\n\x1b[?25h")  # leave the block; show the cursor again
        self._drawn = 0
        for line in lines:
            self.stream.write(line + "\n")
        self.stream.flush()

    def abort(self) -> None:
        """Leave the terminal usable when the run ends in an error of ours."""
        self.stream.write("\n\x1b[?25h")
        self.stream.flush()

    # -- drawing --------------------------------------------------------------------

    def _width(self) -> int:
        return max(20, shutil.get_terminal_size((100, 24)).columns - 1)

    def _home(self) -> str:
        """Escape codes that move to the block's first line and clear below."""
        up = f"\x1b[{self._drawn - 1}A" if self._drawn > 1 else ""
        return "\r" + up + "\x1b[J"

    def _above(self, text: str) -> None:
        self.stream.write(self._home() + text + "\n")
        self._drawn = 0
        self._draw()

    def _draw(self) -> None:
        lines = self._block(self._width())
        self.stream.write(self._home() + "\n".join(lines))
        self.stream.flush()
        self._drawn = len(lines)

    def _block(self, width: int) -> list[str]:
        progress = self.progress
        total = len(progress.status)
        elapsed = time.monotonic() - self._start
        head = f"run {self._run_id}  {elapsed:6.1f} s  {progress.done}/{total} steps done"
        if self._note:
            head += f"  ({self._note})"
        filled = round(20 * progress.done / total) if total else 20
        bar = self._bar[0] * filled + self._bar[1] * (20 - filled)
        counts = [(f"{n} {_LABELS.get(s, s)}", s) for s, n in progress.counts()]
        running = _fit_names(
            [
                f"{sid} ({max(0.0, time.time() - r.since):.1f}s"
                + (f", attempt {r.attempt})" if r.attempt > 1 else ")")
                for sid, r in sorted(progress.running.items(), key=lambda kv: kv[1].since)
            ]
            + [
                f"{sid} ({len(m.running)} instances)"
                for sid, m in progress.maps.items()
                if m.running
            ],
            width - len("  running: "),
        )
        return [
            _cut([(head, None)], width, color=self.color),
            _cut([(f"  {bar}  ", None), *_join(counts, "  ")], width, color=self.color),
            *(_cut([(line, None)], width, color=self.color) for line in self._map_lines()),
            _cut([("  running: " + running, None)], width, color=self.color),
        ]

    def _map_lines(self) -> list[str]:
        """A line per mapped step running (at most ``_MAP_LINES``): a bar and its counts."""
        status = self.progress.status
        active = [
            (sid, m)
            for sid, m in self.progress.maps.items()
            if m.size is not None and status.get(sid) == StepStatus.RUNNING.value
        ]
        lines = []
        for sid, m in active[:_MAP_LINES]:
            size = m.size or 0
            filled = round(10 * m.done / size) if size else 10
            bar = self._bar[0] * filled + self._bar[1] * (10 - filled)
            lines.append(f"  {sid}  {bar}  {m.text()}")
        if len(active) > _MAP_LINES:
            lines.append(f"  +{len(active) - _MAP_LINES} more mapped steps running")
        return lines


def _fit_names(items: Sequence[str], room: int) -> str:
    """As many of ``items`` as fit in ``room`` characters, then ``+N more``."""
    if not items:
        return "-"
    shown: list[str] = []
    for i, item in enumerate(items):
        rest = len(items) - i - 1
        tail = f", +{rest} more" if rest else ""
        if len(", ".join([*shown, item]) + tail) > room:
            break
        shown.append(item)
    if not shown:
        return f"{len(items)} steps"
    hidden = len(items) - len(shown)
    return ", ".join(shown) + (f", +{hidden} more" if hidden else "")


def _paint(text: str, status: str, *, color: bool) -> str:
    return f"\x1b[{_COLORS[status]}m{text}\x1b[0m" if color else text


def _join(parts: list[tuple[str, str]], sep: str) -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = []
    for i, part in enumerate(parts):
        if i:
            out.append((sep, None))
        out.append(part)
    return out


def _cut(segments: Sequence[tuple[str, str | None]], width: int, *, color: bool) -> str:
    """Join colored segments, cut to ``width`` visible characters."""
    out: list[str] = []
    room = width
    for text, status in segments:
        if room <= 0:
            break
        piece = text if len(text) <= room else text[: max(0, room - 1)] + "…"
        room -= len(piece)
        out.append(piece if status is None else _paint(piece, status, color=color))
    return "".join(out)


def make_display(stream: TextIO, progress: Progress, *, color: bool | None = None) -> Display:
    """A :class:`LiveDisplay` if ``stream`` is a terminal, else a :class:`LogDisplay`."""
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        if color is None:
            color = "NO_COLOR" not in os.environ  # https://no-color.org
        return LiveDisplay(stream, progress, color=color)
    return LogDisplay(stream, progress)


def end_lines(
    result: RunResult, progress: Progress, *, elapsed: float, hints: Iterable[str] = ()
) -> list[str]:
    """The lines that close a run: status, counts, the error, what to do next."""
    lines = [
        f"stepvisor: run {result.run_id} {result.status.value} in {elapsed:.2f} s: "
        f"{progress.summary()}"
    ]
    if result.status is RunStatus.FAILED and result.error_message:
        lines.append(f"  {one_line(result.error_message, limit=300)}")
    lines.extend(hints)
    return lines
