"""What the command line says: its exit codes, its messages and its tables of runs.

Kept apart from the commands so that the text a user reads (and a script
parses: the exit codes, the ``status`` columns) is in one place.

A mapped step is one row of a run's table, its status the counts of its
instances (``score  5/6 succeeded, 1 failed``); ``status RUN STEP`` lists a
mapped step's instances, or shows a plain step's attempts
(:mod:`stepvisor.cli._maps` groups the store's rows).
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Final

from stepvisor.cli._maps import Group, count_text, group_steps
from stepvisor.cli._progress import one_line
from stepvisor.core.state import RunStatus, StepRecord, StepStatus
from stepvisor.errors import StepvisorError
from stepvisor.store.base import RunInfo, RunStore

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_CANCELLED: Final = 130


def say(message: str) -> None:
    print(f"stepvisor: {message}", file=sys.stderr)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = [header, *rows]
    out = []
    for line in lines:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(line)]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def when(value: float | None) -> str:
    return "-" if value is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))


def duration(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 60:
        return f"{value:.2f} s"
    minutes, seconds = divmod(round(value), 60)
    return f"{minutes} min {seconds:02d} s"


def run_duration(info: RunInfo) -> float:
    if info.ended is not None:
        end = info.ended
    elif info.status is RunStatus.RUNNING:
        end = time.time()
    else:  # interrupted: its program died after its last heartbeat
        end = info.heartbeat or info.started
    return max(0.0, end - info.started)


def _tally(tally: Mapping[str, int]) -> str:
    order = [s.value for s in StepStatus]
    return ", ".join(f"{tally[s]} {s}" for s in order if tally.get(s))


def counts(steps: Mapping[str, StepRecord]) -> str:
    """The steps by status; a mapped step counts once, by its own status."""
    return _tally(Counter(g.record.status.value for g in group_steps(steps)))


def _instance_counts(groups: Sequence[Group]) -> str | None:
    """``4: 3 succeeded, 1 failed``: every mapped step's instances (pending ones too)."""
    mapped = [g for g in groups if g.mapped]
    if not mapped:
        return None
    tally: Counter[str] = Counter()
    for group in mapped:
        tally.update(group.counts())
    total = sum(g.size or 0 for g in mapped)
    return f"{total}" + (f": {_tally(tally)}" if total else "")


def _error(record: StepRecord) -> str:
    last = record.last_attempt
    if last is not None and last.error_type:
        return f"{last.error_type}: {last.error_message}"
    if record.status is StepStatus.FAILED and not record.attempts and record.note:
        return record.note  # failed without running: e.g. a mapped step's list was no list
    return ""


def _status_text(record: StepRecord) -> str:
    """``succeeded``, ``succeeded (kept)`` on resume, ``succeeded (reused)`` from the cache."""
    if record.restored:
        return f"{record.status.value} (kept)"
    if record.reused_from is not None:
        return f"{record.status.value} (reused)"
    return record.status.value


def _cache_tally(records: list[StepRecord]) -> str | None:
    """``2 reused, 1 computed``: the cached steps of a run, or ``None`` if it cached none."""
    cached = [r for r in records if r.cache_note is not None]
    if not cached:
        return None
    reused = sum(r.reused_from is not None for r in cached)
    return f"{reused} reused, {len(cached) - reused} computed"


def _row(record: StepRecord) -> list[str]:
    last = record.last_attempt
    took = sum(a.duration or 0.0 for a in record.attempts) if record.attempts else None
    return [
        record.step_id,
        _status_text(record),
        str(record.attempt_count),
        duration(took),
        (last.worker or "-") if last else "-",
        one_line(_error(record), limit=80),
    ]


def _mapped_row(group: Group) -> list[str]:
    """A mapped step as one row: its counts, its instances' attempts, wall time and workers.

    TIME is from its first instance's start to its last one's end; ERROR is
    the first failed instance's, by index.
    """
    assert group.size is not None
    attempts = [a for r in group.instances for a in r.attempts]
    starts = [a.started for a in attempts]
    ends = [a.ended for a in attempts if a.ended is not None]
    span = max(ends) - min(starts) if starts and ends else None
    workers = {a.worker for a in attempts if a.worker}
    failed = next((r for r in group.instances if _error(r)), None)
    error = f"{failed.step_id}: {_error(failed)}" if failed is not None else ""
    return [
        group.record.step_id,
        count_text(group.size, group.counts()),
        str(len(attempts)),
        duration(span),
        f"{len(workers)} workers" if workers else "-",
        one_line(error, limit=80),
    ]


