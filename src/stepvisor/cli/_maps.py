"""Mapped steps as the command line and the report show them: one step, its instances inside.

A store keeps a mapped step's instances as step rows of their own
(``"score[7]"``), next to the mapped step's row.  Whoever shows a run groups
them back under their step, so that a map over 100,000 items reads as one
line with its counts, not 100,000 lines::

    StoredRun.steps ─▶ group_steps ─▶ [Group(record, instances, size), ...] (one per step)
                                         │
                                         └─▶ count_text: "730/1000 succeeded, 8 running"

A step is mapped when the run machine wrote its note ``"mapped over N items"``
(when it learned its list); that note is also where ``N`` comes from, since an
instance that has not started yet has no row in the store.  Only ids of the
shape ``step[i]`` under such a step are taken as its instances, so a plain step
that happens to be named ``x[1]`` stays a step.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from stepvisor.core.events import StepDispatched, StepFinished, StepRetrying
from stepvisor.core.records import StepRecord, StepStatus, parse_instance_id

__all__ = [
    "COUNT_ORDER",
    "INSTANCE_LINES",
    "LABELS",
    "Group",
    "MapProgress",
    "Running",
    "count_text",
    "counts_by_status",
    "group_steps",
    "mapped_size",
    "note_counts",
    "status_counts",
]

#: The note the run machine gives a mapped step once its list is known
#: (``core._mapping._counts_note``): ``mapped over 6 items`` or
#: ``mapped over 6 items: 5 succeeded, 1 failed``.
_NOTE: Final = re.compile(r"mapped over (\d+) items(?::|$)")
_NOTE_COUNT: Final = re.compile(r"(\d+) ([a-z_]+)")

#: Lines the live view prints for one mapped step's failed or retried instances;
#: past them it says once that the rest are counted, not printed.
INSTANCE_LINES: Final = 20
_FAILED: Final = frozenset({StepStatus.FAILED.value, StepStatus.TIMED_OUT.value})

#: Instance statuses in the order their counts are shown (pending last, and left
#: out of ``count_text``: ``succeeded`` is shown out of the total).
COUNT_ORDER: Final = (
    "succeeded",
    "failed",
    "timed_out",
    "cancelled",
    "skipped",
    "running",
    "waiting_retry",
    "pending",
)
#: How a status reads in a count (its value, but for these).
LABELS: Final = {"waiting_retry": "retrying", "timed_out": "timed out"}


def mapped_size(record: StepRecord) -> int | None:
    """``N`` of a mapped step whose list is known (from its note), else ``None``."""
    match = _NOTE.match(record.note or "")
    return int(match[1]) if match else None


def note_counts(record: StepRecord) -> tuple[int, Counter[str]] | None:
    """``(N, counts by status)`` from a mapped step's note, once its instances ended.

    The machine writes the counts into the note when the step ends, restored
    instances included, so a finished map is summed up without reading its
    instances.  ``None`` before that (or for a plain step).
    """
    note = record.note or ""
    match = _NOTE.match(note)
    if match is None or not record.terminal:
        return None
    rest = note[match.end() :]
    return int(match[1]), Counter({s: int(n) for n, s in _NOTE_COUNT.findall(rest)})


@dataclass(frozen=True, slots=True)
class Group:
    """One step of a stored run, with its instances if it is mapped.

    ``size`` is ``None`` for a plain step (and for a mapped step whose list was
    never known: it ran no instance).  ``instances`` are the stored ones, in
    index order; those not yet started have no record and count as pending.
    """

    record: StepRecord
    size: int | None = None
    instances: Sequence[StepRecord] = field(default_factory=tuple)

    @property
    def mapped(self) -> bool:
        return self.size is not None

    def counts(self) -> Counter[str]:
        """The instances by status, those without a record as ``pending``."""
        tally = status_counts(self.instances)
        if self.size is not None:
            tally["pending"] += max(0, self.size - len(self.instances))
        return tally


def group_steps(steps: Mapping[str, StepRecord]) -> list[Group]:
    """The run's steps in the store's order, each mapped step with its instances."""
    sizes = {sid: size for sid, r in steps.items() if (size := mapped_size(r)) is not None}
    instances: dict[str, list[tuple[int, StepRecord]]] = {sid: [] for sid in sizes}
    plain: list[StepRecord] = []
    for sid, record in steps.items():
        parsed = parse_instance_id(sid) if sizes else None
        if parsed is not None and parsed[0] in sizes and sid not in sizes:
            instances[parsed[0]].append((parsed[1], record))
        else:
            plain.append(record)
    out = []
    for record in plain:
        sid = record.step_id
        if sid in sizes:
            found = sorted(instances[sid], key=lambda pair: pair[0])
            out.append(Group(record, sizes[sid], tuple(r for _, r in found)))
        else:
            out.append(Group(record))
    return out


def status_counts(records: Iterable[StepRecord]) -> Counter[str]:
    return Counter(r.status.value for r in records)


def count_text(size: int, counts: Mapping[str, int]) -> str:
    """``730/1000 succeeded, 8 failed, 12 running``: pending ones are the rest of ``size``."""
    parts = [f"{counts.get(StepStatus.SUCCEEDED.value, 0)}/{size} succeeded"]
    parts.extend(
        f"{counts[s]} {LABELS.get(s, s)}"
        for s in COUNT_ORDER[1:-1]  # neither succeeded (shown above) nor pending
        if counts.get(s)
    )
    return ", ".join(parts)


def counts_by_status(counts: Mapping[str, int]) -> str:
    """``5 succeeded, 1 failed``: every status some record has, in display order."""
    return ", ".join(f"{counts[s]} {LABELS.get(s, s)}" for s in COUNT_ORDER if counts.get(s))


@dataclass(slots=True)
class Running:
    """An attempt the live view saw start: its number and when (wall seconds)."""

    attempt: int
    since: float


@dataclass(slots=True)
class MapProgress:
    """A mapped step's instances as the live view counts them, from events.

    Instances that ended are only counted, so following a map over a million
    items holds the instances running at the moment, not a million entries.
    """

    #: ``N``, once the step's list is known (``StepExpanded``).
    size: int | None = None
    #: When the list was known (wall seconds): the mapped step's own duration starts there.
    since: float | None = None
    ended: Counter[str] = field(default_factory=Counter)
    running: dict[str, Running] = field(default_factory=dict)
    retrying: set[str] = field(default_factory=set)
    #: Per-instance lines printed so far (capped at ``INSTANCE_LINES``).
    lines: int = 0

    def counts(self) -> Counter[str]:
        tally = Counter(self.ended)
        tally["running"] += len(self.running)
        tally["waiting_retry"] += len(self.retrying)
        if self.size is not None:
            tally["pending"] += max(0, self.size - sum(tally.values()))
        return +tally  # without the zeros

    @property
    def done(self) -> int:
        return sum(self.ended.values())

    def apply(self, event: StepDispatched | StepRetrying | StepFinished) -> float | None:
        """Fold in an event of an instance; -> how long its attempt ran, if it ended one."""
        sid = event.step_id
        if isinstance(event, StepDispatched):
            self.retrying.discard(sid)
            self.running[sid] = Running(event.attempt, event.time)
            return None
        run = self.running.pop(sid, None)
        if isinstance(event, StepRetrying):
            self.retrying.add(sid)
            return None
        self.retrying.discard(sid)
        self.ended[event.status] += 1
        return None if run is None else max(0.0, event.time - run.since)

    def quiet(self, step: str, event: StepRetrying | StepFinished, *, run_id: str) -> str | None:
        """What an instance's event prints instead of its own line.

        ``None``: its own line (a failure or retry, up to ``INSTANCE_LINES`` of
        them).  ``""``: nothing (an instance that succeeded, was skipped or
        cancelled is counted on the step's line; so is any failure past the cap).
        Any other text: the one line said at the cap.
        """
        if isinstance(event, StepFinished) and event.status not in _FAILED:
            return ""
        self.lines += 1
        if self.lines <= INSTANCE_LINES:
            return None
        if self.lines > INSTANCE_LINES + 1:
            return ""
        return (
            f"{step}: further failures and retries of its instances are counted, not printed; "
            f"stepvisor status {run_id} {step} lists them"
        )

    def text(self) -> str:
        """``730/1000 succeeded, 8 running``, or ``no instances`` before the list is known."""
        return "no instances" if self.size is None else count_text(self.size, self.counts())
