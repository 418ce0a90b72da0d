"""loky, the reference the joblib backend is compared with, set up so tests leave nothing.

loky starts two resource trackers (its own and multiprocessing's) that live
for the session, and keeps a reusable executor of worker processes between
``Parallel`` calls; multiprocessing Managers make a temporary directory kept
until exit.  :func:`prepare` starts the session-long ones at collection, before
any test's leak check looks; :func:`stop` ends the executor after a test.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.resource_tracker
import tempfile

from joblib.externals.loky import reusable_executor
from joblib.externals.loky.backend import resource_tracker as loky_tracker


def prepare() -> None:
    """Start what lives for the whole session now (idempotent)."""
    config = multiprocessing.current_process()._config  # type: ignore[attr-defined]
    config.setdefault("tempdir", tempfile.mkdtemp(prefix="pymp-"))  # goes with the session's
    multiprocessing.resource_tracker.ensure_running()
    loky_tracker.ensure_running()


def stop() -> None:
    """Shut loky's reusable executor down, its workers with it, if a test started one."""
    executor = getattr(reusable_executor, "_executor", None)
    if executor is not None:
        executor.shutdown(wait=True, kill_workers=True)
