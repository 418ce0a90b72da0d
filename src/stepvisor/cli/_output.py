"""What the command line says: its exit codes, its messages and its tables of runs.

Kept apart from the commands so that the text a user reads (and a script
parses: the exit codes, the ``status`` columns) is in one place.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Final

from stepvisor.cli._progress import one_line
from stepvisor.core.state import RunStatus, StepRecord, StepStatus
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


def counts(steps: Mapping[str, StepRecord]) -> str:
    tally = Counter(r.status.value for r in steps.values())
    order = [s.value for s in StepStatus]
    return ", ".join(f"{tally[s]} {s}" for s in order if tally[s])


def one_run(store: RunStore, run_id: str) -> str:
    stored = store.load(run_id)
    info = stored.info
    head = [
        f"run       {info.run_id}",
        f"workflow  {info.workflow_id}" + (f" ({info.source})" if info.source else ""),
        f"status    {info.status.value}",
        f"started   {when(info.started)}",
        f"duration  {duration(run_duration(info))}",
        f"seed      {info.seed}",
        f"steps     {counts(stored.steps)}",
    ]
    if info.status is RunStatus.RUNNING and info.owner is not None:
        head.append(f"owner     {info.owner.describe()}")
    if info.error:
        head.append(f"error     {one_line(info.error, limit=300)}")
    rows = []
    for record in stored.steps.values():
        last = record.last_attempt
        took = sum(a.duration or 0.0 for a in record.attempts) if record.attempts else None
        error = f"{last.error_type}: {last.error_message}" if last and last.error_type else ""
        rows.append(
            [
                record.step_id,
                record.status.value + (" (kept)" if record.restored else ""),
                str(record.attempt_count),
                duration(took),
                (last.worker or "-") if last else "-",
                one_line(error, limit=80),
            ]
        )
    steps = table(["STEP", "STATUS", "ATTEMPTS", "TIME", "WORKER", "ERROR"], rows)
    return "\n".join(head) + "\n\n" + steps
