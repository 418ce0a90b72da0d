"""The client's own executors, run with scripted steps, and what they leave behind.

Why this shape: the integration test must run tapps-agents' ``WorkflowExecutor``
and ``CursorWorkflowExecutor`` as they are, once on the client's own
``ParallelStepExecutor`` and once on ``stepvisor.compat``'s, changing nothing
but the name both modules import (``from .parallel_executor import
ParallelStepExecutor``).  The one seam replaced is where a step's work is
done, the ``_execute_step_for_parallel`` method each executor wraps in the
``execute_fn`` it hands to ``execute_parallel``: there the client would call
agents and LLMs; here a script says what each call of each step does.

Everything the run leaves is gathered as plain data (the in-memory state,
the saved state file, the timeline, the health report, the files written),
with what differs between any two runs (times, durations, checksums,
timestamped names) replaced by placeholders that still say whether a time
was naive or aware.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

import stepvisor.compat

executor_module = importlib.import_module("tapps_agents.workflow.executor")
cursor_module = importlib.import_module("tapps_agents.workflow.cursor_executor")
parallel_module = importlib.import_module("tapps_agents.workflow.parallel_executor")
models = importlib.import_module("tapps_agents.workflow.models")
parser = importlib.import_module("tapps_agents.workflow.parser")
timeline_module = importlib.import_module("tapps_agents.workflow.timeline")

PRESETS_DIR = Path(importlib.import_module("tapps_agents").__file__ or "").parent / (
    "resources/workflows/presets"
)
ENGINES = {
    "original": parallel_module.ParallelStepExecutor,
    "stepvisor": stepvisor.compat.ParallelStepExecutor,
}

#: A condition value in rapid-dev.yaml that the client's own schema refuses
#: (so it cannot load its own preset on either executor); the test runs that
#: preset with the value the schema allows.
SHIPPED_SCHEMA_SLIPS = {"rapid-dev": {"mandatory": "required"}}


def load_preset(name: str) -> Any:
    """A shipped preset as the client parses it (with its one schema slip corrected)."""
    text = (PRESETS_DIR / f"{name}.yaml").read_text(encoding="utf-8")
    content = yaml.safe_load(text)
    for step in content.get("workflow", {}).get("steps", []):
        fix = SHIPPED_SCHEMA_SLIPS.get(name, {})
        if step.get("condition") in fix:
            step["condition"] = fix[step["condition"]]
    return parser.WorkflowParser.parse(content)


# -- the step work ------------------------------------------------------------------------


@dataclass
class Script:
    """What each call of each step does: "ok", "fail", "flaky" or "hang" (the default: ok)."""

    plan: dict[str, list[str]] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    hung: asyncio.Event = field(default_factory=asyncio.Event)

    async def _act(self, step: Any) -> None:
        self.calls.append(step.id)
        todo = self.plan.get(step.id)
        what = todo.pop(0) if todo else "ok"
        if what == "fail":
            raise ValueError(f"{step.id}: compile error in fixed.py line 3")
        if what == "flaky":
            raise ConnectionError(f"{step.id}: connection reset by the model server")
        if what == "hang":
            self.hung.set()
            await asyncio.Event().wait()  # until a timeout or a cancel ends it

    async def headless(self, step: Any, target_path: Path | None) -> dict[str, Any] | None:
        """``WorkflowExecutor._execute_step_for_parallel``: artifacts by name, or None."""
        await self._act(step)
        return {name: {"name": name, "path": f"out/{name}"} for name in step.creates} or None

    async def cursor(self, step: Any, target_path: Path | None) -> Any:
        """``CursorWorkflowExecutor._execute_step_for_parallel``: a StepResult, never raising."""
        started = datetime.now()
        error: str | None
        try:
            await self._act(step)
        except Exception as exc:  # the client's method reports, not raises
            status, error, artifacts = "failed", str(exc), []
        else:
            status, error, artifacts = "completed", None, list(step.creates)
        return models.StepResult(
            step_id=step.id,
            status=status,
            success=error is None,
            duration=(datetime.now() - started).total_seconds(),
            started_at=started,
            completed_at=datetime.now(),
            error=error,
            artifacts=artifacts,
        )


# -- one run ------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What a run left behind, normalized (see :func:`normalize`)."""

    calls: list[str]
    raised: str | None
    state: Any
    records: list[Any]  # the live StepExecution objects, for the tests' own checks
    saved: Any
    timeline: Any
    timeline_md: str | None
    health: Any
    files: list[str]

    def as_data(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "raised": self.raised,
            "state": self.state,
            "saved": self.saved,
            "timeline": self.timeline,
            "timeline_md": self.timeline_md,
            "health": self.health,
            "files": self.files,
        }


