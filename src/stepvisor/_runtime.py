"""Running a workflow: ``run``, ``start``, ``run_async`` and ``resume``.

This module prepares a run (resolve settings, check what can be checked
before anything starts (:mod:`stepvisor._prepare`), open and claim the store),
starts it on an engine, and gives the caller a
:class:`~stepvisor._handle.RunHandle`.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from stepvisor._handle import RunHandle
from stepvisor._log import log
from stepvisor._prepare import (
    MEMORY,
    StoreArg,
    _check_pools,
    _executors,
    _open_store,
    _payloads,
    _run_tracer,
    fingerprint,
)
from stepvisor.actors.supervisor import RunPlan, StartRun
from stepvisor.actors.worker import (
    check_backends,
)
from stepvisor.backends.base import Backend
from stepvisor.clock import Clock, RealClock
from stepvisor.config import Resolved, resolve
from stepvisor.core.events import Event
from stepvisor.core.model import Workflow
from stepvisor.core.records import parse_instance_id
from stepvisor.core.result import RunResult
from stepvisor.core.state import RunStatus, StepStatus
from stepvisor.engine import Engine
from stepvisor.errors import (
    FingerprintMismatchError,
    InvalidSettingError,
    RunOwnedError,
    StoreError,
)
from stepvisor.store.base import ClaimingStore, RunStore

__all__ = ["RunHandle", "fingerprint", "resume", "run", "run_async", "start"]


_DEFAULT_CLOCK = RealClock()


def start(
    wf: Workflow,
    *,
    store: StoreArg = None,
    on_event: Callable[[Event], None] | None = None,
    clock: Clock | None = None,
    run_id: str | None = None,
    source: str | None = None,
    backends: Mapping[str, Backend] | None = None,
    engine: Engine | None = None,
    _resume: Any = None,
    **overrides: Any,
) -> RunHandle:
    """Start ``wf`` and return at once with a :class:`RunHandle`.

    Keyword overrides (``max_parallel=``, ``on_failure=``, ``step_timeout=``,
    ``deadline=``, ``kill_grace=``, ``executor=``, ``retry=``, ``pools=``,
    ``seed=``, ``max_worker_crashes=``, ``max_retries_total=``, ``codec=``,
    ``ray_address=``) take precedence over every other source.  ``backends=``
    maps executor names to :class:`~stepvisor.backends.base.Backend` objects
    that run those steps instead of the built-in ones (a test's
    :class:`~stepvisor.testing.FakeBackend`); the caller keeps and closes them.
    ``engine=`` runs on a warm :class:`~stepvisor.Engine` (its Workers, process
    children, loop and Ray are kept for the next run); without one, the run
    has a private engine, closed when it ends.
    """
    if not isinstance(wf, Workflow):
        raise InvalidSettingError(
            f"expected a stepvisor.Workflow, got {type(wf).__name__}; build one with "
            "sv.Workflow(id, steps=[...]) or load a file with sv.load_workflow(path)"
        )
    check_backends(backends)
    if engine is not None and backends:
        raise InvalidSettingError(
            "backends= cannot be given to a run on an Engine: its Workers are shared; "
            "give them to the engine instead: sv.Engine(backends=...)"
        )
    cfg = resolve(wf.settings, overrides)
    _check_pools(wf, cfg)
    executors = _executors(wf, cfg)
    payloads = _payloads(wf, executors)
    the_store, owned = _open_store(store, cfg.codec)
    claimed: str | None = None
    try:
        if _resume is not None:
            plan_extra, run_id, seed = _resume(the_store, cfg)
            claimed = run_id
        else:
            plan_extra = {}
            seed = cfg.seed if cfg.seed is not None else secrets.randbits(32)
            if run_id is None:
                run_id = uuid.uuid4().hex[:12]
            elif not isinstance(the_store, ClaimingStore):
                _check_run_id_is_new(the_store, run_id)
            if isinstance(the_store, ClaimingStore):
                the_store.claim_run(run_id, new=True)
                claimed = run_id
        handle = _launch(
            wf,
            cfg,
            store=the_store,
            owned=owned,
            executors=executors,
            payloads=payloads,
            clock=clock or _DEFAULT_CLOCK,
            run_id=run_id,
            seed=seed,
            on_event=on_event,
            source=source,
            plan_extra=plan_extra,
            backends=backends,
            engine=engine,
        )
    except BaseException:
        _release(the_store, claimed)
        if owned:
            the_store.close()
        raise
    # finish_run gives the run up; this covers a run that ended without it
    # (a store fault, a Supervisor failure), so the run can be resumed at once.
    handle._add_done_callback(lambda _: _release(the_store, claimed))
    return handle


def _release(store: RunStore, run_id: str | None) -> None:
    if run_id is not None and isinstance(store, ClaimingStore):
        try:
            store.release_run(run_id)
        except Exception:
            log.exception("giving up run %s in its store failed", run_id)


def _check_run_id_is_new(store: RunStore, run_id: str) -> None:
    """A new run must not take a stored run's id: it would overwrite its history."""
    if not store.exists(run_id):
        return
    raise StoreError(
        f"run id {run_id!r} is already used by a run in this store; choose another "
        f"run_id, or continue that run with resume({run_id!r}, ...)"
    )


