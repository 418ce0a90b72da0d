"""Integration tests against stepvisor.compat's real client, tapps-agents (Python 3.12).

``make client-test`` runs them in ``.venv-client``; anywhere the client is not
installed they are reported as skipped, with :func:`unavailable_reason`.
"""

from __future__ import annotations

import os
import sys


def unavailable_reason() -> str:
    """Why the client is absent: the Makefile's reason if it gave one, else this interpreter."""
    return os.environ.get("STEPVISOR_CLIENT_UNAVAILABLE") or (
        f"tapps-agents is not installed in this interpreter (Python "
        f"{sys.version_info.major}.{sys.version_info.minor}); `make client-test` runs these "
        "tests in .venv-client with Python 3.12"
    )
