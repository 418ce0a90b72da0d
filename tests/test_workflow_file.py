"""Workflow files: a good file builds the same workflow Python would; a bad one is refused whole.

Each bad file must be rejected before anything runs, with a message that starts
with the file and names the step and the key at fault.  Step modules get a name
unique to each test so that Python's module cache never hands one test the
module another test wrote.
"""

from __future__ import annotations

import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import stepvisor as sv
from stepvisor.errors import WorkflowFileError
from stepvisor.workflow_file import load_workflow, resolve_target

STEPS_MODULE = """
import time

LIMIT = 3

def produce(ctx):
    return {"value": ctx.params.get("value", 1)}

def double(ctx):
    return {"doubled": ctx.inputs["value"] * 2 * ctx.params.get("factor", 1)}

def flaky(ctx):
    if ctx.attempt == 1:
        raise ConnectionError("first attempt fails")
    return {"flaky": ctx.attempt}

class Namespace:
    @staticmethod
    def nested(ctx):
        return {"nested": True}
"""


@pytest.fixture
def isolated_imports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Undo what loading a file does to ``sys.path``, and forget the test's own modules."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(tmp_path)):
            del sys.modules[name]


@pytest.fixture
def mod(tmp_path: Path, isolated_imports: None) -> str:
    """Write the steps module next to where the workflow files go; return its name."""
    name = f"steps_{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{name}.py").write_text(STEPS_MODULE)
    return name


