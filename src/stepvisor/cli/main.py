"""The ``stepvisor`` command: run workflow files and look after their runs.

Commands::

    stepvisor run FILE [--max-parallel N] [--set KEY=VALUE ...] [--store PATH] [--report HTML]
    stepvisor resume RUN_ID [--force] [--max-parallel N] [--set KEY=VALUE ...] [--store PATH]
    stepvisor status [RUN_ID [STEP]] [--store PATH]
    stepvisor cancel RUN_ID [--wait SECONDS] [--store PATH]
    stepvisor report RUN_ID --html FILE [--store PATH]
    stepvisor logs RUN_ID [STEP] [--attempt N] [--follow] [--store PATH]
    stepvisor config [FILE] [--set KEY=VALUE ...]
    stepvisor cache [clear | prune [--older-than 7d] [--max-size 2G]] [--store PATH]

Runs are kept in a SQLite store, ``.stepvisor/runs.db`` under the current
directory unless ``--store`` says otherwise, so another ``stepvisor`` program can
watch (``status``), stop (``cancel``) or continue (``resume``) them.  ``--db`` is
the same option by its older name (the API and the docs call it the store).

Exit codes: 0 the run succeeded (or the command did its job), 1 the run failed,
2 bad usage or an invalid workflow/setting (one line on stderr, no traceback),
130 the run was cancelled (Ctrl-C, SIGTERM or ``stepvisor cancel``).

While a run goes, the main thread waits on the run in ``TICK`` slices and
redraws the progress display between them (:mod:`stepvisor.cli._follow`); the
Supervisor only appends events to a queue (see :mod:`stepvisor.cli._progress`).
What the commands print is in :mod:`stepvisor.cli._output`.
"""

from __future__ import annotations

import argparse
import difflib
import io
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from stepvisor._prepare import fingerprint
from stepvisor._runtime import resume_start, start
from stepvisor.cli._cache import add_cache_command
from stepvisor.cli._follow import SigtermError, follow
from stepvisor.cli._logs import add_logs_command, kept_logs
from stepvisor.cli._maps import mapped_size
from stepvisor.cli._output import (
    EXIT_CANCELLED,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    counts,
    duration,
    one_run,
    one_step,
    run_duration,
    say,
    table,
    when,
)
from stepvisor.cli._progress import TICK, Inbox, Progress, one_line
from stepvisor.cli._report import GraphNode, graph_of, write_html
from stepvisor.config import _parse_text, resolve
from stepvisor.core.model import SETTING_NAMES, Settings, Workflow
from stepvisor.core.result import RunResult
from stepvisor.core.state import RunStatus, StepStatus
from stepvisor.errors import InvalidSettingError, StepvisorError, StoreError, ValidationError
from stepvisor.policies.retry import RetryPolicy
from stepvisor.store.base import RunStore, StoredRun
from stepvisor.store.memory import MemoryStore
from stepvisor.store.sqlite import SQLiteStore
from stepvisor.workflow_file import load_workflow

__all__ = [
    "DEFAULT_DB",
    "EXIT_CANCELLED",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "build_parser",
    "main",
]

DEFAULT_DB: Final = os.path.join(".stepvisor", "runs.db")
_EXIT_BY_STATUS: Final[Mapping[RunStatus, int]] = {
    RunStatus.SUCCEEDED: EXIT_OK,
    RunStatus.FAILED: EXIT_FAILED,
    RunStatus.CANCELLED: EXIT_CANCELLED,
}


# -- settings from flags -------------------------------------------------------------


