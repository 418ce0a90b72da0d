"""The library's logger, with the ``NullHandler`` a library installs on it.

Not in ``stepvisor/__init__``: every process Worker's child imports the
package when it boots, and ``logging`` (with ``re``, ``traceback`` and the
rest it pulls in) was about half of that boot, some 30 ms on this 2-core VM,
paid again each time a child is replaced after a kill.  Every module that
logs imports ``log`` from here, so the handler is in place before anything
is logged.
"""

from __future__ import annotations

import logging

__all__ = ["log"]

log = logging.getLogger("stepvisor")
log.addHandler(logging.NullHandler())
