"""The Ray backend: one attempt is one Ray task, and every decision stays with the engine.

A Ray step runs on a Ray cluster (a local instance started for the run, or one
named by ``ray_address``) with the same semantics as a process step.  The
package is split by what each part manages::

    _backend.py    RayBackend: submit, wait (deadline, cancel), turn the end into a result
    _placement.py  where each input comes from: inline, a shared put, a Ray step's result
    _task.py       what runs in the Ray worker (the step, its reply)
    _session.py    importing Ray, reaching a cluster, one session shared by runs

``RayBackend.run`` returns how an attempt ended; ``RayBackend.connect`` raises
:class:`~stepvisor.errors.BackendUnavailableError` when Ray is not installed
or the cluster cannot be reached, before any step runs.
"""

from __future__ import annotations

from stepvisor.backends.ray._backend import RayBackend
from stepvisor.backends.ray._placement import SHARE_THRESHOLD, RayTransfers
from stepvisor.backends.ray._session import (
    CONNECT_TIMEOUT_S,
    MIN_RAY,
    check_reachable,
    task_options,
)

__all__ = [
    "CONNECT_TIMEOUT_S",
    "MIN_RAY",
    "SHARE_THRESHOLD",
    "RayBackend",
    "RayTransfers",
    "check_reachable",
    "task_options",
]
