"""A process or Ray step defined in ``__main__`` fails with a traceback naming its file.

cloudpickle sends such a function by value and names its code
``<dynamic-code>``; the traceback must still name the script's file and line,
with the source line, as a thread step's does.  A notebook's cell exists only
in the sending program: its lines travel with the function.
"""

from __future__ import annotations

import linecache
import pickle
import shutil
import subprocess
import sys
import tempfile
import textwrap
import types
from pathlib import Path

import pytest

from stepvisor.backends._located import DYNAMIC
from stepvisor.backends.process import prepare_payload
from tests.cli_helpers import cli_env

SCRIPT = """
import stepvisor as sv

def helper(n):
    raise ValueError(f"bad value {{n}}")  # the line the traceback must show

def work(ctx):
    helper(7)

if __name__ == "__main__":
    wf = sv.Workflow("main", [sv.Step("work", work, executor={executor!r})])
    result = sv.run(wf)
    print(result.steps["work"].attempts[-1].error_traceback)
"""


@pytest.mark.realtime
@pytest.mark.parametrize(
    "executor", ["process", pytest.param("ray", marks=[pytest.mark.ray, pytest.mark.slow])]
)
def test_a_step_from_a_script_names_its_file_line_and_source(tmp_path: Path, executor: str) -> None:
    if executor == "ray":
        pytest.importorskip("ray", reason="Ray is not installed: pip install 'stepvisor[ray]'")
    script = tmp_path / "flow.py"
    script.write_text(textwrap.dedent(SCRIPT.format(executor=executor)))
    # Ray's session files go to a short directory of this test's own (its socket
    # paths must fit in 107 bytes), removed after.
    scratch = tempfile.mkdtemp(prefix="svtb", dir="/tmp")
    try:
        proc = subprocess.run(
            [sys.executable, str(script)],
            capture_output=True,
            text=True,
            timeout=120,
            env=cli_env(TMPDIR=scratch, RAY_USAGE_STATS_ENABLED="0"),
            check=False,
            cwd=tmp_path,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert DYNAMIC not in text
    assert f'File "{script}", line 8, in work\n    helper(7)\n' in text
    assert f'File "{script}", line 5, in helper\n    raise ValueError(f"bad value {{n}}")' in text
    assert "ValueError: bad value 7" in text


def test_a_cell_that_exists_nowhere_else_sends_its_lines_along() -> None:
    filename = "<notebook-cell-42>"
    source = "def cell_step(ctx):\n    return 1 / 0\n"
    code = compile(source, filename, "exec")
    namespace: dict[str, object] = {"__name__": "__main__"}
    exec(code, namespace)
    fn = namespace["cell_step"]
    assert isinstance(fn, types.FunctionType)
    fn.__module__ = "__main__"
    lines = source.splitlines(True)
    linecache.cache[filename] = (len(source), None, lines, filename)
    try:
        payload = prepare_payload("cell", fn)
    finally:
        del linecache.cache[filename]
    assert DYNAMIC.encode() in payload  # cloudpickle's name is in there, and ours with it
    loaded = pickle.loads(payload)
    assert loaded.__code__.co_filename == filename
    try:
        loaded(None)
    except ZeroDivisionError as exc:
        import traceback  # noqa: PLC0415

        text = "".join(traceback.format_exception(exc))
    assert f'File "{filename}", line 2, in cell_step\n    return 1 / 0\n' in text
