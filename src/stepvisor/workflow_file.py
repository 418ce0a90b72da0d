"""Workflow files: a YAML description of a workflow, checked whole before anything runs.

A workflow file names its step functions as ``package.module:function`` and
holds only data besides; nothing in it is evaluated.  ``load_workflow`` turns it
into a :class:`~stepvisor.core.model.Workflow`::

    read text ─▶ YAML (safe, duplicate keys rejected) ─▶ check shape, keys, types
       ─▶ import each ``run:`` target ─▶ Step / Settings / RetryPolicy (their own checks)
       ─▶ Workflow (graph checks) ─▶ sv.Workflow

Every problem raises :class:`~stepvisor.errors.WorkflowFileError` whose message
starts with the file, then the step and the key at fault, e.g.
``etl.yaml: step 'load': retry.max_attempts must be >= 1, got 0; use 1 for no retries``.
Errors raised by the model's own constructors are wrapped and prefixed the same
way, so the rules live in one place (the model) and the file only adds where.

The file's directory is put first on ``sys.path`` so that ``run: steps:fetch``
finds ``steps.py`` next to the file; process steps inherit that path.
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
import sys
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import Any, Final, cast

import yaml

from stepvisor._validate import import_module, is_number, name_list, type_name
from stepvisor.core.model import SETTING_NAMES, Settings, Step, Workflow
from stepvisor.errors import ValidationError, WorkflowFileError
from stepvisor.policies.retry import RetryPolicy

__all__ = ["STEP_KEYS", "TOP_KEYS", "load_workflow", "resolve_target"]

TOP_KEYS: Final = ("id", "settings", "steps")
STEP_KEYS: Final = (
    "id",
    "run",
    "needs",
    "requires",
    "creates",
    "timeout",
    "retry",
    "executor",
    "pool",
    "with",
    "metadata",
    "resources",
    "map_over",
    "cache",
)
#: Names people reach for from other tools, mapped to ours (for "did you mean").
_ALIASES: Final[Mapping[str, str]] = {
    "params": "with",
    "parameters": "with",
    "args": "with",
    "kwargs": "with",
    "depends_on": "needs",
    "dependencies": "needs",
    "after": "needs",
    "deps": "needs",
    "fn": "run",
    "function": "run",
    "call": "run",
    "command": "run",
    "name": "id",
    "retries": "retry",
    "max_attempts": "retry",
    "outputs": "creates",
    "inputs": "requires",
}
_DOTTED: Final = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
_TARGET: Final = re.compile(rf"^(?P<module>{_DOTTED}):(?P<attr>{_DOTTED})$")


class _Where:
    """The position of a problem: file, then step, then key, joined as messages need."""

    def __init__(self, file: str) -> None:
        self.file = file

    def fail(self, message: str, *, step: str | None = None) -> WorkflowFileError:
        prefix = self.file if step is None else f"{self.file}: {step}"
        return WorkflowFileError(f"{prefix}: {message}")


# -- YAML ---------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """``SafeLoader`` that refuses duplicate keys (plain PyYAML keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = (key_node.tag, key_node.value)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping",
                        node.start_mark,
                        f"found the key {key_node.value!r} twice; keep one of them",
                        key_node.start_mark,
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str, where: _Where) -> object:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = exc.problem or exc.context or "invalid YAML"
        hint = (
            "only plain YAML data is allowed (no tags); name functions as 'module:function'"
            if "constructor for the tag" in problem
            else "fix the YAML syntax there (indentation, ':' after keys, quotes)"
        )
        raise where.fail(f"{at}{problem}; {hint}") from exc
    except yaml.YAMLError as exc:
        raise where.fail(f"cannot be read as YAML ({exc}); fix the syntax") from exc


def _read(path: Path, where: _Where) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise where.fail("no such file; check the path") from exc
    except IsADirectoryError as exc:
        raise where.fail("is a directory; give the path of a .yaml workflow file") from exc
    except UnicodeDecodeError as exc:
        raise where.fail(f"is not UTF-8 text ({exc.reason}); save it as UTF-8") from exc
    except OSError as exc:
        raise where.fail(f"cannot be read ({exc.strerror or exc}); check its permissions") from exc


# -- shape checks ---------------------------------------------------------------------


def _suggest(key: str, known: tuple[str, ...]) -> str:
    if key in _ALIASES and _ALIASES[key] in known:
        return f" (did you mean {_ALIASES[key]!r}?)"
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_keys(
    data: Mapping[Any, Any], known: tuple[str, ...], *, what: str, fail: Callable[[str], Exception]
) -> None:
    for key in data:
        if not isinstance(key, str):
            raise fail(f"{what} has the key {key!r} ({type_name(key)}); keys must be names")
        if key not in known:
            raise fail(
                f"unknown key {key!r}{_suggest(key, known)}; {what} takes {', '.join(known)}"
            )


