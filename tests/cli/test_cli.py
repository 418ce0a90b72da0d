"""The ``stepvisor`` command line, end to end, in real subprocesses.

Each test runs ``python -m stepvisor`` in its own directory (so the default
store ``.stepvisor/runs.db`` is the test's own) and checks exit codes, what is
printed, and what the store holds.  Waits on another program go through
``wait_for`` on the store, never through sleeps; every subprocess has a
timeout and is killed if a test fails half-way.  The progress display's
rendering is also checked in-process against synthetic events.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stepvisor.cli._progress import LiveDisplay, LogDisplay, Progress, _fit_names
from stepvisor.cli.main import build_parser, main
from stepvisor.core.events import RunStarted, StepDispatched, StepFinished, StepRetrying
from stepvisor.core.state import RunStatus, StepStatus
from stepvisor.store.sqlite import SQLiteStore
from tests.cli_helpers import cli_env, on_terminal, open_store, started_id, stepvisor
from tests.conftest import wait_for

STEPS = """
from pathlib import Path


def _log(ctx):
    with Path("runs.log").open("a") as fh:
        fh.write(ctx.step_id + "\\n")


def ok(ctx):
    _log(ctx)
    return {ctx.step_id: ctx.params.get("value", 1)}


def flaky(ctx):
    if ctx.attempt == 1:
        raise ConnectionError("flaky first attempt")


def bad(ctx):
    raise ValueError("bad step failed on purpose")


def gate(ctx):
    _log(ctx)
    if not Path("open").exists():
        raise RuntimeError("the gate is closed")


def wait(ctx):
    ctx.wait_cancelled(60)
    ctx.raise_if_cancelled()
"""

OK_FILE = """
id: cli
steps:
  - {id: a, run: "clisteps:ok", with: {value: 3}}
  - {id: b, run: "clisteps:ok", needs: [a]}
  - id: flaky
    run: clisteps:flaky
    retry: {max_attempts: 2, backoff: fixed, delay: 0.05}
"""
FAIL_FILE = """
id: failing
settings: {on_failure: continue}
steps:
  - {id: a, run: "clisteps:ok"}
  - {id: bad, run: "clisteps:bad"}
"""
GATE_FILE = """
id: gated
steps:
  - {id: first, run: "clisteps:ok"}
  - {id: gate, run: "clisteps:gate", needs: [first]}