def write(tmp_path: Path, text: str, mod: str = "m", name: str = "wf.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).replace("MOD", mod))
    return path


def test_a_valid_file_builds_steps_settings_params_and_retry(tmp_path: Path, mod: str) -> None:
    path = write(
        tmp_path,
        """
        id: etl
        settings:
          max_parallel: 3
          on_failure: continue
          step_timeout: 12
          pools: {db: 2}
          retry: {max_attempts: 2, backoff: none}
        steps:
          - id: produce
            run: MOD:produce
            with: {value: 21}
            creates: [value]
            metadata: {cost: 2}
          - id: double
            run: MOD:double
            requires: value
            needs: [produce]
            timeout: 5
            pool: db
            retry: {max_attempts: 3, backoff: fixed, delay: 0.5, retry_on: [ConnectionError]}
            executor: thread
          - id: nested
            run: MOD:Namespace.nested
        """,
        mod,
    )
    wf = load_workflow(path)
    assert wf.id == "etl"
    assert wf.settings.max_parallel == 3
    assert wf.settings.on_failure == "continue"
    assert wf.settings.step_timeout == 12.0
    assert dict(wf.settings.pools or {}) == {"db": 2}
    assert wf.settings.retry is not None
    assert wf.settings.retry.max_attempts == 2
    produce, double = wf.step("produce"), wf.step("double")
    assert dict(produce.params) == {"value": 21}
    assert (produce.creates, produce.cost) == (("value",), 2)
    assert (double.requires, double.needs) == (("value",), ("produce",))
    assert (double.timeout, double.pool, double.executor) == (5.0, "db", "thread")
    assert double.retry is not None
    assert (double.retry.max_attempts, double.retry.retry_on) == (3, (ConnectionError,))
    assert (double.fn.__module__, double.fn.__name__) == (mod, "double")
    assert wf.step("nested").fn.__qualname__ == "Namespace.nested"


def test_a_loaded_workflow_runs_and_steps_read_their_with_values(
    tmp_path: Path, mod: str, chdir_tmp: Path
) -> None:
    path = write(
        tmp_path,
        """
        id: tiny
        steps:
          - {id: produce, run: "MOD:produce", with: {value: 5}, creates: [value]}
          - {id: double, run: "MOD:double", requires: [value], with: {factor: 10}}
          - id: flaky
            run: MOD:flaky
            retry: {max_attempts: 2, backoff: none}
        """,
        mod,
    )
    result = sv.run(load_workflow(path))
    assert result.ok, result.error_message
    assert result.artifacts["doubled"] == 100
    assert result.attempts()["flaky"] == 2


def test_the_files_directory_goes_first_on_sys_path(
    tmp_path: Path, mod: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)  # the module is found through the file, not the cwd
    path = write(tmp_path, "id: x\nsteps:\n  - {id: a, run: 'MOD:produce'}\n", mod)
    load_workflow(path)
    assert sys.path[0] == str(tmp_path.resolve())


def test_yaml_tags_are_refused_and_never_executed(tmp_path: Path, isolated_imports: None) -> None:
    marker = tmp_path / "pwned"
    path = write(
        tmp_path,
        f"""
        id: evil
        steps: !!python/object/apply:os.system ["touch {marker}"]
        """,
    )
    with pytest.raises(WorkflowFileError) as info:
        load_workflow(path)
    assert str(info.value).startswith(f"{path}: line 3")
    assert "only plain YAML data is allowed" in str(info.value)
    assert not marker.exists()


def test_resolve_target_says_which_part_is_wrong(tmp_path: Path, mod: str) -> None:
    sys.path.insert(0, str(tmp_path))  # load_workflow does this for the file's directory
    assert resolve_target(f"{mod}:produce").__name__ == "produce"
    with pytest.raises(WorkflowFileError, match=r"has no attribute 'produc' \(did you mean"):
        resolve_target(f"{mod}:produc")


BAD_FILES: list[tuple[str, str, list[str]]] = [
    # (case, file text (MOD = the steps module), message fragments after "<file>: ")
    (
        "malformed_yaml",
        "id: x\nsteps:\n  - id: a\n   run: MOD:produce\n",
        ["line 4, column 4", "fix the YAML syntax"],
    ),
    (
        "duplicate_key",
        "id: x\nsteps:\n  - id: a\n    run: MOD:produce\n    run: MOD:double\n",
        ["line 5", "found the key 'run' twice"],
    ),
    ("empty_file", "", ["is empty; a workflow file needs at least id and steps"]),
    ("top_level_list", "- id: a\n", ["must be a mapping with id, settings and steps"]),
    (
        "unknown_top_key",
        "id: x\nstep:\n  - {id: a, run: 'MOD:produce'}\n",
        ["unknown key 'step' (did you mean 'steps'?)"],
    ),
    ("missing_workflow_id", "steps:\n  - {id: a, run: 'MOD:produce'}\n", ["has no id"]),
    ("workflow_id_not_string", "id: [1]\nsteps: []\n", ["id must be a non-empty string"]),
    ("steps_empty", "id: x\nsteps: []\n", ["steps must be a non-empty list"]),
    ("steps_not_list", "id: x\nsteps: {a: 1}\n", ["steps must be a non-empty list", "a mapping"]),
    ("step_not_mapping", "id: x\nsteps:\n  - just-a-name\n", ["steps[0]: must be a mapping"]),
    ("step_without_id", "id: x\nsteps:\n  - run: MOD:produce\n", ["steps[0]: has no id"]),
    (
        "step_id_read_as_boolean",
        "id: x\nsteps:\n  - {id: no, run: 'MOD:produce'}\n",
        ["steps[0]: id must be a non-empty string, got False (a boolean); quote it"],
    ),
    (
        "step_unknown_key",
        "id: x\nsteps:\n  - {id: a, run: 'MOD:produce', need: [b]}\n",
        ["step 'a': unknown key 'need' (did you mean 'needs'?)"],
    ),
    (
        "step_params_alias",
        "id: x\nsteps:\n  - {id: a, run: 'MOD:produce', params: {n: 1}}\n",
        ["step 'a': unknown key 'params' (did you mean 'with'?)"],
    ),
    ("step_without_run", "id: x\nsteps:\n  - {id: a}\n", ["step 'a': has no run"]),
    (
        "run_malformed",
        "id: x\nsteps:\n  - {id: a, run: MOD.produce}\n",
        ["step 'a': run must look like 'module:function'", "(did you mean 'MOD:produce'?)"],
    ),
    (
        "run_not_a_string",
        "id: x\nsteps:\n  - {id: a, run: 12}\n",
        ["step 'a': run must be a 'module:function' reference", "an integer"],
    ),
    (
        "run_module_missing",
        "id: x\nsteps:\n  - {id: a, run: 'no_such_module_zz:f'}\n",
        ["step 'a': run: module 'no_such_module_zz' cannot be imported"],
    ),
    (
        "run_attribute_missing",
        "id: x\nsteps:\n  - {id: a, run: 'MOD:prodce'}\n",
        ["step 'a': run: 'MOD' has no attribute 'prodce' (did you mean 'produce'?)"],
    ),
    (
        "run_not_callable",
        "id: x\nsteps:\n  - {id: a, run: 'MOD:LIMIT'}\n",
        ["step 'a': run: 'MOD:LIMIT' is an integer, not a function"],
    ),
    (
        "run_module_raises_on_import",
        "id: x\nsteps:\n  - {id: a, run: 'broken_BROKEN:f'}\n",
        ["step 'a': run: importing module 'broken_BROKEN' raised ZeroDivisionError"],
    ),
    (
        "timeout_wrong_type",
        "id: x\nsteps:\n  - {id: a, run: 'MOD:produce', timeout: 30s}\n",
        ["step 'a': timeout must be a number of seconds", "'30s'"],
    ),
    (
        "timeout_negative",
        "id: x\nsteps:\n  - {id: a, run: 'MOD:produce', timeout: -1}\n",
        ["step 'a': timeout must be a positive finite number of seconds"],
    ),
    (
        "retry_max_attempts_zero",
        "id: x\nsteps:\n  - {id: load, run: 'MOD:produce', retry: {max_attempts: 0}}\n",
        ["step 'load': retry.max_attempts must be >= 1, got 0"],
    ),
    (
        "retry_unknown_key",
        "id: x\nsteps:\n  - {id: a, run: 'MOD:produce', retry: {max_attempt: 2}}\n",
        ["step 'a': retry.max_attempt is not a retry setting; did you mean max_attempts?"],
    ),
    (
        "retry_not_mapping",
        "id: x\nsteps:\n  - {id: a, run: 'MOD:produce', retry: 3}\n",
        ["step 'a': retry must be a mapping"],
    ),
    (
        "executor_unknown",
        "id: x\nsteps:\n  - {id: a, run: 'MOD:produce', executor: procss}\n",
        ["step 'a': executor must be one of thread, async, process, ray, got 'procss'"],
    ),
    (
        "needs_wrong_type",
        "id: x\nsteps:\n  - {id: a, run: 'MOD:produce', needs: 3}\n",
        ["step 'a': needs must be a name or a list of names"],
    ),
    (
        "with_not_mapping",
        "id: x\nsteps:\n  - {id: a, run: 'MOD:produce', with: [1, 2]}\n",
        ["step 'a': with must be a mapping", "a list"],
    ),
    (
        "needs_unknown_step",
        "id: x\nsteps:\n  - {id: a, run: 'MOD:produce', needs: [lod]}\n"
        "  - {id: load, run: 'MOD:produce'}\n",
        ["step 'a' needs 'lod', but there is no step with that id (did you mean 'load'?)"],
    ),
    (
        "cycle",
        "id: x\nsteps:\n  - {id: a, run: 'MOD:produce', needs: [b]}\n"
        "  - {id: b, run: 'MOD:produce', needs: [a]}\n",
        ["the steps form a cycle: a -> b -> a"],
    ),
    (
        "duplicate_step_ids",
        "id: x\nsteps:\n  - {id: a, run: 'MOD:produce'}\n  - {id: a, run: 'MOD:double'}\n",
        ["two steps have the id 'a'"],
    ),
    (
        "requires_missing_artifact",
        "id: x\nsteps:\n  - {id: a, run: 'MOD:produce', requires: [rows]}\n",
        ["step 'a' requires the artifact 'rows', but no step creates it"],
    ),
    (
        "settings_unknown_key",
        "id: x\nsettings: {max_paralel: 2}\nsteps:\n  - {id: a, run: 'MOD:produce'}\n",
        ["settings: unknown key 'max_paralel' (did you mean 'max_parallel'?)"],
    ),
    (
        "settings_bad_value",
        "id: x\nsettings: {max_parallel: 0}\nsteps:\n  - {id: a, run: 'MOD:produce'}\n",
        ["settings: max_parallel must be an integer >= 1, got 0"],
    ),
    (
        "settings_bad_retry",
        "id: x\nsettings: {retry: {max_attempts: 2, backoff: fixd}}\n"
        "steps:\n  - {id: a, run: 'MOD:produce'}\n",
        ["settings: retry.backoff must be"],
    ),
    (
        "settings_pools_not_mapping",
        "id: x\nsettings: {pools: [db]}\nsteps:\n  - {id: a, run: 'MOD:produce'}\n",
        ["settings: pools must be a mapping such as {db: 2}"],
    ),
]


@pytest.mark.parametrize(
    ("text", "fragments"), [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES]
)
def test_bad_workflow_file_is_refused_with_a_message_naming_file_step_and_key(
    tmp_path: Path, mod: str, text: str, fragments: list[str]
) -> None:
    broken = f"broken_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{broken}.py").write_text("def f(ctx):\n    pass\n\n1 / 0\n")
    path = tmp_path / "wf.yaml"
    path.write_text(text.replace("MOD", mod).replace("broken_BROKEN", broken))
    with pytest.raises(WorkflowFileError) as info:
        load_workflow(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    for fragment in fragments:
        expected = fragment.replace("MOD", mod).replace("broken_BROKEN", broken)
        assert expected in message, f"{expected!r} not in {message!r}"
    assert "\n" not in message


def test_a_missing_file_is_named_in_the_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(WorkflowFileError, match=r"nope\.yaml: no such file; check the path"):
        load_workflow(path)


def test_the_spec_example_message_is_exact(tmp_path: Path, mod: str) -> None:
    path = write(
        tmp_path,
        """
        id: etl
        steps:
          - id: load
            run: MOD:produce
            retry: {max_attempts: 0}
        """,
        mod,
        name="etl.yaml",
    )
    with pytest.raises(WorkflowFileError) as info:
        load_workflow(path)
    assert str(info.value) == (
        f"{path}: step 'load': retry.max_attempts must be >= 1, got 0; use 1 for no retries"
    )