def _launch(
    wf: Workflow,
    cfg: Resolved,
    *,
    store: RunStore,
    owned: bool,
    executors: tuple[str, ...],
    payloads: dict[str, bytes],
    clock: Clock,
    run_id: str,
    seed: int,
    on_event: Callable[[Event], None] | None,
    source: str | None,
    plan_extra: dict[str, Any],
    backends: Mapping[str, Backend] | None,
    engine: Engine | None,
) -> RunHandle:
    plan = RunPlan(
        workflow=wf,
        settings=cfg,
        run_id=run_id,
        seed=seed,
        clock=clock,
        store=store,
        fingerprint=fingerprint(wf),
        executors=executors,
        payloads=payloads,
        on_event=on_event,
        source=source,
        observer=_run_tracer(wf, run_id, executors),
        **plan_extra,
    )
    handle = RunHandle(run_id, cfg.kill_grace)
    private = engine is None
    if engine is None:
        engine = Engine(
            max_parallel=cfg.max_parallel, ray_address=cfg.ray_address, backends=backends
        )
    the_engine = engine

    def cleanup() -> None:
        the_engine._dismiss(handle)
        if private:
            the_engine.close()
        if owned:
            store.close()

    try:
        the_engine._admit(handle, executors)  # an unreachable Ray cluster fails here
    except BaseException:
        if private:
            the_engine.close()
        raise
    handle._cleanup.append(cleanup)
    handle._quick_finalize = not private
    ref = the_engine._supervisor_ref()
    handle._supervisor = ref
    ref.tell(StartRun(plan, handle._complete, not private))
    return handle


def run(wf: Workflow, **kwargs: Any) -> RunResult:
    """Run ``wf`` to the end and return its :class:`~stepvisor.RunResult`.

    Ctrl-C (``KeyboardInterrupt``) cancels the run, waits for it to stop
    (every attempt stopped, every step terminal, the store consistent), then
    re-raises.
    """
    handle = start(wf, **kwargs)
    try:
        return handle.wait()
    except KeyboardInterrupt:
        handle.cancel()
        with contextlib.suppress(TimeoutError):
            handle.wait(timeout=handle._grace + 30.0)
        raise


async def run_async(wf: Workflow, **kwargs: Any) -> RunResult:
    """Run ``wf`` from inside an asyncio program without blocking its loop.

    Cancelling the task that awaits this cancels the run (and waits for it to
    stop) before the cancellation propagates.
    """
    loop = asyncio.get_running_loop()
    handle = start(wf, **kwargs)
    done: asyncio.Future[RunResult] = loop.create_future()

    def on_done(result: RunResult) -> None:
        def settle() -> None:
            if not done.done():
                done.set_result(result)

        with contextlib.suppress(RuntimeError):  # the loop may be closed already
            loop.call_soon_threadsafe(settle)

    handle._add_done_callback(on_done)
    try:
        await asyncio.shield(done)
    except asyncio.CancelledError:
        handle.cancel()
        # Stay until the run has really stopped, even through further cancels:
        # returning early would leave attempts running behind the caller's back.
        while not done.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(done)
        await _finalize_off_loop(handle)
        raise
    if handle._quick_finalize:
        # On a shared engine only the run's Supervisor thread is left, and it
        # ends right after handing over the result: join it here, not in a
        # thread started for the purpose (which cost as much as a whole run).
        handle._finalize()
    else:
        await _finalize_off_loop(handle)
    return done.result()