"""
WAIT_FILE = """
id: waiting
steps:
  - {id: wait, run: "clisteps:wait"}
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A directory with the step module and the workflow files."""
    (tmp_path / "clisteps.py").write_text(STEPS)
    for name, text in [
        ("ok.yaml", OK_FILE),
        ("fail.yaml", FAIL_FILE),
        ("gate.yaml", GATE_FILE),
        ("wait.yaml", WAIT_FILE),
    ]:
        (tmp_path / name).write_text(textwrap.dedent(text))
    return tmp_path


# -- run -------------------------------------------------------------------------------


@pytest.mark.realtime
def test_run_succeeds_exits_0_and_prints_plain_lines_when_not_a_terminal(project: Path) -> None:
    proc = stepvisor(project, "run", "ok.yaml", "--report", "out/report.html")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    run_id = started_id(proc.stdout)
    assert lines[0] == (
        f"stepvisor: run {run_id} started: workflow 'cli', 3 steps, store .stepvisor/runs.db"
    )
    body = sorted(lines[1:-2], key=lambda line: line.split("]", 1)[1])
    expected = [
        r"retrying   flaky: attempt 1 failed \(ConnectionError: flaky first attempt\); "
        r"next attempt in 0\.05 s",
        r"succeeded  a: attempt 1, [\d.]+ s",
        r"succeeded  b: attempt 1, [\d.]+ s",
        r"succeeded  flaky: 2 attempts, [\d.]+ s",
    ]
    assert len(body) == len(expected), body
    for line, pattern in zip(body, expected, strict=True):
        assert re.fullmatch(r"\[ *\d+\.\d\ds\] " + pattern, line), line
    assert re.fullmatch(rf"stepvisor: run {run_id} succeeded in [\d.]+ s: 3 succeeded", lines[-2])
    report = (project / "out" / "report.html").resolve()
    assert lines[-1] == f"report: {report}"
    assert run_id in report.read_text(encoding="utf-8")
    assert "\x1b[" not in proc.stdout
    with open_store(project) as store:
        info = store.load(run_id).info
    assert info.status is RunStatus.SUCCEEDED
    assert info.source == str((project / "ok.yaml").resolve())


@pytest.mark.realtime
def test_the_demo_runs_its_fan_out_retry_and_fan_in_and_writes_a_report(tmp_path: Path) -> None:
    demo = Path(__file__).resolve().parents[2] / "examples" / "demo.yaml"
    proc = stepvisor(tmp_path, "run", str(demo), "--report", "demo.html", timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "retrying   flaky_rates: attempt 1 failed (ConnectionError:" in proc.stdout
    # 6 steps, crunch mapped over 4 shards: counted as one step, its instances apart.
    assert ": 6 steps: 6 succeeded; 4 instances: 4 succeeded\n" in proc.stdout
    assert re.search(r"\] succeeded  crunch: 4/4 succeeded, [\d.]+ s\n", proc.stdout)
    assert "crunch[" not in proc.stdout  # no line per instance that succeeded
    with open_store(tmp_path) as store:
        stored = store.load(started_id(proc.stdout))
    assert stored.steps["flaky_rates"].attempt_count == 2
    assert stored.outputs["combine"]["summary"]["users"] == 120
    assert (tmp_path / "demo.html").exists()


@pytest.mark.realtime
def test_failed_run_exits_1_and_says_how_to_resume(project: Path) -> None:
    proc = stepvisor(project, "run", "fail.yaml")
    assert proc.returncode == 1, proc.stderr
    run_id = started_id(proc.stdout)
    assert re.search(
        r"failed     bad: attempt 1, [\d.]+ s \(ValueError: bad step failed on purpose\)",
        proc.stdout,
    )
    assert f"stepvisor: run {run_id} failed in " in proc.stdout
    assert ": 1 succeeded, 1 failed\n" in proc.stdout
    assert "  step 'bad' failed: ValueError: bad step failed on purpose\n" in proc.stdout
    assert proc.stdout.endswith(f"  resume with: stepvisor resume {run_id}\n")
    assert proc.stderr == ""


def test_invalid_workflow_exits_2_with_one_line_and_nothing_runs(project: Path) -> None:
    (project / "bad.yaml").write_text(
        "id: x\nsteps:\n  - {id: load, run: 'clisteps:ok', retry: {max_attempts: 0}}\n"
    )
    proc = stepvisor(project, "run", "bad.yaml")
    assert proc.returncode == 2
    assert proc.stderr == (
        "stepvisor: error: bad.yaml: step 'load': retry.max_attempts must be >= 1, got 0; "
        "use 1 for no retries\n"
    )
    assert proc.stdout == ""
    assert not (project / ".stepvisor").exists()
    assert not (project / "runs.log").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--set", "max_parallel=0"], "--set max_parallel=0: max_parallel must be an integer >= 1"),
        (
            ["--set", "max_paralel=2"],
            "unknown setting 'max_paralel' (did you mean 'max_parallel'?)",
        ),
        (["--set", "step_timeout"], "--set takes KEY=VALUE, e.g. --set max_parallel=4"),
        (["--set", "retry={bad"], "retry must be a JSON object"),
        (
            ["--set", 'retry={"max_attempts": 0}'],
            '--set retry={"max_attempts": 0}: retry.max_attempts must be >= 1',
        ),
        (["--max-parallel", "0"], "--max-parallel: max_parallel must be an integer >= 1, got 0"),
    ],
)
def test_bad_setting_flags_exit_2_with_the_reason(
    chdir_tmp: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(["run", "never-read.yaml", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("stepvisor: error: ")
    assert message in err
    assert err.count("\n") == 1


@pytest.mark.realtime
def test_setting_flags_reach_the_run(project: Path) -> None:
    proc = stepvisor(
        project,
        "run",
        "ok.yaml",
        "--max-parallel",
        "2",
        "--set",
        "step_timeout=5",
        "--set",
        'retry={"max_attempts": 4}',
    )
    assert proc.returncode == 0, proc.stderr
    with open_store(project) as store:
        settings = store.load(started_id(proc.stdout)).info.settings
    assert settings["max_parallel"] == 2
    assert settings["step_timeout"] == 5.0
    assert settings["retry"]["max_attempts"] == 4


def test_no_command_prints_usage_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: stepvisor" in capsys.readouterr().err


def test_python_dash_m_runs_the_same_command_line(tmp_path: Path) -> None:
    proc = stepvisor(tmp_path, "--help")
    assert proc.returncode == 0
    assert "exit codes: 0 succeeded, 1 failed, 2 usage or invalid input, 130 cancelled" in (
        proc.stdout
    )


# -- resume --------------------------------------------------------------------------------


@pytest.mark.realtime
def test_resume_continues_a_failed_run_without_rerunning_succeeded_steps(project: Path) -> None:
    first = stepvisor(project, "run", "gate.yaml")
    assert first.returncode == 1, first.stderr
    run_id = started_id(first.stdout)
    (project / "open").touch()
    resumed = stepvisor(project, "resume", run_id)
    assert resumed.returncode == 0, resumed.stderr
    assert started_id(resumed.stdout) == run_id
    assert "(resumed; 1 succeeded steps kept)" in resumed.stdout.splitlines()[0]
    assert (project / "runs.log").read_text().split() == ["first", "gate", "gate"]
    with open_store(project) as store:
        stored = store.load(run_id)
    assert stored.info.status is RunStatus.SUCCEEDED
    assert stored.steps["first"].restored


@pytest.mark.realtime
def test_resume_refuses_a_changed_workflow_unless_forced(project: Path) -> None:
    first = stepvisor(project, "run", "gate.yaml")
    run_id = started_id(first.stdout)
    (project / "gate.yaml").write_text(
        GATE_FILE.replace('"clisteps:ok"}', '"clisteps:ok", with: {value: 9}}')
    )
    (project / "open").touch()
    refused = stepvisor(project, "resume", run_id)
    assert refused.returncode == 2
    assert "was started with a different workflow" in refused.stderr
    assert "--force" in refused.stderr
    forced = stepvisor(project, "resume", run_id, "--force")
    assert forced.returncode == 0, forced.stderr


def test_resume_of_an_unknown_run_exits_2(
    chdir_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    SQLiteStore(chdir_tmp / ".stepvisor" / "runs.db").close()
    assert main(["resume", "0123456789ab"]) == 2
    assert "no run with id '0123456789ab'" in capsys.readouterr().err


# -- status, report, config ----------------------------------------------------------------


@pytest.mark.realtime
def test_status_lists_runs_and_shows_one_runs_steps(project: Path) -> None:
    failed = started_id(stepvisor(project, "run", "fail.yaml").stdout)
    passed = started_id(stepvisor(project, "run", "ok.yaml").stdout)
    listing = stepvisor(project, "status")
    assert listing.returncode == 0, listing.stderr
    header, *rows = listing.stdout.splitlines()
    assert header.split() == ["RUN", "WORKFLOW", "STATUS", "STARTED", "DURATION", "STEPS"]
    assert [row.split()[:3] for row in rows] == [
        [passed, "cli", "succeeded"],
        [failed, "failing", "failed"],
    ]
    assert rows[1].endswith("1 succeeded, 1 failed")
    one = stepvisor(project, "status", failed)
    assert one.returncode == 0, one.stderr
    assert f"run       {failed}" in one.stdout
    assert "status    failed" in one.stdout
    steps = one.stdout.split("\n\n", 1)[1].splitlines()
    assert steps[0].split() == ["STEP", "STATUS", "ATTEMPTS", "TIME", "WORKER", "ERROR"]
    assert steps[1].split()[:3] == ["a", "succeeded", "1"]
    assert steps[2].split()[:3] == ["bad", "failed", "1"]
    assert steps[2].endswith("ValueError: bad step failed on purpose")


@pytest.mark.parametrize(
    "argv",
    [
        ["status"],
        ["status", "abc"],
        ["cancel", "abc"],
        ["resume", "abc"],
        ["report", "abc", "--html", "r.html"],
    ],
)
def test_commands_without_a_store_exit_2_and_say_where_they_looked(
    chdir_tmp: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith(
        "stepvisor: error: there is no run store at .stepvisor/runs.db; start a run first"
    )
    assert not (chdir_tmp / ".stepvisor").exists()


def _store_options(parser: argparse.ArgumentParser) -> dict[str, set[str]]:
    """Each command's option strings that fill ``args.store``."""
    found: dict[str, set[str]] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[name] = {
                    flag for a in sub._actions if a.dest == "store" for flag in a.option_strings
                }
    return found


