"""The rows of one run read back as records, and a run's info written as a row.

What the store adds to the plain mapping is the verdict on a ``running`` run:
it reads ``interrupted`` when its heartbeat is stale or its owner on this
machine is dead (see :mod:`stepvisor.store.sqlite._owner`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from stepvisor.core.state import AttemptRecord, RunStatus, StepRecord, StepStatus
from stepvisor.store.base import RunInfo, RunOwner
from stepvisor.store.sqlite import _owner
from stepvisor.store.sqlite._schema import Row, attempt_from_row


def run_row(info: RunInfo, settings: bytes | str, owner: RunOwner | None) -> Row:
    """The ``runs`` row of ``info``, its settings already encoded, owned by ``owner``."""
    owner_row = _owner.owner_row(owner) if owner is not None else (None,) * 6
    return (
        info.run_id,
        info.workflow_id,
        info.fingerprint,
        settings,
        info.seed,
        str(info.status),
        info.started,
        info.ended,
        info.heartbeat,
        info.error,
        info.source,
        *owner_row,
    )


def run_info(row: Row, *, now: float, stale_after: float) -> RunInfo:
    """A ``runs`` row as the run's info, a dead ``running`` run read as ``interrupted``."""
    run_id, workflow_id, fingerprint, settings, seed, status, started, *rest = row
    ended, heartbeat, error, source = rest[:4]
    owner = _owner.owner_of(rest[4:])
    run_status = RunStatus(status)
    if run_status is RunStatus.RUNNING:
        last_sign_of_life = heartbeat if heartbeat is not None else started
        if now - last_sign_of_life > stale_after:
            run_status = RunStatus.INTERRUPTED  # its program stopped beating: it died
        elif owner is not None and _owner.liveness(owner) == "dead":
            run_status = RunStatus.INTERRUPTED  # its owner on this machine is gone
    return RunInfo(
        run_id=run_id,
        workflow_id=workflow_id,
        fingerprint=fingerprint,
        settings=json.loads(settings),
        seed=seed,
        status=run_status,
        started=started,
        ended=ended,
        heartbeat=heartbeat,
        error=error,
        source=source,
        owner=owner,
    )


def step_records(
    step_rows: Sequence[Row],
    attempt_rows: Sequence[Row],
    artifact_rows: Sequence[Row],
    *,
    decode: Callable[[Row], Any],
) -> tuple[dict[str, StepRecord], dict[str, dict[str, Any]]]:
    """A run's steps and their outputs from its rows; ``decode`` reads one artifact row.

    Called outside the store's lock: decoding may unpickle, which runs code.
    """
    attempts: dict[str, list[AttemptRecord]] = {}
    for row in attempt_rows:
        attempts.setdefault(row[0], []).append(attempt_from_row(row))
    steps: dict[str, StepRecord] = {}
    outputs: dict[str, dict[str, Any]] = {}
    for step_id, status, note, restored, has_outputs, reused_from, cache_note in step_rows:
        steps[step_id] = StepRecord(
            step_id=step_id,
            status=StepStatus(status),
            attempts=tuple(attempts.get(step_id, ())),
            note=note,
            restored=bool(restored),
            reused_from=reused_from,
            cache_note=cache_note,
        )
        if has_outputs:
            outputs[step_id] = {}
    for row in artifact_rows:
        outputs.setdefault(row[0], {})[row[1]] = decode(row)
    return steps, outputs
