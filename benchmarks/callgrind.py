"""Instructions per no-op step or call, counted by valgrind's callgrind: repeatable under load.

Wall-clock rows (``python -m benchmarks``) move by 2x on a shared 2-core VM; an
instruction count moves by a few percent.  Each workload runs at two sizes
under ``valgrind --tool=callgrind --trace-children=yes``, and the difference
divided by the difference in size is the cost of one more step or call, start-up
and imports cancelled out, for the parent and for its process children apart::

    python -m benchmarks.callgrind                 # every workload
    python -m benchmarks.callgrind steps-tee tpe   # some of them

Workloads: ``steps-tee`` and ``steps-off`` (``sv.run`` of no-op process steps,
``max_parallel=1``, ``capture`` as named), ``process-many`` (``sv.Executor``,
one process, ``wait([submit(f) ...])``) beside ``ppe``
(``ProcessPoolExecutor(1)``), ``thread-many`` (``sv.Executor(8)``) beside
``tpe`` (``ThreadPoolExecutor(8)``).  The parent's count varies with timing
(how outcomes batch); a child's barely does.  It takes minutes: valgrind runs
Python about 50x slower.

Process children are made to exit on their own at the end (their command pipe
closed, then waited for) instead of being killed, so that callgrind writes
their counts: the workload patches the process slot's child for that only.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

#: Workload name -> (sizes, the code of ``_workload``'s mode).
WORKLOADS: Final = {
    "steps-tee": (100, 300),
    "steps-off": (100, 300),
    "process-many": (200, 600),
    "thread-many": (1000, 3000),
    "tpe": (1000, 3000),
    "ppe": (200, 600),
}


def _graceful_children() -> None:
    """Let process children exit when their pipe closes (callgrind writes on exit only)."""
    from stepvisor.backends.process._worker import Child  # noqa: PLC0415

    reap, kill = Child.reap, Child.kill

    def closed(self: Any) -> None:
        if not getattr(self, "_graceful", False) and not self.reaped:
            self._graceful = True
            os.close(self.cmd_w)
            self.cmd_w = os.open(os.devnull, os.O_WRONLY)  # what reap() closes later
            self.proc.wait(timeout=600)

    def graceful_reap(self: Any) -> int:
        closed(self)
        return reap(self)

    def graceful_kill(self: Any) -> None:
        closed(self)
        kill(self)

    Child.reap = graceful_reap  # type: ignore[method-assign]
    Child.kill = graceful_kill  # type: ignore[method-assign]


def _workload(name: str, n: int) -> None:
    """Run one workload of size ``n`` in this process (under valgrind)."""
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, wait  # noqa: PLC0415

    import stepvisor as sv  # noqa: PLC0415
    from benchmarks.steps import noop, nothing  # noqa: PLC0415

    _graceful_children()
    if name.startswith("steps-"):
        steps = [sv.Step(f"s{i:06d}", noop, executor="process") for i in range(n)]
        result = sv.run(sv.Workflow("cg", steps), max_parallel=1, capture=name[len("steps-") :])
        if not result.ok:
            raise SystemExit(f"the run ended {result.status.value}: {result.error}")
        return
    pool: Any
    if name == "process-many":
        pool = sv.Executor(max_workers=1, executor="process")
    elif name == "thread-many":
        pool = sv.Executor(max_workers=8)
    elif name == "ppe":
        pool = ProcessPoolExecutor(1)
    else:
        pool = ThreadPoolExecutor(8)
    with pool:
        wait([pool.submit(nothing) for _ in range(n)])


def _count(name: str, n: int, out: Path) -> dict[str, int]:
    """Instructions of the parent and of its process children (summed) at size ``n``."""
    files = out / f"{name}-{n}"
    files.mkdir()
    subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--trace-children=yes",
            f"--callgrind-out-file={files}/out.%p",
            sys.executable,
            "-m",
            "benchmarks.callgrind",
            "--run",
            name,
            str(n),
        ],
        check=True,
        capture_output=True,
    )
    counts = {"parent": 0, "children": 0}
    # The parent started first: the lowest pid (a forked child has the parent's command).
    paths = sorted(files.iterdir(), key=lambda path: int(path.suffix[1:]))
    for i, path in enumerate(paths):
        totals = re.search(r"^totals: (\d+)", path.read_text(errors="replace"), re.MULTILINE)
        if totals is None:
            continue  # a process that wrote nothing (killed): not counted
        counts["parent" if i == 0 else "children"] += int(totals.group(1))
    return counts


def measure(names: Sequence[str]) -> list[str]:
    """One line per workload: instructions per step or call, parent and children."""
    lines = []
    with tempfile.TemporaryDirectory(prefix="sv-callgrind-") as tmp:
        for name in names:
            small, large = WORKLOADS[name]
            a, b = _count(name, small, Path(tmp)), _count(name, large, Path(tmp))
            per = {who: (b[who] - a[who]) / (large - small) for who in a}
            lines.append(
                f"{name:13s} parent {per['parent'] / 1000:7.1f}k  "
                f"children {per['children'] / 1000:7.1f}k  "
                f"total {(per['parent'] + per['children']) / 1000:7.1f}k instructions per call "
                f"(sizes {small} and {large})"
            )
            print(lines[-1], flush=True)
    return lines


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["--run"]:
        _workload(argv[1], int(argv[2]))
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    names = list(argv) or list(WORKLOADS)
    unknown = [name for name in names if name not in WORKLOADS]
    if unknown:
        print(f"unknown workload(s) {unknown}; choose from {list(WORKLOADS)}", file=sys.stderr)
        return 2
    measure(names)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