def _mapping(
    value: object, *, key: str, example: str, fail: Callable[[str], Exception]
) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise fail(f"{key} must be a mapping such as {example}, got {type_name(value)}")
    for name in value:
        if not isinstance(name, str):
            raise fail(f"{key} has the key {name!r} ({type_name(name)}); keys must be names")
    return value


def _names(value: object, *, key: str, fail: Callable[[str], Exception]) -> tuple[str, ...]:
    items = name_list(value) if isinstance(value, str | list) else None
    if items is None or not all(isinstance(v, str) and v for v in items):
        raise fail(
            f"{key} must be a name or a list of names such as [extract, clean], "
            f"got {value!r} ({type_name(value)})"
        )
    return cast("tuple[str, ...]", items)


def _optional_str(value: object, *, key: str, fail: Callable[[str], Exception]) -> str | None:
    if value is None or (isinstance(value, str) and value):
        return value
    raise fail(f"{key} must be a non-empty string, got {value!r} ({type_name(value)})")


def _seconds(value: object, *, key: str, fail: Callable[[str], Exception]) -> float | None:
    if value is None:
        return None
    if not is_number(value):
        raise fail(
            f"{key} must be a number of seconds such as 30 or 2.5 (or null for no limit), "
            f"got {value!r} ({type_name(value)})"
        )
    return float(value)


# -- step functions ---------------------------------------------------------------------


def resolve_target(target: object) -> Callable[..., Any]:
    """Import ``package.module:function`` and return the callable it names.

    Raises :class:`WorkflowFileError` (without a file prefix) saying whether the
    reference is malformed, the module cannot be imported, the attribute is
    missing, or the object found is not callable.
    """
    if not isinstance(target, str):
        raise WorkflowFileError(
            f"run must be a 'module:function' reference such as 'etl_steps:load', "
            f"got {target!r} ({type_name(target)})"
        )
    match = _TARGET.match(target.strip())
    if match is None:
        module, dot, attr = target.rpartition(".")
        hint = f" (did you mean '{module}:{attr}'?)" if dot and ":" not in target else ""
        raise WorkflowFileError(
            f"run must look like 'module:function', e.g. 'etl_steps:load', got {target!r}{hint}"
        )
    module_name, attr_path = match["module"], match["attr"]
    found: object = _import_module(module_name)
    for depth, part in enumerate(attr_path.split(".")):
        if not hasattr(found, part):
            owner = module_name if depth == 0 else ".".join(attr_path.split(".")[:depth])
            close = difflib.get_close_matches(
                part, [n for n in dir(found) if not n.startswith("_")], n=1
            )
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise WorkflowFileError(
                f"run: {owner!r} has no attribute {part!r}{hint}; define it there or fix "
                f"the name in {target!r}"
            )
        found = getattr(found, part)
    if not callable(found):
        raise WorkflowFileError(
            f"run: {target!r} is {type_name(found)}, not a function; point run at a "
            "function that takes the step context"
        )
    return found


def _import_module(name: str) -> object:
    return import_module(
        name,
        prefix="run: ",
        fail=WorkflowFileError,
        fix=f"put {name.replace('.', '/')}.py next to the workflow file, "
        "or install the package that provides it",
    )


# -- building the model -------------------------------------------------------------------


def _model_error(exc: ValidationError, where: _Where, label: str) -> WorkflowFileError:
    """Prefix a model error with the file and ``label`` (unless it already says them)."""
    message = str(exc)
    if message.startswith(f"{where.file}: "):  # from_mapping(where=...) named the place
        return WorkflowFileError(message)
    if message.startswith((f"{label}:", f"{label} ")):
        return where.fail(message)
    return where.fail(message, step=label)


def _settings(data: object, where: _Where) -> Settings:
    def fail(message: str) -> Exception:
        return where.fail(message, step="settings")

    values = _mapping(data, key="settings", example="{max_parallel: 4}", fail=fail)
    _check_keys(values, SETTING_NAMES, what="settings", fail=fail)
    kwargs = dict(values)
    if "pools" in kwargs:
        kwargs["pools"] = _mapping(kwargs["pools"], key="pools", example="{db: 2}", fail=fail)
    try:
        if "retry" in kwargs:
            kwargs["retry"] = RetryPolicy.from_mapping(
                kwargs["retry"], where=f"{where.file}: settings"
            )
        return Settings(**kwargs)
    except ValidationError as exc:
        raise _model_error(exc, where, "settings") from exc


def _step_id(data: dict[str, Any], index: int, where: _Where) -> str:
    label = f"steps[{index}]"
    if "id" not in data:
        raise where.fail("has no id; give every step a unique id such as id: extract", step=label)
    sid = data["id"]
    if not isinstance(sid, str) or not sid.strip():
        # YAML reads yes/no/on/off as booleans and 1.0 as a number: quoting keeps text.
        hint = "; quote it to keep it text, e.g. id: 'no'" if isinstance(sid, int | float) else ""
        raise where.fail(
            f"id must be a non-empty string, got {sid!r} ({type_name(sid)}){hint}", step=label
        )
    return sid


