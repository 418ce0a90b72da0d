"""Ray backend (placeholder until the Ray work lands)."""

from __future__ import annotations

from typing import Any

from stepvisor.backends.base import AttemptResult, AttemptSpec
from stepvisor.context import AttemptControl
from stepvisor.errors import BackendUnavailableError

__all__ = ["RayBackend"]


class RayBackend:
    @classmethod
    def connect(cls, *, address: str | None) -> RayBackend:
        raise BackendUnavailableError("the Ray backend is not available in this build")

    def run(self, spec: AttemptSpec, control: AttemptControl) -> AttemptResult:
        raise BackendUnavailableError("the Ray backend is not available in this build")

    def close(self) -> None:
        """Nothing to release."""

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(name)