def _setting_override(item: str) -> tuple[str, Any]:
    """``KEY=VALUE`` from ``--set`` as a checked setting (name, value)."""
    key, sep, raw = item.partition("=")
    name = key.strip().replace("-", "_")
    if not sep or not name:
        raise InvalidSettingError(f"--set takes KEY=VALUE, e.g. --set max_parallel=4, got {item!r}")
    if name not in SETTING_NAMES:
        close = difflib.get_close_matches(name, SETTING_NAMES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InvalidSettingError(
            f"--set {item}: unknown setting {name!r}{hint}; settings are {', '.join(SETTING_NAMES)}"
        )
    try:
        value = _parse_text(name, raw)
    except ValidationError as exc:
        raise type(exc)(f"--set {item}: {exc}") from exc
    if name == "retry":  # its errors start with ``where`` already
        return name, RetryPolicy.from_mapping(value, where=f"--set {item}")
    try:
        Settings(**{name: value})  # the model's own check, with its own message
    except ValidationError as exc:
        raise type(exc)(f"--set {item}: {exc}") from exc
    return name, value


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    values = dict(_setting_override(item) for item in args.set or ())
    if getattr(args, "max_parallel", None) is not None:
        try:
            Settings(max_parallel=args.max_parallel)
        except ValidationError as exc:
            raise type(exc)(f"--max-parallel: {exc}") from exc
        values["max_parallel"] = args.max_parallel
    return values


# -- stores ----------------------------------------------------------------------------


def _codec() -> str:
    """The codec stores are opened with: the environment's or project's, else json."""
    return resolve(None, None).codec


#: ``--store :memory:``: a store in this program's memory, as SQLite names it.
_MEMORY: Final = ":memory:"


def _existing_store(db: str) -> SQLiteStore:
    if db == _MEMORY:
        raise StoreError(
            f"--store {_MEMORY} is an in-memory store: it holds only the runs of the program "
            "that made it, so no other command can see them; point --store at the store "
            "file the run was kept in (default: .stepvisor/runs.db)"
        )
    if not os.path.lexists(db):
        raise StoreError(
            f"there is no run store at {db}; start a run first (stepvisor run FILE), "
            "or point --store at the store the run was kept in"
        )
    return SQLiteStore(db, codec=_codec(), create=False)


# -- following a run ---------------------------------------------------------------------


def _mapped(wf: Workflow) -> list[str]:
    return [step.id for step in wf.steps if step.mapped]


def _headline(wf: Workflow, db: str, *, kept: int = 0) -> str:
    mapped = len(_mapped(wf))
    steps = f"{len(wf.steps)} steps" + (f" ({mapped} mapped)" if mapped else "")
    text = f"workflow {wf.id!r}, {steps}, store {db}"
    return text + (f" (resumed; {kept} succeeded steps kept)" if kept else "")


def _finish(
    result: RunResult, *, interrupted: bool, store: RunStore, report: str | None, wf: Workflow
) -> int:
    if report is not None:
        try:
            stored = store.load(result.run_id)
            path = write_html(
                stored, report, graph=graph_of(wf, stored), logs=kept_logs(store, result.run_id)
            )
        except OSError as exc:  # the run's own outcome still decides the exit code
            say(f"error: cannot write the report to {report}: {exc.strerror or exc}")
        else:
            print(f"report: {path}")
    if interrupted:
        return EXIT_CANCELLED
    return _EXIT_BY_STATUS.get(result.status, EXIT_FAILED)


def _start_error(exc: ValidationError, file: str) -> ValidationError:
    """Name the file in errors found when the run starts (pools, executors)."""
    return type(exc)(f"{file}: {exc}")


# -- commands -----------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    overrides = _overrides(args)  # flags first: a typo there is cheaper to report
    wf = load_workflow(args.file)
    codec = resolve(wf.settings, overrides).codec
    # --store :memory: runs without a file: nothing to resume or inspect afterwards.
    store: RunStore = (
        MemoryStore() if args.store == _MEMORY else SQLiteStore(args.store, codec=codec)
    )
    try:
        inbox = Inbox()
        try:
            handle = start(
                wf,
                store=store,
                on_event=inbox,
                source=str(Path(args.file).resolve()),
                **overrides,
            )
        except ValidationError as exc:
            raise _start_error(exc, args.file) from exc
        progress = Progress(wf.step_ids, mapped=_mapped(wf))
        result, interrupted = follow(
            handle, inbox=inbox, progress=progress, headline=_headline(wf, args.store)
        )
        return _finish(result, interrupted=interrupted, store=store, report=args.report, wf=wf)
    finally:
        store.close()


def cmd_resume(args: argparse.Namespace) -> int:
    overrides = _overrides(args)
    with _existing_store(args.store) as store:
        stored = store.load(args.run_id)
        source = stored.info.source
        if source is None:
            raise StepvisorError(
                f"run {args.run_id!r} has no workflow file recorded (it was started from "
                "Python); resume it from Python with sv.resume(run_id, workflow, store=...)"
            )
        if not os.path.exists(source):
            raise StepvisorError(
                f"run {args.run_id!r} was started from {source}, which no longer exists; "
                "put the workflow file back there to resume it"
            )
        wf = load_workflow(source)
        kept = [
            sid
            for sid, record in stored.steps.items()
            if record.status is StepStatus.SUCCEEDED and sid in wf.graph.rank
        ]
        inbox = Inbox()
        try:
            handle = resume_start(
                args.run_id,
                wf,
                store=store,
                force=args.force,
                on_event=inbox,
                source=source,
                **overrides,
            )
        except ValidationError as exc:
            raise _start_error(exc, source) from exc
        sizes = {sid: mapped_size(stored.steps[sid]) for sid in kept}
        progress = Progress(
            wf.step_ids,
            mapped=_mapped(wf),
            kept=kept,
            kept_sizes={sid: size for sid, size in sizes.items() if size is not None},
        )
        headline = _headline(wf, args.store, kept=len(kept))
        result, interrupted = follow(handle, inbox=inbox, progress=progress, headline=headline)
        return _finish(result, interrupted=interrupted, store=store, report=args.report, wf=wf)


def cmd_status(args: argparse.Namespace) -> int:
    with _existing_store(args.store) as store:
        if args.step is not None:
            print(one_step(store, args.run_id, args.step))
            return EXIT_OK
        if args.run_id is not None:
            print(one_run(store, args.run_id))
            return EXIT_OK
        runs = store.list_runs()
        if not runs:
            print(f"no runs in {args.store} yet; start one with: stepvisor run FILE")
            return EXIT_OK
        shown = runs if args.all else runs[: args.limit]
        rows = [
            [
                info.run_id,
                info.workflow_id,
                info.status.value,
                when(info.started),
                duration(run_duration(info)),
                counts(store.load(info.run_id).steps),
            ]
            for info in shown
        ]
        print(table(["RUN", "WORKFLOW", "STATUS", "STARTED", "DURATION", "STEPS"], rows))
        for info in shown:
            if info.status is RunStatus.RUNNING and info.owner is not None:
                print(f"run {info.run_id} is run by {info.owner.describe()}")
        if len(shown) < len(runs):
            print(f"({len(runs) - len(shown)} older runs not shown; use --all)")
        return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    with _existing_store(args.store) as store:
        info = store.load(args.run_id).info
        if info.status is not RunStatus.RUNNING:
            print(f"run {args.run_id} is not running ({info.status.value}); nothing to cancel")
            return EXIT_OK
        store.request_cancel(args.run_id)
        print(f"cancel requested for run {args.run_id}; its program stops it within a second")
        if args.wait is None:
            return EXIT_OK
        deadline = time.monotonic() + args.wait
        while store.load(args.run_id).info.status is RunStatus.RUNNING:
            if time.monotonic() > deadline:
                say(f"run {args.run_id} is still running after {args.wait:g} s")
                return EXIT_FAILED
            time.sleep(TICK)
        print(f"run {args.run_id} is {store.load(args.run_id).info.status.value}")
        return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    with _existing_store(args.store) as store:
        stored = store.load(args.run_id)
        path = write_html(
            stored,
            args.html,
            graph=_graph_from_source(stored),
            logs=kept_logs(store, args.run_id),
        )
    print(f"report: {path}")
    return EXIT_OK


def _graph_from_source(stored: StoredRun) -> list[GraphNode] | None:
    """The graph of the workflow file the run was started from, if it is there unchanged.

    ``None`` (the page says it is not drawn) for a run started from Python, a file
    gone or broken, or one whose steps changed since: its graph would not be this run's.
    """
    source = stored.info.source
    if source is None or not os.path.exists(source):
        return None
    try:
        wf = load_workflow(source)
    except Exception:  # even a step module that raises on import: the report goes on
        return None
    if fingerprint(wf) != stored.info.fingerprint:
        return None
    return graph_of(wf, stored)


def cmd_config(args: argparse.Namespace) -> int:
    overrides = _overrides(args)
    wf = load_workflow(args.file) if args.file else None
    resolved = resolve(wf.settings if wf else None, overrides)
    values = resolved.jsonable()
    names = {"argument": "--set", "workflow": f"workflow file {args.file}"}
    rows = [
        [name, names.get(source, source), json.dumps(values[name])]
        for name, _, source in resolved.describe()
    ]
    print(table(["SETTING", "FROM", "VALUE"], rows))
    return EXIT_OK


# -- parser -------------------------------------------------------------------------------


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return value


def _add_store(parser: argparse.ArgumentParser) -> None:
    # --db: the option's first name, kept so that existing scripts go on working.
    parser.add_argument(
        "--store",
        "--db",
        dest="store",
        default=DEFAULT_DB,
        metavar="PATH",
        help=f"run store, a SQLite file (default: {DEFAULT_DB}); --db is the same",
    )


def _add_settings(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set any setting, e.g. --set step_timeout=30 (repeatable)",
    )


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-parallel", type=int, metavar="N", help="steps run at once")
    _add_settings(parser)
    _add_store(parser)
    parser.add_argument("--report", metavar="HTML", help="write an HTML report there at the end")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stepvisor",
        description="Run workflow files: parallel, deadlined, retried, durable.",
        epilog="exit codes: 0 succeeded, 1 failed, 2 usage or invalid input, 130 cancelled",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="run a workflow file")
    p.add_argument("file", metavar="FILE", help="workflow YAML file")
    _add_run_options(p)
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser("resume", help="continue a stored run that failed, was cancelled or died")
    p.add_argument(
        "run_id", metavar="RUN_ID", help="the run to continue (stepvisor status lists them)"
    )
    p.add_argument("--force", action="store_true", help="resume even if the workflow changed")
    _add_run_options(p)
    p.set_defaults(handler=cmd_resume)

    p = sub.add_parser(
        "status", help="list runs, show one run's steps, or one step's attempts or instances"
    )
    p.add_argument("run_id", metavar="RUN_ID", nargs="?", help="one run: its steps")
    p.add_argument(
        "step",
        metavar="STEP",
        nargs="?",
        help="a step of RUN_ID: its attempts, or a mapped step's instances",
    )
    p.add_argument("--limit", type=int, default=20, metavar="N", help="runs listed (default 20)")
    p.add_argument("--all", action="store_true", help="list every run")
    _add_store(p)
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser("cancel", help="ask a running run to stop")
    p.add_argument("run_id", metavar="RUN_ID", help="the run to stop")
    p.add_argument(
        "--wait", type=_positive_float, metavar="SECONDS", help="wait up to SECONDS for it to stop"
    )
    _add_store(p)
    p.set_defaults(handler=cmd_cancel)

    p = sub.add_parser("report", help="write a run's HTML report (timeline, attempts, errors)")
    p.add_argument("run_id", metavar="RUN_ID", help="the run to draw")
    p.add_argument("--html", required=True, metavar="FILE", help="where to write the page")
    _add_store(p)
    p.set_defaults(handler=cmd_report)

    add_logs_command(sub, add_store=_add_store, open_store=_existing_store)
    add_cache_command(sub, add_store=_add_store, open_store=_existing_store)

    p = sub.add_parser("config", help="show the effective settings and where each comes from")
    p.add_argument("file", metavar="FILE", nargs="?", help="workflow file whose settings apply")
    _add_settings(p)
    p.set_defaults(handler=cmd_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    for stream in (sys.stdout, sys.stderr):
        # Step errors may hold any text; a terminal that cannot show it gets '?', not a crash.
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="replace")
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return handler(args)
    except StepvisorError as exc:
        say(f"error: {one_line(str(exc), limit=2000)}")
        return EXIT_USAGE
    except OSError as exc:
        say(f"error: {exc}")
        return EXIT_USAGE
    except (KeyboardInterrupt, SigtermError):
        return EXIT_CANCELLED
