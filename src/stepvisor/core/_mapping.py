"""Mapped steps in the run machine: expansion, instances, chains, and the step's summary.

A mapped step is one node of the static graph.  When its dependencies are met
the machine *expands* it: it learns its list (fixed in the workflow, an
artifact's value, or, for a chained map, the length of the map it is chained
to) and keeps a vector of instances in the run state
(:class:`~stepvisor.core.records.MapVec`: entries of the state's own tables,
past the steps').  Instances are dispatched, retried,
stopped and stored like steps, under ids ``"score[7]"``; nothing is added to
the graph.  When every instance has ended, the step itself ends with a summary
status, and, when all succeeded, with its artifacts: one list per name, in
index order.  Only then is it committed, so the commit sequence stays a pure
function of the workflow::

    deps met ──▶ expand ──▶ instances queued (urgency << 32 | index)
                   │             │ each ends: succeeded | failed | ... (retries as steps)
                   │             ▼
                   │        chained maps: b[i] queued when a[i] succeeded, skipped if it did not
                   ▼
              all ended ──▶ step's summary record (+ collected artifacts) ──▶ commit

This is a base class of :class:`~stepvisor.core.machine.RunMachine`, like
:class:`~stepvisor.core._settle.Settling`; the attributes it uses are the
machine's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from stepvisor.core.effects import SaveStep, SaveSteps
from stepvisor.core.records import (
    TERMINAL,
    StepRecord,
    StepStatus,
    instance_id,
    parse_instance_id,
)
from stepvisor.errors import MapOverError

if TYPE_CHECKING:
    from stepvisor.core._events import Emitter
    from stepvisor.core._inputs import Inputs, Visible
    from stepvisor.core.effects import Effect
    from stepvisor.core.graph import Graph
    from stepvisor.core.model import Step
    from stepvisor.core.state import RunState, RunStatus
    from stepvisor.policies.concurrency import Scheduler

__all__ = ["INDEX_KEY", "ITEM_KEY", "MapRun", "Mapped", "is_sequence", "summary_status"]

#: The keys an instance's item and index travel under, with its inputs: every
#: backend's data plane (shared memory for process steps, object references on
#: Ray) then carries the item as it carries any input.  ``StepContext`` takes
#: them out again; no artifact name can be either (they start with a NUL).
ITEM_KEY: Final = "\x00item"
INDEX_KEY: Final = "\x00index"

_FAILED: Final = (StepStatus.FAILED, StepStatus.TIMED_OUT)


def is_sequence(value: object) -> bool:
    """Whether ``value`` can be mapped over: sized and indexable, and not text or a mapping.

    Lists, tuples, ranges and NumPy arrays are; a ``str`` (a map over its
    characters is never what was meant), ``bytes``, a ``dict``, a set, a
    generator (no length, and read once) and ``None`` are not.
    """
    if isinstance(value, str | bytes | bytearray | Mapping) or value is None:
        return False
    kind = type(value)
    return hasattr(kind, "__len__") and hasattr(kind, "__getitem__")


def _indexable(value: object) -> Sequence[Any] | None:
    """``value`` as the machine reads a map's items, or ``None`` if it cannot be one.

    Lists, tuples, ranges and arrays (anything with a ``dtype``) are kept as they
    are; another sequence is copied into a list once, here, so that a user's
    ``__len__`` or ``__getitem__`` that raises fails the mapped step now, not
    the run's machinery at a dispatch.
    """
    if not is_sequence(value):
        return None
    if isinstance(value, list | tuple | range):
        return value
    try:
        if hasattr(value, "dtype"):
            len(value)  # type: ignore[arg-type]  # a 0-d array has no length
            return value  # type: ignore[return-value]
        copied: list[Any] = list(value)  # type: ignore[call-overload]
    except Exception:
        return None
    return copied


def summary_status(statuses: Sequence[StepStatus]) -> StepStatus:
    """A mapped step's status from its instances': ``succeeded`` only if all did.

    Otherwise ``failed`` if any failed or timed out, else ``cancelled`` if any
    was cancelled, else ``skipped``.
    """
    if all(s is StepStatus.SUCCEEDED for s in statuses):
        return StepStatus.SUCCEEDED
    if any(s in _FAILED for s in statuses):
        return StepStatus.FAILED
    if StepStatus.CANCELLED in statuses:
        return StepStatus.CANCELLED
    return StepStatus.SKIPPED


def _counts_note(size: int, statuses: Sequence[StepStatus]) -> str:
    counts: dict[str, int] = {}
    for s in statuses:
        counts[s.value] = counts.get(s.value, 0) + 1
    parts = ", ".join(f"{n} {name}" for name, n in sorted(counts.items()))
    return f"mapped over {size} items" + (f": {parts}" if parts else "")


@dataclass(slots=True)
class MapRun:
    """The machine's working set for one expanded mapped step."""

    size: int
    #: Instances not yet in a terminal status.
    left: int
    #: The items (fixed or an artifact's value); ``None`` for a chained map,
    #: whose item ``i`` is instance ``i``'s output of the map it is chained to.
    items: Sequence[Any] | None
    #: What every instance sees as ``ctx.inputs``: the step's other inputs.
    inputs: dict[str, Any] = field(default_factory=dict)
    #: The same inputs with the rank of each one's maker (a cache lookup keys on them).
    view: Any = None


