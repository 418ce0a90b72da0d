"""Mapped steps on the command line: one line per mapped step, its instances on demand.

The end-to-end tests run ``python -m stepvisor`` on a mapped workflow in the
test's own directory, as ``tests/cli/test_cli.py`` does: a splitter, a step mapped
over its list with one failing item under ``on_failure: continue``, a map
chained to it, a step that needs the whole list, and a map over fixed items.
The live view's drawing and its cap on per-instance lines are checked
in-process against events, so they need no timing.
"""

from __future__ import annotations

import io
import re
import subprocess
import textwrap
from pathlib import Path

import pytest

import stepvisor as sv
from stepvisor.cli._maps import INSTANCE_LINES, count_text, group_steps, note_counts
from stepvisor.cli._output import one_run, one_step
from stepvisor.cli._progress import LiveDisplay, LogDisplay, Progress
from stepvisor.cli.main import main
from stepvisor.core.events import Event, StepDispatched, StepExpanded, StepFinished, StepRetrying
from stepvisor.core.state import RunStatus, StepRecord, StepStatus
from stepvisor.errors import StepvisorError
from stepvisor.store.base import RunInfo
from tests.cli_helpers import on_terminal, open_store, started_id, stepvisor

MAP_STEPS = """
import time
from pathlib import Path


def split(ctx):
    return {"chunks": list(range(int(ctx.params.get("n", 6))))}


def score(ctx):
    every = int(ctx.params.get("fail_every", 0))
    bad = ctx.item == 3 if not every else ctx.item % every == 0
    if bad and not Path("open").exists():
        raise ValueError(f"item {ctx.item} is bad")
    return {"scores": ctx.item * 2}


def not_a_list(ctx):
    return {"chunks": {"a": 1}}


def held(ctx):
    # Item 0 ends at once; the others wait for the test to create the file "open".
    deadline = time.monotonic() + 20
    while ctx.item and not Path("open").exists():
        if time.monotonic() > deadline:
            raise TimeoutError("the test never opened the gate")
        time.sleep(0.01)


def double(ctx):
    return {"doubled": ctx.item * 2}


def total(ctx):
    return {"total": sum(ctx.inputs["scores"])}
"""

MAP_FILE = """
id: mapped
settings: {on_failure: continue, max_parallel: 4}
steps:
  - {id: split, run: "mapsteps:split", creates: [chunks]}
  - {id: score, run: "mapsteps:score", map_over: chunks, creates: [scores]}
  - {id: again, run: "mapsteps:double", map_over: scores, creates: [doubled]}
  - {id: total, run: "mapsteps:total", requires: [scores]}
  - {id: fixed, run: "mapsteps:double", map_over: [1, 2]}
"""

#: 400 items, every 5th fails: 80 failures, far more than the live view prints.
MANY_FILE = """
id: many
settings: {on_failure: continue, max_parallel: 4}
steps:
  - {id: split, run: "mapsteps:split", with: {n: 400}, creates: [chunks]}
  - {id: score, run: "mapsteps:score", map_over: chunks, with: {fail_every: 5}}
"""

HELD_FILE = """
id: held
settings: {max_parallel: 2}
steps:
  - {id: split, run: "mapsteps:split", creates: [chunks]}
  - {id: score, run: "mapsteps:held", map_over: chunks}
"""

NOT_A_LIST_FILE = """
id: notalist
steps:
  - {id: split, run: "mapsteps:not_a_list", creates: [chunks]}
  - {id: score, run: "mapsteps:score", map_over: chunks}
  - {id: empty, run: "mapsteps:double", map_over: []}
"""


