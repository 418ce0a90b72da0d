"""Scale: does a run of 100,000 steps cost ten times one of 10,000?

The DAG is 100 chains, each ending in a fan of as many steps as the chain is
long (``N/200`` each), so it has long dependency chains as well as wide
levels.  The steps are no-ops on threads.  Each size runs in a fresh
subprocess, so its peak RSS is its own: once timed without tracing, once
under ``tracemalloc`` for the peak of Python allocations.  The peak RSS is
``VmHWM`` (the high-water mark of the process image, reset by ``exec``)
rather than ``ru_maxrss``, which Linux carries across ``exec`` from the
parent, so that a big harness process cannot mask the child's own figure.
Memory figures cover building the workflow and running it; the wall time
covers the run (the build time is in the note).

The wall-time ratio between the two sizes shows whether the engine stays
linear: 10 (5 in quick mode) is linear, more means some per-step cost grows
with the size of the run.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import stepvisor as sv
from benchmarks.common import Measured, probe
from benchmarks.harness import Row, Target

NAME = "scale"
TITLE = "100 chains feeding fans, no-op thread steps"
ORDER = 60

CHAINS = 100
#: How long one child run may take before it is considered hung.
CHILD_TIMEOUT = 900.0


def sv_noop(ctx: sv.StepContext) -> None:
    """A step that does nothing."""
    del ctx


def chains_and_fans(n: int) -> list[sv.Step]:
    """``n`` steps: ``CHAINS`` chains of length ``n / (2 * CHAINS)``, each feeding a fan."""
    length = max(1, n // (2 * CHAINS))
    steps: list[sv.Step] = []
    for c in range(CHAINS):
        prev: list[str] = []
        for j in range(length):
            sid = f"c{c:03d}-{j:05d}"
            steps.append(sv.Step(sid, sv_noop, needs=prev))
            prev = [sid]
        steps.extend(sv.Step(f"f{c:03d}-{j:05d}", sv_noop, needs=prev) for j in range(length))
    return steps


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _status_mb(field: str) -> float | None:
    """``VmRSS`` / ``VmHWM`` of this process from ``/proc/self/status`` (Linux), in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def measure_here(n: int, *, trace: bool) -> dict[str, Any]:
    """Build and run the DAG of ``n`` steps in this process; its figures."""
    rss_before = _status_mb("VmRSS")
    maxrss_before = _maxrss_mb()
    if trace:
        tracemalloc.start()
    started = time.perf_counter()
    wf = sv.Workflow("scale", chains_and_fans(n), settings=sv.Settings(max_parallel=8))
    built = time.perf_counter()
    result = sv.run(wf)
    ended = time.perf_counter()
    peak = tracemalloc.get_traced_memory()[1] if trace else 0
    if trace:
        tracemalloc.stop()
    if result.status is not sv.RunStatus.SUCCEEDED:
        raise RuntimeError(f"the run ended {result.status.value}: {result.error}")
    return {
        "steps": len(wf.steps),
        "build_s": built - started,
        "run_s": ended - built,
        "tracemalloc_peak_mb": peak / 2**20,
        "rss_before_mb": rss_before,
        "rss_peak_mb": _status_mb("VmHWM"),
        "maxrss_before_mb": maxrss_before,
        "maxrss_after_mb": _maxrss_mb(),
    }


def child_main(argv: Sequence[str]) -> None:
    """Entry point of the measuring subprocess: ``N [trace]``; prints JSON."""
    n = int(argv[0])
    trace = len(argv) > 1 and argv[1] == "trace"
    print(json.dumps(measure_here(n, trace=trace)))


def _in_subprocess(n: int, *, trace: bool) -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    code = "import sys; from benchmarks.scenario_scale import child_main; child_main(sys.argv[1:])"
    args = [sys.executable, "-c", code, str(n), *(["trace"] if trace else [])]
    done = subprocess.run(
        args, cwd=root, capture_output=True, text=True, timeout=CHILD_TIMEOUT, check=False
    )
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        raise RuntimeError(f"the {n}-step child failed: {tail[0]}")
    figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def _size_rows(n: int, *, large: bool) -> list[Row]:
    def row(metric: str, unit: str, target: Target | None = None) -> Row:
        return Row(
            scenario=NAME,
            system="stepvisor",
            metric=f"{n:,} steps: {metric}",
            value=None,
            unit=unit,
            target=target,
        )

    memory_target = Target(on="value", op="<", limit=600.0, text="< 600 MB") if large else None
    return [
        row("wall time", "s"),
        row("steps per second", "steps/s"),
        row("tracemalloc peak", "MB"),
        row("peak RSS increase", "MB", memory_target),
    ]


def _size_figures(n: int, walls: dict[int, float]) -> list[Measured]:
    timed = _in_subprocess(n, trace=False)
    traced = _in_subprocess(n, trace=True)
    walls[n] = timed["run_s"]
    return [
        Measured(timed["run_s"], f"building the workflow: {timed['build_s']:.2f} s (not timed)"),
        Measured(n / timed["run_s"]),
        Measured(
            traced["tracemalloc_peak_mb"],
            f"build + run, traced in its own process ({traced['run_s']:.1f} s under tracing)",
        ),
        _rss_figure(timed, n),
    ]


def _rss_figure(timed: dict[str, Any], n: int) -> Measured:
    """The peak RSS increase: VmHWM (reset by exec) when there is one, else ru_maxrss.

    ``ru_maxrss`` is carried across ``exec`` from the parent on Linux, so in a
    child of a big harness process it can show the parent's peak instead of
    the child's own; it is reported in the note for comparison.
    """
    maxrss = timed["maxrss_after_mb"] - timed["maxrss_before_mb"]
    if timed["rss_peak_mb"] is None or timed["rss_before_mb"] is None:
        return Measured(maxrss, "ru_maxrss delta (no /proc here)")
    delta = timed["rss_peak_mb"] - timed["rss_before_mb"]
    return Measured(
        delta,
        f"{delta * 1024 / n:.1f} KB per step; VmHWM {timed['rss_peak_mb']:.0f} MB - VmRSS "
        f"before {timed['rss_before_mb']:.0f} MB (ru_maxrss delta {maxrss:.0f} MB: it "
        f"starts from the parent's peak, {timed['maxrss_before_mb']:.0f} MB, across exec)",
    )


def run(*, quick: bool) -> list[Row]:
    """Measure the two sizes, each in its own subprocesses, and the ratio of their wall times."""
    small, large = (2_000, 10_000) if quick else (10_000, 100_000)
    walls: dict[int, float] = {}
    rows = probe(_size_rows(small, large=False), lambda: _size_figures(small, walls))
    rows += probe(_size_rows(large, large=True), lambda: _size_figures(large, walls))
    linear = large / small
    ratio_row = Row(
        scenario=NAME,
        system="stepvisor",
        metric=f"wall time {large:,} / {small:,}",
        value=None,
        unit="",
        note=f"{linear:g} is linear",
        target=Target(on="value", op="<", limit=linear * 1.2, text=f"< {linear * 1.2:g}"),
    )

    def ratio() -> list[Measured]:
        if small not in walls or large not in walls:
            raise RuntimeError("a size failed, so there is no ratio")
        return [Measured(walls[large] / walls[small])]

    return rows + probe([ratio_row], ratio)
