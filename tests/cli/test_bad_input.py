"""Bad input, everywhere it can come in: each is refused by name and changes no store.

One table per door - the Python API, workflow files (loaded directly and through
``stepvisor run``) and the command line.  Every row gives the input, the typed
error it must raise (or exit code 2 for the command line) and a pattern the
message must contain, so "refused" also means "told why".  Before each row a
store with two finished runs is set up next to a text file, a foreign SQLite
database and a store from a newer stepvisor; after it, every file there must be
byte-for-byte what it was (and no file may have appeared: no ``-wal`` left by
opening a file that is not ours, no store created where none was asked for).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import sqlite3
import stat
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import stepvisor as sv
from stepvisor.cli.main import main as cli_main
from stepvisor.store.sqlite import SQLiteStore
from stepvisor.workflow_file import load_workflow

STEPS_MODULE = "bad_input_steps"
STEPS = '''
"""Step functions for the bad-input tests."""

NOT_CALLABLE = 3


def work(ctx):
    return {ctx.step_id: 1}


def other(ctx):
    return None
'''
BOOM = 'raise RuntimeError("this module cannot be imported")\n'
GOOD_YAML = f"""
id: good
steps:
  - id: a
    run: {STEPS_MODULE}:work
  - id: b
    run: {STEPS_MODULE}:work
    needs: [a]
"""


@dataclass(frozen=True)
class Env:
    """One test's directory: the workflow file, its module, and the stores dir."""

    root: Path

    @property
    def stores(self) -> Path:
        return self.root / "stores"

    @property
    def db(self) -> Path:
        return self.stores / "runs.db"

    @property
    def wf_file(self) -> Path:
        return self.root / "wf.yaml"

    def write(self, name: str, text: str) -> Path:
        path = self.root / name
        path.write_text(textwrap.dedent(text))
        return path

    def wf(self) -> sv.Workflow:
        return load_workflow(self.wf_file)


FILE_RUN = "from-file"  # started from wf.yaml: `stepvisor resume` can find its file
PY_RUN = "from-python"  # started from Python: no file recorded


def _build_template(root: Path) -> None:
    (root / f"{STEPS_MODULE}.py").write_text(STEPS)
    (root / "bad_input_boom.py").write_text(BOOM)
    (root / "wf.yaml").write_text(GOOD_YAML)
    stores = root / "stores"
    stores.mkdir()
    wf = load_workflow(root / "wf.yaml")
    # A relative source: resolved from the test's own copy when resumed.
    assert sv.run(wf, store=stores / "runs.db", run_id=FILE_RUN, source="wf.yaml").ok
    assert sv.run(wf, store=stores / "runs.db", run_id=PY_RUN).ok
    (stores / "notes.txt").write_text("not a database\n")
    conn = sqlite3.connect(stores / "foreign.db")
    with conn:
        conn.execute("CREATE TABLE t (x)")
        conn.execute("INSERT INTO t VALUES (1)")
    conn.close()
    SQLiteStore(stores / "pickle.db", codec="pickle").close()
    SQLiteStore(stores / "newer.db").close()
    conn = sqlite3.connect(stores / "newer.db")
    with conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.close()


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("bad-input-template")
    saved = list(sys.path)
    try:
        _build_template(root)
        yield root
    finally:
        sys.path[:] = saved


