"""The package's layers, held by walking the imports of every module of ``src/stepvisor``.

Two rules (DESIGN: a pure core, an actor shell, backends, front ends):

- the core imports nothing from the backends: the values they exchange
  (``AttemptSpec``, ``AttemptResult``) live in ``core/attempt.py``;
- code outside ``actors/`` imports no private module of it (``actors/_x.py``):
  it uses the seams ``actors/`` makes public (``actors/runs.py``, ``actors/calls.py``,
  ``messages``, ``supervisor``, ``worker``).

Every import counts, wherever it is: at the top, under ``TYPE_CHECKING`` or in a function.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import stepvisor
from stepvisor.backends import base
from stepvisor.core import attempt

PACKAGE = Path(stepvisor.__file__).resolve().parent


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(source: str, module: str, *, is_package: bool = False) -> Iterator[str]:
    """Every module name ``source`` (the text of ``module``) imports, relative ones resolved.

    ``from a.b import c`` yields ``a.b`` and ``a.b.c`` (``c`` may be a module).
    """
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def _private_actor_module(name: str) -> bool:
    parts = name.split(".")
    return parts[:2] == ["stepvisor", "actors"] and len(parts) > 2 and parts[2].startswith("_")


def violations(root: Path) -> list[str]:
    """Each import in the package at ``root`` that breaks one of the two rules."""
    found = []
    for path in sorted(root.rglob("*.py")):
        module = _module_name(path, root)
        names = set(imported(path.read_text(), module, is_package=path.name == "__init__.py"))
        in_core = module.startswith("stepvisor.core")
        in_actors = module == "stepvisor.actors" or module.startswith("stepvisor.actors.")
        for name in sorted(names):
            if in_core and (name == "stepvisor.backends" or name.startswith("stepvisor.backends.")):
                found.append(f"{module} imports {name}: the core imports nothing from backends/")
            if not in_actors and _private_actor_module(name):
                found.append(
                    f"{module} imports {name}: outside actors/, use its public seams "
                    "(actors/runs.py, actors/calls.py)"
                )
    return found


def test_the_core_imports_no_backend_and_no_one_reaches_into_the_actors() -> None:
    assert violations(PACKAGE) == []


def test_the_rules_catch_each_form_of_import(tmp_path: Path) -> None:
    root = tmp_path / "stepvisor"
    files = {
        "core/bad_top.py": "from stepvisor.backends.base import AttemptSpec\n",
        "core/bad_typing.py": (
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    import stepvisor.backends.thread\n"
        ),
        "core/bad_relative.py": "def f():\n    from ..backends import base\n",
        "core/good.py": "from stepvisor.core.attempt import AttemptSpec\n",
        "futures.py": "from stepvisor.actors._hub import CallHub\n",
        "compat/host.py": "from stepvisor.actors import _pool\n",
        "compat/good.py": "from stepvisor.actors.runs import RunPlan\n",
        "actors/runs.py": "from stepvisor.actors._shell import RunPlan\n",  # inside: fine
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    found = violations(root)
    assert [line.split(" imports ")[0] for line in found] == [
        "stepvisor.compat.host",
        "stepvisor.core.bad_relative",
        "stepvisor.core.bad_relative",
        "stepvisor.core.bad_top",
        "stepvisor.core.bad_top",
        "stepvisor.core.bad_typing",
        "stepvisor.futures",
        "stepvisor.futures",
    ]


def test_backends_base_still_names_the_attempt_values_it_used_to_define() -> None:
    assert base.AttemptSpec is attempt.AttemptSpec
    assert base.AttemptResult is attempt.AttemptResult
