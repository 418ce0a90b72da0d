"""A campaign (many runs from one seed, their figures added up) and its command line.

``python -m tests.chaos`` runs :func:`main`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import random
import secrets
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from tests import store_faults
from tests.chaos.map_checks import check_map_lists, map_ran
from tests.chaos.observe import Outcome
from tests.chaos.oracle import Checker, Violation, check_artifacts
from tests.chaos.programs import drive
from tests.chaos.runner import (
    RunContext,
    RunReport,
    count_faults,
    db_path,
    reference_artifacts,
    run_in_process,
    run_with_driver,
)
from tests.chaos.scenario import (
    FAULTS,
    STORE_FAULTS_AFTER_KILL,
    STORE_FAULTS_IN_RUN,
    STORE_FAULTS_MOUNTED,
    build_workflow,
    generate,
)
from tests.chaos.steps import MARK_VAR
from tests.chaos.store_runs import run_after_kill_fault, run_race, run_with_store_fault

#: The size of the tmpfs a full-disk or read-only run keeps its store on.
DISK_KIB = 4096


# -- one run -------------------------------------------------------------------------------------


@functools.cache
def mount_problem() -> str | None:
    """Why this program cannot mount a tmpfs (for the full-disk and read-only faults), or None."""
    probe = Path(tempfile.mkdtemp(prefix="stepvisor-chaos-mount-"))
    try:
        return store_faults.mounting_works(probe)
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def _execute(ctx: RunContext) -> Outcome | None:
    s = ctx.scenario
    if s.store_fault in STORE_FAULTS_IN_RUN:
        return run_with_store_fault(ctx)
    if s.store_fault in STORE_FAULTS_AFTER_KILL:
        return run_after_kill_fault(ctx)
    if s.driver == "race":
        return run_race(ctx)
    if s.driver != "none":
        return run_with_driver(ctx)
    return run_in_process(ctx)


def run_one(seed: int, workdir: Path, *, token: str | None = None) -> RunReport:
    """Generate, execute and check the run of ``seed`` in a fresh directory under ``workdir``.

    A fault that needs a tmpfs where none can be mounted is not injected: the
    report says so (``not_run``), and the run goes without it.
    """
    generated = generate(seed)
    scenario = generated
    report = RunReport(seed, generated)
    if generated.store_fault in STORE_FAULTS_MOUNTED and mount_problem() is not None:
        report.not_run[generated.store_fault] = f"not run: {mount_problem()}"
        scenario = replace(generated, store_fault="none", fault_at=0)
    checker = Checker(seed)
    run_dir = workdir / f"run-{seed}"
    (run_dir / "effects").mkdir(parents=True)
    (run_dir / "pids").mkdir()
    wf = build_workflow(scenario, run_dir)
    ctx = RunContext(
        scenario,
        run_dir,
        token or secrets.token_hex(4),
        checker,
        report,
        wf,
        wf.graph.order,
        db_path(run_dir, generated),
    )
    count_faults(scenario, report.faults)
    started = time.monotonic()
    previous_mark = os.environ.get(MARK_VAR)
    try:
        with contextlib.ExitStack() as mounted:
            if scenario.store_fault in STORE_FAULTS_MOUNTED:
                mounted.enter_context(store_faults.small_disk(ctx.db.parent, size_kib=DISK_KIB))
            outcome = _execute(ctx)
        if outcome is not None:
            report.status = outcome.status
            if outcome.status == "succeeded" or map_ran(scenario, outcome):
                reference = reference_artifacts(scenario)
                check_artifacts(checker, outcome, reference)
                check_map_lists(checker, scenario, outcome, reference)
    finally:
        if previous_mark is None:
            os.environ.pop(MARK_VAR, None)
        else:
            os.environ[MARK_VAR] = previous_mark
        report.seconds = time.monotonic() - started
        report.checks = checker.counts
        report.violations = checker.violations
        report.faults.update({f"tolerated:{k}": n for k, n in checker.tolerated.items()})
        shutil.rmtree(run_dir, ignore_errors=True)
    return report


# -- a campaign ----------------------------------------------------------------------------------


@dataclass(slots=True)
class CampaignSummary:
    """The figures of a campaign."""

    seed: int
    runs: int = 0
    seconds: float = 0.0
    faults: Counter[str] = field(default_factory=Counter)
    checks: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    scenarios: Counter[str] = field(default_factory=Counter)
    violations: list[Violation] = field(default_factory=list)
    abandoned: int = 0
    slowest: tuple[float, int] = (0.0, 0)
    #: Fault kind -> how many runs did not get it, and why.
    not_run: Counter[str] = field(default_factory=Counter)
    not_run_why: dict[str, str] = field(default_factory=dict)

    def add(self, report: RunReport) -> None:
        self.runs += 1
        for kind, why in report.not_run.items():
            self.not_run[kind] += 1
            self.not_run_why[kind] = why
        self.faults.update(report.faults)
        self.checks.update(report.checks)
        self.statuses[report.status] += 1
        s = report.scenario
        self.scenarios[f"store:{s.store}"] += 1
        self.scenarios[f"on_failure:{s.on_failure}"] += 1
        if s.driver != "none":
            self.scenarios["driver"] += 1
        if s.cancel_at is not None:
            self.scenarios["cancel"] += 1
        if s.store_fault != "none":
            self.scenarios["store_fault"] += 1
        if any(p.mapped for p in s.steps):
            self.scenarios["maps"] += 1
        self.violations.extend(report.violations)
        self.abandoned += report.abandoned
        self.slowest = max(self.slowest, (report.seconds, report.seed))

    def render(self) -> str:
        steps = {k.split(":")[1]: v for k, v in self.faults.items() if k.startswith("executor:")}
        step_faults = {k: v for k, v in self.faults.items() if k in FAULTS and k != "ok"}
        run_faults = {
            k: v for k, v in self.faults.items() if ":" in k and not k.startswith("executor:")
        }
        run_faults |= {k: v for k, v in self.faults.items() if k.startswith("driver_")}
        maps = {k.split(":", 1)[1]: v for k, v in self.faults.items() if k.startswith("map:")}
        tolerated = {
            k.split(":", 1)[1]: v for k, v in self.faults.items() if k.startswith("tolerated:")
        }
        for k in maps:
            run_faults.pop(f"map:{k}", None)
        for k in tolerated:
            run_faults.pop(f"tolerated:{k}", None)
        store = {
            k.split(":", 1)[1]: v for k, v in self.faults.items() if k.startswith("store_fault:")
        }
        for k in store:
            run_faults.pop(f"store_fault:{k}", None)
        injected = {k: v for k, v in store.items() if ":" not in k}
        lock_brief = {k: v for k, v in run_faults.items() if k.startswith("lock_brief:")}
        for k in lock_brief:
            run_faults.pop(k)
        owners = {k: v for k, v in run_faults.items() if k in ("driver:race", "driver:resume-now")}
        not_run = [
            f"{kind} {self.not_run[kind]} ({self.not_run_why[kind]})"
            for kind in sorted(self.not_run)
        ]
        lines = [
            f"stepvisor chaos: {self.runs} runs in {self.seconds:.1f} s "
            f"(campaign seed {self.seed}), {len(self.violations)} violations",
            f"  steps: {sum(steps.values())} ({_pairs(steps)})",
            f"  runs: {_pairs(self.scenarios)}",
            f"  run statuses: {_pairs(self.statuses)}",
            f"  step faults injected: {sum(step_faults.values())} ({_pairs(step_faults)})",
            f"  run faults injected: {_pairs(run_faults)}",
            f"  store faults injected: {sum(injected.values())} ({_pairs(injected)}); "
            f"other outcomes: {_pairs({k: v for k, v in store.items() if ':' in k})}; "
            f"brief locks released: {_pairs(lock_brief)}",
            f"  store faults not run: {'; '.join(not_run) or 'none'}",
            f"  ownership runs: {_pairs(owners)} (each after a SIGKILL of the owner)",
            f"  maps: {self.scenarios['maps']} runs with mapped steps ({_pairs(maps)})",
            f"  invariant checks: {sum(self.checks.values())} ({_pairs(self.checks)})",
            f"  abandoned daemon threads (excepted from the thread check): {self.abandoned}",
            f"  steps the oracle let off for load, each only as its record says: "
            f"{_pairs(tolerated)}",
            f"  slowest run: {self.slowest[0]:.2f} s (seed {self.slowest[1]})",
        ]
        for violation in self.violations[:50]:
            lines.append(f"  VIOLATION {violation}")
        if self.violations:
            lines.append("  replay one: python -m tests.chaos --replay SEED -v")
        return "\n".join(lines)


def _pairs(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def run_seeds(seed: int, runs: int) -> Iterator[int]:
    """The run seeds of a campaign: a function of the campaign seed alone."""
    rng = random.Random(seed)
    for _ in range(runs):
        yield rng.getrandbits(40)


def run_campaign(
    *,
    runs: int,
    seed: int,
    budget_seconds: float | None = None,
    progress: Callable[[RunReport, CampaignSummary], None] | None = None,
    seeds: Sequence[int] | None = None,
) -> CampaignSummary:
    """Run ``runs`` scenarios (fewer if ``budget_seconds`` runs out) and add up the figures."""
    summary = CampaignSummary(seed=seed)
    started = time.monotonic()
    token = secrets.token_hex(4)
    workdir = Path(tempfile.mkdtemp(prefix="stepvisor-chaos-"))
    try:
        for run_seed in seeds if seeds is not None else run_seeds(seed, runs):
            if budget_seconds is not None and time.monotonic() - started > budget_seconds:
                break
            report = run_one(run_seed, workdir, token=token)
            summary.add(report)
            summary.seconds = time.monotonic() - started
            if progress is not None:
                progress(report, summary)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        summary.seconds = time.monotonic() - started
    return summary


# -- command line --------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.chaos",
        description="Run random workflows with random faults and check stepvisor's invariants "
        "after each; exit 1 if any is broken.",
    )
    parser.add_argument("--runs", type=int, default=100, help="workflows to run (default 100)")
    parser.add_argument("--seed", type=int, default=None, help="campaign seed (default: random)")
    parser.add_argument(
        "--budget-seconds",
        type=float,
        default=None,
        help="start no new run after this many seconds",
    )
    parser.add_argument(
        "--replay",
        type=int,
        action="append",
        default=None,
        metavar="SEED",
        help="run only the run with this run seed (repeatable)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="print a line per run")
    parser.add_argument("--drive", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--drive-dir", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--drive-resume", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--drive-race", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tests.chaos``: 0 when every invariant held, 1 otherwise, 2 on bad usage."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.drive is not None:
        if args.drive_dir is None:
            parser.error("--drive needs --drive-dir")
        return drive(args.drive, args.drive_dir, resume=args.drive_resume, race=args.drive_race)
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")
    if args.budget_seconds is not None and not args.budget_seconds > 0:
        parser.error(f"--budget-seconds must be a positive number, got {args.budget_seconds}")
    seed = args.seed if args.seed is not None else secrets.randbits(32)
    every = max(1, args.runs // 20)

    def progress(report: RunReport, summary: CampaignSummary) -> None:
        if args.verbose or report.violations:
            print(report.line(), flush=True)
            for violation in report.violations:
                print(f"  VIOLATION {violation}", flush=True)
        elif summary.runs % every == 0:
            print(
                f"  {summary.runs}/{args.runs} runs, {len(summary.violations)} violations, "
                f"{summary.seconds:.0f} s",
                flush=True,
            )

    runs = len(args.replay) if args.replay else args.runs
    print(f"stepvisor chaos: campaign seed {seed}, {runs} runs", flush=True)
    summary = run_campaign(
        runs=runs,
        seed=seed,
        budget_seconds=args.budget_seconds,
        progress=progress,
        seeds=args.replay,
    )
    print(summary.render(), flush=True)
    return 1 if summary.violations else 0
