"""Fixtures of the cache-key tests: user modules written to a temporary folder, digested
in a fresh interpreter, rewritten, digested again in another.

:func:`digest_in_child` is the one way the tests read a digest across processes: each
call is a new ``python -c`` with its own ``PYTHONHASHSEED`` (so a digest that leaned on
``hash()`` of a str or on set order would differ) and no bytecode cache (a module rewritten
within the same second, at the same size, must not be read from a stale ``.pyc``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

__all__ = ["SEEDS", "digest_in_child", "write_modules"]

ROOT = Path(__file__).resolve().parent.parent.parent
SEEDS = ("1", "2")

_PRELUDE = """\
import json, sys
sys.path.insert(0, {folder!r})
{first}
from stepvisor.cache._code import code_digest
from stepvisor.cache._digest import value_digest
"""


def write_modules(folder: Path, modules: dict[str, str]) -> None:
    """Write each ``name: source`` as ``folder/name.py`` (``a/b`` makes a package folder)."""
    for name, source in modules.items():
        path = folder / f"{name}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))


def digest_in_child(
    folder: Path,
    expressions: dict[str, str],
    *,
    setup: str = "",
    seed: str = "1",
    first: str = "",
) -> dict[str, str]:
    """Run ``setup`` (imports, definitions) in a new interpreter with ``folder`` on the path,
    then evaluate each expression there (``code_digest(mod.f)``); their values by key.
    ``first`` runs before stepvisor's cache is imported."""
    program = (
        _PRELUDE.format(folder=str(folder), first=first)
        + textwrap.dedent(setup)
        + f"\nprint(json.dumps({{k: eval(v) for k, v in {expressions!r}.items()}}))\n"
    )
    env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONDONTWRITEBYTECODE="1")
    done = subprocess.run(
        [sys.executable, "-c", program],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert isinstance(result, dict)
    return {str(k): str(v) for k, v in result.items()}
