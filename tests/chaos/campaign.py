"""A campaign (many runs from one seed, their figures added up) and its command line.

``python -m tests.chaos`` runs :func:`main`.
"""

from __future__ import annotations

import argparse
import random
import secrets
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.chaos.oracle import Violation
from tests.chaos.runner import RunReport, drive, run_one
from tests.chaos.scenario import FAULTS


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

    def add(self, report: RunReport) -> None:
        self.runs += 1
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
        lines = [
            f"stepvisor chaos: {self.runs} runs in {self.seconds:.1f} s "
            f"(campaign seed {self.seed}), {len(self.violations)} violations",
            f"  steps: {sum(steps.values())} ({_pairs(steps)})",
            f"  runs: {_pairs(self.scenarios)}",
            f"  run statuses: {_pairs(self.statuses)}",
            f"  step faults injected: {sum(step_faults.values())} ({_pairs(step_faults)})",
            f"  run faults injected: {_pairs(run_faults)}",
            f"  invariant checks: {sum(self.checks.values())} ({_pairs(self.checks)})",
            f"  abandoned daemon threads (excepted from the thread check): {self.abandoned}",
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tests.chaos``: 0 when every invariant held, 1 otherwise, 2 on bad usage."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.drive is not None:
        if args.drive_dir is None:
            parser.error("--drive needs --drive-dir")
        return drive(args.drive, args.drive_dir, resume=args.drive_resume)
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
