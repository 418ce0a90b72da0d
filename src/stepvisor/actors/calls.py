"""The seam for the Executor front end: calls submitted one by one, run by a hub.

:mod:`stepvisor.futures` hands each call to a :class:`CallHub` (one machine of
one-step runs sharing a worker pool) as a :class:`HubCall`, and cancels through
:class:`CancelCall` / :class:`CancelAll`; ``first_attempt`` is how the first
attempt of a call is built without a machine.  They live in the private ``_hub``
and ``_call`` modules; code outside :mod:`stepvisor.actors` takes them from here
(tests/test_layering.py holds that rule).
"""

from __future__ import annotations

from stepvisor.actors._call import HubCall, first_attempt
from stepvisor.actors._hub import CallHub, CancelAll, CancelCall

__all__ = ["CallHub", "CancelAll", "CancelCall", "HubCall", "first_attempt"]
