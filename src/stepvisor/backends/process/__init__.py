"""The process backend: each process Worker owns one child process, reused across attempts.

A :class:`ProcessSlot` starts its child lazily (or with :meth:`ProcessSlot.start`)
and runs one attempt at a time in it.  A deadline or a cancel really stops the
work: the child's whole process group gets SIGTERM, then SIGKILL after the grace
period, and a fresh child is started at once so the next attempt does not wait
for interpreter start-up.  The package is split by what each part manages, as
pebble splits its pool::

    _slot.py      ProcessSlot: the attempts (deadline, cancel, send-ahead, replacement)
    _worker.py    Child: the process (spawn, signal its group, reap) and its pipes
    _wait.py      one attempt's wait: serve a poll, how long to block, the deadline
    _results.py   how an attempt ended, as an AttemptResult
    _pickling.py  the function and inputs, pickled; what cannot be, named
    ../_child.py  the program the child runs (kept outside, so it boots light)
    ../_wire.py   the typed messages both sides speak

Why it is built this way:

* **fork+exec, not fork.**  The child is ``subprocess.Popen`` of ``sys.executable``
  (``start_new_session=True``), which is safe beside the engine's threads and
  puts the child in a process group of its own that can be killed as a whole.
* **Death is observed, never guessed.**  The parent waits on a pidfd of the
  child as well as on its result pipe, so a child that dies is noticed at once
  even when a process it forked still holds the pipe open.
* **What a step leaves behind is killed.**  After a timeout, cancel or crash the
  whole process group gets SIGKILL before the child is reaped; after a normal
  end the child itself kills and reaps any descendants still running (it is
  their subreaper) and the result names them (``extra["leftover_pids"]``).
  Processes that put themselves in another session or group (``setsid``)
  survive a timeout; cgroups would be needed to catch those.
* **Values are checked before they travel** (``_pickling``), and a step's
  outputs are checked in the child with the function every backend uses.
"""

from __future__ import annotations

from stepvisor.backends.process._pickling import check_sendable, prepare_payload
from stepvisor.backends.process._slot import ProcessSlot, open_slot

__all__ = ["ProcessSlot", "check_sendable", "open_slot", "prepare_payload"]
