"""The joblib scenario times its two backends in turns, and one failing spares the other's row.

Timing stepvisor's runs and then loky's let one burst of load from other work
decide the ratio; the runs alternate instead.  What is checked is the order of
the runs and what each row reports, with fake runs (no joblib needed).
"""

from __future__ import annotations

from collections.abc import Callable

from benchmarks.harness import Row
from benchmarks.scenario_joblib import _alternated, _pair


def _timer(name: str, times: list[float], order: list[str]) -> Callable[[], float]:
    left = list(times)

    def once() -> float:
        order.append(name)
        return left.pop(0)

    return once


def _rows() -> list[Row]:
    return [
        Row(scenario="joblib", system=s, metric="m", value=None, unit="s")
        for s in ("stepvisor", "joblib (loky)")
    ]


def test_runs_alternate_after_one_untimed_warm_up_each_and_the_best_is_kept() -> None:
    order: list[str] = []
    ours = _timer("sv", [9.0, 3.0, 1.0, 2.0, 5.0], order)
    theirs = _timer("loky", [9.0, 4.0, 6.0, 7.0, 2.5], order)
    mine, other = _alternated(4, ours, theirs)
    assert order == ["sv", "loky", "sv", "loky", "loky", "sv", "sv", "loky", "loky", "sv"]
    assert (mine.value, other.value) == (1.0, 2.5)  # the warm-ups (9.0) are not figures
    assert mine.note == "best of 4 (3.000, 1.000, 2.000, 5.000)"


def test_a_failing_backend_leaves_the_other_row_its_figure() -> None:
    def broken() -> float:
        raise RuntimeError("loky broke")

    order: list[str] = []
    # Paired: its warm-up (8.0), then loky's warm-up fails.  Alone: warm-up (7.0), 3.0, 1.5.
    made = _timer("sv", [8.0, 7.0, 3.0, 1.5], order)
    rows = _pair(_rows(), lambda: made, lambda: broken, repeat=2, requires=())
    assert [(r.system, r.status) for r in rows] == [
        ("stepvisor", "ok"),
        ("joblib (loky)", "failed"),
    ]
    assert rows[0].value == 1.5
    assert order == ["sv"] * 4
    assert "loky broke" in rows[1].note


def test_both_working_give_both_figures_from_one_alternated_run() -> None:
    order: list[str] = []
    ours = _timer("sv", [5.0, 1.0], order)
    theirs = _timer("loky", [5.0, 2.0], order)
    rows = _pair(_rows(), lambda: ours, lambda: theirs, repeat=1, requires=())
    assert [(r.status, r.value) for r in rows] == [("ok", 1.0), ("ok", 2.0)]
    assert order == ["sv", "loky", "sv", "loky"]