class Mapped:
    """Mapped steps (a base of ``RunMachine``)."""

    graph: Graph
    state: RunState
    sched: Scheduler
    stopping: bool
    plan: Any
    _inputs: Inputs
    _events: Emitter
    _errors: dict[str, list[BaseException]]
    _fx: list[Effect]
    _wall: float
    _map_runs: dict[int, MapRun]
    _cached_maps: frozenset[int]
    _to_cache: set[tuple[int, int]]

    if TYPE_CHECKING:  # the machine's, Settling's and Caching's

        def _step(self, rank: int) -> Step: ...

        def _begin_stop(self, status: RunStatus, note: str) -> None: ...

        def _succeeded(self, r: int, record: StepRecord, outputs: Mapping[str, Any]) -> None: ...

        def _end_step(self, r: int, record: StepRecord, index: int = -1) -> None: ...

        def _queue_instance(self, r: int, index: int) -> None: ...

        def _cache_result(self, r: int, index: int, outputs: Mapping[str, Any]) -> None: ...

    # -- addressing ------------------------------------------------------------------

    def _uid(self, r: int, index: int) -> str:
        """The id of a unit of work: the step's, or its instance's."""
        sid = self.graph.order[r]
        return sid if index < 0 else instance_id(sid, index)

    def _unit(self, uid: str) -> tuple[int, int]:
        """(rank, index) of a step id or an instance id (index -1 for a step)."""
        rank = self.graph.rank.get(uid)
        if rank is not None:
            return rank, -1
        parsed = parse_instance_id(uid)
        assert parsed is not None, uid
        return self.graph.rank[parsed[0]], parsed[1]

    def _record_of(self, r: int, index: int) -> StepRecord:
        if index < 0:
            return self.state.record_at(r)
        return self.state.instance_record(r, index)

    def _put_record(self, r: int, index: int, record: StepRecord) -> None:
        if index < 0:
            self.state = self.state.set_step_at(r, record)
        else:
            self.state = self.state.set_instance(r, index, record)

    # -- expansion -------------------------------------------------------------------

    def _expand_ready(self) -> None:
        """Expand every mapped step whose dependencies were met (in rank order)."""
        sched = self.sched
        while sched.expandable:
            ready, sched.expandable = sorted(sched.expandable), []
            for r in ready:
                if not self.stopping:
                    self._expand(r)

    def _expand(self, r: int) -> None:
        step = self._step(r)
        link = self.graph.maps[r]
        items: Sequence[Any] | None = None
        if link.source is not None:
            inputs = self._inputs.partial(r, link.source)
            size = self._map_runs[link.source].size
        else:
            inputs = self._inputs.of(r)
            value = step.map_over if link.artifact is None else _value_of(inputs, link.artifact)
            items = _indexable(value)
            if items is None:
                self._bad_list(r, step, link.artifact or "", value)
                return
            size = len(items)
        run = MapRun(size, size, items, _plain(inputs), inputs)
        self._map_runs[r] = run
        self.state = self.state.expand(r, step.id, size)
        node = self.state.record_at(r).with_status(StepStatus.RUNNING, _counts_note(size, ()))
        self.state = self.state.set_step_at(r, node)
        self._fx.append(SaveStep(node))
        self._restore_instances(r, run)
        self._events.expanded(self._fx, step.id, size, size - run.left, self._wall)
        self._queue_instances(r, run, link.source)
        self.sched.expanded(r)
        if run.left == 0:
            self._complete(r)

    def _bad_list(self, r: int, step: Step, artifact: str, value: object) -> None:
        """The value to map over is not a sequence: the mapped step fails, once."""
        error = MapOverError(
            f"step {step.id!r} maps over the artifact {artifact!r}, but its value is a "
            f"{type(value).__name__}, not a sequence; make its creator return a list or "
            "tuple (for a generator, list(...) it first)",
            step_id=step.id,
        )
        self._errors.setdefault(step.id, []).append(error)
        record = self.state.record_at(r).with_status(StepStatus.FAILED, str(error))
        self._end_step(r, record)

    def _restore_instances(self, r: int, run: MapRun) -> None:
        """On resume: instances that succeeded before are kept, not run again."""
        restored: Mapping[str, Mapping[str, Any]] = self.plan.restored
        if not restored:
            return
        records = self.plan.restored_records
        sid = self.graph.order[r]
        kept: list[StepRecord] = []
        for i in range(run.size):
            uid = instance_id(sid, i)
            if uid in restored and uid in records:
                record = records[uid]._replace(status=StepStatus.SUCCEEDED, restored=True)
                self.state = self.state.succeed_instance(r, i, record, restored[uid])
                kept.append(record)
                run.left -= 1
        if kept:  # the store says so too, as it does of the steps a resume keeps
            self._fx.append(SaveSteps(tuple(kept)))

    def _queue_instances(self, r: int, run: MapRun, source: int | None) -> None:
        state = self.state
        cached = r in self._cached_maps  # each instance is looked up first (_caching.py)
        if source is None and run.left == run.size and not cached:  # all of them
            self.sched.push_all(r, run.size)
            return
        for i in range(run.size):
            if state.instance_kept(r, i) is not None:
                continue  # restored
            if source is None:
                self._queue_instance(r, i)
                continue
            status = state.instance_record(source, i).status
            if status is StepStatus.SUCCEEDED:
                if r in self._cached_maps:  # each instance looked up first
                    self._queue_instance(r, i)
                else:
                    self._push_chained(r, i, source)
            elif status in TERMINAL:
                self._skip_instance(r, i, source, status)

    def _push_chained(self, r: int, index: int, source: int) -> None:
        """Queue a chained instance, ordered by how long its source instance took."""
        last = self.state.instance_record(source, index).last_attempt
        self.sched.push_chained(r, index, None if last is None else last.duration)

    # -- instances ending ------------------------------------------------------------

    def _instance_inputs(self, r: int, index: int) -> Mapping[str, Any]:
        """What instance ``index`` is sent: the step's inputs, its item and its index.

        A plain dict, not a read-only view: ``StepContext`` copies it anyway, to
        take the item and the index out, and hands the step a view of its copy.
        """
        run = self._map_runs[r]
        item = run.items[index] if run.items is not None else self._chained_item(r, index)
        if not run.inputs:
            return {ITEM_KEY: item, INDEX_KEY: index}
        return {**run.inputs, ITEM_KEY: item, INDEX_KEY: index}

    def _chained_item(self, r: int, index: int) -> Any:
        """Item ``index`` of a chained map: that instance's output of the map before it."""
        link = self.graph.maps[r]
        assert link.source is not None
        assert link.artifact is not None
        return self.state.instance_output(link.source, index).get(link.artifact)

    def _instance_succeeded(
        self, r: int, index: int, record: StepRecord, outputs: Mapping[str, Any]
    ) -> None:
        self.state = self.state.succeed_instance(r, index, record, outputs)
        if self._to_cache and (r, index) in self._to_cache:
            self._cache_result(r, index, outputs)
        if self._events.on:
            self._events.finished(self._fx, record, self._wall)
        self._instance_ended(r, index, StepStatus.SUCCEEDED)

    def _instance_ended(self, r: int, index: int, status: StepStatus) -> None:
        """Instance ``index`` of ``r`` reached ``status`` (terminal): chains, then the step."""
        run = self._map_runs[r]
        run.left -= 1
        for c in self.sched.chained_to(r):
            if c not in self._map_runs:
                continue  # not expanded yet: it looks at this instance when it is
            if status is StepStatus.SUCCEEDED:
                if not self.stopping:
                    if c in self._cached_maps:  # each instance looked up first
                        self._queue_instance(c, index)
                    else:
                        self._push_chained(c, index, r)
            else:
                self._skip_instance(c, index, r, status)
        if run.left == 0:
            self._complete(r)

    def _skip_instance(self, r: int, index: int, source: int, status: StepStatus) -> None:
        """Instance ``index`` of the chained map ``r`` cannot run: its source's did not succeed."""
        record = self.state.instance_record(r, index)
        if record.terminal:
            return
        source_id = instance_id(self.graph.order[source], index)
        record = record.with_status(
            StepStatus.SKIPPED, f"skipped: it depends on {source_id!r}, which {status.value}"
        )
        self.state = self.state.set_instance(r, index, record)
        self._fx.append(SaveStep(record))
        self._events.finished(self._fx, record, self._wall)
        self._instance_ended(r, index, StepStatus.SKIPPED)

    def _complete(self, r: int) -> None:
        """Every instance of ``r`` ended: the mapped step ends with their summary."""
        statuses = [record.status for record in self.state.instance_records(r)]
        status = summary_status(statuses)
        node = self.state.record_at(r).with_status(status, _counts_note(len(statuses), statuses))
        if status is StepStatus.SUCCEEDED:
            outputs = _collect(self.state.instance_outputs(r), self._step(r).creates)
            # Its record alone: the store holds each instance's outputs already, and a
            # resume makes the lists again from them (see _restore_map), so a map's data
            # is stored once, not twice.
            self._fx.append(SaveStep(node))
            self._succeeded(r, node, outputs)
            return
        self._end_step(r, node)

    def _finish_maps(self, note: str) -> None:
        """The run ends: cancel every instance still pending, then sum their steps up."""
        leftovers = self.state.unfinished_instances()
        if leftovers:
            cancelled = []
            for r, i, pending in leftovers:
                record = pending.with_status(StepStatus.CANCELLED, note)
                self.state = self.state.set_instance(r, i, record)
                cancelled.append(record)
            self._fx.append(SaveSteps(tuple(cancelled)))
            for record in cancelled:
                self._events.finished(self._fx, record, self._wall)
        for r in sorted(self._map_runs):
            if not self.state.record_at(r).terminal:
                statuses = [record.status for record in self.state.instance_records(r)]
                node = self.state.record_at(r).with_status(
                    summary_status(statuses), _counts_note(len(statuses), statuses)
                )
                self.state = self.state.set_step_at(r, node)
                self._fx.append(SaveStep(node))
                self._events.finished(self._fx, node, self._wall)

    def _restore_map(self, r: int, sid: str) -> None:
        """A mapped step restored whole on resume: its instances come back, and its lists.

        The store keeps a mapped step's record without outputs: its lists are
        made again here from its instances' outputs.
        """
        records = self.plan.restored_records
        restored = self.plan.restored
        size = 0
        while instance_id(sid, size) in records:
            size += 1
        self.state = self.state.expand(r, sid, size)
        kept = []
        for i in range(size):
            uid = instance_id(sid, i)
            kept.append(records[uid]._replace(restored=True))
            self.state = self.state.succeed_instance(r, i, kept[-1], restored.get(uid, {}))
        if kept:
            self._fx.append(SaveSteps(tuple(kept)))
        self._map_runs[r] = MapRun(size, 0, None)
        collected = _collect(self.state.instance_outputs(r), self._step(r).creates)
        self.state = self.state.set_outputs(sid, collected)


def _value_of(view: Visible, name: str) -> object:
    entry = view.get(name)
    return None if entry is None else entry[1]


def _plain(view: Visible) -> dict[str, Any]:
    return {name: value for name, (_, value) in view.items()}


def _collect(outputs: Sequence[Mapping[str, Any]], names: Sequence[str]) -> dict[str, list[Any]]:
    """Each artifact the mapped step creates: its instances' values, in index order."""
    return {name: [produced.get(name) for produced in outputs] for name in names}
