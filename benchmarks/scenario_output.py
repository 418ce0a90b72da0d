"""Output capture: a step printing 100,000 short lines, captured and not.

One thread step and one process step each run ``print(f"line {i}")`` 100,000
times.  Beside them, in the same run: the same step writing the same lines to
a file (the target: captured printing takes at most twice as long), and the
same printing with ``capture="off"`` (the uncaptured figure; stdout goes to
``/dev/null`` while it is timed, and so does ``capture="tee"``'s copy).  Each
figure is the time of the step's own loop, measured inside the step (a whole
run adds the same few milliseconds of scheduling to every row, and on a loaded
machine more noise than the loop itself), on a warm :class:`~stepvisor.Engine`
(its Workers and process children up already), the best of a few.  A process
step's output is read by the engine while the loop runs; were the reading slower
than the writing, the pipe would fill and the loop would wait, so its cost shows
in the figure.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import stepvisor as sv
from benchmarks.common import Measured, best_of, probe, scratch_dir
from benchmarks.harness import Row, Target
from benchmarks.steps import lines_to_file, print_lines
from stepvisor.core.model import Executor

NAME = "output"
TITLE = "a step printing 100,000 short lines: captured, to a file, uncaptured"
ORDER = 95

LINES = 100_000


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """fds 1 and 2 (and sys.stdout, sys.stderr) to /dev/null while a figure is taken."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def _timer(
    engine: sv.Engine, wf: sv.Workflow, capture: str, check: Callable[[sv.RunResult], None]
) -> Callable[[], float]:
    def timed() -> float:
        with _quiet():
            result = engine.run(wf, capture=capture, store=None)
        if not result.ok:
            raise RuntimeError(f"the run ended {result.status.value}: {result.error}")
        check(result)
        return float(result.artifacts["seconds"])

    return timed


def _kept_all(n: int) -> Callable[[sv.RunResult], None]:
    def check(result: sv.RunResult) -> None:
        text = result.logs("s")
        if not text.endswith(f"line {n - 1}\n"):
            raise RuntimeError("the captured log does not end with the last line printed")

    return check


def _kept_nothing(result: sv.RunResult) -> None:
    if result.logs("s"):
        raise RuntimeError("capture='off' kept output")


def _figures(executor: Executor, n: int, repeat: int, tmp: Path) -> list[Measured]:
    params: dict[str, Any] = {"n": n}
    printing = sv.Workflow("print", [sv.Step("s", print_lines, executor=executor, params=params)])
    to_file = sv.Workflow(
        "file",
        [
            sv.Step(
                "s", lines_to_file, executor=executor, params={**params, "path": str(tmp / "out")}
            )
        ],
    )
    # A limit above what is printed: the log keeps it all, so all of it is checked.
    with sv.Engine(max_parallel=1) as engine:
        cases = [
            (printing, "store", _kept_all(n)),
            (printing, "tee", _kept_all(n)),
            (to_file, "store", _kept_nothing),
            (printing, "off", _kept_nothing),
        ]
        figures = []
        for wf, capture, check in cases:
            timer = _timer(engine, wf, capture, check)
            timer()  # warm: the child imports the step's module, the loop starts
            best, times = best_of(repeat, timer)
            spread = ", ".join(f"{t * 1e3:.0f}" for t in times)
            figures.append(Measured(best * 1e3, f"best of {len(times)} ({spread})"))
        return figures


def _rows(executor: Executor, n: int) -> list[Row]:
    metric = f"{n:,} lines, {executor} step"
    row = functools.partial(Row, scenario=NAME, metric=metric, value=None, unit="ms")
    return [
        row(system="stepvisor", note='print(), capture="store"'),
        row(system="stepvisor, tee", note='print(), capture="tee" (shown: to /dev/null)'),
        row(
            system="same loop to a file",
            note="print(file=f) in the same step",
            target=Target(on="ratio", op="<=", limit=2.0, text="captured <= 2x"),
        ),
        row(system="uncaptured", note='print(), capture="off" (to /dev/null)'),
    ]


def run(*, quick: bool) -> list[Row]:
    n = 2_000 if quick else LINES
    repeat = 1 if quick else 5
    rows: list[Row] = []
    with scratch_dir() as tmp:
        for executor, requires in (
            ("thread", ("stepvisor",)),
            ("process", ("stepvisor.backends.process",)),
        ):
            kind: Executor = "thread" if executor == "thread" else "process"
            rows += probe(
                _rows(kind, n),
                functools.partial(_figures, kind, n, repeat, tmp),
                requires=requires,
            )
    return rows
