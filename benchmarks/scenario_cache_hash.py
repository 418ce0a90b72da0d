"""What a cache key costs: hashing a large array, and the code digest of a step.

Issue 24, point 9, first row: hashing a 200 MB NumPy array (float64, C order; 8 MB with
``--quick``) must be at least 3x faster than ``joblib.hash`` of the same array, which is
what a joblib.Memory user pays for the same job.  Side by side, in the same run:

* stepvisor: :func:`stepvisor.cache._digest.value_digest`, BLAKE3 over the array's buffer
  (one thread, no copy);
* ``joblib.hash``: MD5 over the buffer (joblib's own array path);
* ``hashlib.sha256`` on one thread and on two threads (the two halves at once: hashlib
  releases the GIL), the strongest candidates without a new dependency;
* xxHash's XXH3-128 (``pip install xxhash``): fast, but not a cryptographic hash.

The systems run in turns (A, B, C, A, B, C, ...) so that a burst of load on the shared
machine falls on all of them alike, and each figure is the best of its turns.

The code digest rows: one call of :func:`stepvisor.cache._code.code_digest` on a step
function that reaches a helper, a class and plain globals, memoized (what each of 10,000
steps of one function pays) and first time; beside it, a Prefect-style ``TASK_SOURCE``
key (SHA-256 of ``inspect.getsource``), which reads less and costs more.
"""

from __future__ import annotations

import hashlib
import inspect
import threading
import time
import types
from collections.abc import Callable
from typing import Any

from benchmarks.common import Measured, optional, probe
from benchmarks.harness import Row, Target
from stepvisor.cache._code import code_digest
from stepvisor.cache._digest import value_digest

NAME = "cache_hash"
TITLE = "cache keys: hashing a 200 MB array (vs joblib.hash) and a step's code digest"
ORDER = 27

SCALE = 3


def _helper(x: float) -> float:
    return x * SCALE


class _Model:
    def predict(self, x: float) -> float:
        return _helper(x) + 1


def _step(x: float, offset: float = 0.5) -> float:
    """A step function of the shape the digest follows: a helper, a class, a global."""
    return _Model().predict(x) + offset