_COLUMNS: Final = ["STATUS", "ATTEMPTS", "TIME", "WORKER", "ERROR"]


def one_run(store: RunStore, run_id: str) -> str:
    stored = store.load(run_id)
    info = stored.info
    groups = group_steps(stored.steps)
    head = [
        f"run       {info.run_id}",
        f"workflow  {info.workflow_id}" + (f" ({info.source})" if info.source else ""),
        f"status    {info.status.value}",
        f"started   {when(info.started)}",
        f"duration  {duration(run_duration(info))}",
        f"seed      {info.seed}",
        f"steps     {_tally(Counter(g.record.status.value for g in groups))}",
    ]
    instances = _instance_counts(groups)
    if instances is not None:
        head.append(f"instances {instances}")
    if info.status is RunStatus.RUNNING and info.owner is not None:
        head.append(f"owner     {info.owner.describe()}")
    if info.error:
        head.append(f"error     {one_line(info.error, limit=300)}")
    cache = _cache_tally([g.record for g in groups])
    if cache is not None:
        head.append(f"cache     {cache}")
    rows = [_mapped_row(g) if g.mapped else _row(g.record) for g in groups]
    columns = ["STEP", *_COLUMNS]
    if cache is not None:  # why each cached step was reused or computed
        columns.append("CACHE")
        for row, group in zip(rows, groups, strict=True):
            row.append(one_line(group.record.cache_note or "", limit=60))
    text = "\n".join(head) + "\n\n" + table(columns, rows)
    mapped = next(
        (g.record.step_id for g in groups if g.mapped and any(map(_error, g.instances))),
        next((g.record.step_id for g in groups if g.mapped), None),
    )
    if mapped is not None:
        text += f"\n\na mapped step's instances: stepvisor status {run_id} {mapped}"
    return text


def one_step(store: RunStore, run_id: str, step_id: str) -> str:
    """A mapped step's instances, one row each; or a plain step's (or instance's) attempts."""
    stored = store.load(run_id)
    groups = group_steps(stored.steps)
    group = next((g for g in groups if g.record.step_id == step_id), None)
    if group is None:
        record = stored.steps.get(step_id)
        if record is None:
            names = ", ".join(g.record.step_id for g in groups)
            raise StepvisorError(
                f"run {run_id} has no step {step_id!r}; its steps are: {names} "
                f"(an instance is named like step[0])"
            )
        group = Group(record)
    record = group.record
    head = [f"step      {record.step_id}", f"run       {run_id}"]
    if not group.mapped:
        head += [f"status    {_status_text(record)}", f"attempts  {record.attempt_count}"]
        if record.note:
            head.append(f"note      {one_line(record.note, limit=300)}")
        if record.cache_note:
            head.append(f"cache     {record.cache_note}")
        return "\n".join(head) + "\n\n" + _attempts(record)
    assert group.size is not None
    head += [
        f"status    {record.status.value}",
        f"instances {count_text(group.size, group.counts())}",
    ]
    rows = [_row(r) for r in group.instances]
    text = "\n".join(head)
    if rows:
        text += "\n\n" + table(["INSTANCE", *_COLUMNS], rows)
    waiting = group.size - len(group.instances)
    if waiting:
        text += f"\n\n{waiting} more instances have not started yet (pending)"
    return text


def _attempts(record: StepRecord) -> str:
    if not record.attempts:
        # Why (skipped, cancelled, a list that was none) is its note; a reused step's
        # result came from the run its cache line names.
        return "no attempts"
    rows = [
        [
            str(a.number),
            a.outcome or "running",
            when(a.started),
            duration(a.duration),
            a.worker or "-",
            one_line(f"{a.error_type}: {a.error_message}" if a.error_type else "", limit=120),
        ]
        for a in record.attempts
    ]
    text = table(["ATTEMPT", "OUTCOME", "STARTED", "TIME", "WORKER", "ERROR"], rows)
    last = record.attempts[-1]
    if last.error_traceback:
        text += f"\n\nattempt {last.number}'s traceback:\n{last.error_traceback.rstrip()}"
    return text
