"""Resolving settings: one order for every setting, and where each value came from.

Highest first::

    argument (sv.run(..., max_parallel=4), CLI flag)
      > environment (STEPVISOR_MAX_PARALLEL=4)
      > the workflow's settings (Settings(max_parallel=4))
      > the project file ([tool.stepvisor] in pyproject.toml, [stepvisor] in setup.cfg)
      > built-in default (max_parallel=8)

Values from the environment and project files are parsed from text and then
validated by constructing :class:`~stepvisor.core.model.Settings`, so a bad value is
rejected with the same message wherever it came from, prefixed by its source.
"""

from __future__ import annotations

import configparser
import json
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from stepvisor.core.model import SETTING_NAMES, Settings
from stepvisor.errors import InvalidSettingError, ValidationError
from stepvisor.policies.retry import RetryPolicy

__all__ = ["DEFAULTS", "ENV_PREFIX", "Resolved", "find_project_settings", "resolve"]

ENV_PREFIX: Final = "STEPVISOR_"

#: Built-in defaults: the last source consulted.
DEFAULTS: Final[Mapping[str, Any]] = {
    "max_parallel": 8,
    "on_failure": "fail_fast",
    "pools": {},
    "executor": "thread",
    "step_timeout": None,
    "deadline": None,
    "kill_grace": 1.0,
    "retry": RetryPolicy(),
    "seed": None,
    "max_worker_crashes": 3,
    "max_retries_total": None,
    "codec": "json",
    "ray_address": None,
    "capture": "tee",
    "log_limit": 1 << 20,
    "cache": False,
}

_INTS: Final = frozenset(
    {"max_parallel", "seed", "max_worker_crashes", "max_retries_total", "log_limit"}
)
_FLOATS: Final = frozenset({"step_timeout", "deadline", "kill_grace"})
#: The texts a boolean setting (``cache``) takes in the environment and setup.cfg.
_BOOLS: Final = {"true": True, "1": True, "yes": True, "on": True}
_BOOLS.update({"false": False, "0": False, "no": False, "off": False})


@dataclass(frozen=True, slots=True)
class Resolved:
    """Concrete values for every setting, and the source each one came from."""

    max_parallel: int
    on_failure: str
    pools: Mapping[str, int]
    executor: str
    step_timeout: float | None
    deadline: float | None
    kill_grace: float
    retry: RetryPolicy
    seed: int | None
    max_worker_crashes: int
    max_retries_total: int | None
    codec: str
    ray_address: str | None
    capture: str
    log_limit: int
    cache: bool = False
    sources: Mapping[str, str] = field(default_factory=dict)

    def describe(self) -> list[tuple[str, Any, str]]:
        """``(name, value, source)`` for every setting, in a stable order."""
        return [(name, getattr(self, name), self.sources[name]) for name in SETTING_NAMES]

    def jsonable(self) -> dict[str, Any]:
        """The values as JSON-friendly data (for stores and ``stepvisor config``)."""
        out: dict[str, Any] = {}
        for name in SETTING_NAMES:
            value = getattr(self, name)
            if isinstance(value, RetryPolicy):
                value = value.to_mapping()
            elif isinstance(value, Mapping):
                value = dict(value)
            out[name] = value
        return out


def _parse_text(name: str, text: str) -> Any:
    """Turn an environment/INI string into the type the setting takes.

    Text that does not parse is returned as it is: ``Settings()`` then rejects
    it with the message every other source gets.
    """
    text = text.strip()
    if name in _INTS:
        return _number(text, int)
    if name in _FLOATS:
        return None if text.lower() in ("", "none") else _number(text, float)
    if name == "pools":
        return _parse_pools(text)
    if name == "retry":
        return _parse_retry(text)
    if name == "cache":
        return _BOOLS.get(text.lower(), text)
    return text


def _number(text: str, kind: type[int] | type[float]) -> Any:
    try:
        return kind(text)
    except ValueError:
        return text


def _parse_pools(text: str) -> dict[str, Any]:
    pools: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        pool, sep, size = part.partition("=")
        if not sep:
            raise InvalidSettingError(f"pools must look like 'db=2,net=4', got {text!r}")
        pools[pool.strip()] = _number(size.strip(), int)
    return pools