def _step(data: object, index: int, where: _Where) -> Step:
    if not isinstance(data, dict):
        raise where.fail(
            f"must be a mapping with at least id and run, got {type_name(data)}",
            step=f"steps[{index}]",
        )
    sid = _step_id(data, index, where)
    label = f"step {sid!r}"

    def fail(message: str) -> Exception:
        return where.fail(message, step=label)

    _check_keys(data, STEP_KEYS, what="a step", fail=fail)
    if "run" not in data:
        raise fail("has no run; name its function, e.g. run: etl_steps:load")
    kwargs: dict[str, Any] = {
        "needs": _names(data.get("needs", []), key="needs", fail=fail),
        "requires": _names(data.get("requires", []), key="requires", fail=fail),
        "creates": _names(data.get("creates", []), key="creates", fail=fail),
        "timeout": _seconds(data.get("timeout"), key="timeout", fail=fail),
        "executor": _optional_str(data.get("executor"), key="executor", fail=fail),
        "pool": _optional_str(data.get("pool"), key="pool", fail=fail),
        "params": _mapping(data.get("with", {}), key="with", example="{table: orders}", fail=fail),
        "metadata": _mapping(
            data.get("metadata", {}), key="metadata", example="{cost: 2}", fail=fail
        ),
    }
    if data.get("map_over") is not None:
        kwargs["map_over"] = _map_over(data["map_over"], fail=fail)
    if "cache" in data:  # cache: true, cache: false, cache: {version: "2", expire: 3600}
        kwargs["cache"] = data["cache"]
    if data.get("resources") is not None:
        kwargs["resources"] = _mapping(
            data["resources"], key="resources", example="{CPU: 2}", fail=fail
        )
    try:
        fn = resolve_target(data["run"])
    except WorkflowFileError as exc:
        raise fail(str(exc)) from exc
    try:
        if data.get("retry") is not None:
            kwargs["retry"] = RetryPolicy.from_mapping(
                data["retry"], where=f"{where.file}: {label}"
            )
        return Step(sid, fn, **kwargs)
    except ValidationError as exc:
        raise _model_error(exc, where, label) from exc


def _map_over(value: object, *, fail: Callable[[str], Exception]) -> str | list[Any]:
    """``map_over: chunks`` (an artifact) or ``map_over: [0, 1, 2]`` (the items)."""
    if isinstance(value, str | list):
        return value
    raise fail(
        f"map_over must be an artifact's name or a list of items, got {type_name(value)}; "
        "write map_over: chunks, or map_over: [0, 1, 2]"
    )


def _steps(data: object, where: _Where) -> list[Step]:
    if not isinstance(data, list) or not data:
        raise where.fail(
            f"steps must be a non-empty list of steps (each '- id: ...' with a run), "
            f"got {type_name(data)}"
        )
    return [_step(item, i, where) for i, item in enumerate(data)]


def _on_sys_path(directory: Path) -> None:
    """Put ``directory`` first on ``sys.path`` so modules next to the file import."""
    entry = os.fspath(directory)
    if not sys.path or sys.path[0] != entry:
        sys.path.insert(0, entry)
    importlib.invalidate_caches()  # the directory may have changed since the last import


def load_workflow(path: str | os.PathLike[str]) -> Workflow:
    """Read, check and build the workflow described by the YAML file at ``path``.

    The file's directory goes first on ``sys.path`` before any ``run:`` target
    is imported.  Raises :class:`WorkflowFileError` naming the file, the step
    and the key for any problem; nothing runs before the whole file is valid.
    """
    file = Path(path)
    where = _Where(os.fspath(path))
    data = _parse_yaml(_read(file, where), where)
    if data is None:
        raise where.fail("is empty; a workflow file needs at least id and steps")
    if not isinstance(data, dict):
        raise where.fail(
            f"must be a mapping with id, settings and steps at the top, got {type_name(data)}"
        )
    _check_keys(data, TOP_KEYS, what="a workflow file", fail=where.fail)
    if "id" not in data:
        raise where.fail("has no id; name the workflow at the top, e.g. id: etl")
    wf_id = data["id"]
    if not isinstance(wf_id, str) or not wf_id.strip():
        raise where.fail(f"id must be a non-empty string, got {wf_id!r} ({type_name(wf_id)})")
    settings = _settings(data["settings"], where) if data.get("settings") is not None else None
    _on_sys_path(file.resolve().parent)
    steps = _steps(data.get("steps"), where)
    try:
        return Workflow(wf_id, steps, settings=settings)
    except ValidationError as exc:
        raise where.fail(str(exc)) from exc
