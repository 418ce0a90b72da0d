"""What a joblib batch is when it travels to a process child, and how the child runs it.

``Parallel(max_nbytes=...)`` keeps its meaning: an array argument of at least
``max_nbytes`` bytes is not copied into the message.  Its buffer is pickled
out of band (protocol 5), which the process backend writes into a sealed
shared-memory segment that the child maps read-only; an argument below the
threshold, and every argument with ``max_nbytes=None``, is pickled in the
message::

    parent: Batch.__reduce_ex__ ── cloudpickle(batch), buffers >= max_nbytes out of band
            ── the process backend: the out-of-band buffers ──▶ one memfd segment, sealed
    child:  load_batch(pickle, mode, *buffers mapped read-only) ── run_batch ── batch()

As with joblib's memmapping, what came through shared memory is read-only
(``mmap_mode="r"``, the default).  With ``mmap_mode="c"``, ``"r+"`` or
``"w+"`` the child gets a writable private copy instead (nothing written is
seen by another call).  Below 1 MiB in all the process backend sends even
out-of-band buffers through the pipe, where it is as fast; they are loaded
read-only all the same, so what a function may write into does not depend
on the transport.

This module is imported by every child that runs a joblib batch: it imports
only what unpickling a batch needs.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
from collections.abc import Callable
from typing import Any, Final, NamedTuple

__all__ = ["Batch", "Init", "load_batch", "run_batch"]

#: Environment variables that bound the threads of native libraries (joblib's own list).
THREAD_VARS: Final = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMBA_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)
_PROTOCOL: Final = 5
#: The thread limit this process already applies (one process runs one engine's batches).
_applied: list[int | None] = [None]
#: The initializers this process has run, by token.
_initialized: set[str] = set()
_registered: list[bool] = []


class Init(NamedTuple):
    """A worker initializer (joblib's ``initializer=``/``initargs=``), run once per child.

    ``token`` names one configuration of it: a child runs each token's
    initializer before the first batch that carries it.
    """

    token: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]


class Batch:
    """A joblib batch on its way to a process child, pickled with its large buffers apart.

    ``max_nbytes=None``: every buffer in band.  Pickled once, whatever the
    number of times the process backend asks (it may look at a value twice).
    The parent's ``authkey`` travels with it, as loky gives it to its workers:
    a ``multiprocessing.Manager`` proxy in the arguments connects with it.
    """

    __slots__ = ("_reduced", "batch", "init", "max_nbytes", "writable")

    def __init__(
        self,
        batch: Callable[[], Any],
        *,
        max_nbytes: int | None,
        writable: bool,
        init: Init | None = None,
    ) -> None:
        self.batch = batch
        self.max_nbytes = max_nbytes
        self.writable = writable
        self.init = init
        self._reduced: tuple[Any, ...] | None = None

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        if self._reduced is None:
            import cloudpickle  # noqa: PLC0415 - the parent has it; a child never pickles a Batch

            large: list[pickle.PickleBuffer] = []
            limit = self.max_nbytes

            def in_band(buffer: pickle.PickleBuffer) -> bool:
                if limit is None or memoryview(buffer).nbytes < limit:
                    return True
                large.append(buffer)
                return False

            pickled = cloudpickle.dumps(
                (self.init, self.batch), protocol=_PROTOCOL, buffer_callback=in_band
            )
            authkey = bytes(multiprocessing.current_process().authkey)
            self._reduced = (load_batch, (pickled, self.writable, authkey, *large))
        return self._reduced


def load_batch(pickled: bytes, writable: bool, authkey: bytes, *buffers: Any) -> Any:
    """The batch, its large buffers read-only views (or private copies when ``writable``)."""
    process = multiprocessing.current_process()
    if process.authkey != authkey:
        process.authkey = authkey
    if writable:
        views: list[Any] = [bytearray(memoryview(b)) for b in buffers]
    else:
        views = [memoryview(b).toreadonly() for b in buffers]
    init, batch = pickle.loads(pickled, buffers=views)  # noqa: S301 - our own parent's bytes
    if init is not None and init.token not in _initialized:
        init.fn(*init.args)
        _initialized.add(init.token)
    return batch


def run_batch(batch: Callable[[], Any], threads: int | None) -> Any:
    """Run a joblib batch in a child whose native thread pools hold ``threads`` threads each.

    The limit is what joblib's process backends give their workers (the CPU
    count over ``n_jobs``, or ``inner_max_num_threads``), so that ``n_jobs``
    processes of multithreaded NumPy do not oversubscribe the machine.  The
    backend is registered here too: a batch may name it in a nested call.
    """
    if not _registered:
        from stepvisor.joblib import register  # noqa: PLC0415 - joblib is loaded by now

        register()
        _registered.append(True)
    if threads is not None and _applied[0] != threads:
        _limit_threads(threads)
        _applied[0] = threads
    return batch()


def _limit_threads(threads: int) -> None:
    """Libraries loaded later read the variables; those loaded already are told by threadpoolctl."""
    for name in THREAD_VARS:
        os.environ[name] = str(threads)
    try:
        from threadpoolctl import threadpool_limits  # noqa: PLC0415 - optional, as in joblib
    except ImportError:
        return
    threadpool_limits(limits=threads)
