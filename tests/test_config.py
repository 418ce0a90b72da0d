"""Every configuration source, and the order between them."""

from __future__ import annotations

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
