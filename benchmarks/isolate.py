"""Run one scenario in a fresh interpreter, so no scenario measures another's leftovers.

Scenarios share nothing on purpose, but the libraries they compare against do
leave things behind in the process that imported them: Ray's and Dask's
threads stay alive, their pools are kept for reuse, and every scenario leaves
the heap bigger and the allocator's free lists shuffled.  Inside one process
the retry storm, which is bound by how fast threads get the GIL back, came out
~1.5x worse than the same scenario run alone.  So ``python -m benchmarks``
runs each scenario in a child of its own (as pyperf runs each benchmark in
worker processes) and collects the rows it writes::

    parent: python -m benchmarks.isolate MODULE OUT.json [--quick]
                  │ child imports MODULE, runs it, writes its rows to OUT.json
                  │ (a scenario that raises writes one "failed" row itself)
    parent: a child that dies, or writes nothing, becomes one "failed" row

``--in-process`` on the harness keeps the old behaviour, for profiling one run.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from benchmarks.harness import (
    Row,
    Scenario,
    Target,
    broken_scenario,
    failed_row,
    run_in_process,
    scenario_from,
)

__all__ = ["CHILD_TIMEOUT", "row_from_json", "row_to_json", "run_isolated"]

#: Seconds a scenario's child may take before it is killed; the slowest
#: scenario (scale, a million steps) takes about two minutes on two cores.
CHILD_TIMEOUT: Final = 1800.0
_ROOT: Final = Path(__file__).resolve().parent.parent


def row_to_json(row: Row) -> dict[str, Any]:
    """Every field of ``row``, its target as a dict of its own fields."""
    return dataclasses.asdict(row)


def row_from_json(data: dict[str, Any]) -> Row:
    """The row :func:`row_to_json` wrote; a field it does not know is an error."""
    fields = dict(data)
    target = fields.pop("target", None)
    return Row(**fields, target=Target(**target) if target is not None else None)


def _crashed(scenario: Scenario, why: str) -> list[Row]:
    return [failed_row(scenario, RuntimeError(f"its child process {why}"))]


def run_isolated(scenario: Scenario, *, quick: bool, timeout: float = CHILD_TIMEOUT) -> list[Row]:
    """``scenario.run(quick=quick)`` in a child interpreter; its rows, or one failed row.

    The child's output goes to this process's stderr (where progress goes), so
    the table on stdout stays the table.
    """
    try:
        progress: int | None = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a stderr without a file: inherit ours
        progress = None
    with tempfile.TemporaryDirectory(prefix="stepvisor-bench-") as tmp:
        out = Path(tmp) / "rows.json"
        args = [sys.executable, "-m", "benchmarks.isolate", scenario.module, str(out)]
        try:
            done = subprocess.run(
                [*args, *(["--quick"] if quick else [])],
                cwd=_ROOT,
                stdout=progress,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return _crashed(scenario, f"took more than {timeout:g} s and was killed")
        if done.returncode != 0:
            return _crashed(scenario, f"exited with status {done.returncode}")
        if not out.exists():
            return _crashed(scenario, "exited without writing its rows")
        return [row_from_json(item) for item in json.loads(out.read_text())]


def child_main(argv: Sequence[str]) -> int:
    """``MODULE OUT [--quick]``: import the scenario module, run it, write its rows."""
    module, out, *rest = argv
    try:
        scenario = scenario_from(importlib.import_module(module))
    except Exception as exc:
        scenario = broken_scenario(module.rpartition(".")[2].removeprefix("scenario_"), module, exc)
    rows = run_in_process(scenario, quick="--quick" in rest)
    Path(out).write_text(json.dumps([row_to_json(r) for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