def test_every_command_that_takes_db_takes_store_as_the_same_option() -> None:
    options = _store_options(build_parser())
    assert {name for name, flags in options.items() if flags} == {
        "run",
        "resume",
        "status",
        "cancel",
        "report",
        "logs",
        "cache",
    }
    for name, flags in options.items():
        assert flags in (set(), {"--store", "--db"}), name
        if flags:
            argv = [name] + ["x"] * (name not in ("status", "cache"))
            argv += ["--html", "h"] * (name == "report")
            parsed = [build_parser().parse_args([*argv, flag, "s.db"]).store for flag in flags]
            assert parsed == ["s.db", "s.db"], name


def test_a_run_kept_with_store_is_found_with_db_and_the_other_way(
    chdir_tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (chdir_tmp / "clisteps.py").write_text(STEPS)
    (chdir_tmp / "ok.yaml").write_text("id: one\nsteps:\n  - {id: a, run: 'clisteps:ok'}\n")
    monkeypatch.syspath_prepend(str(chdir_tmp))
    assert main(["run", "ok.yaml", "--store", "kept/a.db"]) == 0
    first = started_id(capsys.readouterr().out)
    assert main(["run", "ok.yaml", "--db", "kept/b.db"]) == 0
    second = started_id(capsys.readouterr().out)
    assert not (chdir_tmp / ".stepvisor").exists()  # neither went to the default store
    assert main(["status", first, "--db", "kept/a.db"]) == 0
    assert f"run       {first}" in capsys.readouterr().out
    assert main(["status", second, "--store", "kept/b.db"]) == 0
    assert f"run       {second}" in capsys.readouterr().out
    assert main(["report", first, "--html", "r.html", "--store", "kept/b.db"]) == 2
    assert f"{first!r}" in capsys.readouterr().err  # not in that store


@pytest.mark.realtime
def test_report_command_writes_the_html_page(project: Path) -> None:
    run_id = started_id(stepvisor(project, "run", "fail.yaml").stdout)
    proc = stepvisor(project, "report", run_id, "--html", "r.html")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"report: {(project / 'r.html').resolve()}\n"
    page = (project / "r.html").read_text(encoding="utf-8")
    assert 'data-step="bad" data-outcome="failed"' in page
    missing = stepvisor(project, "report", "nope", "--html", "r2.html")
    assert missing.returncode == 2
    assert not (project / "r2.html").exists()


def test_config_shows_each_value_and_where_it_came_from(project: Path) -> None:
    (project / "cfg.yaml").write_text(
        "id: c\nsettings: {max_parallel: 3, kill_grace: 4}\n"
        "steps:\n  - {id: a, run: 'clisteps:ok'}\n"
    )
    proc = stepvisor(
        project,
        "config",
        "cfg.yaml",
        "--set",
        "step_timeout=9",
        env=cli_env(STEPVISOR_KILL_GRACE="2.5"),
    )
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()[1:]}
    assert rows["max_parallel"].split() == ["max_parallel", "workflow", "file", "cfg.yaml", "3"]
    assert rows["kill_grace"].split() == ["kill_grace", "environment", "2.5"]
    assert rows["step_timeout"].split() == ["step_timeout", "--set", "9.0"]
    assert rows["codec"].split() == ["codec", "default", '"json"']
    assert rows["capture"].split() == ["capture", "default", '"tee"']
    assert rows["cache"].split() == ["cache", "default", "false"]
    assert len(rows) == 16


