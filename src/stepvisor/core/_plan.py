"""What the run machine is given about one run: :class:`Plan`, values only."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stepvisor.config import Resolved
    from stepvisor.core.model import Workflow
    from stepvisor.core.records import StepRecord

__all__ = ["Plan"]


@dataclass(frozen=True, slots=True)
class Plan:
    """What the machine needs to know about one run: values only."""

    workflow: Workflow
    settings: Resolved
    run_id: str
    seed: int
    executors: tuple[str, ...]  # by canonical rank
    payloads: Mapping[str, bytes] = field(default_factory=dict)
    restored: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    restored_records: Mapping[str, StepRecord] = field(default_factory=dict)
    #: Build events (the caller gave an ``on_event`` hook): skipped otherwise.
    emit_events: bool = False
    #: The store may refuse a step's outputs (it encodes them): a success with
    #: outputs is final only once ``OutputsSaved`` reports the write.
    store_may_refuse: bool = True
    #: Give free slots back while nothing is ready (the run shares an engine).
    lend_slots: bool = False
    #: Executors whose backend starts every attempt it is given at once (it takes
    #: them without a thread): their attempts are never queued behind another.
    unqueued: frozenset[str] = frozenset()
    #: Ranks of the cached steps: looked up in the cache before they may run.
    cached: frozenset[int] = frozenset()
