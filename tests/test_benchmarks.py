"""The benchmark harness: it runs, reports every row honestly, and leaves nothing behind.

The numbers themselves are not checked (they depend on the machine and its
load); what is checked is that the harness produces its table and JSON, that
ratios and verdicts are computed as documented, and that a baseline which is
missing or breaks is reported as such rather than hidden.  Runs of the real
scenarios happen in a subprocess, so their pools and threads end with it.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import stepvisor as sv
from benchmarks import common, harness, isolate
from benchmarks.common import Measured
from benchmarks.harness import Row, Scenario, Target
from benchmarks.scenario_makespan import Task, lower_bound, random_dag
from benchmarks.scenario_map import mapped_workflow
from benchmarks.scenario_map_chain import chain_tasks, chain_workflow, durations, policy_floor
from benchmarks.scenario_scale import _rss_figure, chains_and_fans, mapped

ROOT = Path(__file__).resolve().parent.parent
EXPECTED_SCENARIOS = {
    "overhead",
    "async",
    "executor",
    "cpu",
    "makespan",
    "deadline",
    "cancel",
    "scale",
    "retry_storm",
    "ray",
    "data",
    "runs",
    "map",
    "map_chain",
    "cache_hash",
}


def _row(system: str, value: float | None, *, metric: str = "m", **kw: object) -> Row:
    return Row(scenario="s", system=system, metric=metric, value=value, unit="µs", **kw)  # type: ignore[arg-type]


def _run_harness(tmp_path: Path, *args: str, timeout: float) -> tuple[str, dict[str, object]]:
    out = tmp_path / "figures.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", *args, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert isinstance(payload, dict)
    return done.stdout, payload


# -- ratios, targets, rows ------------------------------------------------------------------


def test_ratio_is_stepvisor_value_over_the_baseline_value_of_the_same_metric() -> None:
    rows = [
        _row("stepvisor", 300.0),
        _row("pool", 100.0),
        _row("pool", 50.0, metric="other"),
        _row("given", 100.0, ratio=7.0),
    ]
    ratios = [r.ratio for r in harness.resolve(rows)]
    assert ratios == [None, 3.0, None, 7.0]


def test_target_judges_value_or_ratio_and_says_na_without_a_figure() -> None:
    within = Target(on="ratio", op="<=", limit=4.0)
    assert within.judge(1.0, 3.9) == "pass"
    assert within.judge(1.0, 4.1) == "miss"
    assert within.judge(1.0, None) == "n/a"
    assert Target(on="value", op="<", limit=25.0).judge(26.0, None) == "miss"
    assert within.text == "ratio <= 4"


def test_missing_baseline_is_reported_not_installed_with_how_to_install_it() -> None:
    rows = common.probe(
        [_row("ghost", None)], lambda: [Measured(1.0)], requires=("no_such_module_xyz",)
    )
    assert [(r.status, r.value) for r in rows] == [("not installed", None)]
    assert "pip install no_such_module_xyz" in rows[0].note


def test_missing_part_of_stepvisor_is_reported_not_available() -> None:
    rows = common.probe(
        [_row("stepvisor", None)], lambda: [Measured(1.0)], requires=("stepvisor.no_such_part",)
    )
    assert rows[0].status == "not available"
    assert "stepvisor.no_such_part" in rows[0].note


def test_failing_baseline_is_reported_failed_with_its_error() -> None:
    def broken() -> list[Measured]:
        raise OSError("pool exploded")

    rows = common.probe([_row("pool", None), _row("pool", None, metric="n")], broken)
    assert [r.status for r in rows] == ["failed", "failed"]
    assert rows[0].note == "OSError: pool exploded"
    results = harness.resolve([*rows, _row("stepvisor", 1.0)])
    assert results[0].ratio is None


def test_probe_keeps_the_template_note_and_adds_the_measured_one() -> None:
    rows = common.probe([_row("pool", None, note="8 workers")], lambda: [Measured(2.0, "best")])
    assert (rows[0].value, rows[0].note) == (2.0, "8 workers; best")


def test_scenario_that_raises_becomes_one_failed_row_and_the_rest_still_run() -> None:
    def explode(*, quick: bool) -> list[Row]:
        raise RuntimeError("boom")

    def fine(*, quick: bool) -> list[Row]:
        return [_row("stepvisor", 1.0 if quick else 2.0)]

    scenarios = [Scenario("bad", "Bad", 1, explode, "x"), Scenario("good", "Good", 2, fine, "y")]
    rows, info = harness.run_scenarios(scenarios, quick=True)
    assert [(r.scenario, r.status) for r in rows] == [("bad", "failed"), ("s", "ok")]
    assert "RuntimeError: boom" in rows[0].note
    assert [i["name"] for i in info] == ["bad", "good"]


def test_a_row_comes_back_from_its_json_equal_with_or_without_its_target() -> None:
    plain = _row("pool", 2.5, note="n", status="failed")
    aimed = _row("stepvisor", None, target=Target(on="ratio", op=">=", limit=1.5, text="1.5x"))
    for row in (plain, aimed):
        assert isolate.row_from_json(json.loads(json.dumps(isolate.row_to_json(row)))) == row


def _probe() -> Scenario:
    return harness.scenario_from(importlib.import_module("tests.bench_probe"))


@pytest.mark.realtime
def test_an_isolated_scenario_runs_in_a_child_process_and_its_rows_come_back() -> None:
    rows = isolate.run_isolated(_probe(), quick=True, timeout=60)
    assert [(r.scenario, r.metric, r.note, r.status) for r in rows] == [
        ("probe", "pid", "quick", "ok")
    ]
    assert rows[0].value is not None
    assert rows[0].value != os.getpid()
    assert rows[0].target == Target(on="value", op=">", limit=0.0, text="a process id")


@pytest.mark.realtime
def test_an_isolated_scenario_that_raises_dies_or_cannot_load_becomes_one_failed_row(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STEPVISOR_BENCH_PROBE", "raise")
    raised = isolate.run_isolated(_probe(), quick=False, timeout=60)
    assert [(r.scenario, r.status) for r in raised] == [("probe", "failed")]
    assert "LookupError: the probe was told to raise" in raised[0].note
    monkeypatch.setenv("STEPVISOR_BENCH_PROBE", "exit")
    died = isolate.run_isolated(_probe(), quick=False, timeout=60)
    assert [(r.scenario, r.status) for r in died] == [("probe", "failed")]
    assert "exited with status 3" in died[0].note
    missing = Scenario("gone", "Gone", 1, lambda **_: [], "tests.no_such_scenario_module")
    unloadable = isolate.run_isolated(missing, quick=True, timeout=60)
    # Named after its module, as discover names a module it cannot import.
    assert [(r.scenario, r.status) for r in unloadable] == [("no_such_scenario_module", "failed")]
    assert "could not load tests.no_such_scenario_module: ModuleNotFoundError" in unloadable[0].note


def test_table_has_a_line_per_row_with_status_ratio_and_verdict() -> None:
    rows = [
        _row("stepvisor", 200.0),
        _row("pool", 100.0, target=Target(on="ratio", op="<=", limit=4.0, text="within 4x")),
        _row("ray", None, status="not installed"),
    ]
    table = harness.render_table(harness.resolve(rows), {"s": "Title"})
    lines = table.splitlines()
    assert len(lines) == 2 + len(rows)
    assert "| s: Title |" in lines[2]
    assert "2x" in lines[3]
    assert "within 4x: **pass**" in lines[3]
    assert "not installed" in lines[4]


# -- discovery and the command line ---------------------------------------------------------


def test_discover_finds_every_scenario_module_with_its_contract() -> None:
    found = harness.discover()
    assert {s.name for s in found} >= EXPECTED_SCENARIOS
    for scenario in found:
        assert scenario.module == f"benchmarks.scenario_{scenario.name}", scenario
        assert scenario.title


def test_unknown_scenario_name_is_refused_naming_the_choices(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"choose from .*makespan"):
        harness.main(["--only", "nope", "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()


# -- scenario building blocks ----------------------------------------------------------------


def test_lower_bound_is_the_larger_of_critical_path_and_work_over_parallelism() -> None:
    tasks = [Task("a", 1.0, ()), Task("b", 2.0, ("a",)), Task("c", 1.0, ())]
    assert lower_bound(tasks, parallel=2) == (3.0, 3.0, 2.0)
    assert lower_bound(tasks, parallel=1) == (4.0, 3.0, 4.0)


def test_random_dag_is_seeded_layered_and_a_valid_workflow() -> None:
    dag = random_dag(60, seed=7)
    assert dag == random_dag(60, seed=7)
    assert dag != random_dag(60, seed=8)
    assert len(dag) == 60
    assert all(0.005 <= t.seconds <= 0.05 for t in dag)
    wf = sv.Workflow("dag", [sv.Step(t.id, print, needs=t.needs) for t in dag])
    assert len(wf.steps) == 60


def test_scale_dag_has_exactly_the_requested_number_of_steps() -> None:
    steps = chains_and_fans(2_000)
    assert len(steps) == 2_000
    wf = sv.Workflow("scale", steps)
    assert sum(1 for s in wf.steps if not s.needs) == 100


def test_map_scenarios_build_the_workflows_they_describe() -> None:
    wf = mapped_workflow([0, 1, 2])
    assert [(s.id, s.map_over) for s in wf.steps] == [("each", (0, 1, 2))]
    assert [s.id for s in sv.Workflow("scale", mapped(7)).steps] == ["split", "each"]
    chained = chain_workflow([0.5, 0.1], barrier=False)
    walled = chain_workflow([0.5, 0.1], barrier=True)
    assert chained.steps[1].map_over == "a_out"
    assert chained.steps[1].requires == ()
    assert walled.steps[1].map_over == (0.5, 0.1)
    assert walled.steps[1].requires == ("a_out",)


def test_chained_maps_have_one_slow_item_in_twenty_and_the_bound_counts_both_steps() -> None:
    seconds = durations(40, 0.01)
    assert [i for i, s in enumerate(seconds) if s > 0.01] == [0, 20]
    tasks = chain_tasks([2.0, 1.0])
    assert [(t.id, t.needs) for t in tasks] == [
        ("a[0]", ()),
        ("a[1]", ()),
        ("b[0]", ("a[0]",)),
        ("b[1]", ("a[1]",)),
    ]
    assert lower_bound(tasks, parallel=2) == (4.0, 4.0, 3.0)


def test_policy_floor_runs_a_first_by_index_and_waits_for_all_of_a_behind_a_barrier() -> None:
    # One slot: every a in index order, then every b.
    assert policy_floor([2.0, 1.0], parallel=1, barrier=False) == 6.0
    # Two slots: b[1] runs beside a[0]; b[0] follows a[0] (2 + 2 s).
    assert policy_floor([2.0, 1.0], parallel=2, barrier=False) == 4.0
    # a goes first: a[2] (3 s) takes a slot before b[0] and b[1] do, then b[2]
    # follows it (1 + 3 + 3 s); behind a barrier b[0] and b[1] wait for a[2] too,
    # and b[2] then waits for a slot (4 + 1 + 3 s).
    assert policy_floor([1.0, 1.0, 3.0], parallel=2, barrier=False) == 7.0
    assert policy_floor([1.0, 1.0, 3.0], parallel=2, barrier=True) == 8.0


# -- real runs, in a subprocess ---------------------------------------------------------------


@pytest.mark.realtime
def test_only_runs_the_named_scenario_and_writes_versions_machine_and_load(
    tmp_path: Path,
) -> None:
    stdout, payload = _run_harness(tmp_path, "--quick", "--only", "makespan", timeout=100)
    rows = payload["rows"]
    assert isinstance(rows, list)
    assert {r["scenario"] for r in rows} == {"makespan"}
    assert {r["status"] for r in rows} <= {"ok", "not installed"}
    assert any(r["system"] == "stepvisor" and r["value"] > 0 for r in rows)
    versions = payload["versions"]
    machine = payload["machine"]
    assert isinstance(versions, dict)
    assert isinstance(machine, dict)
    assert versions["stepvisor"] == sv.__version__
    assert set(versions) == {"stepvisor", "python", "dask", "ray"}
    assert {"cores", "python", "platform", "date", "loadavg_start", "loadavg_end"} <= set(machine)
    assert "| makespan: " in stdout


@pytest.mark.slow
@pytest.mark.realtime
@pytest.mark.timeout(300)
def test_quick_mode_runs_every_scenario_and_prints_its_table_and_json(tmp_path: Path) -> None:
    stdout, payload = _run_harness(tmp_path, "--quick", timeout=280)
    rows = payload["rows"]
    assert isinstance(rows, list)
    assert {r["scenario"] for r in rows} >= EXPECTED_SCENARIOS
    assert payload["mode"] == "quick"
    for row in rows:
        if row["status"] == "ok":
            assert isinstance(row["value"], int | float), row
    # A baseline may fail on a given machine (and says so); a scenario or one of
    # stepvisor's own rows must not, or a broken scenario would pass unnoticed.
    ours = ("stepvisor", "(scenario)")
    broken = [r for r in rows if r["status"] == "failed" and r["system"].startswith(ours)]
    assert not broken, broken
    table = payload["table_markdown"]
    assert isinstance(table, str)
    assert table in stdout
    assert len(table.splitlines()) == 2 + len(rows)


def test_scale_memory_is_the_childs_own_peak_not_the_ru_maxrss_it_inherits() -> None:
    # A child of a 600 MB harness starts with ru_maxrss = 600 MB (Linux keeps it
    # across exec), so its ru_maxrss delta reads 0; VmHWM is reset by exec.
    timed = {
        "rss_before_mb": 20.0,
        "rss_peak_mb": 70.0,
        "maxrss_before_mb": 600.0,
        "maxrss_after_mb": 600.0,
    }
    figure = _rss_figure(timed, 10_000)
    assert figure.value == 50.0
    assert "ru_maxrss delta 0 MB" in figure.note


def test_list_schedule_is_the_policys_own_floor() -> None:
    from benchmarks.scenario_makespan import list_schedule  # noqa: PLC0415

    # Two slots: the long chain a -> b must start first, or the run takes longer.
    tasks = [
        Task("a", 2.0, ()),
        Task("c", 1.0, ()),
        Task("d", 1.0, ()),
        Task("b", 2.0, ("a",)),
    ]
    assert list_schedule(tasks, parallel=2) == 4.0  # a, then b, beside c then d
    assert list_schedule(tasks, parallel=1) == 6.0
    dag = random_dag(200, seed=2)
    bound = lower_bound(dag, parallel=8)[0]
    assert bound <= list_schedule(dag, parallel=8) < 1.1 * bound
