"""Importing the client once, up front, with its dependencies' import-time warnings muted.

Why: the suite turns every warning into an error (pyproject's
``filterwarnings = ["error"]``), which is right for stepvisor's own code, but
tapps-agents' dependencies (bandit via stevedore) warn on import about their
own deprecated arguments.  That is not ours to fix, and it would stop the
client's modules from importing at all; anything they warn about while the
tests run still fails the test.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings

with warnings.catch_warnings(), contextlib.suppress(ImportError):
    warnings.simplefilter("ignore", DeprecationWarning)
    importlib.import_module("tapps_agents.workflow.executor")
    importlib.import_module("tapps_agents.workflow.cursor_executor")
