"""The benchmark harness: find the scenarios, run them, judge them, report them.

A benchmark is only worth its comparison, so every scenario measures stepvisor
*and* what a user would pick instead (``concurrent.futures``, asyncio, Dask,
Ray) in the same run, on the same machine, under the same load, and the harness
prints the ratio between them beside the stated target::

    discover benchmarks/scenario_*.py  ──>  run(quick=...) -> [Row, ...]
        (a scenario that raises becomes one "failed" row, never a crash)
                                      │
    ratio: stepvisor's value / this row's value (same scenario and metric)
    verdict: the row's Target checked against its value or its ratio
                                      │
                  markdown table on stdout + JSON (figures, versions, machine, load)
                  + charts beside the JSON: overhead, data, cancel .png (charts.py)

The scenario module contract (also used by modules other people add):
``NAME`` (str), ``TITLE`` (str), ``run(*, quick: bool) -> list[Row]`` and,
optionally, ``ORDER`` (int, where it sorts in the table; default 100).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import operator
import pkgutil
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Final, Literal

from benchmarks.charts import missing_reason, write_charts
from benchmarks.environment import environment, loadavg

__all__ = [
    "REFERENCE",
    "Result",
    "Row",
    "Scenario",
    "Target",
    "broken_scenario",
    "discover",
    "failed_row",
    "main",
    "render_table",
    "resolve",
    "run_in_process",
    "run_scenarios",
    "scenario_from",
]

#: The system every other row of the same scenario and metric is compared to.
REFERENCE: Final = "stepvisor"
#: Where ``python -m benchmarks`` writes its figures unless told otherwise.
DEFAULT_OUT: Final = Path(__file__).resolve().parent / "results" / "latest.json"

Status = Literal["ok", "not installed", "not available", "failed"]
Verdict = Literal["pass", "miss", "n/a", ""]

_OPS: Final[dict[str, Callable[[float, float], bool]]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """A stated goal for one row: ``value`` or ``ratio`` compared with ``limit``.

    ``text`` is what the table shows, e.g. ``"ratio <= 4"``; it should read as
    the goal itself so a reader need not look anything up.
    """

    on: Literal["value", "ratio"]
    op: Literal["<", "<=", ">", ">="]
    limit: float
    text: str = ""

    def __post_init__(self) -> None:
        if self.op not in _OPS:
            raise ValueError(f"Target.op must be one of {sorted(_OPS)}, got {self.op!r}")
        if not self.text:
            object.__setattr__(self, "text", f"{self.on} {self.op} {self.limit:g}")

    def judge(self, value: float | None, ratio: float | None) -> Verdict:
        """``pass`` or ``miss``; ``n/a`` when the figure it needs was not measured."""
        figure = value if self.on == "value" else ratio
        if figure is None or math.isnan(figure):
            return "n/a"
        return "pass" if _OPS[self.op](figure, self.limit) else "miss"


@dataclass(frozen=True, slots=True, kw_only=True)
class Row:
    """One figure of one system in one scenario.

    ``value`` is ``None`` when nothing was measured (``status`` says why, and
    ``note`` carries the error of a failed baseline).  ``ratio`` is normally
    left ``None`` and computed by the harness as the stepvisor row's value
    divided by this row's value; set it to give a ratio of your own.
    """

    scenario: str
    system: str
    metric: str
    value: float | None
    unit: str
    note: str = ""
    ratio: float | None = None
    status: Status = "ok"
    target: Target | None = None


@dataclass(frozen=True, slots=True)
class Result:
    """A row with its ratio and verdict resolved."""

    row: Row
    ratio: float | None
    verdict: Verdict

    def as_json(self) -> dict[str, Any]:
        row = self.row
        return {
            "scenario": row.scenario,
            "system": row.system,
            "metric": row.metric,
            "value": row.value,
            "unit": row.unit,
            "ratio": self.ratio,
            "status": row.status,
            "note": row.note,
            "target": row.target.text if row.target else None,
            "verdict": self.verdict or None,
        }


@dataclass(frozen=True, slots=True)
class Scenario:
    """A discovered scenario module."""

    name: str
    title: str
    order: int
    run: Callable[..., list[Row]]
    module: str


# -- discovery -------------------------------------------------------------------------


def scenario_from(module: ModuleType) -> Scenario:
    """The scenario ``module`` defines; ``TypeError`` naming the contract if it does not."""
    name = getattr(module, "NAME", None)
    title = getattr(module, "TITLE", None)
    run = getattr(module, "run", None)
    if not isinstance(name, str) or not isinstance(title, str) or not callable(run):
        raise TypeError(
            f"{module.__name__} is not a scenario: it must define NAME (str), TITLE (str) "
            "and run(*, quick: bool) -> list[Row]"
        )
    order = getattr(module, "ORDER", 100)
    return Scenario(name, title, int(order), run, module.__name__)


def discover(package: str = "benchmarks") -> list[Scenario]:
    """Every ``<package>/scenario_*.py`` module, in ``ORDER`` then name order.

    A module that fails to import is reported as a scenario whose run raises
    that error, so it shows up in the table as failed instead of vanishing.
    """
    pkg = importlib.import_module(package)
    found: list[Scenario] = []
    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("scenario_"):
            continue
        qualified = f"{package}.{info.name}"
        try:
            found.append(scenario_from(importlib.import_module(qualified)))
        except Exception as exc:
            found.append(broken_scenario(info.name.removeprefix("scenario_"), qualified, exc))
    return sorted(found, key=lambda s: (s.order, s.name))


def broken_scenario(name: str, module: str, exc: Exception) -> Scenario:
    """A scenario in place of ``module``, which failed to import: its run says why.

    So that a broken module shows in the table as one failed row rather than vanishing.
    """

    def run(*, quick: bool) -> list[Row]:
        del quick
        raise RuntimeError(f"could not load {module}: {type(exc).__name__}: {exc}") from exc

    return Scenario(name, f"{module} (could not be loaded)", 1000, run, module)


# -- resolving ratios and verdicts -------------------------------------------------------


def _reference_values(rows: Iterable[Row]) -> dict[tuple[str, str], float]:
    refs: dict[tuple[str, str], float] = {}
    for row in rows:
        if row.system == REFERENCE and row.value is not None:
            refs.setdefault((row.scenario, row.metric), row.value)
    return refs


def resolve(rows: Sequence[Row]) -> list[Result]:
    """Give every row its ratio (explicit, else stepvisor / this) and its verdict."""
    refs = _reference_values(rows)
    out: list[Result] = []
    for row in rows:
        ratio = row.ratio
        ref = refs.get((row.scenario, row.metric))
        if ratio is None and row.system != REFERENCE and row.value and ref is not None:
            ratio = ref / row.value
        verdict: Verdict = row.target.judge(row.value, ratio) if row.target else ""
        out.append(Result(row, ratio, verdict))
    return out


# -- running ---------------------------------------------------------------------------


def failed_row(scenario: Scenario, exc: BaseException) -> Row:
    """The one row a scenario that raised ``exc`` shows, naming the error and where."""
    last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" (at {last[0].filename}:{last[0].lineno})" if last else ""
    return Row(
        scenario=scenario.name,
        system="(scenario)",
        metric="run",
        value=None,
        unit="",
        status="failed",
        note=f"{type(exc).__name__}: {exc}{where}",
    )


def run_in_process(scenario: Scenario, *, quick: bool) -> list[Row]:
    """``scenario.run`` in this interpreter; one failed row if it raises."""
    try:
        return list(scenario.run(quick=quick))
    except Exception as exc:
        return [failed_row(scenario, exc)]


def run_scenarios(
    scenarios: Sequence[Scenario],
    *,
    quick: bool,
    progress: Callable[[str], None] | None = None,
    runner: Callable[..., list[Row]] = run_in_process,
) -> tuple[list[Row], list[dict[str, Any]]]:
    """Run each scenario with ``runner``; return all rows and, per scenario, its time and load.

    ``runner(scenario, quick=...)`` is :func:`run_in_process` unless told
    otherwise; ``python -m benchmarks`` gives :func:`benchmarks.isolate.run_isolated`.
    """
    rows: list[Row] = []
    info: list[dict[str, Any]] = []
    for scenario in scenarios:
        if progress:
            progress(f"running {scenario.name}: {scenario.title} ...")
        load_before = loadavg()
        started = time.perf_counter()
        produced = runner(scenario, quick=quick)
        seconds = time.perf_counter() - started
        rows.extend(produced)
        info.append(
            {
                "name": scenario.name,
                "title": scenario.title,
                "seconds": round(seconds, 3),
                "loadavg_before": load_before,
                "loadavg_after": loadavg(),
            }
        )
        if progress:
            progress(f"  {scenario.name} took {seconds:.1f} s")
    return rows, info


# -- reporting -------------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0 or math.isnan(value) or math.isinf(value):
        return f"{value:g}"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 0.01:
        return f"{value:.3g}"
    return f"{value:.2e}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _value_cell(result: Result) -> str:
    row = result.row
    if row.status != "ok":
        return row.status
    return f"{_fmt(row.value)} {row.unit}".strip()


def _target_cell(result: Result) -> str:
    target = result.row.target
    if target is None:
        return ""
    return f"{target.text}: **{result.verdict}**"


def render_table(results: Sequence[Result], titles: dict[str, str]) -> str:
    """A markdown table, one line per row, grouped by scenario in run order."""
    lines = [
        "| scenario | metric | system | value | stepvisor ÷ this | target | note |",
        "|---|---|---|---|---|---|---|",
    ]
    last = ""
    for result in results:
        row = result.row
        scenario = row.scenario if row.scenario != last else ""
        last = row.scenario
        if scenario:
            scenario = f"{scenario}: {titles.get(scenario, '')}".rstrip(": ")
        ratio = f"{_fmt(result.ratio)}x" if result.ratio is not None else ""
        cells = [
            scenario,
            row.metric,
            row.system,
            _value_cell(result),
            ratio,
            _target_cell(result),
            row.note,
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


# -- command line ----------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run stepvisor's benchmarks beside the baselines users would pick instead.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="run every scenario small (about a minute in all)"
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="run only this scenario (repeat for several); see --list",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        metavar="PATH",
        help=f"where to write the JSON figures (default: {DEFAULT_OUT})",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run the scenarios in this interpreter instead of a fresh child each (for profiling)",
    )
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    return parser


def _select(scenarios: list[Scenario], only: Sequence[str] | None) -> list[Scenario]:
    if not only:
        return scenarios
    known = {s.name for s in scenarios}
    unknown = [name for name in only if name not in known]
    if unknown:
        raise SystemExit(
            f"unknown scenario(s): {', '.join(unknown)}; choose from {', '.join(sorted(known))}"
        )
    return [s for s in scenarios if s.name in only]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks``: run, print the table, write the JSON; 0 unless it broke."""
    args = _parser().parse_args(argv)
    scenarios = discover()
    if args.list:
        for s in scenarios:
            print(f"{s.name:12} {s.title}")
        return 0
    chosen = _select(scenarios, args.only)

    def progress(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    load_start = loadavg()
    started = time.perf_counter()
    runner = run_in_process
    if not args.in_process:
        from benchmarks.isolate import run_isolated  # noqa: PLC0415 - it imports this module

        runner = run_isolated
    rows, info = run_scenarios(chosen, quick=args.quick, progress=progress, runner=runner)
    results = resolve(rows)
    env = environment()
    env["machine"]["loadavg_start"] = load_start
    env["machine"]["loadavg_end"] = loadavg()
    titles = {s.name: s.title for s in chosen}
    table = render_table(results, titles)
    payload = {
        "mode": "quick" if args.quick else "full",
        "seconds": round(time.perf_counter() - started, 3),
        **env,
        "scenarios": info,
        "rows": [r.as_json() for r in results],
        "table_markdown": table,
    }
    _write_json(args.out, payload)
    charts = _charts(payload["rows"], args.out.parent)
    machine = env["machine"]
    print(
        f"stepvisor {env['versions']['stepvisor']} on {machine['cores']} cores, "
        f"{machine['python']}, {machine['platform']}; load {load_start} -> "
        f"{machine['loadavg_end']}; mode {payload['mode']}\n"
    )
    print(table)
    print(f"\nfigures written to {args.out}")
    print(charts)
    return 0


def _charts(rows: list[dict[str, Any]], out_dir: Path) -> str:
    """Draw the charts beside the JSON; say where, or why there are none."""
    reason = missing_reason()
    if reason is not None:
        return f"no charts: {reason}"
    written = write_charts(rows, out_dir)
    lines = [f"chart written to {path}" for path in written]
    return "\n".join(lines) or "no charts for these scenarios"


def replace_row(row: Row, **changes: Any) -> Row:
    """``dataclasses.replace`` for rows, typed."""
    return dataclasses.replace(row, **changes)