@contextlib.contextmanager
def swapped(engine: str) -> Iterator[None]:
    """Both executors' module attribute ``ParallelStepExecutor``: the one import, changed."""
    modules = (executor_module, cursor_module)
    before = [getattr(m, "ParallelStepExecutor") for m in modules]  # noqa: B009
    for module in modules:
        setattr(module, "ParallelStepExecutor", ENGINES[engine])  # noqa: B010
    try:
        yield
    finally:
        for module, original in zip(modules, before, strict=True):
            setattr(module, "ParallelStepExecutor", original)  # noqa: B010


@dataclass
class Run:
    """How to run: which client executor, step timeout, a cancel once a step hangs."""

    mode: str  # "headless" (WorkflowExecutor) or "cursor" (CursorWorkflowExecutor)
    timeout: float | None = None
    cancel_when_hung: bool = False
    tweak: Callable[[Any], None] | None = None


def prepare_project(root: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """A project directory the client can run in without beads, network or prompts."""
    root.mkdir(parents=True)
    (root / ".tapps-agents").mkdir()
    (root / ".tapps-agents" / "config.yaml").write_text(
        "beads:\n  enabled: false\n  required: false\n", encoding="utf-8"
    )
    monkeypatch.chdir(root)
    monkeypatch.setenv("HOME", str(root / "home"))
    monkeypatch.setenv("TAPPS_AGENTS_PRESERVE_WORKFLOW_ID", "true")
    if mode == "cursor":
        monkeypatch.setenv("TAPPS_AGENTS_MODE", "cursor")
    else:
        monkeypatch.setenv("TAPPS_AGENTS_MODE", "headless")


async def _drive(executor: Any, workflow: Any, script: Script, run: Run) -> str | None:
    if run.mode == "cursor":
        coro = executor.run(workflow=workflow)
    else:
        coro = executor.execute(workflow=workflow)
    task = asyncio.ensure_future(coro)
    try:
        if run.cancel_when_hung:
            async with asyncio.timeout(30):
                hung = asyncio.ensure_future(script.hung.wait())
                await asyncio.wait([task, hung], return_when=asyncio.FIRST_COMPLETED)
                hung.cancel()
            task.cancel()
        async with asyncio.timeout(60):
            await task
    except asyncio.CancelledError:
        return "CancelledError"
    except Exception as exc:  # what the client raised is part of the outcome
        return f"{type(exc).__name__}: {exc}"
    return None


def run_workflow(
    engine: str, root: Path, workflow: Any, script: Script, run: Run, mp: pytest.MonkeyPatch
) -> Outcome:
    """Run ``workflow`` on the client's executor with ``engine`` behind it."""
    prepare_project(root, mp, run.mode)

    async def main() -> tuple[Any, str | None]:
        script.hung = asyncio.Event()
        with swapped(engine):
            if run.mode == "cursor":
                executor = cursor_module.CursorWorkflowExecutor(project_root=root)
            else:
                executor = executor_module.WorkflowExecutor(project_root=root, auto_detect=False)
        assert isinstance(executor.parallel_executor, ENGINES[engine])
        executor.auto_progression.max_retry_backoff = 0.0  # the client's own retries: no wait
        if run.timeout is not None:
            executor.parallel_executor.default_timeout_seconds = run.timeout
        if run.tweak is not None:
            run.tweak(executor)
        executor._execute_step_for_parallel = getattr(script, run.mode)
        raised = await _drive(executor, workflow, script, run)
        return executor, raised

    executor, raised = asyncio.run(main())
    return gather(root, executor, workflow, script, raised, mode=run.mode)


# -- what it left -------------------------------------------------------------------------

_ISO = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(?P<tz>[+-]\d{2}:\d{2}|Z)?")
_STAMPED_NAME = re.compile(r"\d{8}-\d{6}(-\d{6})?|\d{10}\.\d+")
_SECONDS_KEYS = ("duration", "elapsed", "time_since", "timestamp_ms")


def _time_tag(match: re.Match[str]) -> str:
    return "<aware time>" if match.group("tz") else "<naive time>"


def normalize(value: Any, *, key: str = "") -> Any:
    """``value`` with run-specific parts replaced; naive and aware times stay told apart.

    Times become ``<naive time>`` or ``<aware time>``, durations ``<seconds>``
    (or ``<negative seconds>``), timestamps in names ``<stamp>``; the rest,
    error texts included, is kept as it is.
    """
    if isinstance(value, dict):
        return {k: normalize(v, key=str(k)) for k, v in value.items() if k != "_checksum"}
    if isinstance(value, list | tuple):
        return [normalize(v, key=key) for v in value]
    if isinstance(value, datetime):
        return "<aware time>" if value.tzinfo is not None else "<naive time>"
    if isinstance(value, int | float) and not isinstance(value, bool):
        if any(word in key for word in _SECONDS_KEYS):
            return "<seconds>" if value >= 0 else "<negative seconds>"
        return value
    if isinstance(value, str):
        if "duration_formatted" in key and value != "N/A":
            return "<duration>"
        return _STAMPED_NAME.sub("<stamp>", _ISO.sub(_time_tag, value))
    return value


def _normalize_markdown(text: str) -> str:
    text = _STAMPED_NAME.sub("<stamp>", _ISO.sub(_time_tag, text))
    return re.sub(r"\b\d+(\.\d+)?(s|m|h)\b", "<duration>", text)


def _record(se: Any) -> dict[str, Any]:
    return {
        "step_id": se.step_id,
        "agent": se.agent,
        "action": se.action,
        "started_at": se.started_at,
        "completed_at": se.completed_at,
        "duration_seconds": se.duration_seconds,
        "status": se.status,
        "error": se.error,
    }


def _saved_state(root: Path, workflow_id: str, mode: str) -> Any:
    state_dir = root / ".tapps-agents" / "workflow-state"
    if mode == "cursor":
        path = state_dir / f"{workflow_id}.json"
    else:
        last = state_dir / "last.json"
        if not last.exists():
            return None
        path = Path(json.loads(last.read_text(encoding="utf-8"))["state_file"])
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def gather(
    root: Path, executor: Any, workflow: Any, script: Script, raised: str | None, *, mode: str
) -> Outcome:
    state = executor.state
    wid = state.workflow_id if state is not None else ""
    state_data = None
    timeline = health = None
    if state is not None:
        state_data = {
            "workflow_id": state.workflow_id,
            "started_at": state.started_at,
            "status": state.status,
            "error": state.error,
            "current_step": state.current_step,
            "completed_steps": list(state.completed_steps),
            "skipped_steps": list(state.skipped_steps),
            "artifacts": {
                name: {"path": a.path, "status": a.status, "created_by": a.created_by}
                for name, a in state.artifacts.items()
            },
            "step_executions": [_record(se) for se in state.step_executions],
        }
        # The client's own readers of the records: they must not raise on them.
        timeline = timeline_module.generate_timeline(state, workflow)
        if mode == "cursor":
            health = executor.get_workflow_health()
    timeline_file = root / "project-timeline.md"
    files = sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "home" not in p.parts
    )
    return Outcome(
        calls=list(script.calls),
        raised=raised,
        state=normalize(state_data),
        records=list(state.step_executions) if state is not None else [],
        saved=normalize(_saved_state(root, wid, mode)),
        timeline=normalize(timeline),
        timeline_md=(
            _normalize_markdown(timeline_file.read_text(encoding="utf-8"))
            if timeline_file.exists()
            else None
        ),
        health=normalize(health),
        # Names only, each once: how many timestamped saves a run makes depends
        # on how many clock seconds it spans.
        files=sorted({normalize(f) for f in files}),
    )
