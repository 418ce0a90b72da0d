"""Every configuration source, and the order between them."""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import stepvisor as sv
from stepvisor.config import resolve


def noop(ctx: sv.StepContext) -> None:
    return None


def test_default_is_eight(chdir_tmp: Path) -> None:
    cfg = resolve(environ={})
    assert cfg.max_parallel == 8
    assert cfg.sources["max_parallel"] == "default"


def test_pyproject_section(chdir_tmp: Path) -> None:
    (chdir_tmp / "pyproject.toml").write_text("[tool.stepvisor]\nmax_parallel = 3\n")
    cfg = resolve(environ={})
    assert cfg.max_parallel == 3
    assert "pyproject.toml" in cfg.sources["max_parallel"]


def test_setup_cfg_section(chdir_tmp: Path) -> None:
    (chdir_tmp / "setup.cfg").write_text("[stepvisor]\nmax_parallel = 5\non_failure = continue\n")
    cfg = resolve(environ={})
    assert (cfg.max_parallel, cfg.on_failure) == (5, "continue")
    assert "setup.cfg" in cfg.sources["max_parallel"]


def test_project_file_found_from_a_subdirectory(
    chdir_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (chdir_tmp / "pyproject.toml").write_text("[tool.stepvisor]\nmax_parallel = 2\n")
    sub = chdir_tmp / "pkg" / "deep"
    sub.mkdir(parents=True)
    monkeypatch.chdir(sub)
    assert resolve(environ={}).max_parallel == 2


def test_precedence_argument_env_workflow_project_default(chdir_tmp: Path) -> None:
    (chdir_tmp / "pyproject.toml").write_text("[tool.stepvisor]\nmax_parallel = 2\n")
    wf_settings = sv.Settings(max_parallel=3)
    env = {"STEPVISOR_MAX_PARALLEL": "4"}
    assert resolve(wf_settings, {"max_parallel": 5}, environ=env).max_parallel == 5
    cfg = resolve(wf_settings, {}, environ=env)
    assert (cfg.max_parallel, cfg.sources["max_parallel"]) == (4, "environment")
    cfg = resolve(wf_settings, {}, environ={})
    assert (cfg.max_parallel, cfg.sources["max_parallel"]) == (3, "workflow")
    cfg = resolve(sv.Settings(), {}, environ={})
    assert cfg.max_parallel == 2


def test_bad_environment_value_names_its_source(chdir_tmp: Path) -> None:
    with pytest.raises(sv.InvalidMaxParallelError, match=r"^environment: max_parallel"):
        resolve(environ={"STEPVISOR_MAX_PARALLEL": "zero"})
    with pytest.raises(sv.InvalidMaxParallelError, match=r"^environment: max_parallel"):
        resolve(environ={"STEPVISOR_MAX_PARALLEL": "0"})


def test_bad_project_value_names_the_file(chdir_tmp: Path) -> None:
    (chdir_tmp / "pyproject.toml").write_text("[tool.stepvisor]\nmax_parallel = 0\n")
    with pytest.raises(sv.InvalidMaxParallelError, match=r"pyproject.toml: max_parallel"):
        resolve(environ={})


def test_unknown_project_key_is_rejected(chdir_tmp: Path) -> None:
    (chdir_tmp / "pyproject.toml").write_text("[tool.stepvisor]\nmax_paralel = 2\n")
    with pytest.raises(sv.InvalidSettingError, match="unknown setting 'max_paralel'"):
        resolve(environ={})


def test_pools_and_timeouts_from_environment(chdir_tmp: Path) -> None:
    cfg = resolve(environ={"STEPVISOR_POOLS": "db=2, net=3", "STEPVISOR_STEP_TIMEOUT": "1.5"})
    assert dict(cfg.pools) == {"db": 2, "net": 3}
    assert cfg.step_timeout == 1.5


def test_run_argument_zero_is_rejected(chdir_tmp: Path) -> None:
    wf = sv.Workflow("wf", steps=[sv.Step("a", noop)])
    with pytest.raises(sv.InvalidMaxParallelError):
        sv.run(wf, max_parallel=0)


def test_describe_lists_every_setting_with_its_source(chdir_tmp: Path) -> None:
    cfg = resolve(sv.Settings(on_failure="continue"), {"max_parallel": 2}, environ={})
    rows = {name: (value, source) for name, value, source in cfg.describe()}
    assert rows["max_parallel"] == (2, "argument")
    assert rows["on_failure"] == ("continue", "workflow")
    assert rows["kill_grace"] == (1.0, "default")


# -- the repository's own project settings (setup.cfg) ------------------------------------

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_the_repository_setup_cfg_holds_only_stepvisor_settings() -> None:
    parser = configparser.ConfigParser()
    parser.read(REPO_ROOT / "setup.cfg", encoding="utf-8")
    assert parser.sections() == ["stepvisor"]
    assert "stepvisor" not in tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]


def test_the_demo_runs_with_the_settings_of_the_repository_setup_cfg() -> None:
    """``stepvisor config examples/demo.yaml`` from the repository root: what ``make demo`` uses."""
    parser = configparser.ConfigParser()
    parser.read(REPO_ROOT / "setup.cfg", encoding="utf-8")
    in_cfg = set(parser["stepvisor"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEPVISOR_")}
    done = subprocess.run(
        [sys.executable, "-m", "stepvisor", "config", "examples/demo.yaml"],
        cwd=REPO_ROOT,
        env={**env, "STEPVISOR_TEST_SESSION": os.environ["STEPVISOR_TEST_SESSION"]},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    source = {line.split()[0]: line.split()[1:-1] for line in done.stdout.splitlines()[1:]}
    from_cfg = {name for name, words in source.items() if words[-1].endswith("setup.cfg)")}
    from_workflow = {name for name, words in source.items() if words[0] == "workflow"}
    assert {"kill_grace", "max_worker_crashes", "codec"} <= from_cfg
    assert from_cfg | from_workflow >= in_cfg  # each is used unless the workflow file sets it
    assert source["max_parallel"] == ["workflow", "file", "examples/demo.yaml"]


def test_tests_never_read_the_repository_setup_cfg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO_ROOT)
    cfg = resolve(environ={})
    assert set(cfg.sources.values()) == {"default"}


def test_a_project_file_is_parsed_once_until_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stepvisor import config  # noqa: PLC0415

    project = tmp_path / "pyproject.toml"
    project.write_text("[tool.stepvisor]\nmax_parallel = 3\n")
    parsed: list[str] = []
    real = tomllib.loads

    def counting(text: str) -> dict[str, object]:
        parsed.append(text)
        return real(text)

    monkeypatch.setattr(tomllib, "loads", counting)
    assert config.resolve(environ={}, cwd=tmp_path).max_parallel == 3
    assert config.resolve(environ={}, cwd=tmp_path).max_parallel == 3
    assert len(parsed) == 1  # the second run read the cached section
    project.write_text("[tool.stepvisor]\nmax_parallel = 5\n")  # a new size: read again
    assert config.resolve(environ={}, cwd=tmp_path).max_parallel == 5
    assert len(parsed) == 2
