"""The fault campaign for ``sv.Executor``: random calls, random faults, a random ending.

One run (its seed picks everything)::

    generate(seed) ─▶ ExecutorScenario: thread or process calls, 4-24 of them,
                      each ok, raising, slow, or (process) SIGKILLed mid-call;
                      the workers; an ending:
                        shutdown        shutdown(wait=True) once all are submitted
                        cancel_futures  shutdown(cancel_futures=True) after a random delay
                        stop_running    shutdown(stop_running=True) after a random delay,
                                        racing the calls' own completions
                        both            cancel_futures and stop_running together
                        exit            a child interpreter submits the calls and ends
                                        without shutdown()
                   ─▶ run it, a monitor SIGKILLing each call that asked for it (pid file)
                   ─▶ check (``INVARIANTS``)

What is checked:

* ``once``: every future ends exactly once (one done-callback call each), and
  is done when ``shutdown(wait=True)`` returns;
* ``outcome``: each ends as its call and the ending allow: its value, its
  error, ``WorkerCrashedError`` for a killed one; ``StepCancelledError`` only
  under ``stop_running``; cancelled only under ``cancel_futures``;
* ``not-started``: a cancelled future's call never began, and under
  ``cancel_futures`` alone no call that began was stopped;
* ``ran-once``: no call began twice (no retries are asked for);
* ``exit``: with the ``exit`` ending, every call submitted before the
  interpreter exited ran to its end, and the program exited 0 with nothing on
  stderr;
* ``no-orphans``: no process a call ran in is alive after the executor (or
  the program) ended.

    python -m tests.chaos.executors --runs 200 --seed 7
    python -m tests.chaos.executors --replay 123 -v
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import stepvisor as sv
from tests.procfs import pid_gone

__all__ = ["ENDINGS", "INVARIANTS", "ExecutorScenario", "call", "generate", "run_one"]

ENDINGS: Final = ("shutdown", "cancel_futures", "stop_running", "both", "exit")
INVARIANTS: Final = ("once", "outcome", "not-started", "ran-once", "exit", "no-orphans")
#: How long anything here may wait for something that must happen.
_BOUND: Final = 30.0
_REPO: Final = str(Path(__file__).resolve().parents[2])


@dataclass(frozen=True)
class ExecutorScenario:
    seed: int
    executor: str
    workers: int
    ending: str
    #: (kind, seconds) per call: kind is ok, raise, slow or kill.
    calls: tuple[tuple[str, float], ...]
    #: Seconds between the last submit and the ending's shutdown.
    delay: float


def generate(seed: int) -> ExecutorScenario:
    """The run of ``seed``: pure (the same seed, the same scenario)."""
    rng = random.Random(seed)
    executor = rng.choice(("thread", "process"))
    ending = rng.choice(ENDINGS)
    kinds = ["ok", "ok", "raise", "slow"]
    if executor == "process" and ending != "exit":
        kinds.append("kill")
    calls = tuple(
        (rng.choice(kinds), round(rng.uniform(0.0, 0.05), 4)) for _ in range(rng.randint(4, 24))
    )
    return ExecutorScenario(
        seed, executor, rng.randint(1, 4), ending, calls, round(rng.uniform(0.0, 0.03), 4)
    )


def call(folder: str, index: int, kind: str, seconds: float) -> int:
    """One call of a run: says it began (its pid) and ended, in files outside the program."""
    with open(os.path.join(folder, f"{index}.begin"), "a") as fh:
        fh.write(f"{os.getpid()}\n")
    if kind == "raise":
        raise ValueError(f"call {index} raised")
    if kind == "kill":  # the monitor SIGKILLs this process; bounded if it never does
        pid_file = os.path.join(folder, f"kill-{index}.pid")
        with open(pid_file + ".tmp", "w") as fh:
            fh.write(str(os.getpid()))
        os.rename(pid_file + ".tmp", pid_file)
        end = time.monotonic() + _BOUND
        while time.monotonic() < end:
            time.sleep(0.01)
        raise TimeoutError(f"call {index} was never killed")
    if kind == "slow":
        time.sleep(seconds)
    with open(os.path.join(folder, f"{index}.end"), "a") as fh:
        fh.write("end\n")
    return index * 2


@dataclass
class RunReport:
    scenario: ExecutorScenario
    violations: list[str] = field(default_factory=list)
    checked: Counter[str] = field(default_factory=Counter)

    def check(self, name: str, ok: bool, what: str) -> None:
        self.checked[name] += 1
        if not ok:
            self.violations.append(f"seed {self.scenario.seed} [{name}] {what}")


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except FileNotFoundError:
        return []


def _monitor(folder: Path, stop: threading.Event) -> None:
    killed: set[str] = set()
    while not stop.wait(0.005):
        for pid_file in folder.glob("kill-*.pid"):
            if pid_file.name not in killed:
                killed.add(pid_file.name)
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid_file.read_text()), signal.SIGKILL)


def _pids(folder: Path, n: int) -> set[int]:
    return {int(p) for i in range(n) for p in _lines(folder / f"{i}.begin")}


def _check_gone(report: RunReport, pids: set[int], exclude: int) -> None:
    pids.discard(exclude)
    end = time.monotonic() + 5.0
    while not all(map(pid_gone, pids)) and time.monotonic() < end:
        time.sleep(0.01)
    alive = sorted(p for p in pids if not pid_gone(p))
    report.check("no-orphans", not alive, f"processes {alive} outlived the executor")


def _allowed(kind: str, ending: str, error: BaseException | None) -> bool:
    stopping = ending in ("stop_running", "both")
    if isinstance(error, sv.StepCancelledError):
        return stopping
    if kind == "raise":
        return isinstance(error, ValueError)
    if kind == "kill":
        return isinstance(error, sv.WorkerCrashedError)
    return error is None


def _in_process(scenario: ExecutorScenario, folder: Path, report: RunReport) -> None:
    ends: Counter[int] = Counter()
    lock = threading.Lock()
    stop = threading.Event()
    monitor = threading.Thread(target=_monitor, args=(folder, stop), name="chaos-monitor")
    monitor.start()
    try:
        executor = sv.Executor(scenario.workers, executor=scenario.executor, kill_grace=0.2)
        futures: list[concurrent.futures.Future[Any]] = []
        for index, (kind, seconds) in enumerate(scenario.calls):
            future = executor.submit(call, str(folder), index, kind, seconds)

            def ended(_: object, index: int = index) -> None:
                with lock:
                    ends[index] += 1

            future.add_done_callback(ended)
            futures.append(future)
        time.sleep(scenario.delay)
        executor.shutdown(
            wait=True,
            cancel_futures=scenario.ending in ("cancel_futures", "both"),
            stop_running=scenario.ending in ("stop_running", "both"),
        )
    finally:
        stop.set()
        monitor.join()
    for index, (future, (kind, _)) in enumerate(zip(futures, scenario.calls, strict=True)):
        began = len(_lines(folder / f"{index}.begin"))
        report.check(
            "once", future.done() and ends[index] == 1, f"call {index} ended {ends[index]} times"
        )
        report.check("ran-once", began <= 1, f"call {index} began {began} times")
        if not future.done():
            continue
        if future.cancelled():
            report.check(
                "outcome", scenario.ending in ("cancel_futures", "both"), f"call {index} cancelled"
            )
            report.check("not-started", began == 0, f"call {index} was cancelled after it began")
            continue
        error = future.exception()
        ok = _allowed(kind, scenario.ending, error) and (
            error is not None or future.result() == index * 2
        )
        report.check("outcome", ok, f"call {index} ({kind}) ended with {error!r}")
        if scenario.ending == "cancel_futures":
            report.check(
                "not-started",
                not isinstance(error, sv.StepCancelledError),
                f"call {index} began and was stopped by cancel_futures",
            )
    _check_gone(report, _pids(folder, len(scenario.calls)), exclude=os.getpid())


_EXIT_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
import stepvisor as sv
from tests.chaos.executors import call
ex = sv.Executor({workers}, executor={executor!r})
for index, (kind, seconds) in enumerate({calls!r}):
    ex.submit(call, {folder!r}, index, kind, seconds)
print("submitted", flush=True)
"""


