"""Every Python example of the docs and the README runs, as written; the site's parts
that are made from the code (the command line and API references) cover all of it.

Each page's ```` ```python ```` blocks run in order as one script, in a fresh folder,
as a reader who copies them one after the other would; a block with a title
(```` ```python title="flow.py" ````) is a file of the example, written into that
folder instead of run. An example that stops working fails here, and so in CI.
A page whose examples import an optional dependency that is not installed (Ray,
joblib, ...) is skipped, naming it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

import stepvisor
from stepvisor.cli.main import build_parser
from tests.browser import need_chromium, screenshot

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(
    [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *DOCS.rglob("*.md")],
    key=lambda path: str(path.relative_to(ROOT)),
)
_FENCE = re.compile(r"^```python([^\n]*)\n(.*?)^```", flags=re.S | re.M)
_TITLE = re.compile(r'title="([^"]+)"')
_IMPORT = re.compile(r"^\s*(?:import|from)\s+([\w]+)", flags=re.M)
#: What an example may need that stepvisor's own install does not bring.
OPTIONAL = {
    "ray": "stepvisor[ray]",
    "joblib": "stepvisor[joblib]",
    "sklearn": "scikit-learn",
    "numpy": "numpy",
    "opentelemetry": "stepvisor[otel] and opentelemetry-sdk",
    "dask": "stepvisor[bench]",
}


@dataclass(frozen=True)
class Example:
    """A page's examples: the script its untitled blocks make, and its files."""

    script: str
    files: dict[str, str]


def examples(page: Path) -> Example:
    script: list[str] = []
    files: dict[str, str] = {}
    for info, body in _FENCE.findall(page.read_text(encoding="utf-8")):
        title = _TITLE.search(info)
        if title:
            files[title.group(1)] = body
        else:
            script.append(body)
    return Example("\n".join(script), files)


PAGES_WITH_CODE = [page for page in PAGES if _FENCE.search(page.read_text(encoding="utf-8"))]


def _missing(example: Example) -> list[str]:
    needed = sorted(_imports(example) & set(OPTIONAL))
    return [name for name in needed if importlib.util.find_spec(name) is None]


def _imports(example: Example) -> set[str]:
    return set(_IMPORT.findall("\n".join([example.script, *example.files.values()])))


@pytest.mark.parametrize(
    "page",
    [
        # A page on Ray starts a local Ray instance (tens of seconds here): marked as such.
        pytest.param(page, marks=[pytest.mark.ray, pytest.mark.slow])
        if "ray" in _imports(examples(page))
        else page
        for page in PAGES_WITH_CODE
    ],
    ids=[str(p.relative_to(ROOT)) for p in PAGES_WITH_CODE],
)
def test_the_examples_of_a_page_run(page: Path, tmp_path: Path) -> None:
    example = examples(page)
    missing = _missing(example)
    if missing:
        pytest.skip(
            f"its examples import {', '.join(missing)}, not installed here "
            f"(pip install {', '.join(OPTIONAL[name] for name in missing)})"
        )
    for name, body in example.files.items():
        (tmp_path / name).write_text(body, encoding="utf-8")
    if not example.script.strip():
        return
    script = tmp_path / "example.py"
    script.write_text(example.script, encoding="utf-8")
    # The example's temporary files (Ray's session folder, ...) go to a folder of its own,
    # removed afterwards; under /tmp, since Ray's socket paths must stay short (< 108 bytes).
    scratch = tempfile.mkdtemp(prefix="svdoc-", dir="/tmp")
    try:
        done = subprocess.run(
            [sys.executable, str(script)],
            check=False,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            start_new_session=True,
            env={**os.environ, "TMPDIR": scratch},
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    assert done.returncode == 0, f"{page.name}: {done.stderr[-4000:]}"


def test_every_page_with_code_is_found_and_readme_and_docs_have_examples() -> None:
    names = {str(p.relative_to(ROOT)) for p in PAGES_WITH_CODE}
    assert "README.md" in names
    assert "docs/tutorial/first-workflow.md" in names
    assert len(names) >= 15


def test_a_titled_block_is_a_file_and_the_rest_one_script(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        'Text.\n\n```python title="mod.py"\nX = 1\n```\n\n```sh\nls\n```\n\n'
        "```python\nimport mod\n```\n\n```python\nprint(mod.X)\n```\n"
    )
    found = examples(page)
    assert found.files == {"mod.py": "X = 1\n"}
    assert found.script == "import mod\n\nprint(mod.X)\n"
    assert _missing(Example("import ray_not_a_module\nimport os\n", {})) == []


def test_the_readme_is_short_and_links_into_the_docs() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150
    for target in re.findall(r"\]\(((?:docs/|CONTRIBUTING)[^)#]*)", text):
        assert (ROOT / target).is_file(), target
    images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    assert images, "the README shows no benchmark chart"
    for image in images:
        assert (ROOT / image).is_file(), image
    assert "make test" in text  # the command CI runs (.ci/run)


def test_every_page_is_in_the_site_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for page in DOCS.rglob("*.md"):
        assert str(page.relative_to(DOCS)) in nav, page


def _hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "_hooks.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cli_reference_names_every_command_and_option() -> None:
    text = _hooks().cli_reference()
    parser = build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(sub.choices) >= 7
    for name, command in sub.choices.items():
        assert f"## `stepvisor {name}`" in text
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue  # every command has -h; the page says so once, in each usage line
            for flag in action.option_strings:
                assert f"`{flag}" in text, (name, flag)
            if action.help and action.help != argparse.SUPPRESS:
                assert action.help.replace("|", "\\|") in text


def test_the_api_reference_covers_every_public_name() -> None:
    hooks = _hooks()
    api = (DOCS / "reference" / "api.md").read_text(encoding="utf-8")
    errors = (DOCS / "reference" / "errors.md").read_text(encoding="utf-8")
    documented = {name for name, _ in hooks.public_names()}
    assert "<!-- api-reference -->" in api
    assert "::: stepvisor.errors" in errors
    assert documented | set(stepvisor.errors.__all__) | {"__version__"} == set(stepvisor.__all__)
    for module in re.findall(r"<!-- api-reference ([\w.]+) -->", api):
        names = {name for name, _ in hooks.public_names(module)}
        assert names == set(importlib.import_module(module).__all__)
    assert "stepvisor.compat" in api
    assert "stepvisor.joblib" in api
    assert "stepvisor.testing" in api
    for name, path in hooks.public_names():
        block = hooks.api_reference()
        assert f"::: {path}\n" in block
        assert f"heading: {name}\n" in block


@pytest.mark.realtime
def test_the_site_builds_and_its_first_page_renders_in_headless_chromium(tmp_path: Path) -> None:
    """The built site's first page, as a reader's browser draws it: not a blank page."""
    need_chromium()
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed here: pip install -e '.[docs]' (make docs does)")
    site = tmp_path / "site"
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert built.returncode == 0, built.stderr[-4000:]
    index = site / "index.html"
    html = index.read_text(encoding="utf-8")
    assert "<h1" in html
    assert "stepvisor" in html
    assert 'href="tutorial/first-workflow/"' in html
    shot = Path(os.environ.get("STEPVISOR_DOCS_SHOT", tmp_path / "shot.png"))
    data = screenshot(index, shot, tmp_path, size=(1280, 900), env=os.environ)
    assert len(data) > 40_000  # a blank or unstyled page compresses to far less
