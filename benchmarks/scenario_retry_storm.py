"""Retry storm: does jitter keep retries from hitting a service all at once?

Many steps call a fake service (it counts calls in progress; each call takes
50 ms) that fails each caller's first two calls, as a service that is
briefly down would.  Retries back off exponentially (0.2 s, doubling, capped
at 1 s).  The figure is the peak number of *retry* calls in progress at the
same time, with full jitter and without.

Read it with care on a small machine: 1,000 slots are 1,000 Worker threads,
and on 2 cores the one Supervisor thread falls behind them (the first calls
take about a second to start, and retries start a median 0.2 to 0.6 s after
their due time), so the peaks show where the Supervisor caught up as much
as where the backoff put the retries, and vary from run to run.

``max_parallel`` equals the number of callers, as when every client of a
service retries on its own: a smaller bound keeps the service at that many
calls whatever the backoff (stepvisor's own protection), so jitter could not
show.

The baselines are what a user would write without stepvisor: a
``ThreadPoolExecutor(callers)`` running each call under tenacity, with
``wait_random_exponential`` (full jitter) and ``wait_exponential`` (none).
Those threads sleep through their backoff holding their slot, where
stepvisor frees the slot for another step while a step waits.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait

import tenacity

import stepvisor as sv
from benchmarks.common import Measured, probe
from benchmarks.harness import Row, Target

NAME = "retry_storm"
TITLE = "retry storm: peak concurrent retry calls, jitter vs none (max_parallel = callers)"
ORDER = 70

CALL_SECONDS = 0.05
FAILURES = 2
INITIAL = 0.2
CAP = 1.0
METRIC_RETRY = "peak concurrent retry calls"
METRIC_ALL = "peak concurrent calls (all)"


class ServiceDownError(ConnectionError):
    """What the fake service raises while it is "down" for a caller."""


class FakeService:
    """Counts calls in progress (all, and retries only) and keeps the peaks."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.current = 0
        self.current_retries = 0
        self.peak = 0
        self.peak_retries = 0
        self.calls = 0

    def call(self, *, attempt: int) -> None:
        """One call; fails (after the call's time) for the first ``FAILURES`` attempts."""
        retry = attempt > 1
        with self._lock:
            self.calls += 1
            self.current += 1
            self.peak = max(self.peak, self.current)
            if retry:
                self.current_retries += 1
                self.peak_retries = max(self.peak_retries, self.current_retries)
        try:
            time.sleep(CALL_SECONDS)
        finally:
            with self._lock:
                self.current -= 1
                if retry:
                    self.current_retries -= 1
        if attempt <= FAILURES:
            raise ServiceDownError(f"service unavailable (attempt {attempt})")


class _Caller:
    """A stepvisor step calling the service (an object, so it can hold the service)."""

    def __init__(self, service: FakeService) -> None:
        self.service = service

    def __call__(self, ctx: sv.StepContext) -> None:
        self.service.call(attempt=ctx.attempt)


def _stepvisor(n: int, *, jitter: bool) -> tuple[FakeService, float]:
    service = FakeService()
    caller = _Caller(service)
    policy = sv.RetryPolicy(
        max_attempts=FAILURES + 1,
        backoff=sv.Backoff.exponential(
            initial=INITIAL, multiplier=2.0, cap=CAP, jitter="full" if jitter else "none"
        ),
    )
    wf = sv.Workflow("storm", [sv.Step(f"s{i:05d}", caller) for i in range(n)])
    started = time.perf_counter()
    result = sv.run(wf, max_parallel=n, retry=policy, seed=1)
    elapsed = time.perf_counter() - started
    if result.status is not sv.RunStatus.SUCCEEDED:
        raise RuntimeError(f"the stepvisor run ended {result.status.value}: {result.error}")
    return service, elapsed


def _tenacity_pool(n: int, *, jitter: bool) -> tuple[FakeService, float]:
    service = FakeService()
    wait_strategy = (
        tenacity.wait_random_exponential(multiplier=INITIAL, max=CAP)
        if jitter
        else tenacity.wait_exponential(multiplier=INITIAL, max=CAP)
    )

    def job() -> None:
        for attempt in tenacity.Retrying(
            stop=tenacity.stop_after_attempt(FAILURES + 1), wait=wait_strategy, reraise=True
        ):
            with attempt:
                service.call(attempt=attempt.retry_state.attempt_number)

    started = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(job) for _ in range(n)]
        wait(futures)
    elapsed = time.perf_counter() - started
    for future in futures:
        future.result()  # raise if a job failed for good
    return service, elapsed


def _figures(runner: Callable[[], tuple[FakeService, float]], n: int) -> list[Measured]:
    service, elapsed = runner()
    expected = n * (FAILURES + 1)
    if service.calls != expected:
        raise RuntimeError(f"the service saw {service.calls} calls, expected {expected}")
    note = f"{n} callers, {service.calls} calls in {elapsed:.2f} s"
    return [Measured(service.peak_retries, note), Measured(service.peak)]


def _rows(system: str, *, target: Target | None = None) -> list[Row]:
    return [
        Row(
            scenario=NAME,
            system=system,
            metric=METRIC_RETRY,
            value=None,
            unit="calls",
            target=target,
        ),
        Row(scenario=NAME, system=system, metric=METRIC_ALL, value=None, unit="calls"),
    ]


def run(*, quick: bool) -> list[Row]:
    """Measure peak concurrent calls with and without jitter, stepvisor and tenacity."""
    n = 200 if quick else 1_000  # callers, and slots
    below = Target(on="ratio", op="<", limit=1.0, text="full jitter below it")
    systems: list[tuple[str, Callable[[], tuple[FakeService, float]], Target | None]] = [
        ("stepvisor", lambda: _stepvisor(n, jitter=True), None),
        ("stepvisor, no jitter", lambda: _stepvisor(n, jitter=False), below),
        (
            f"ThreadPoolExecutor({n}) + tenacity wait_random_exponential",
            lambda: _tenacity_pool(n, jitter=True),
            None,
        ),
        (
            f"ThreadPoolExecutor({n}) + tenacity wait_exponential (no jitter)",
            lambda: _tenacity_pool(n, jitter=False),
            None,
        ),
    ]
    rows: list[Row] = []
    for system, runner, target in systems:
        rows += probe(_rows(system, target=target), functools.partial(_figures, runner, n))
    return rows