@pytest.fixture
def env(template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    root = tmp_path / "env"
    shutil.copytree(template, root)
    monkeypatch.chdir(root)
    monkeypatch.setattr(sys, "path", list(sys.path))  # load_workflow adds the file's dir
    return Env(root)


def snapshot(directory: Path) -> dict[str, str]:
    """File name -> sha256 of every file in ``directory``."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


def cli(*argv: str) -> tuple[int, str]:
    """Run the command line in-process: (exit code, stderr)."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = cli_main(list(argv))
        except SystemExit as exc:  # argparse's own usage errors
            code = exc.code if isinstance(exc.code, int) else 2
    return code, err.getvalue()


@dataclass(frozen=True)
class Case:
    """A bad input: what to do, the error (or exit code) it must give, and its message."""

    id: str
    call: Callable[[Env], object]
    expect: type[BaseException] | int
    match: str


def run_case(case: Case, env: Env) -> None:
    before = snapshot(env.stores)
    if isinstance(case.expect, int):
        result = case.call(env)
        assert isinstance(result, tuple), "a command-line case must return (code, stderr)"
        code, err = result
        assert code == case.expect, f"exit code {code}, stderr: {err}"
        assert case.match.lower() in err.lower(), err
        assert "Traceback" not in err
    else:
        with pytest.raises(case.expect) as info:
            case.call(env)
        assert case.match.lower() in str(info.value).lower(), str(info.value)
    assert snapshot(env.stores) == before, "a refused input changed the stores"


# -- the Python API ----------------------------------------------------------------------------


def _fn(ctx: sv.StepContext) -> None:
    return None


async def _afn(ctx: sv.StepContext) -> None:
    return None


def _step(**kw: Any) -> sv.Step:
    return sv.Step(kw.pop("id", "a"), kw.pop("fn", _fn), **kw)


def _one(**kw: Any) -> sv.Workflow:
    return sv.Workflow("w", [_step(**kw)])


def _lock_closure() -> Callable[[sv.StepContext], None]:
    lock = threading.Lock()

    def step(ctx: sv.StepContext) -> None:
        with lock:
            pass

    return step


def _run_on(store: Callable[[Env], object], **kw: Any) -> Callable[[Env], object]:
    return lambda env: sv.run(env.wf(), store=store(env), **kw)


API_CASES = [
    Case("step-id-empty", lambda env: _step(id=""), sv.InvalidStepIdError, "non-empty string"),
    Case("step-id-int", lambda env: _step(id=7), sv.InvalidStepIdError, "got 7"),
    Case("step-fn-not-callable", lambda env: _step(fn="work"), sv.StepFunctionError, "callable"),
    Case("timeout-negative", lambda env: _step(timeout=-1), sv.InvalidTimeoutError, "positive"),
    Case("timeout-nan", lambda env: _step(timeout=float("nan")), sv.InvalidTimeoutError, "nan"),
    Case("timeout-str", lambda env: _step(timeout="5"), sv.InvalidTimeoutError, "'5' (str)"),
    Case("needs-itself", lambda env: _step(needs=["a"]), sv.InvalidSettingError, "itself"),
    Case("executor-unknown", lambda env: _step(executor="gpu"), sv.InvalidSettingError, "'gpu'"),
    Case(
        "executor-async-sync-fn",
        lambda env: _step(executor="async"),
        sv.InvalidSettingError,
        "async def",
    ),
    Case("retry-not-policy", lambda env: _step(retry=3), sv.InvalidSettingError, "RetryPolicy"),
    Case(
        "retry-zero-attempts",
        lambda env: sv.RetryPolicy(max_attempts=0),
        sv.InvalidRetryPolicyError,
        "max_attempts",
    ),
    Case(
        "backoff-negative",
        lambda env: sv.Backoff.fixed(-1.0),
        sv.InvalidRetryPolicyError,
        "delay",
    ),
    Case("params-not-mapping", lambda env: _step(params=[1]), sv.InvalidSettingError, "params"),
    Case(
        "duplicate-step",
        lambda env: sv.Workflow("w", [_step(), _step()]),
        sv.DuplicateStepError,
        "'a'",
    ),
    Case(
        "unknown-need",
        lambda env: sv.Workflow("w", [_step(), _step(id="b", needs=["aa"])]),
        sv.UnknownDependencyError,
        "'aa'",
    ),
    Case(
        "cycle",
        lambda env: sv.Workflow("w", [_step(needs=["b"]), _step(id="b", needs=["a"])]),
        sv.CycleError,
        "cycle",
    ),
    Case(
        "requires-nobody-creates",
        lambda env: sv.Workflow("w", [_step(requires=["rows"])]),
        sv.MissingArtifactError,
        "'rows'",
    ),
    Case(
        "max-parallel-zero",
        lambda env: sv.Settings(max_parallel=0),
        sv.InvalidMaxParallelError,
        "max_parallel",
    ),
    Case(
        "max-parallel-bool",
        lambda env: sv.Settings(max_parallel=True),
        sv.InvalidMaxParallelError,
        "max_parallel",
    ),
    Case(
        "on-failure-unknown",
        lambda env: sv.Settings(on_failure="ignore"),  # type: ignore[arg-type]
        sv.InvalidSettingError,
        "'ignore'",
    ),
    Case("codec-unknown", lambda env: sv.Settings(codec="yaml"), sv.InvalidSettingError, "'yaml'"),
    Case(
        "run-not-a-workflow",
        lambda env: sv.run("wf.yaml"),  # type: ignore[arg-type]
        sv.InvalidSettingError,
        "Workflow",
    ),
    Case(
        "run-override-out-of-range",
        _run_on(lambda env: env.db, max_parallel=-1),
        sv.InvalidMaxParallelError,
        "-1",
    ),
    Case(
        "run-override-unknown-name",
        _run_on(lambda env: env.db, max_paralel=2),
        sv.InvalidSettingError,
        "max_paralel",
    ),
    Case(
        "run-deadline-zero",
        _run_on(lambda env: env.db, deadline=0),
        sv.InvalidTimeoutError,
        "deadline",
    ),
    Case(
        "run-unknown-pool",
        lambda env: sv.run(sv.Workflow("w", [_step(pool="db")]), store=env.db),
        sv.InvalidSettingError,
        "pool 'db'",
    ),
    Case(
        "run-unpicklable-process-step",
        lambda env: sv.run(
            sv.Workflow("w", [_step(fn=_lock_closure(), executor="process")]), store=env.db
        ),
        sv.StepNotSerializableError,
        "lock",
    ),
    Case(
        "store-is-a-text-file",
        _run_on(lambda env: env.stores / "notes.txt"),
        sv.NotAStoreError,
        "not an SQLite database",
    ),
    Case(
        "store-is-a-foreign-database",
        _run_on(lambda env: env.stores / "foreign.db"),
        sv.NotAStoreError,
        "did not create",
    ),
    Case(
        "store-from-a-newer-schema",
        _run_on(lambda env: env.stores / "newer.db"),
        sv.SchemaVersionError,
        "newer stepvisor",
    ),
    Case(
        "store-is-a-directory",
        lambda env: SQLiteStore(env.stores),
        sv.NotAStoreError,
        "not a regular file",
    ),
    Case(
        "store-codec-conflicts-with-option",
        _run_on(lambda env: env.db, codec="pickle"),
        sv.StoreError,
        "codec='json'",
    ),
    Case(
        "store-bad-staleness",
        lambda env: SQLiteStore(env.db, stale_after=0),
        sv.InvalidTimeoutError,
        "stale_after",
    ),
    Case(
        "store-missing-without-create",
        lambda env: SQLiteStore(env.stores / "missing.db", create=False),
        sv.StoreError,
        "no run store",
    ),
    Case(
        "resume-unknown-run",
        lambda env: sv.resume("nope", env.wf(), store=env.db),
        sv.RunNotFoundError,
        "'nope'",
    ),
    Case(
        "resume-changed-workflow",
        lambda env: sv.resume(
            FILE_RUN, sv.Workflow("good", [*env.wf().steps, _step(id="c")]), store=env.db
        ),
        sv.FingerprintMismatchError,
        "different workflow",
    ),
    Case(
        "resume-without-store",
        lambda env: sv.resume(FILE_RUN, env.wf(), store=None),
        sv.InvalidSettingError,
        "store",
    ),
    Case(
        "retryable-negative-after",
        lambda env: sv.RetryableError("x", after=-1),
        sv.InvalidSettingError,
        "after",
    ),
]

# A new run must not take the id of a stored run: that used to overwrite the stored
# run's record and mix its steps with the new workflow's.  Resume is the way back in.
REUSED_RUN_ID = Case(
    "run-id-of-a-stored-run",
    _run_on(lambda env: env.db, run_id=FILE_RUN),
    sv.StoreError,
    FILE_RUN,
)


@pytest.mark.parametrize("case", API_CASES, ids=lambda c: c.id)
def test_python_api_refuses_bad_input_by_name(case: Case, env: Env) -> None:
    run_case(case, env)


def test_a_new_run_cannot_take_the_id_of_a_stored_run(env: Env) -> None:
    run_case(REUSED_RUN_ID, env)


# -- workflow files: loaded directly and through `stepvisor run` --------------------------------

FILE_CASES: list[tuple[str, str, str]] = [
    ("malformed-yaml", "id: x\nsteps: [\n", "line"),
    ("duplicate-key", "id: a\nid: b\nsteps: []\n", "found the key 'id' twice"),
    ("top-level-list", "- a\n- b\n", "must be a mapping"),
    ("empty-file", "", "is empty"),
    ("no-id", f"steps:\n  - id: a\n    run: {STEPS_MODULE}:work\n", "has no id"),
    ("unknown-top-key", "id: x\nstepz: []\n", "did you mean 'steps'"),
    (
        "unknown-step-key",
        f"id: x\nsteps:\n  - id: a\n    run: {STEPS_MODULE}:work\n    depends_on: [b]\n",
        "did you mean 'needs'",
    ),
    (
        "target-without-colon",
        f"id: x\nsteps:\n  - id: a\n    run: {STEPS_MODULE}.work\n",
        f"did you mean '{STEPS_MODULE}:work'",
    ),
    (
        "target-unimportable",
        "id: x\nsteps:\n  - id: a\n    run: no_such_module_xyz:work\n",
        "'no_such_module_xyz' cannot be imported",
    ),
    (
        "target-missing-attribute",
        f"id: x\nsteps:\n  - id: a\n    run: {STEPS_MODULE}:wrok\n",
        "did you mean 'work'",
    ),
    (
        "target-not-callable",
        f"id: x\nsteps:\n  - id: a\n    run: {STEPS_MODULE}:NOT_CALLABLE\n",
        "not a function",
    ),
    (
        "target-module-raises",
        "id: x\nsteps:\n  - id: a\n    run: bad_input_boom:work\n",
        "raised RuntimeError",
    ),
    (
        "timeout-negative",
        f"id: x\nsteps:\n  - id: a\n    run: {STEPS_MODULE}:work\n    timeout: -1\n",
        "timeout must be a positive",
    ),
    (
        "timeout-text",
        f"id: x\nsteps:\n  - id: a\n    run: {STEPS_MODULE}:work\n    timeout: soon\n",
        "number of seconds",
    ),
    (
        "retry-zero-attempts",
        f"id: x\nsteps:\n  - id: a\n    run: {STEPS_MODULE}:work\n    retry: {{max_attempts: 0}}\n",
        "max_attempts",
    ),
    (
        "executor-unknown",
        f"id: x\nsteps:\n  - id: a\n    run: {STEPS_MODULE}:work\n    executor: gpu\n",
        "'gpu'",
    ),
    (
        "cycle",
        f"id: x\nsteps:\n  - id: a\n    run: {STEPS_MODULE}:work\n    needs: [b]\n"
        f"  - id: b\n    run: {STEPS_MODULE}:work\n    needs: [a]\n",
        "cycle",
    ),
    (
        "unknown-need",
        f"id: x\nsteps:\n  - id: a\n    run: {STEPS_MODULE}:work\n    needs: [ghost]\n",
        "'ghost'",
    ),
    (
        "duplicate-step-ids",
        f"id: x\nsteps:\n  - id: a\n    run: {STEPS_MODULE}:work\n"
        f"  - id: a\n    run: {STEPS_MODULE}:other\n",
        "two steps have the id 'a'",
    ),
    (
        "max-parallel-text",
        "id: x\nsettings: {max_parallel: many}\n"
        f"steps:\n  - id: a\n    run: {STEPS_MODULE}:work\n",
        "max_parallel",
    ),
    ("steps-empty", "id: x\nsteps: []\n", "non-empty list"),
    (
        "step-id-boolean",
        f"id: x\nsteps:\n  - id: no\n    run: {STEPS_MODULE}:work\n",
        "quote it",
    ),
    (
        "python-tag-is-not-run",
        "id: x\nsteps: !!python/object/apply:os.system ['touch pwned']\n",
        "no tags",
    ),
]


def _file_case(name: str, text: str, match: str, *, via: str) -> Case:
    if via == "api":
        return Case(
            f"{via}-{name}",
            lambda env: load_workflow(env.write("bad.yaml", text)),
            sv.WorkflowFileError,
            match,
        )
    return Case(
        f"{via}-{name}",
        lambda env: cli("run", str(env.write("bad.yaml", text)), "--db", str(env.db)),
        2,
        match,
    )


WORKFLOW_FILE_CASES = [
    _file_case(name, text, match, via=via)
    for name, text, match in FILE_CASES
    for via in ("api", "cli")
]


@pytest.mark.parametrize("case", WORKFLOW_FILE_CASES, ids=lambda c: c.id)
def test_bad_workflow_file_is_refused_by_name(case: Case, env: Env) -> None:
    run_case(case, env)
    assert not (env.root / "pwned").exists()


def test_a_file_that_is_not_utf8_is_refused(env: Env) -> None:
    path = env.root / "latin1.yaml"
    path.write_bytes("id: caf\xe9\n".encode("latin-1"))
    run_case(Case("not-utf8", lambda env: load_workflow(path), sv.WorkflowFileError, "UTF-8"), env)


# -- the command line -----------------------------------------------------------------------------


def _edit_workflow(env: Env) -> tuple[int, str]:
    env.write("wf.yaml", GOOD_YAML + f"  - id: c\n    run: {STEPS_MODULE}:work\n")
    return cli("resume", FILE_RUN, "--db", str(env.db))


def _remove_workflow(env: Env) -> tuple[int, str]:
    env.wf_file.unlink()
    return cli("resume", FILE_RUN, "--db", str(env.db))


def _run(*extra: str) -> Callable[[Env], tuple[int, str]]:
    return lambda env: cli("run", str(env.wf_file), "--db", str(env.db), *extra)


def _on_db(name: str, *argv: str) -> Callable[[Env], tuple[int, str]]:
    return lambda env: cli(*argv, "--db", str(env.stores / name))


CLI_CASES = [
    Case("no-command", lambda env: cli(), 2, "usage"),
    Case("unknown-command", lambda env: cli("frobnicate"), 2, "invalid choice"),
    Case("run-without-file", lambda env: cli("run"), 2, "file"),
    Case("run-missing-file", lambda env: cli("run", "missing.yaml"), 2, "no such file"),
    Case("max-parallel-zero", _run("--max-parallel", "0"), 2, "max_parallel"),
    Case("max-parallel-not-int", _run("--max-parallel", "two"), 2, "invalid int value"),
    Case("set-unknown-setting", _run("--set", "max_paralel=2"), 2, "did you mean 'max_parallel'"),
    Case("set-without-equals", _run("--set", "max_parallel"), 2, "KEY=VALUE"),
    Case("set-out-of-range", _run("--set", "step_timeout=-5"), 2, "step_timeout"),
    Case("set-bad-pools", _run("--set", "pools=db"), 2, "db=2"),
    Case("set-codec-conflicts-with-store", _run("--set", "codec=pickle"), 2, "codec='json'"),
    Case(
        "db-is-a-text-file",
        lambda env: cli("run", str(env.wf_file), "--db", str(env.stores / "notes.txt")),
        2,
        "not a stepvisor run store",
    ),
    Case(
        "db-is-a-foreign-database",
        lambda env: cli("run", str(env.wf_file), "--db", str(env.stores / "foreign.db")),
        2,
        "did not create",
    ),
    Case("db-newer-schema", _on_db("newer.db", "status"), 2, "newer stepvisor"),
    Case("db-pickle-without-opt-in", _on_db("pickle.db", "status"), 2, "only if you trust"),
    Case("set-expression-not-evaluated", _run("--set", "max_parallel=2*2"), 2, "'2*2'"),
    Case("status-missing-db", _on_db("missing.db", "status"), 2, "there is no run store"),
    Case("status-unknown-run", _on_db("runs.db", "status", "nope"), 2, "'nope'"),
    Case("resume-unknown-run", _on_db("runs.db", "resume", "nope"), 2, "'nope'"),
    Case(
        "resume-run-without-file",
        _on_db("runs.db", "resume", PY_RUN),
        2,
        "no workflow file recorded",
    ),
    Case("resume-changed-file", _edit_workflow, 2, "different workflow"),
    Case("resume-removed-file", _remove_workflow, 2, "no longer exists"),
    Case("cancel-unknown-run", _on_db("runs.db", "cancel", "nope"), 2, "'nope'"),
    Case(
        "cancel-negative-wait",
        _on_db("runs.db", "cancel", FILE_RUN, "--wait", "-1"),
        2,
        "expected seconds >= 0",
    ),
    Case("report-without-html", _on_db("runs.db", "report", FILE_RUN), 2, "--html"),
    Case(
        "report-unknown-run",
        _on_db("runs.db", "report", "nope", "--html", "out.html"),
        2,
        "'nope'",
    ),
    Case(
        "config-bad-file",
        lambda env: cli("config", str(env.write("bad.yaml", "id: x\nstepz: []\n"))),
        2,
        "did you mean 'steps'",
    ),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=lambda c: c.id)
def test_command_line_exits_2_naming_the_problem(case: Case, env: Env) -> None:
    run_case(case, env)
    assert not (env.root / "out.html").exists()


def test_the_matrix_covers_at_least_forty_inputs_across_the_three_doors() -> None:
    assert len(API_CASES) >= 15
    assert len(WORKFLOW_FILE_CASES) >= 15
    assert len(CLI_CASES) >= 15
    for table in (API_CASES, WORKFLOW_FILE_CASES, CLI_CASES):
        assert len({c.id for c in table}) == len(table)
    assert len(API_CASES) + len(WORKFLOW_FILE_CASES) + len(CLI_CASES) >= 40


def test_the_store_check_sees_a_changed_store(env: Env) -> None:
    """The unchanged-store check is not vacuous: a real write is caught."""
    before = snapshot(env.stores)
    with SQLiteStore(env.db) as store:
        store.request_cancel(FILE_RUN)
    assert snapshot(env.stores) != before


# -- the trust model: what can and cannot run code ----------------------------------------------
# Covered elsewhere, not repeated here: store files are 0600 and their directory
# 0700 whatever the umask (test_store_sqlite.py::
# test_store_and_wal_files_are_owner_only_whatever_the_umask); a pickle store is
# refused without opting in, and a pickled row planted in a json store is never
# unpickled (test_store_sqlite.py::test_pickle_store_refuses_to_open_without_opting_in,
# ::test_pickled_row_planted_in_a_json_store_is_never_unpickled); YAML tags are refused
# unexecuted (test_workflow_file.py::test_yaml_tags_are_refused_and_never_executed).

EXPRESSIONS = [
    "os:system('touch pwned')",
    "__import__('os'):system",
    "os:system; touch pwned",
    "(lambda: 0)",
]


@pytest.mark.parametrize("target", EXPRESSIONS)
def test_run_targets_are_references_never_expressions(target: str, env: Env) -> None:
    text = f'id: x\nsteps:\n  - id: a\n    run: "{target}"\n'
    case = Case(
        target,
        lambda env: load_workflow(env.write("evil.yaml", text)),
        sv.WorkflowFileError,
        "must look like 'module:function'",
    )
    run_case(case, env)
    assert not (env.root / "pwned").exists()


def test_with_values_reach_the_step_as_plain_text(env: Env) -> None:
    expression = "__import__('os').system('touch pwned')"
    path = env.write(
        "echo.yaml",
        f"id: echo\nsteps:\n  - id: a\n    run: {STEPS_MODULE}:echo\n"
        f'    with: {{cmd: "{expression}", n: "1+1"}}\n',
    )
    (env.root / f"{STEPS_MODULE}.py").write_text(
        STEPS + "\n\ndef echo(ctx):\n    return dict(ctx.params)\n"
    )
    sys.modules.pop(STEPS_MODULE, None)
    try:
        result = sv.run(load_workflow(path))
    finally:
        sys.modules.pop(STEPS_MODULE, None)
    assert result.ok, result.error_message
    assert dict(result.artifacts) == {"cmd": expression, "n": "1+1"}
    assert not (env.root / "pwned").exists()


def test_a_store_the_command_line_creates_is_private_whatever_the_umask(env: Env) -> None:
    old = os.umask(0)
    try:
        code, err = cli("run", str(env.wf_file))
    finally:
        os.umask(old)
    assert code == 0, err
    store_dir = env.root / ".stepvisor"
    assert stat.S_IMODE(store_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((store_dir / "runs.db").stat().st_mode) == 0o600
