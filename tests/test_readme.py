"""The README's first example, and its example of a map, run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _run(example: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run one example as a script in ``tmp_path``; it must exit 0."""
    script = tmp_path / "example.py"
    script.write_text(example)
    done = subprocess.run(
        [sys.executable, str(script)],
        check=False,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done


def test_first_python_example_runs(tmp_path: Path) -> None:
    blocks = _blocks()
    assert blocks, "README has no python example"
    example = blocks[0]
    assert len(example.strip().splitlines()) <= 20
    done = _run(example, tmp_path)
    assert "squared 4 chunks\nsucceeded [25, 36, 49, 64, 81]\n" in done.stdout


def test_the_map_example_runs_and_its_asserts_hold(tmp_path: Path) -> None:
    [example] = [block for block in _blocks() if 'sv.Workflow("parts"' in block]
    _run(example, tmp_path)
