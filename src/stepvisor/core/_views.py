"""A run state's records as a read-only mapping of step id to record (``StepsView``)."""

from __future__ import annotations

from collections.abc import ItemsView, Iterator, Mapping, ValuesView

from stepvisor.core._table import table_get
from stepvisor.core.records import StepRecord, _unkept, instance_id, parse_instance_id
from stepvisor.core.state import RunState

__all__ = ["StepsView"]


class _ItemsView(ItemsView[str, StepRecord]):
    _mapping: StepsView

    def __iter__(self) -> Iterator[tuple[str, StepRecord]]:
        return ((record.step_id, record) for record in self._mapping._state.all_records())


class _ValuesView(ValuesView[StepRecord]):
    _mapping: StepsView

    def __iter__(self) -> Iterator[StepRecord]:
        return self._mapping._state.all_records()


class StepsView(Mapping[str, StepRecord]):
    """A run state's records as a read-only mapping of step id to record.

    A run's result hands back every step's record, and building a dict of
    them at the end of a big run made as many objects as the run kept (three
    per step, see ``stepvisor.core.records._kept``) in one burst, and
    the cyclic GC's full passes over a heap growing that fast were most of the
    run's last seconds.  The view builds a record when it is read.  It holds
    a mapped step's instances too (``"score[7]"``), right after their step.
    It is immutable like the state it reads; a pickled view comes back as a
    plain ``dict``.
    """

    __slots__ = ("_state",)

    def __init__(self, state: RunState) -> None:
        self._state = state

    def __getitem__(self, step_id: str) -> StepRecord:
        state = self._state
        rank = state.rank.get(step_id)
        if rank is not None:
            return _unkept(table_get(state.records, rank))
        found = self._instance(step_id)
        if found is None:
            raise KeyError(step_id)
        return state.instance_record(*found)

    def _instance(self, step_id: object) -> tuple[int, int] | None:
        """(rank, index) of an instance id of this state's expanded maps."""
        if not self._state.maps or not isinstance(step_id, str):
            return None
        parsed = parse_instance_id(step_id)
        if parsed is None:
            return None
        rank = self._state.rank.get(parsed[0])
        vec = None if rank is None else self._state.maps.get(rank)
        if rank is None or vec is None or parsed[1] >= vec.size:
            return None
        return rank, parsed[1]

    def __contains__(self, step_id: object) -> bool:
        return step_id in self._state.rank or self._instance(step_id) is not None

    def __iter__(self) -> Iterator[str]:
        state = self._state
        if not state.maps:
            return iter(state.order)
        return self._ids_with_instances()

    def _ids_with_instances(self) -> Iterator[str]:
        maps = self._state.maps
        for r, sid in enumerate(self._state.order):
            yield sid
            vec = maps.get(r)
            if vec is not None:
                yield from (instance_id(sid, i) for i in range(vec.size))

    def __len__(self) -> int:
        state = self._state
        return len(state.order) + sum(vec.size for vec in state.maps.values())

    def items(self) -> ItemsView[str, StepRecord]:
        return _ItemsView(self)

    def values(self) -> ValuesView[StepRecord]:
        return _ValuesView(self)

    def __repr__(self) -> str:
        return repr(dict(self.items()))

    def __reduce__(self) -> tuple[type[dict[str, StepRecord]], tuple[dict[str, StepRecord]]]:
        return dict, (dict(self.items()),)