# -- cancel and interrupt ------------------------------------------------------------------


@pytest.fixture
def waiting_run(project: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``stepvisor run wait.yaml`` in the background, once its step is running."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "stepvisor", "run", "wait.yaml"],
        cwd=project,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    try:
        db = project / ".stepvisor" / "runs.db"
        found: list[str] = []

        def step_running() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"the run ended early: {proc.communicate()}")
            if not db.exists():
                return False
            with SQLiteStore(db, create=False) as store:
                runs = store.list_runs()
                if (
                    not runs
                    or store.load(runs[0].run_id).steps["wait"].status is not StepStatus.RUNNING
                ):
                    return False
                found.append(runs[0].run_id)
                return True

        wait_for(step_running, timeout=20, what="the wait step to be running")
        yield proc, found[0]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


@pytest.mark.realtime
def test_cancel_from_another_process_stops_the_run_with_exit_130(
    project: Path, waiting_run: tuple[subprocess.Popen[str], str]
) -> None:
    proc, run_id = waiting_run
    began = time.monotonic()
    cancel = stepvisor(project, "cancel", run_id, "--wait", "20")
    assert cancel.returncode == 0, cancel.stderr
    assert cancel.stdout.splitlines() == [
        f"cancel requested for run {run_id}; its program stops it within a second",
        f"run {run_id} is cancelled",
    ]
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 130, err
    assert time.monotonic() - began < 10
    assert f"stepvisor: run {run_id} cancelled in " in out
    assert err == ""
    with open_store(project) as store:
        stored = store.load(run_id)
    assert stored.info.status is RunStatus.CANCELLED
    assert stored.steps["wait"].status is StepStatus.CANCELLED
    again = stepvisor(project, "cancel", run_id)
    assert again.returncode == 0
    assert again.stdout == f"run {run_id} is not running (cancelled); nothing to cancel\n"