def status(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> subprocess.CompletedProcess[str]:
    """``stepvisor status ARGS`` in this process (quicker than a program of its own)."""
    monkeypatch.chdir(project)
    code = main(["status", *args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["status", *args], code, out, err)


STAMP = r"\[ *\d+\.\d\ds\] "


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "mapsteps.py").write_text(MAP_STEPS)
    (tmp_path / "map.yaml").write_text(textwrap.dedent(MAP_FILE))
    (tmp_path / "many.yaml").write_text(textwrap.dedent(MANY_FILE))
    (tmp_path / "held.yaml").write_text(textwrap.dedent(HELD_FILE))
    (tmp_path / "notalist.yaml").write_text(textwrap.dedent(NOT_A_LIST_FILE))
    return tmp_path


# -- stepvisor run -----------------------------------------------------------------------------


@pytest.mark.realtime
def test_run_prints_a_mapped_step_as_one_line_and_only_its_failed_instances(
    project: Path,
) -> None:
    proc = stepvisor(project, "run", "map.yaml")
    assert proc.returncode == 1, proc.stderr
    run_id = started_id(proc.stdout)
    lines = proc.stdout.splitlines()
    assert lines[0].endswith("workflow 'mapped', 5 steps (3 mapped), store .stepvisor/runs.db")
    body = [re.sub(STAMP, "", line) for line in lines[1:-3]]
    assert len(body) == len(lines[1:-3])  # every line in between is a stamped step line
    assert sorted(re.sub(r", [\d.]+ s\b", ", T s", line) for line in body) == [
        "failed     score: 5/6 succeeded, 1 failed, T s",
        "failed     score[3]: attempt 1, T s (ValueError: item 3 is bad)",
        "skipped    again: 5/6 succeeded, 1 skipped, T s",
        "skipped    total: attempt 0",
        "succeeded  fixed: 2/2 succeeded, T s",
        "succeeded  split: attempt 1, T s",
    ]
    assert re.fullmatch(
        rf"stepvisor: run {run_id} failed in [\d.]+ s: 5 steps: 2 succeeded, 1 failed, "
        r"2 skipped; 14 instances: 12 succeeded, 1 failed, 1 skipped",
        lines[-3],
    )
    assert lines[-2] == "  step 'score[3]' failed: ValueError: item 3 is bad"


@pytest.mark.realtime
def test_a_map_with_many_failures_prints_a_bounded_number_of_lines(project: Path) -> None:
    proc = stepvisor(project, "run", "many.yaml")
    assert proc.returncode == 1, proc.stderr
    run_id = started_id(proc.stdout)
    failures = re.findall(r"failed     score\[\d+\]: attempt 1", proc.stdout)
    assert len(failures) == INSTANCE_LINES
    assert proc.stdout.count("counting   score: further failures") == 1
    assert f"stepvisor status {run_id} score lists them" in proc.stdout
    assert "failed     score: 320/400 succeeded, 80 failed" in proc.stdout
    assert ": 2 steps: 1 succeeded, 1 failed; 400 instances: 320 succeeded, 80 failed\n" in (
        proc.stdout
    )
    assert len(proc.stdout.splitlines()) == INSTANCE_LINES + 7


@pytest.mark.realtime
def test_resume_counts_the_instances_it_kept(project: Path) -> None:
    first = stepvisor(project, "run", "map.yaml")
    run_id = started_id(first.stdout)
    with open_store(project) as store:
        before = store.load(run_id).steps["score[0]"]
    (project / "open").touch()  # item 3 succeeds now
    resumed = stepvisor(project, "resume", run_id)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    # score[3] ran again; the other five instances of score and both of fixed were kept.
    assert re.search(r"succeeded  score: 6/6 succeeded, [\d.]+ s\n", resumed.stdout)
    assert "score[" not in resumed.stdout
    assert ": 5 steps: 5 succeeded; 14 instances: 14 succeeded\n" in resumed.stdout
    with open_store(project) as store:
        stored = store.load(run_id)
    assert stored.steps["score[0]"].attempts == before.attempts  # not run again
    assert stored.steps["score[3]"].status is StepStatus.SUCCEEDED


@pytest.mark.realtime
def test_on_a_terminal_a_running_map_is_one_redrawn_line_with_its_counts(project: Path) -> None:
    running = re.compile(r"  score  \S{10}  1/6 succeeded, [2-5] running\r?\n")

    def let_go_once_seen(screen: str) -> None:
        if not (project / "open").exists() and running.search(screen):
            (project / "open").touch()  # seen while it runs: let the rest finish

    screen = on_terminal(project, "run", "held.yaml", columns=100, watch=let_go_once_seen)
    assert running.search(screen), screen
    assert "score[" not in screen  # no line for an instance that succeeded
    summary = r"succeeded in [\d.]+ s: 2 steps: 2 succeeded; 6 instances: 6 succeeded"
    assert re.search(summary, screen)


@pytest.mark.realtime
def test_a_map_whose_list_is_no_list_fails_as_one_step_that_ran_no_instance(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    proc = stepvisor(project, "run", "notalist.yaml")
    assert proc.returncode == 1, proc.stderr
    run_id = started_id(proc.stdout)
    assert re.search(STAMP + r"failed     score: no instances\n", proc.stdout)
    assert re.search(STAMP + r"succeeded  empty: 0/0 succeeded, [\d.]+ s\n", proc.stdout)
    assert ": 3 steps: 2 succeeded, 1 failed; 0 instances\n" in proc.stdout
    table = status(project, monkeypatch, capsys, run_id).stdout.split("\n\n")[1]
    rows = {line.split()[0]: line for line in table.splitlines()}
    assert re.match(
        r"score +failed +0 +- +- +step 'score' maps over the artifact 'chunks'", rows["score"]
    )
    assert re.match(r"empty +0/0 succeeded +0 ", rows["empty"])
    one = status(project, monkeypatch, capsys, run_id, "score").stdout
    assert "note      step 'score' maps over the artifact 'chunks', but its value is a dict" in one
    assert one.endswith("\n\nno attempts\n")


# -- stepvisor status ------------------------------------------------------------------------


@pytest.mark.realtime
def test_status_shows_a_mapped_step_as_one_row_and_lists_its_instances(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run_id = started_id(stepvisor(project, "run", "map.yaml").stdout)
    listing = status(project, monkeypatch, capsys)
    assert listing.stdout.splitlines()[1].endswith("2 succeeded, 1 failed, 2 skipped")

    one = status(project, monkeypatch, capsys, run_id)
    assert one.returncode == 0, one.stderr
    head, table, hint = one.stdout.split("\n\n")
    assert "steps     2 succeeded, 1 failed, 2 skipped" in head
    assert "instances 14: 12 succeeded, 1 failed, 1 skipped" in head
    rows = {line.split()[0]: line for line in table.splitlines()}
    assert set(rows) == {"STEP", "split", "score", "again", "total", "fixed"}
    assert re.fullmatch(
        r"score +5/6 succeeded, 1 failed +6 +[\d.]+ s +\d workers +"
        r"score\[3\]: ValueError: item 3 is bad",
        rows["score"],
    )
    assert re.match(r"again +5/6 succeeded, 1 skipped +5 ", rows["again"])
    assert re.match(r"split +succeeded +1 ", rows["split"])
    # The hint names a mapped step with a failed instance, if there is one.
    assert hint.strip() == f"a mapped step's instances: stepvisor status {run_id} score"

    mapped = status(project, monkeypatch, capsys, run_id, "score")
    assert mapped.returncode == 0, mapped.stderr
    head, table = mapped.stdout.split("\n\n")
    assert head.splitlines() == [
        "step      score",
        f"run       {run_id}",
        "status    failed",
        "instances 5/6 succeeded, 1 failed",
    ]
    header, *instances = table.splitlines()
    assert header.split() == ["INSTANCE", "STATUS", "ATTEMPTS", "TIME", "WORKER", "ERROR"]
    assert [row.split()[:3] for row in instances] == [
        [f"score[{i}]", "failed" if i == 3 else "succeeded", "1"] for i in range(6)
    ]
    assert instances[3].endswith("ValueError: item 3 is bad")

    plain = status(project, monkeypatch, capsys, run_id, "split")
    assert plain.returncode == 0, plain.stderr
    head, attempts = plain.stdout.split("\n\n")
    assert head.splitlines()[2:] == ["status    succeeded", "attempts  1"]
    assert attempts.splitlines()[0].split() == [
        "ATTEMPT", "OUTCOME", "STARTED", "TIME", "WORKER", "ERROR"
    ]  # fmt: skip
    assert attempts.splitlines()[1].split()[:2] == ["1", "succeeded"]

    instance = status(project, monkeypatch, capsys, run_id, "score[3]")
    assert instance.returncode == 0, instance.stderr
    assert "status    failed" in instance.stdout
    assert "attempt 1's traceback:\nTraceback (most recent call last):" in instance.stdout
    assert instance.stdout.rstrip().endswith("ValueError: item 3 is bad")

    unknown = status(project, monkeypatch, capsys, run_id, "scor")
    assert unknown.returncode == 2
    assert unknown.stderr == (
        f"stepvisor: error: run {run_id} has no step 'scor'; its steps are: "
        "fixed, split, score, again, total (an instance is named like step[0])\n"
    )


def _store_mid_map() -> tuple[sv.MemoryStore, str]:
    """A store holding a run whose mapped step is half-way: 3 of 10 instances have rows."""
    store = sv.MemoryStore()
    info = RunInfo("r1", "wf", "fp", {}, 1, RunStatus.RUNNING, started=1.0)
    store.begin_run(info, [StepRecord("split"), StepRecord("score")])
    store.save_step("r1", StepRecord("split", StepStatus.SUCCEEDED))
    store.save_step("r1", StepRecord("score", StepStatus.RUNNING, note="mapped over 10 items"))
    store.save_step("r1", StepRecord("score[1]", StepStatus.SUCCEEDED))
    store.save_step("r1", StepRecord("score[0]", StepStatus.RUNNING))
    store.save_step("r1", StepRecord("score[2]", StepStatus.WAITING_RETRY))
    return store, "r1"


def test_status_of_a_running_map_counts_instances_without_rows_as_pending() -> None:
    store, run_id = _store_mid_map()
    table = one_run(store, run_id).split("\n\n")[1]
    assert re.match(r"score +1/10 succeeded, 1 running, 1 retrying +0 ", table.splitlines()[2])
    assert "instances 10: 7 pending, 1 running, 1 waiting_retry, 1 succeeded" in one_run(
        store, run_id
    )
    text = one_step(store, run_id, "score")
    assert "instances 1/10 succeeded, 1 running, 1 retrying" in text
    rows = text.split("\n\n")[1].splitlines()[1:]
    assert [row.split()[:2] for row in rows] == [
        ["score[0]", "running"],
        ["score[1]", "succeeded"],
        ["score[2]", "waiting_retry"],
    ]
    assert text.endswith("\n\n7 more instances have not started yet (pending)")
    with pytest.raises(StepvisorError, match="has no step 'nope'"):
        one_step(store, run_id, "nope")


# -- grouping and notes ------------------------------------------------------------------------


def test_only_ids_under_a_mapped_step_are_its_instances() -> None:
    steps = {
        "x": StepRecord("x", StepStatus.SUCCEEDED),
        "x[1]": StepRecord("x[1]", StepStatus.FAILED),  # a plain step with an odd name
        "m": StepRecord("m", StepStatus.SUCCEEDED, note="mapped over 2 items: 2 succeeded"),
        "m[1]": StepRecord("m[1]", StepStatus.SUCCEEDED),
        "m[0]": StepRecord("m[0]", StepStatus.SUCCEEDED),
        "m[01]": StepRecord("m[01]", StepStatus.SKIPPED),  # not an instance id's shape
    }
    groups = group_steps(steps)
    assert [(g.record.step_id, g.size) for g in groups] == [
        ("x", None),
        ("x[1]", None),
        ("m", 2),
        ("m[01]", None),
    ]
    assert [r.step_id for r in groups[2].instances] == ["m[0]", "m[1]"]


def test_a_finished_maps_note_gives_its_counts() -> None:
    done = StepRecord("m", StepStatus.FAILED, note="mapped over 12 items: 1 failed, 11 succeeded")
    assert note_counts(done) == (12, {"failed": 1, "succeeded": 11})
    assert note_counts(done._replace(status=StepStatus.RUNNING)) is None
    assert note_counts(StepRecord("m", StepStatus.SUCCEEDED, note="mapped over 0 items")) == (0, {})
    assert note_counts(StepRecord("p", StepStatus.SUCCEEDED, note="something else")) is None
    assert count_text(12, {"failed": 1, "succeeded": 11, "pending": 3}) == (
        "11/12 succeeded, 1 failed"
    )


# -- the live view, in-process ----------------------------------------------------------------


def _map_events(failures: int, successes: int) -> list[Event]:
    size = failures + successes + 3
    events: list[Event] = [StepExpanded("r1", "score", size, 0, 100.0)]
    for i in range(failures + successes + 3):  # the last three stay running
        events.append(StepDispatched("r1", f"score[{i}]", 1, "w1", 100.0))
    events.append(StepRetrying("r1", "score[0]", 1, 0.5, "OSError", "again", 100.1))
    events.append(StepDispatched("r1", "score[0]", 2, "w1", 100.15))
    for i in range(failures + successes):
        status = "failed" if i < failures else "succeeded"
        kind, message = ("ValueError", f"item {i}") if i < failures else (None, None)
        attempts = 2 if i == 0 else 1
        events.append(
            StepFinished("r1", f"score[{i}]", status, attempts, kind, message, time=100.2)
        )
    return events


def test_log_display_prints_failed_instances_up_to_the_cap_then_counts_them() -> None:
    out = io.StringIO()
    progress = Progress(["split", "score"], mapped=["score"])
    display = LogDisplay(out, progress)
    display.begin(run_id="r1", headline="wf")
    display.refresh(_map_events(failures=INSTANCE_LINES + 30, successes=5000))
    lines = out.getvalue().splitlines()[1:]
    assert lines[0].endswith(
        "retrying   score[0]: attempt 1 failed (OSError: again); next attempt in 0.50 s"
    )
    assert lines[1].endswith("failed     score[0]: 2 attempts, 0.05 s (ValueError: item 0)")
    assert len(lines) == INSTANCE_LINES + 1
    assert lines[-1].endswith(
        "counting   score: further failures and retries of its instances are counted, not "
        "printed; stepvisor status r1 score lists them"
    )
    m = progress.maps["score"]
    assert (
        m.text()
        == f"5000/{5000 + INSTANCE_LINES + 33} succeeded, {INSTANCE_LINES + 30} failed, 3 running"
    )
    assert len(m.running) == 3  # only the instances running are held, not the ones that ended
    display.refresh([StepFinished("r1", "score", "failed", 0, None, None, 101.5)])
    assert (
        out.getvalue()
        .splitlines()[-1]
        .endswith(
            f"failed     score: 5000/{5000 + INSTANCE_LINES + 33} succeeded, "
            f"{INSTANCE_LINES + 30} failed, 3 running, 1.50 s"
        )
    )
    assert progress.summary() == (
        f"2 steps: 1 failed, 1 pending; {5000 + INSTANCE_LINES + 33} instances: "
        f"5000 succeeded, {INSTANCE_LINES + 30} failed, 3 running"
    )


def test_live_display_draws_one_line_per_running_map(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        "shutil.get_terminal_size", lambda fallback=(0, 0): __import__("os").terminal_size((80, 24))
    )
    out = io.StringIO()
    progress = Progress(["split", "score"], mapped=["score"], kept=["split"])
    display = LiveDisplay(out, progress, color=False)
    display.begin(run_id="r1", headline="wf")
    display.refresh(_map_events(failures=1, successes=6))
    block = out.getvalue().rsplit("\x1b[J", 1)[1].split("\n")
    assert block[0].endswith("1/2 steps done")
    assert block[1].endswith("1 succeeded  1 running")
    assert block[2] == "  score  #######---  6/10 succeeded, 1 failed, 3 running"
    assert block[3] == "  running: score (3 instances)"
    screen = out.getvalue()
    assert "failed score[0]: 2 attempts, 0.05 s (ValueError: item 0)" in screen
    assert "score[1]" not in screen  # an instance that succeeded gets no line


def test_a_mapped_step_sends_step_expanded_before_its_instances_run() -> None:
    def split(ctx: sv.StepContext) -> dict[str, list[int]]:
        return {"chunks": [10, 20, 30]}

    def noop(ctx: sv.StepContext) -> None:
        return None

    events: list[Event] = []
    wf = sv.Workflow(
        "ev",
        [
            sv.Step("split", split, creates=["chunks"]),
            sv.Step("score", noop, map_over="chunks"),
            sv.Step("none", noop, map_over=[]),
        ],
    )
    result = sv.run(wf, store=sv.MemoryStore(), on_event=events.append)
    assert result.ok
    expanded = [e for e in events if isinstance(e, StepExpanded)]
    assert sorted((e.step_id, e.size, e.kept) for e in expanded) == [
        ("none", 0, 0),
        ("score", 3, 0),
    ]
    first = next(i for i, e in enumerate(events) if getattr(e, "step_id", "").startswith("score["))
    assert events.index(next(e for e in expanded if e.step_id == "score")) < first
