"""``stepvisor logs``, the failed step's output under a failed run, and the report's Output."""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.cli_helpers import cli_env, on_terminal, open_store, started_id, stepvisor

pytestmark = pytest.mark.realtime

STEPS = """
import logging, sys, time
from pathlib import Path

def chatty(ctx):
    for i in range(30):
        print(f"{ctx.step_id} line {i} of attempt {ctx.attempt}")
    logging.getLogger("chatty").warning("warned on attempt %d", ctx.attempt)
    if ctx.attempt == 1:
        raise ConnectionError("first attempt fails")

def broken(ctx):
    for i in range(30):
        print(f"broken line {i}")
    print("the last words", file=sys.stderr)
    raise ValueError("it broke")

def slow_talker(ctx):
    print("started talking", flush=True)
    gate = Path(ctx.params["gate"])
    deadline = time.monotonic() + 20
    while not gate.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    print("done talking")
"""

WORKFLOWS = {
    "talk.yaml": """
        id: talk
        steps:
          - id: chatty
            run: "logsteps:chatty"
            retry: {max_attempts: 2, backoff: none}
    """,
    "broken.yaml": """
        id: broken
        steps:
          - {id: fine, run: "logsteps:chatty", retry: {max_attempts: 2, backoff: none}}
          - {id: broken, run: "logsteps:broken", executor: process, needs: [fine]}
    """,
    "slow.yaml": """
        id: slow
        steps:
          - {id: talker, run: "logsteps:slow_talker", with: {gate: gate}}
    """,
}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "logsteps.py").write_text(STEPS)
    for name, text in WORKFLOWS.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    return tmp_path


def test_logs_shows_each_attempt_of_a_step_from_the_store(project: Path) -> None:
    proc = stepvisor(project, "run", "talk.yaml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_id = started_id(proc.stdout)
    # Shown live, each line with its step's id.
    assert "[chatty] chatty line 0 of attempt 1\n" in proc.stdout
    last = stepvisor(project, "logs", run_id, "chatty")
    assert last.returncode == 0, last.stderr
    assert last.stdout.startswith("chatty line 0 of attempt 2\n")
    assert "WARNING chatty: warned on attempt 2\n" in last.stdout
    assert "attempt 1" not in last.stdout
    first = stepvisor(project, "logs", run_id, "chatty", "--attempt", "1")
    assert first.stdout.startswith("chatty line 0 of attempt 1\n")
    every = stepvisor(project, "logs", run_id)
    assert every.stdout.index("==> step chatty, attempt 1 <==") < every.stdout.index(
        "==> step chatty, attempt 2 <=="
    )
    with open_store(project) as store:
        assert store.load_log(run_id, "chatty", 2) == last.stdout


def test_logs_refuses_an_unknown_step_and_an_attempt_without_a_step(project: Path) -> None:
    run_id = started_id(stepvisor(project, "run", "talk.yaml").stdout)
    proc = stepvisor(project, "logs", run_id, "nope")
    assert proc.returncode == 2
    assert f"run '{run_id}' has no step 'nope'; its steps are chatty" in proc.stderr
    proc = stepvisor(project, "logs", run_id, "--attempt", "1")
    assert proc.returncode == 2
    assert "--attempt N needs a STEP" in proc.stderr


def test_a_failed_run_prints_the_tail_of_the_failed_steps_output(project: Path) -> None:
    proc = stepvisor(project, "run", "broken.yaml", "--report", "r.html")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    run_id = started_id(proc.stdout)
    lines = proc.stdout.splitlines()
    error = lines.index("  step 'broken' failed: ValueError: it broke")
    assert lines[error + 1] == (
        f"  ---- output of step broken (attempt 1, last 20 lines; all of it: "
        f"stepvisor logs {run_id} broken) ----"
    )
    # Its last 20 lines, stderr too (a process step: through its own pipe).
    assert lines[error + 2 : error + 22] == [
        *(f"  | broken line {i}" for i in range(11, 30)),
        "  | the last words",
    ]
    report = (project / "r.html").read_text(encoding="utf-8")
    assert "<h2>Output</h2>" in report
    assert "<code>broken</code> attempt 1" in report
    assert "<code>fine</code> attempt 2" in report
    assert "the last words" in report


def test_logs_follow_prints_a_running_runs_output_from_another_program(project: Path) -> None:
    run = subprocess.Popen(
        [sys.executable, "-m", "stepvisor", "run", "slow.yaml"],
        cwd=project,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=cli_env(),
    )
    follower: subprocess.Popen[bytes] | None = None
    try:
        assert run.stdout is not None
        run_id = started_id(run.stdout.readline())
        follower = following = subprocess.Popen(
            [sys.executable, "-m", "stepvisor", "logs", run_id, "--follow"],
            cwd=project,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=cli_env(),
        )
        assert following.stdout is not None
        out = following.stdout.fileno()
        seen = b""
        deadline = time.monotonic() + 20
        while b"started talking" not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([out], [], [], 0.5)
            if ready:
                seen += os.read(out, 65536)
        # Seen while the step still runs: it waits for the gate made only now.
        assert b"==> step talker, attempt 1 <==\nstarted talking\n" in seen
        (project / "gate").write_text("go")
        rest, errors = following.communicate(timeout=30)
        assert following.returncode == 0, errors
        assert (seen + rest).endswith(b"started talking\ndone talking\n")
        assert run.wait(timeout=30) == 0
    finally:
        for proc in (run, follower):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        if run.stdout is not None:
            run.stdout.close()


def test_on_a_terminal_step_lines_go_above_the_progress_block(project: Path) -> None:
    screen = on_terminal(project, "run", "talk.yaml")
    # Every step line is whole on a line of its own, never inside the block's lines.
    rows = re.split(r"\r\n|\r|\n", screen)
    visible = [re.sub(r"\x1b\[[\d;?]*[a-zA-Z]", "", row) for row in rows]
    for attempt in (1, 2):
        for i in range(30):
            assert f"[chatty] chatty line {i} of attempt {attempt}" in visible
    assert "[chatty] WARNING chatty: warned on attempt 2" in visible
    for row in visible:
        if "[chatty]" in row:
            assert row.startswith("[chatty] "), row