@pytest.mark.realtime
def test_ctrl_c_cancels_the_run_and_exits_130(
    project: Path, waiting_run: tuple[subprocess.Popen[str], str]
) -> None:
    proc, run_id = waiting_run
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert f"resume with: stepvisor resume {run_id}" in out
    with open_store(project) as store:
        assert store.load(run_id).info.status is RunStatus.CANCELLED


# -- the live display ------------------------------------------------------------------------


@pytest.mark.realtime
def test_on_a_terminal_progress_is_redrawn_in_place(project: Path) -> None:
    screen = on_terminal(project, "run", "ok.yaml")
    assert screen.startswith("\x1b[?25l")  # cursor hidden while drawing
    assert "\x1b[2A\x1b[J" in screen  # the three-line block redrawn from its top
    assert "3/3 steps done" in screen
    assert "retrying" in screen  # mishaps get a permanent line
    assert "\x1b[?25h" in screen  # cursor shown again
    assert re.search(r"stepvisor: run [0-9a-f]{12} succeeded in [\d.]+ s: 3 succeeded", screen)
    for line in re.split(r"\r\n|\r|\n|\x1b\[\d*[AJ]", screen):
        visible = re.sub(r"\x1b\[[\d;?]*[a-zA-Z]", "", line)
        if visible.startswith(("run ", "  ")):  # the redrawn block must never wrap
            assert len(visible) <= 79, visible


def _events() -> list[object]:
    return [
        RunStarted("r1", "wf", 1, {}, False, 100.0),
        StepDispatched("r1", "a", 1, "w1", 100.0),
        StepDispatched("r1", "b", 1, "w2", 100.1),
        StepRetrying("r1", "b", 1, 0.5, "OSError", "disk\nfull", 100.3),
        StepFinished("r1", "a", "succeeded", 1, None, None, 101.25),
        StepDispatched("r1", "b", 2, "w2", 100.8),
        StepFinished("r1", "b", "failed", 2, "ValueError", "no", 101.5),
    ]


def test_log_display_prints_one_line_per_finished_or_retrying_step() -> None:
    out = io.StringIO()
    progress = Progress(["a", "b", "c"])
    display = LogDisplay(out, progress)
    display.begin(run_id="r1", headline="workflow 'wf'")
    display.refresh(_events())  # type: ignore[arg-type]
    assert out.getvalue().splitlines() == [
        "stepvisor: run r1 started: workflow 'wf'",
        "[   0.30s] retrying   b: attempt 1 failed (OSError: disk full); next attempt in 0.50 s",
        "[   1.25s] succeeded  a: attempt 1, 1.25 s",
        "[   1.50s] failed     b: 2 attempts, 0.70 s (ValueError: no)",
    ]
    assert progress.summary() == "1 succeeded, 1 failed, 1 pending"


def test_live_display_draws_counts_and_running_steps_within_the_width(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def block(columns: int) -> list[str]:
        monkeypatch.setattr(
            "shutil.get_terminal_size", lambda fallback=(0, 0): os.terminal_size((columns, 24))
        )
        out = io.StringIO()
        progress = Progress(["a", "b", "c"], kept=["c"])
        display = LiveDisplay(out, progress, color=False)
        display.begin(run_id="r1", headline="wf")
        display.refresh(_events()[:3])  # type: ignore[arg-type]
        assert out.getvalue().startswith("\x1b[?25l\r\x1b[Jstepvisor: run r1 started: wf\n")
        return out.getvalue().rsplit("\x1b[J", 1)[1].split("\n")

    wide = block(80)
    assert len(wide) == 3
    assert wide[0].startswith("run r1 ")
    assert wide[0].endswith("1/3 steps done")
    assert wide[1].endswith("1 succeeded  2 running")
    assert re.fullmatch(r"  running: a \([\d.]+s\), b \([\d.]+s\)", wide[2])
    narrow = block(30)
    assert all(len(line) <= 29 for line in narrow)
    assert narrow[1].endswith("…")


def test_fit_names_shows_what_fits_then_a_count() -> None:
    assert _fit_names([], 20) == "-"
    assert _fit_names(["alpha", "beta"], 20) == "alpha, beta"
    assert _fit_names(["alpha", "beta", "gamma", "delta"], 20) == "alpha, beta, +2 more"
    assert _fit_names(["alpha", "beta", "gamma", "delta"], 19) == "alpha, +3 more"
    assert _fit_names(["a-very-long-step-name"], 10) == "1 steps"