def _turns(candidates: dict[str, Callable[[], object]], repeat: int) -> dict[str, list[float]]:
    """Each candidate timed ``repeat`` times, in turns; seconds per call, by name."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeat):
        for name, fn in candidates.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return times


def _two_threads(data: memoryview) -> bytes:
    half = len(data) // 2
    out: list[bytes] = [b"", b""]

    def one(index: int, part: memoryview) -> None:
        out[index] = hashlib.sha256(part).digest()

    other = threading.Thread(target=one, args=(1, data[half:]))
    other.start()
    one(0, data[:half])
    other.join()
    return hashlib.sha256(out[0] + out[1]).digest()


def _array_candidates(array: Any) -> dict[str, Callable[[], object]]:
    data = memoryview(array).cast("B")
    candidates: dict[str, Callable[[], object]] = {
        "stepvisor": lambda: value_digest(array),
        "joblib.hash (MD5)": lambda: _joblib().hash(array),
        "hashlib.sha256, 1 thread": lambda: hashlib.sha256(data).digest(),
        "hashlib.sha256, 2 threads": lambda: _two_threads(data),
    }
    xxhash = optional("xxhash")
    if xxhash is not None:
        candidates["xxhash XXH3-128"] = lambda: xxhash.xxh3_128(data).digest()
    return candidates


def _joblib() -> Any:
    import joblib  # noqa: PLC0415 - an optional baseline

    return joblib


NOTES = {
    "stepvisor": "value_digest: BLAKE3, one thread, no copy",
    "joblib.hash (MD5)": "what joblib.Memory hashes an array argument with",
    "hashlib.sha256, 1 thread": "no new dependency (SHA-NI where the CPU has it)",
    "hashlib.sha256, 2 threads": "the halves at once, then one hash of the two",
    "xxhash XXH3-128": "not cryptographic; pip install xxhash",
}


def _array_rows(megabytes: int, repeat: int) -> list[Row]:
    metric = f"hash a {megabytes} MB float64 array"
    names = list(NOTES)
    targets = {
        "joblib.hash (MD5)": Target(on="ratio", op="<=", limit=1 / 3, text="stepvisor >= 3x faster")
    }
    templates = [
        Row(
            scenario=NAME,
            system=name,
            metric=metric,
            value=None,
            unit="ms",
            note=NOTES[name],
            target=targets.get(name),
        )
        for name in names
    ]
    measured: dict[str, Measured] = {}

    def measure_all() -> list[Measured]:
        import numpy as np  # noqa: PLC0415 - the bench extra

        array = np.random.default_rng(0).random(megabytes * 1_000_000 // 8)
        times = _turns(_array_candidates(array), repeat)
        for name, seen in times.items():
            note = f"best of {len(seen)} in turns ({', '.join(f'{t * 1e3:.3g}' for t in seen)})"
            measured[name] = Measured(min(seen) * 1e3, note)
        return [measured["stepvisor"]]

    def recorded(name: str) -> Callable[[], list[Measured]]:
        return lambda: [measured[name]]

    rows = probe(templates[:1], measure_all, requires=("numpy",))
    for template in templates[1:]:
        requires = ("joblib",) if template.system.startswith("joblib") else ()
        if template.system.startswith("xxhash"):
            requires = ("xxhash",)
        rows += probe([template], recorded(template.system), requires=requires)
    return rows


def _per_call(fn: Callable[[], object], calls: int, batches: int = 5) -> Measured:
    """µs per call: the best of ``batches`` batches of ``calls // batches`` calls."""
    size = max(1, calls // batches)
    best = float("inf")
    for _ in range(batches):
        started = time.perf_counter()
        for _ in range(size):
            fn()
        best = min(best, (time.perf_counter() - started) / size)
    return Measured(best * 1e6, f"best of {batches} batches of {size} calls")


def _code_rows(calls: int) -> list[Row]:
    def row(system: str, metric: str, note: str, target: Target | None = None) -> Row:
        return Row(
            scenario=NAME,
            system=system,
            metric=metric,
            value=None,
            unit="µs",
            note=note,
            target=target,
        )

    def source_key() -> str:
        return hashlib.sha256(inspect.getsource(_step).encode()).hexdigest()

    def fresh() -> float:
        # A new function object each time (the memo cannot answer), same code objects.
        best = float("inf")
        for _ in range(20):
            clone = types.FunctionType(
                _step.__code__, _step.__globals__, "_step", _step.__defaults__
            )
            started = time.perf_counter()
            code_digest(clone)
            best = min(best, time.perf_counter() - started)
        return best * 1e6

    memo_metric = "code digest of one step function, per call"
    rows = probe(
        [
            row(
                "stepvisor",
                memo_metric,
                "code_digest, memoized (what each of 10,000 steps of one function pays)",
            )
        ],
        lambda: [_per_call(lambda: code_digest(_step), calls)],
    )
    rows += probe(
        [
            row(
                "Prefect-style TASK_SOURCE",
                memo_metric,
                "sha256(inspect.getsource(fn)): no closures, no helpers",
                Target(on="ratio", op="<=", limit=0.2, text="stepvisor >= 5x cheaper"),
            )
        ],
        lambda: [_per_call(source_key, max(1, calls // 10))],
    )
    rows += probe(
        [
            row(
                "stepvisor",
                "code digest, first call of a new function object",
                "best of 20; code objects memoized",
            )
        ],
        lambda: [Measured(fresh())],
    )
    return rows


def run(*, quick: bool) -> list[Row]:
    """Hash the array with each candidate, in turns; then time the code digest."""
    megabytes, repeat, calls = (8, 3, 2_000) if quick else (200, 5, 20_000)
    return _array_rows(megabytes, repeat) + _code_rows(calls)
