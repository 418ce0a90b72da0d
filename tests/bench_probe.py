"""A scenario module for the harness's own tests: it reports which process ran it.

``STEPVISOR_BENCH_PROBE`` picks what it does: ``pid`` (default) returns one row
whose value is its process id, ``raise`` raises, ``exit`` ends its process
without writing anything, as a crashing scenario would.
"""

from __future__ import annotations

import os

from benchmarks.harness import Row, Target

NAME = "probe"
TITLE = "Which process ran me"


def run(*, quick: bool) -> list[Row]:
    """One row carrying this process's id, or the failure the environment asks for."""
    mode = os.environ.get("STEPVISOR_BENCH_PROBE", "pid")
    if mode == "raise":
        raise LookupError("the probe was told to raise")
    if mode == "exit":
        os._exit(3)
    target = Target(on="value", op=">", limit=0.0, text="a process id")
    note = "quick" if quick else "full"
    pid = float(os.getpid())
    return [
        Row(
            scenario=NAME,
            system="stepvisor",
            metric="pid",
            value=pid,
            unit="",
            note=note,
            target=target,
        )
    ]
