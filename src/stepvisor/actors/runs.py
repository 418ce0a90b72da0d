"""The seam for code that hosts runs on the actor shell: the runtime and the front ends.

A run is a plan (:class:`RunPlan`) carried out by a :class:`RunShell` over Workers
leased from a :class:`WorkerPool`, watched by a :class:`RunObserver`.  Those live
in private modules (``_shell``, ``_pool``), which may be split or renamed freely;
code outside :mod:`stepvisor.actors` (``engine``, ``compat``, ``_prepare``) takes
them from here, so the shell's insides can change without reaching into its users
(tests/test_layering.py holds that rule).
"""

from __future__ import annotations

from stepvisor.actors._pool import WorkerPool
from stepvisor.actors._shell import RunObserver, RunPlan, RunShell

__all__ = ["RunObserver", "RunPlan", "RunShell", "WorkerPool"]