def _at_exit(scenario: ExecutorScenario, folder: Path, report: RunReport) -> None:
    script = _EXIT_SCRIPT.format(
        repo=_REPO,
        workers=scenario.workers,
        executor=scenario.executor,
        calls=scenario.calls,
        folder=str(folder),
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=_BOUND * 2,
        check=False,
    )
    report.check(
        "exit",
        done.returncode == 0 and done.stdout.strip() == "submitted" and not done.stderr,
        f"the program exited {done.returncode}: {done.stdout!r} {done.stderr[-500:]!r}",
    )
    for index, (kind, _) in enumerate(scenario.calls):
        began = len(_lines(folder / f"{index}.begin"))
        ended = len(_lines(folder / f"{index}.end"))
        report.check("ran-once", began == 1, f"call {index} began {began} times")
        want = 0 if kind == "raise" else 1
        report.check("exit", ended == want, f"call {index} ({kind}) ended {ended} times")
    _check_gone(report, _pids(folder, len(scenario.calls)), exclude=-1)


def run_one(seed: int, workdir: Path | None = None) -> RunReport:
    """Run the scenario of ``seed`` and check it."""
    scenario = generate(seed)
    report = RunReport(scenario)
    with tempfile.TemporaryDirectory(dir=workdir, prefix=f"sv-chaos-ex-{seed}-") as tmp:
        folder = Path(tmp)
        if scenario.ending == "exit":
            _at_exit(scenario, folder, report)
        else:
            _in_process(scenario, folder, report)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.executors", description=__doc__)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=random.randrange(1 << 32))
    parser.add_argument("--replay", type=int, default=None, help="run this one seed")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    seeds = (
        [args.replay] if args.replay is not None else list(range(args.seed, args.seed + args.runs))
    )
    checked: Counter[str] = Counter()
    endings: Counter[str] = Counter()
    failed = 0
    for seed in seeds:
        report = run_one(seed)
        checked.update(report.checked)
        endings[f"{report.scenario.executor}/{report.scenario.ending}"] += 1
        if args.verbose:
            print(report.scenario)
        for violation in report.violations:
            failed += 1
            print(violation)
    print(f"{len(seeds)} runs (first seed {seeds[0]}): {dict(sorted(endings.items()))}")
    print(f"checks: {dict(sorted(checked.items()))}; violations: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
