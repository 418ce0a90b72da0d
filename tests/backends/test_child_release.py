"""A process child lets go of an attempt's inputs only after it has sent the reply.

Letting go of a large input can be slow: the last mapping of its shared-memory
segment frees the segment's pages (about 50 ms for 200 MB).  Done before the
reply, the parent waits for it on every call (the joblib map of 200 MB slices
did).  Here an input whose release blocks until the test says so stands in for
a slow release: the result must arrive while it is still blocked, and the
input must still be released afterwards, without another call to push it out.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import stepvisor as sv
from tests.conftest import wait_for

#: How long the child's release waits for the test's go-ahead (a bound, never reached when passing).
_GATE_S = 10.0


class _HeldInChild:
    """What the child loads: releasing it waits for ``go`` to exist, then writes ``released``."""

    def __init__(self, go: str, released: str) -> None:
        self.go = go
        self.released = released

    def __del__(self) -> None:
        deadline = time.monotonic() + _GATE_S
        while not os.path.exists(self.go) and time.monotonic() < deadline:
            time.sleep(0.005)
        Path(self.released).write_text(str(os.getpid()))


class Gate:
    """The parent's side: pickles as :class:`_HeldInChild` (the parent's copy never blocks)."""

    def __init__(self, go: Path, released: Path) -> None:
        self.go = str(go)
        self.released = str(released)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_HeldInChild, (self.go, self.released))


def child_pid(gate: object) -> int:
    """The step: it only looks at its input's type (runs in the child)."""
    assert type(gate).__name__ == "_HeldInChild"
    return os.getpid()


def test_the_reply_is_sent_before_the_inputs_are_released(tmp_path: Path) -> None:
    go, released = tmp_path / "go", tmp_path / "released"
    with sv.Executor(executor="process", max_workers=1) as ex:
        future = ex.submit(child_pid, Gate(go, released))
        try:
            # Released before the reply, the result would wait for `go` (for _GATE_S).
            pid = future.result(timeout=_GATE_S / 2)
            assert not released.exists()
        finally:
            go.touch()
        wait_for(released.exists, what="the child to release the inputs after its reply")
        assert released.read_text() == str(pid)
