"""What a run needs before it starts, checked before anything runs.

The workflow's fingerprint (what a resume compares), each step's executor,
the pickled functions of process and Ray steps, the store to open, and a
tracer when OpenTelemetry is set up.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterator
from os import PathLike
from typing import Final

from stepvisor.actors.runs import RunObserver
from stepvisor.config import Resolved
from stepvisor.core.model import Step, Workflow
from stepvisor.errors import (
    InvalidSettingError,
)
from stepvisor.store._unkept import Unkept
from stepvisor.store.base import RunStore

__all__ = ["MEMORY", "StoreArg", "fingerprint"]

StoreArg = RunStore | str | PathLike[str] | None


def fingerprint(wf: Workflow) -> str:
    """A digest of what makes a workflow's steps what they are.

    It covers the graph, each step's function (by qualified name), executor,
    pool and parameters, but not timeouts or retry policies, which a resumed
    run may change freely.
    """
    h = hashlib.sha256()
    h.update(wf.id.encode())
    for step in _in_canonical_order(wf):
        sid = step.id
        fn = step.fn
        name = f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(type(fn)))}"
        parts = [
            sid,
            ",".join(step.needs),
            ",".join(step.requires),
            ",".join(step.creates),
            name,
            str(step.executor),
            str(step.pool),
            repr(sorted(step.params.items())) if step.params else "",
            "" if step.map_over is None else f"map_over={step.map_over!r}",
        ]
        h.update("\x1f".join(parts).encode())
        h.update(b"\x1e")
    return h.hexdigest()[:16]


def _in_canonical_order(wf: Workflow) -> Iterator[Step]:
    """The steps by canonical rank, without an id lookup each."""
    steps = wf.steps
    return (steps[i] for i in wf.graph.step_at_rank)


#: The store name that means "in memory", as it does for SQLite itself.
MEMORY: Final = ":memory:"


def _open_store(store: StoreArg, codec: str) -> tuple[RunStore, bool]:
    """The store to run with, and whether this run opened it (so closes it)."""
    if store is None or (isinstance(store, str) and store == MEMORY):
        # Only this run could read a fresh store: it keeps nothing (store/_unkept.py).
        return Unkept(), True
    if isinstance(store, str | PathLike):
        from stepvisor.store.sqlite import SQLiteStore  # noqa: PLC0415

        return SQLiteStore(store, codec=codec), True
    return store, False


def _executors(wf: Workflow, cfg: Resolved) -> tuple[str, ...]:
    out: list[str] = []
    for step in _in_canonical_order(wf):
        if step.executor is not None:
            out.append(step.executor)
        elif step.is_async and cfg.executor == "thread":
            out.append("async")
        else:
            out.append(cfg.executor)
    return tuple(out)


def _check_pools(wf: Workflow, cfg: Resolved) -> None:
    for step in wf.steps:
        if step.pool is not None and step.pool not in cfg.pools:
            raise InvalidSettingError(
                f"step {step.id!r} uses pool {step.pool!r}, but no pool of that name is "
                f"configured; add it, e.g. Settings(pools={{{step.pool!r}: 2}})"
            )


def _payloads(wf: Workflow, executors: tuple[str, ...]) -> dict[str, bytes]:
    """Pickle process/Ray step functions once, before anything runs."""
    payloads: dict[str, bytes] = {}
    if "process" not in executors and "ray" not in executors:
        return payloads
    from stepvisor.backends.process import prepare_payload  # noqa: PLC0415

    # Many steps share a function: pickle each once (the workflow keeps it alive meanwhile).
    made: dict[int, bytes] = {}
    for step, executor in zip(_in_canonical_order(wf), executors, strict=True):
        if executor in ("process", "ray"):
            payload = made.get(id(step.fn))
            if payload is None:
                payload = made[id(step.fn)] = prepare_payload(step.id, step.fn)
            payloads[step.id] = payload
    return payloads


def _run_tracer(wf: Workflow, run_id: str, executors: tuple[str, ...]) -> RunObserver | None:
    """OpenTelemetry spans for this run, if a tracer provider is set (:mod:`stepvisor._otel`).

    A provider can only have been set by code that imported ``opentelemetry.trace``,
    or through ``OTEL_PYTHON_TRACER_PROVIDER``: otherwise nothing is imported.
    """
    if "opentelemetry.trace" not in sys.modules and "OTEL_PYTHON_TRACER_PROVIDER" not in os.environ:
        return None
    try:
        from stepvisor._otel import run_tracer  # noqa: PLC0415 - the optional extra
    except ImportError:
        return None
    return run_tracer(run_id, wf.id, dict(zip(wf.graph.order, executors, strict=True)))
