"""What the tests that kill a workflow's program and resume it share.

``test_resume`` (steps), ``test_map_driver_kill`` (mapped steps) and the fault
campaign's driver scenario each run a workflow module in a program of its own,
SIGKILL it mid-run, then resume from the store: with a clock a minute ahead,
so that the killed program's last heartbeat already reads as stale.
"""

from __future__ import annotations

import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


class MinuteAhead:
    """A wall clock a minute ahead, so a killed run's last heartbeat reads as stale."""

    def wall(self) -> float:
        return time.time() + 60.0

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def call_later(self, delay: float, callback: Callable[[], None]) -> Any:
        raise NotImplementedError("only the store reads this clock")


def driver(module: str) -> str:
    """The program that runs ``module.build()`` on the store and run id it is given."""
    return textwrap.dedent(
        f"""
        import sys
        import stepvisor as sv
        import {module}
        sv.run({module}.build(), store=sys.argv[1], run_id=sys.argv[2])
        """
    )


def run_counts(root: Path) -> dict[str, int]:
    """How many times each step ran: the lines of its ``ran-<step>`` file under ``root``."""
    return {
        p.name.removeprefix("ran-"): len(p.read_text().splitlines()) for p in root.glob("ran-*")
    }
