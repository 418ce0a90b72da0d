"""Run stores: where a run's state lives while it runs and after it ends."""

from stepvisor.store.base import RunInfo, RunStore, StoredRun
from stepvisor.store.memory import MemoryStore

__all__ = ["MemoryStore", "RunInfo", "RunStore", "StoredRun"]
