"""The fault campaign for joblib ``Parallel`` calls on the stepvisor backend.

A run is one program (a subprocess, so that what it leaves behind can be seen
after it exits): from its seed it draws a few ``Parallel`` calls on one warm
engine, each over a few items, and for each item a fault:

* ``ok``: the item's value;
* ``sigkill``: the batch's worker process SIGKILLs itself mid-call;
* ``outside_kill``: the batch writes its pid and waits; the program kills that
  worker process from outside (SIGKILL), mid-call.

Invariants, checked by the program for every call and by the driver after it:

* a call with no fault returns the reference values, in order; a call with a
  crash raises ``WorkerCrashedError`` (nothing else, and never hangs);
* every batch submitted ends exactly once: its future is done when the
  ``Parallel`` call is over, and its completion callback ran once;
* the engine goes on: the call after a crash runs on it and succeeds;
* no child outlives the program (checked from outside, by an environment mark).

``python -m tests.chaos.joblib_calls --runs 200`` runs a campaign; the test
suite runs a few seeds (tests/chaos/test_chaos_joblib.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

from joblib import Parallel, delayed

import stepvisor as sv
import stepvisor.joblib
from stepvisor.joblib._backend import StepvisorBackend
from tests.procfs import processes_with_env

FAULTS: Final = ("ok", "ok", "ok", "sigkill", "outside_kill")
#: The environment mark every process of a run inherits (children included).
MARK_VAR: Final = "STEPVISOR_CHAOS_JOBLIB"
#: How long a run may take before the driver calls it hung.
RUN_BOUND: Final = 120.0


def item(value: int, fault: str, pid_dir: str) -> int:
    """One item of a Parallel call (runs in a worker process)."""
    if fault == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault == "outside_kill":
        path = Path(pid_dir, f"{value}-{time.monotonic_ns()}.pid")
        path.with_suffix(".tmp").write_text(str(os.getpid()))
        path.with_suffix(".tmp").rename(path)  # whole when it appears
        time.sleep(RUN_BOUND)  # killed from outside long before
    return value * 10 + 1


def plan(seed: int) -> list[list[str]]:
    """The calls of a run (a list of faults, one per item), drawn from its seed."""
    rng = random.Random(seed)
    return [
        [rng.choice(FAULTS) for _ in range(rng.randint(1, 6))] for _ in range(rng.randint(2, 5))
    ]


def _killer(pid_dir: Path, stop: threading.Event) -> None:
    """Kill every worker that says it waits to be killed (the outside_kill fault)."""
    while not stop.wait(0.01):
        for path in pid_dir.glob("*.pid"):
            pid = int(path.read_text())
            path.unlink()
            with contextlib.suppress(ProcessLookupError):  # gone: stopped with its call
                os.kill(pid, signal.SIGKILL)


def _one_call(faults: list[str], pid_dir: Path, problems: list[str]) -> None:
    ended: dict[int, int] = {}
    futures: dict[int, Any] = {}
    lock = threading.Lock()  # joblib submits from its callback threads too

    class Counting(StepvisorBackend):
        """Records each batch's future and how many times its callback ran."""

        def submit(self, func: Callable[[], Any], callback: Any = None) -> Any:
            with lock:
                index = len(ended)
                ended[index] = 0

            def counted(future: Any) -> None:
                with lock:
                    ended[index] += 1
                if callback is not None:
                    callback(future)

            future = super().submit(func, counted)
            with lock:
                futures[index] = future
            return future

    crash = any(f != "ok" for f in faults)
    calls = [delayed(item)(i, f, str(pid_dir)) for i, f in enumerate(faults)]
    try:
        got = Parallel(n_jobs=2, backend=Counting(), batch_size=1)(calls)
    except sv.WorkerCrashedError:
        if not crash:
            problems.append(f"{faults}: WorkerCrashedError with no crash")
    except BaseException as exc:
        problems.append(f"{faults}: raised {type(exc).__name__}: {exc}")
    else:
        if crash:
            problems.append(f"{faults}: returned {got} despite a crash")
        elif got != [i * 10 + 1 for i in range(len(faults))]:
            problems.append(f"{faults}: returned {got}")
    for index, future in sorted(futures.items()):
        if not future.done():
            problems.append(f"{faults}: batch {index} not ended after the call")
        if ended[index] > 1:
            problems.append(f"{faults}: batch {index} ended {ended[index]} times")


def program(seed: int, pid_dir: Path) -> int:
    """One run: its calls, each checked; prints the problems as JSON, exits 0 if none."""
    stepvisor.joblib.register()
    problems: list[str] = []
    stop = threading.Event()
    killer = threading.Thread(target=_killer, args=(pid_dir, stop), daemon=True)
    killer.start()
    try:
        for faults in [*plan(seed), ["ok", "ok"]]:  # the last: the engine goes on
            _one_call(faults, pid_dir, problems)
    finally:
        stop.set()
    print(json.dumps(problems))
    return 1 if problems else 0


def marked(mark: str) -> set[int]:
    return processes_with_env(MARK_VAR, mark)


def run_one(seed: int, workdir: Path) -> list[str]:
    """Run seed ``seed`` as a program; its problems and any child that outlived it."""
    pid_dir = workdir / f"run-{seed}"
    pid_dir.mkdir()
    mark = f"{seed}-{os.getpid()}-{time.monotonic_ns()}"
    env = {**os.environ, MARK_VAR: mark}
    code = (
        "import sys, pathlib; from tests.chaos.joblib_calls import program; "
        f"sys.exit(program({seed}, pathlib.Path({str(pid_dir)!r})))"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            capture_output=True,
            text=True,
            timeout=RUN_BOUND,
            check=False,
        )
    except subprocess.TimeoutExpired:
        problems = [f"seed {seed}: the program did not end within {RUN_BOUND:g} s"]
    else:
        lines = done.stdout.strip().splitlines()
        try:
            problems = [f"seed {seed}: {p}" for p in json.loads(lines[-1])] if lines else []
        except json.JSONDecodeError:
            problems = []
        if done.returncode != 0 and not problems:
            problems = [f"seed {seed}: exit {done.returncode}: {done.stderr[-2000:]}"]
    deadline = time.monotonic() + 5.0
    while (left := marked(mark)) and time.monotonic() < deadline:
        time.sleep(0.05)
    if left:
        problems.append(f"seed {seed}: processes {sorted(left)} outlived the program")
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.joblib_calls")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="the first run's seed")
    args = parser.parse_args(argv)

    failed = 0
    with tempfile.TemporaryDirectory(prefix="stepvisor-chaos-joblib-") as tmp:
        for seed in range(args.seed, args.seed + args.runs):
            problems = run_one(seed, Path(tmp))
            failed += bool(problems)
            for problem in problems:
                print(problem)
    print(f"{args.runs} runs, {failed} with a broken invariant")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