async def _finalize_off_loop(handle: RunHandle) -> None:
    """Join the run's threads without blocking the caller's event loop."""
    loop = asyncio.get_running_loop()
    joined: asyncio.Future[None] = loop.create_future()

    def settle() -> None:
        if not joined.done():
            joined.set_result(None)

    def join() -> None:
        try:
            handle._finalize()
        finally:
            with contextlib.suppress(RuntimeError):  # the loop may be closed already
                loop.call_soon_threadsafe(settle)

    threading.Thread(target=join, name="stepvisor-finalize", daemon=True).start()
    await asyncio.shield(joined)


def resume(
    run_id: str,
    wf: Workflow,
    *,
    store: StoreArg,
    force: bool = False,
    **kwargs: Any,
) -> RunResult:
    """Continue a stored run: succeeded steps keep their artifacts, the rest run.

    Refused (``FingerprintMismatchError``) if ``wf`` changed since the run
    started, unless ``force=True``.
    """
    return resume_start(run_id, wf, store=store, force=force, **kwargs).wait()


def resume_start(
    run_id: str,
    wf: Workflow,
    *,
    store: StoreArg,
    force: bool = False,
    **kwargs: Any,
) -> RunHandle:
    """Like :func:`resume`, but return a :class:`RunHandle` at once."""
    if store is None:
        raise InvalidSettingError(
            "resume needs the store the run was kept in: pass store='path/to/runs.db'"
        )
    if isinstance(store, str) and store == MEMORY:
        raise InvalidSettingError(
            f"resume needs the store the run was kept in, but store={MEMORY!r} is a new, "
            "empty in-memory store; pass the MemoryStore object the run was kept in, or "
            "the path of a store file (a run survives its program only in a file)"
        )

    def prepare(the_store: RunStore, cfg: Resolved) -> tuple[dict[str, Any], str, int]:
        plan = _plan_resume(the_store, run_id, wf, force=force)  # refusals write nothing
        if not isinstance(the_store, ClaimingStore):
            return plan
        # The claim is one atomic check-and-write; once it is ours nobody else
        # writes the run, so we read it again: that is what we resume.
        the_store.claim_run(run_id, new=False)
        try:
            return _plan_resume(the_store, run_id, wf, force=force)
        except BaseException:
            _release(the_store, run_id)
            raise

    return start(wf, store=store, _resume=prepare, **kwargs)


def _in_workflow(wf: Workflow, sid: str) -> bool:
    """Whether ``sid`` is a step of ``wf``, or an instance of one of its mapped steps."""
    if sid in wf.graph.rank:
        return True
    parsed = parse_instance_id(sid)
    return parsed is not None and wf.graph.rank.get(parsed[0]) in wf.graph.maps


def _plan_resume(
    the_store: RunStore, run_id: str, wf: Workflow, *, force: bool
) -> tuple[dict[str, Any], str, int]:
    """What a resumed run keeps: the succeeded steps' records and artifacts."""
    stored = the_store.load(run_id)
    if not isinstance(the_store, ClaimingStore) and stored.info.status is RunStatus.RUNNING:
        raise RunOwnedError(
            f"run {run_id!r} is still running (its heartbeat is fresh); cancel it with "
            f"`stepvisor cancel {run_id}` or wait for it before resuming",
            run_id=run_id,
        )
    now_fp = fingerprint(wf)
    if stored.info.fingerprint != now_fp and not force:
        raise FingerprintMismatchError(
            f"run {run_id!r} was started with a different workflow "
            f"(fingerprint {stored.info.fingerprint}, now {now_fp}): its steps, "
            "functions or parameters changed; resume with force=True (--force) to run "
            "it anyway, or start a new run"
        )
    restored = {
        sid: dict(stored.outputs.get(sid, {}))
        for sid, record in stored.steps.items()
        if record.status is StepStatus.SUCCEEDED and _in_workflow(wf, sid)
    }
    records = {sid: stored.steps[sid] for sid in restored}
    return {"restored": restored, "restored_records": records}, run_id, stored.info.seed
