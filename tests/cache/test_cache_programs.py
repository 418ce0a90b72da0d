"""The cache across programs: runs in separate processes sharing one SQLite store.

Each run is a fresh ``python`` process importing a pipeline module written
into ``tmp_path``; what a run did is read back from the store, so the test
sees exactly what a user's second program would.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import stepvisor as sv
from stepvisor.store.sqlite import SQLiteStore
from tests.store.test_store_sqlite import make_v1_store

PIPELINE = """
import json, sys
import stepvisor as sv

def load(ctx):
    return {"rows": list(range(ctx.params["n"]))}

def features(ctx):
    return {"feats": [r * ctx.params["scale"] for r in ctx.inputs["rows"]]}

def score(ctx):
    return {"score": sum(ctx.inputs["feats"])}

wf = sv.Workflow("ml", [
    sv.Step("load", load, creates=["rows"], params={"n": int(sys.argv[2])}),
    sv.Step("features", features, requires=["rows"], creates=["feats"],
            params={"scale": int(sys.argv[3])}),
    sv.Step("score", score, requires=["feats"], creates=["score"]),
], settings=sv.Settings(cache=True))
result = sv.run(wf, store=sys.argv[1])
print(json.dumps({"run_id": result.run_id, "status": result.status}))
"""


def run_program(tmp_path: Path, store: Path, n: int, scale: int) -> str:
    script = tmp_path / "pipeline.py"
    script.write_text(PIPELINE)
    done = subprocess.run(
        [sys.executable, str(script), str(store), str(n), str(scale)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["status"] == "succeeded"
    return str(out["run_id"])


def test_a_second_program_reuses_the_first_ones_results_and_says_why_it_recomputes(
    tmp_path: Path,
) -> None:
    store_path = tmp_path / "runs.db"
    first = run_program(tmp_path, store_path, 5, 2)
    second = run_program(tmp_path, store_path, 5, 2)
    third = run_program(tmp_path, store_path, 5, 3)
    fourth = run_program(tmp_path, store_path, 5, 2)
    with SQLiteStore(store_path) as store:
        runs = {run_id: store.load(run_id) for run_id in (first, second, third, fourth)}
        entries = store.cache_list()
    assert {s: r.cache_note for s, r in runs[first].steps.items()} == dict.fromkeys(
        ("load", "features", "score"), "computed: no entry"
    )
    assert {s: r.reused_from for s, r in runs[second].steps.items()} == dict.fromkeys(
        ("load", "features", "score"), first
    )
    assert runs[second].outputs["score"] == {"score": 20}
    assert {s: r.cache_note for s, r in runs[third].steps.items()} == {
        "load": f"reused from run {first}",
        "features": "computed: parameter scale changed",
        "score": "computed: input feats changed",
    }
    assert runs[third].outputs["score"] == {"score": 30}
    # Going back to scale 2 finds the first entries again: entries are by key, not by step.
    assert {r.reused_from for r in runs[fourth].steps.values()} == {first}
    assert sorted(e.step_id for e in entries) == ["features", "features", "load", "score", "score"]


def test_a_store_from_before_the_cache_opens_reads_its_runs_and_caches(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    make_v1_store(path)
    with SQLiteStore(path) as store:
        old = store.load("old-run")
        assert old.steps["a"].reused_from is None
        assert old.steps["a"].cache_note is None

        def a(ctx: sv.StepContext) -> dict[str, int]:
            return {"x": 1}

        wf = sv.Workflow("w", [sv.Step("a", a, cache=True)])
        first = sv.run(wf, store=store)
        assert sv.run(wf, store=store).steps["a"].reused_from == first.run_id


def test_a_reused_step_stores_no_second_copy_and_a_resume_reads_its_outputs(
    tmp_path: Path,
) -> None:
    path = tmp_path / "runs.db"
    state = {"fail": True}

    def make(ctx: sv.StepContext) -> dict[str, list[int]]:
        return {"rows": list(range(1000))}

    def use(ctx: sv.StepContext) -> dict[str, int]:
        if state["fail"]:
            raise ValueError("not yet")
        return {"n": len(ctx.inputs["rows"])}

    wf = sv.Workflow("w", [sv.Step("make", make, cache=True), sv.Step("use", use, needs=["make"])])
    first = sv.run(wf, store=str(path))
    second = sv.run(wf, store=str(path))
    assert second.steps["make"].reused_from == first.run_id
    assert second.status == "failed"
    with sqlite3.connect(path) as conn:
        rows = conn.execute(
            "SELECT run_id FROM artifacts WHERE step_id = 'make' ORDER BY run_id"
        ).fetchall()
    conn.close()
    assert rows == [(first.run_id,)]  # one copy, kept by the run that computed it
    with SQLiteStore(path) as store:
        assert store.load(second.run_id).outputs["make"] == {"rows": list(range(1000))}
    state["fail"] = False
    resumed = sv.resume(second.run_id, wf, store=str(path))
    assert resumed.status == "succeeded"
    assert resumed.artifacts["n"] == 1000
    assert resumed.steps["make"].restored
