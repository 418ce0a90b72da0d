"""MkDocs hooks: the parts of the docs site that are made from the code, at build time.

Written out by hand, a reference drifts from what it describes; made here, a build
after any change shows the change, and ``mkdocs build --strict`` fails where a page
names something that no longer exists.

- ``<!-- cli-reference -->`` in a page becomes the command line's reference, walked
  from the argparse parser the program itself uses (``stepvisor.cli.main.build_parser``).
- ``<!-- api-reference -->`` becomes one mkdocstrings block per public name, taken
  from ``stepvisor``'s own export table, so a name added there is documented without
  editing a page (``<!-- api-reference MODULE -->``: the names of ``MODULE.__all__``).
- ``CONTRIBUTING.md`` (at the repository root, where GitHub shows it) is served as
  ``contributing.md``, and the charts the benchmark harness draws
  (``benchmarks/results/*.png``) as ``img/*.png``: one copy of each, in its own place.
"""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path
from typing import TYPE_CHECKING

import stepvisor
from stepvisor.cli.main import build_parser

if TYPE_CHECKING:  # mkdocs is there when the site is built; the tests use the rest without it
    from mkdocs.config.defaults import MkDocsConfig
    from mkdocs.structure.files import Files

ROOT = Path(__file__).resolve().parent.parent
CHARTS = ROOT / "benchmarks" / "results"

_API = re.compile(r"<!-- api-reference(?: ([\w.]+))? -->")


def cli_reference() -> str:
    """The command line's reference in Markdown, from the program's own parser."""
    parser = build_parser()
    lines = [
        f"`{parser.prog}`: {parser.description}",
        "",
        "```text",
        _usage(parser),
        "```",
        "",
    ]
    if parser.epilog:
        lines += [parser.epilog[0].upper() + parser.epilog[1:] + ".", ""]
    for name, sub, summary in _subcommands(parser):
        lines += [f"## `stepvisor {name}`", "", summary[0].upper() + summary[1:] + ".", ""]
        lines += ["```text", _usage(sub), "```", ""]
        lines += _arguments(sub)
    return "\n".join(lines)


def _usage(parser: argparse.ArgumentParser) -> str:
    # A fixed width, so that the page does not depend on the terminal of whoever builds it.
    formatter = argparse.HelpFormatter(parser.prog, width=88)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    return formatter.format_help().strip()


def _subcommands(
    parser: argparse.ArgumentParser,
) -> list[tuple[str, argparse.ArgumentParser, str]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, sub in action.choices.items():
                found.append((name, sub, helps.get(name, "")))
    return found


def _arguments(parser: argparse.ArgumentParser) -> list[str]:
    rows = ["| argument | what it is |", "|---|---|"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if action.option_strings:
            shown = ", ".join(
                f"`{flag} {action.metavar}`" if action.metavar else f"`{flag}`"
                for flag in action.option_strings
            )
        else:
            shown = f"`{action.metavar or action.dest}`"
            if action.nargs == "?":
                shown += " (optional)"
        text = (action.help or "").replace("|", "\\|")
        if action.required and action.option_strings:
            text += " (required)"
        rows.append(f"| {shown} | {text} |")
    return [*rows, ""]


def public_names(module: str | None = None) -> list[tuple[str, str]]:
    """``(public name, dotted path of its definition)`` for a module's public API.

    For ``stepvisor`` itself: the lazy export table (the errors have their own page);
    for any other module, its ``__all__``.
    """
    if module is None:
        return [
            (name, f"{where}.{name}")
            for where, names in stepvisor._EXPORTS.items()
            for name in sorted(names)
        ]
    loaded = importlib.import_module(module)
    names = []
    for name in loaded.__all__:
        value = getattr(loaded, name)
        home = getattr(value, "__module__", None)
        # Constants and type aliases have no home of their own (or a typing module's):
        # document them where they are.
        if not (isinstance(home, str) and home.startswith("stepvisor")) or not hasattr(
            value, "__qualname__"
        ):
            home = module
        names.append((name, f"{home}.{name}"))
    return names


#: How ``stepvisor``'s own names are grouped on the page, in a reader's order; a name
#: in none of the groups is still documented, under the last heading.
GROUPS: dict[str, tuple[str, ...]] = {
    "Defining a workflow": ("Workflow", "Step", "Settings", "StepContext", "load_workflow"),
    "Running it": ("run", "start", "run_async", "RunHandle", "resume", "resume_start", "Engine"),
    "Calls as futures": ("Executor",),
    "Results and records": ("RunResult", "RunStatus", "StepRecord", "StepStatus", "AttemptRecord"),
    "Retries": ("RetryPolicy", "Backoff"),
    "Stores": ("RunStore", "MemoryStore", "SQLiteStore"),
    "Events": (
        "Event",
        "RunStarted",
        "StepDispatched",
        "StepExpanded",
        "StepRetrying",
        "StepFinished",
        "StepCommitted",
        "RunFinished",
    ),
    "Settings, resolved": ("resolve", "Resolved"),
    "Clocks": ("Clock", "RealClock", "FakeClock"),
}
_OTHERS = "More"


def _block(name: str, path: str, level: int) -> str:
    return (
        f"::: {path}\n    options:\n      heading: {name}\n      toc_label: {name}\n"
        f"      heading_level: {level}"
    )


def api_reference(module: str | None = None) -> str:
    """One mkdocstrings block per public name, headed by the name users write.

    ``stepvisor``'s names come in the groups of ``GROUPS``; a module's in its order.
    """
    names = public_names(module)
    if module is not None:
        return "\n\n".join(_block(name, path, 3) for name, path in names)
    where = dict(names)
    blocks = []
    for group, members in [*GROUPS.items(), (_OTHERS, tuple(sorted(where)))]:
        present = [name for name in members if name in where]
        if present:
            blocks.append(f"## {group}")
            blocks += [_block(name, where.pop(name), 3) for name in present]
    return "\n\n".join(blocks)


def on_page_markdown(markdown: str, **_: object) -> str:
    markdown = markdown.replace("<!-- cli-reference -->", cli_reference())
    return _API.sub(lambda match: api_reference(match.group(1)), markdown)


def on_files(files: Files, config: MkDocsConfig) -> Files:
    from mkdocs.structure.files import File  # noqa: PLC0415 - only where the site is built

    contributing = (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
    files.append(File.generated(config, "contributing.md", content=contributing))
    for chart in sorted(CHARTS.glob("*.png")):
        files.append(File.generated(config, f"img/{chart.name}", abs_src_path=str(chart)))
    return files