def _parse_retry(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidSettingError(
            f"retry must be a JSON object such as "
            f'{{"max_attempts": 3, "backoff": "exponential"}}, got {text!r}'
        ) from exc


def _to_settings(values: Mapping[str, Any], *, where: str) -> Settings:
    """Validate raw values from a text source by building ``Settings`` from them."""
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        if name not in SETTING_NAMES:
            raise InvalidSettingError(
                f"{where}: unknown setting {name!r}; known settings are {', '.join(SETTING_NAMES)}"
            )
        if name == "retry" and isinstance(value, Mapping):
            kwargs[name] = RetryPolicy.from_mapping(value, where=where)
        else:
            kwargs[name] = value
    try:
        return Settings(**kwargs)
    except ValidationError as exc:
        raise type(exc)(f"{where}: {exc}") from exc


def environment_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Settings given as ``STEPVISOR_<NAME>`` environment variables."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name in SETTING_NAMES:
        key = ENV_PREFIX + name.upper()
        if key in environ:
            values[name] = _parse_text(name, environ[key])
    return _to_settings(values, where="environment") if values else Settings()


def find_project_settings(start: Path | None = None) -> tuple[Settings, str | None]:
    """The project file's stepvisor section, looking up from ``start``.

    Returns the settings and the file they came from (``None`` when no file
    has a section).  ``pyproject.toml`` is preferred over ``setup.cfg`` in the
    same directory.
    """
    here = (start or Path.cwd()).resolve()
    for directory in (here, *here.parents):
        pyproject, setup_cfg = directory / "pyproject.toml", directory / "setup.cfg"
        found = False
        for path, read in ((pyproject, _pyproject_section), (setup_cfg, _setup_cfg_section)):
            section = _cached_section(path, read)
            if section is _ABSENT:
                continue
            found = True
            if isinstance(section, Settings):
                return section, str(path)
        if found:
            # The first directory with a project file is the project root: stop
            # there, so a parent directory's settings never leak into a nested project.
            break
    return Settings(), None


#: A file that does not exist (as opposed to one without a stepvisor section: None).
_ABSENT: Final = object()
#: Parsed sections by file, valid while the file's (inode, size, mtime) hold: every
#: run resolves its settings, and parsing pyproject.toml costs about a millisecond.
_SECTIONS: dict[Path, tuple[tuple[int, int, int], Settings | None]] = {}


def _cached_section(path: Path, read: Callable[[Path], Settings | None]) -> object:
    try:
        st = path.stat()
    except OSError:
        return _ABSENT
    if not path.is_file():
        return _ABSENT
    key = (st.st_ino, st.st_size, st.st_mtime_ns)
    cached = _SECTIONS.get(path)
    if cached is not None and cached[0] == key:
        return cached[1]
    section = read(path)  # a bad file raises every time: it is never cached
    _SECTIONS[path] = (key, section)
    return section


def _pyproject_section(pyproject: Path) -> Settings | None:
    try:
        data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, OSError, UnicodeDecodeError) as exc:
        raise InvalidSettingError(
            f"{pyproject}: cannot read it as TOML ({exc}); fix the file"
        ) from exc
    section = data.get("tool", {}).get("stepvisor")
    if section is None:
        return None
    if not isinstance(section, dict):
        raise InvalidSettingError(f"{pyproject}: [tool.stepvisor] must be a table")
    return _to_settings(section, where=str(pyproject))


def _setup_cfg_section(setup_cfg: Path) -> Settings | None:
    parser = configparser.ConfigParser()
    try:
        parser.read(setup_cfg, encoding="utf-8")
    except configparser.Error as exc:
        raise InvalidSettingError(f"{setup_cfg}: cannot read it ({exc}); fix the file") from exc
    if not parser.has_section("stepvisor"):
        return None
    raw = {k: _parse_text(k, v) for k, v in parser.items("stepvisor")}
    return _to_settings(raw, where=str(setup_cfg))


def resolve(
    workflow_settings: Settings | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Resolved:
    """Every setting's value, taken from the highest source that sets it."""
    override_settings = _to_settings(
        {k: v for k, v in (overrides or {}).items() if v is not None}, where="argument"
    )
    env = environment_settings(environ)
    project, project_file = find_project_settings(cwd)
    layers: list[tuple[str, Settings]] = [
        ("argument", override_settings),
        ("environment", env),
        ("workflow", workflow_settings or Settings()),
        (f"project ({project_file})" if project_file else "project", project),
    ]
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name in SETTING_NAMES:
        for source, layer in layers:
            value = getattr(layer, name)
            if value is not None:
                values[name] = value
                sources[name] = source
                break
        else:
            values[name] = DEFAULTS[name]
            sources[name] = "default"
    values["pools"] = dict(values["pools"])
    return Resolved(**values, sources=sources)
