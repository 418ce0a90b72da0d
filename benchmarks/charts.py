"""Charts of the benchmark figures: stepvisor beside its peers, as PNG files.

A table says how much; a chart says at a glance who is ahead and by how far.
The charts are drawn from the harness's rows (the JSON's ``rows``) by this
module alone, offline, with matplotlib's Agg renderer (no display, no pyplot
state, no network)::

    rows: scenario, system, metric, value, unit, status
        │  CHARTS: which scenarios are drawn, to which file, under which title
        ▼
    one figure per scenario, one panel per metric, one bar per system
    (stepvisor's bars in one colour, the peers' in another; a peer that was
    not measured is named with its status instead of a bar)
        │  written to a temporary file beside the target, then renamed over it
        ▼
    <dir>/overhead.png  <dir>/data.png  <dir>/cancel.png

``python -m benchmarks`` writes them beside its JSON; ``python -m
benchmarks.charts [JSON]`` draws them again from a JSON already written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["CHARTS", "Chart", "missing_reason", "write_charts"]

#: Where ``python -m benchmarks.charts`` reads the figures unless told otherwise.
DEFAULT_JSON: Final = Path(__file__).resolve().parent / "results" / "latest.json"


@dataclass(frozen=True, slots=True)
class Chart:
    """One scenario drawn as one PNG: ``<file>.png`` titled ``title``."""

    scenario: str
    file: str
    title: str


#: The scenarios a reader compares first: what a step costs, what moving data
#: costs, and how long a cancel takes to leave nothing behind.
CHARTS: Final = (
    Chart("overhead", "overhead", "Per-step overhead: no-op steps (lower is better)"),
    Chart("data", "data", "Data movement: one array to four readers (lower is better)"),
    Chart("cancel", "cancel", "Cancel latency: until nothing is left running (lower is better)"),
)

_OURS: Final = "#1f6feb"  # stepvisor's bars
_PEER: Final = "#9aa4ae"  # everyone else's
#: Above this spread of values in one panel, the axis is logarithmic (else the
#: fastest bars are too short to see next to a slow peer).
_LOG_SPREAD: Final = 30.0


def missing_reason() -> str | None:
    """Why charts cannot be drawn here (matplotlib absent), or ``None`` if they can."""
    try:
        import matplotlib  # noqa: PLC0415, F401 - only the charts need it
    except ImportError:
        return "matplotlib is not installed: pip install -e '.[bench]'"
    return None


def write_charts(rows: Sequence[Mapping[str, Any]], out_dir: Path) -> list[Path]:
    """Draw each chart of ``CHARTS`` whose scenario has rows; return the files written.

    Each file appears whole or not at all (a temporary file renamed over it), so
    a reader never sees half a PNG and an error leaves no temporary file behind.
    """
    written: list[Path] = []
    for chart in CHARTS:
        mine = [row for row in rows if row.get("scenario") == chart.scenario]
        if mine:
            written.append(_write(chart, mine, out_dir))
    return written


# -- drawing ----------------------------------------------------------------------------


def _panels(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """The rows by metric, metrics and systems in the order the scenario gave them."""
    panels: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        panels.setdefault(str(row["metric"]), []).append(row)
    return panels


def _label(value: float, unit: str) -> str:
    if value >= 100:
        text = f"{value:,.0f}"
    elif value >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.3g}"
    return f"{text} {unit}".strip()


def _measured(row: Mapping[str, Any]) -> float | None:
    value = row.get("value")
    if row.get("status", "ok") != "ok" or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) and value > 0 else None


def _draw_panel(ax: Axes, metric: str, rows: Sequence[Mapping[str, Any]]) -> None:
    values = [_measured(row) for row in rows]
    shown = [v for v in values if v is not None]
    log = bool(shown) and max(shown) / min(shown) > _LOG_SPREAD
    units = {str(row.get("unit", "")) for row in rows if _measured(row) is not None}
    unit = units.pop() if len(units) == 1 else ""
    positions = list(range(len(rows)))
    ax.barh(
        positions,
        [v or 0.0 for v in values],
        color=[_OURS if str(r["system"]).startswith("stepvisor") else _PEER for r in rows],
    )
    ax.set_yticks(positions, [str(row["system"]) for row in rows], fontsize=8)
    ax.invert_yaxis()  # the scenario's order, top to bottom
    if log:
        ax.set_xscale("log")
    floor = min(shown) / 2 if log and shown else 0.0
    for pos, row, value in zip(positions, rows, values, strict=True):
        text = _label(value, unit) if value is not None else str(row.get("status", "-"))
        ax.text(value or floor, pos, f" {text}", va="center", fontsize=8)
    if shown:  # room on the right for the last label
        ax.set_xlim(left=floor if log else 0.0, right=max(shown) * (4.0 if log else 1.3))
    scale = ", log scale" if log else ""
    ax.set_title(metric, fontsize=9, loc="left")
    ax.set_xlabel(f"{unit}{scale}".lstrip(", "), fontsize=8)
    ax.tick_params(axis="x", labelsize=8)


def _write(chart: Chart, rows: Sequence[Mapping[str, Any]], out_dir: Path) -> Path:
    from matplotlib.figure import Figure  # noqa: PLC0415 - the bench extra's, loaded on use

    panels = _panels(rows)
    bars = sum(len(p) for p in panels.values())
    fig = Figure(figsize=(8.0, 1.0 + 0.32 * bars + 0.55 * len(panels)), layout="constrained")
    axes = fig.subplots(
        len(panels), 1, squeeze=False, height_ratios=[len(p) + 1 for p in panels.values()]
    )
    for ax, (metric, panel) in zip(axes[:, 0], panels.items(), strict=True):
        _draw_panel(ax, metric, panel)
    fig.suptitle(chart.title, fontsize=11)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{chart.file}.png"
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{chart.file}.", suffix=".png.tmp")
    try:
        os.fchmod(fd, 0o644)  # as a file written with open() would be (mkstemp makes 0600)
        with os.fdopen(fd, "wb") as fh:
            # No "Software" entry: the same rows give the same bytes on any matplotlib.
            fig.savefig(fh, format="png", dpi=110, metadata={"Software": None})
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return target


# -- command line ----------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.charts [JSON] [--out DIR]``: draw the charts of a JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.charts",
        description="Draw the benchmark charts (PNG) from the figures python -m benchmarks wrote.",
    )
    parser.add_argument("json", nargs="?", type=Path, default=DEFAULT_JSON, metavar="JSON")
    parser.add_argument("--out", type=Path, metavar="DIR", help="default: beside the JSON")
    args = parser.parse_args(argv)
    reason = missing_reason()
    if reason is not None:
        print(f"no charts: {reason}", file=sys.stderr)
        return 1
    payload = json.loads(args.json.read_text())
    for path in write_charts(payload["rows"], args.out or args.json.parent):
        print(f"chart written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
