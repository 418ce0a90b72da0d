"""Observing a run: its outcome, the side-effect files its steps wrote, its processes.

What is read here is what the checks of :mod:`tests.chaos.oracle` judge; none of
it decides anything.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stepvisor.actors.worker import worker_thread_name
from tests.chaos.steps import MARK_VAR
from tests.procfs import processes_with_env


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a run ended with, from a RunResult or read back from a store."""

    status: str
    steps: Mapping[str, Any]  # step id -> StepRecord
    artifacts: Mapping[str, Any]
    failed_step: str | None = None
    known_failed_step: bool = False
    #: The ids as the result lists them, in its order (empty when read from a store).
    ids: tuple[str, ...] = ()

    @classmethod
    def from_result(cls, result: Any) -> Outcome:
        return cls(
            status=str(result.status),
            steps=dict(result.steps),
            artifacts=dict(result.artifacts),
            failed_step=result.failed_step,
            known_failed_step=True,
            ids=tuple(result.steps),
        )

    @classmethod
    def from_stored(cls, stored: Any, order: Sequence[str]) -> Outcome:
        return cls(
            status=str(stored.info.status),
            steps=dict(stored.steps),
            artifacts=merged_outputs(stored, order),
        )


#: A mapped step's note once it learnt its list.
_MAPPED = re.compile(r"mapped over (\d+) items")


def merged_outputs(stored: Any, order: Sequence[str]) -> dict[str, Any]:
    """The artifacts a stored run adds up to: succeeded steps' outputs in canonical order.

    The store keeps a mapped step's record without its list (its instances' outputs
    hold the data once): the list is put together here from them, in index order,
    under the one name a campaign's mapped step creates (``l_<id>``).
    """
    merged: dict[str, Any] = {}
    for sid in order:
        record = stored.steps.get(sid)
        if record is not None and str(record.status) == "succeeded":
            outputs = stored.outputs.get(sid, {})
            found = _MAPPED.match(record.note or "")
            if not outputs and found is not None:
                name = f"l_{sid}"
                size = int(found.group(1))
                items = [stored.outputs.get(f"{sid}[{i}]", {}).get(name) for i in range(size)]
                outputs = {name: items}
            merged.update(outputs)
    return merged


@dataclass(frozen=True, slots=True)
class Effect:
    """One line of a step's side-effect file."""

    event: str  # start | end
    phase: str
    attempt: int
    pid: int


def read_effects(run_dir: Path) -> dict[str, list[Effect]]:
    """Step id -> the attempts it began and ended, in the order written."""
    found: dict[str, list[Effect]] = {}
    directory = run_dir / "effects"
    if not directory.is_dir():
        return found
    for path in sorted(directory.glob("*.log")):
        effects: list[Effect] = []
        for line in path.read_text(encoding="ascii").splitlines():
            event, phase, attempt, pid = line.split()
            effects.append(Effect(event, phase, int(attempt), int(pid)))
        found[path.name.removesuffix(".log")] = effects
    return found


def start_counts(effects: Mapping[str, list[Effect]]) -> dict[str, int]:
    """Step id -> how many attempts it began, across every program."""
    return {sid: sum(e.event == "start" for e in lines) for sid, lines in effects.items()}


def marked_processes(mark: str) -> set[int]:
    """Live (non-zombie) processes whose environment carries ``MARK_VAR=mark``."""
    return processes_with_env(MARK_VAR, mark)


def carries_mark(pid: int, mark_prefix: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return f"{MARK_VAR}={mark_prefix}".encode() in fh.read()
    except OSError:
        return False


def cmdlines(pids: Iterable[int]) -> str:
    out = []
    for pid in sorted(pids):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                out.append(fh.read().replace(b"\0", b" ").decode(errors="replace")[:60])
        except OSError:
            continue
    return "; ".join(out)


def abandoned_threads(outcome: Outcome) -> set[str]:
    names = set()
    for record in outcome.steps.values():
        last = record.attempts[-1] if record.attempts else None
        if last is not None and last.note == "abandoned" and last.worker:
            names.add(worker_thread_name(last.worker))
    return names
