"""Retry storm: does jitter keep retries from hitting a service all at once?

Many steps call a fake service (it counts calls in progress; each call takes
50 ms) that fails each caller's first two calls, as a service that is
briefly down would.  Retries back off exponentially (0.2 s, doubling, capped
at 1 s).  The figure is the peak number of *retry* calls in progress at the
same time, with full jitter and without.

The second figure says whether the Supervisor keeps up: how late each retry
starts.  A retry is due when the attempt before it failed plus the backoff
chosen for it: both are in the run's records (the failed attempt's ``ended``
and ``delay_after``, as its Worker and the machine set them), and the retry
starts at its own ``started`` (its Worker's clock, as the step begins).  So
the lateness counts all the Supervisor does in between: taking in the
failure, the timer, the dispatch.  For tenacity it is the same span, from
the failed call's end to the next call's start, less the sleep it chose.

Both sides start with their threads up, before the clock starts: stepvisor
on an ``sv.Engine`` whose Workers a warm-up run started (one step per
caller, all meeting at a barrier), tenacity on a ``ThreadPoolExecutor``
warmed the same way.  Starting 1,000 threads takes 0.1 to 0.2 s on an idle
2-core machine, and far longer under load, and it staggers the first calls
by as much: without the warm-up the unjittered retries inherit that stagger,
and the peaks compare thread start-up rather than backoff.

Read the peaks with care on a small machine: 1,000 slots are 1,000 Worker
threads, and on 2 cores the one Supervisor thread shares the GIL with them.
An unjittered backoff counts from the failed attempt's end, so its retry
(0.2 s) starts on time even when the Supervisor took a while to get to the
failure; a jittered one is waited from when the failure is taken in, so the
draws stay spread however late that was; and a retry come due goes ahead of
the failures still queued (the Supervisor's lane of due retries), so neither
the intake nor the queue bunches the jittered retries.  What keeps the
unjittered peak low is the GIL: the 1,000 first calls end within 50 ms of
each other, but their Workers take some 200 ms to get the GIL back, record
the failure and report it (the Supervisor deciding in between), so the
unjittered retries, each due 0.2 s after its own failure, are spread over
those 200 ms as well.  tenacity's threads do almost nothing between their
call and their sleep.

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
import itertools
import statistics
import threading
import time
from collections.abc import Callable, Iterable
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
#: Seconds the warm-up may take to get every thread of a pool running at once.
WARM_UP_TIMEOUT = 60.0
METRIC_RETRY = "peak concurrent retry calls"
METRIC_ALL = "peak concurrent calls (all)"
METRIC_LATE = "retry start after its due time, median"
METRIC_LATE_P90 = "retry start after its due time, p90"


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
        #: How late each retry call started after its due time (tenacity runs fill it).
        self.lateness: list[float] = []

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


def _lateness(records: Iterable[sv.StepRecord]) -> list[float]:
    """How late each retry started: its start less (the failed attempt's end + its backoff)."""
    late: list[float] = []
    for record in records:
        for failed, retry in itertools.pairwise(record.attempts):
            if failed.ended is None or failed.delay_after is None:
                raise RuntimeError(f"step {record.step_id}: an attempt before a retry has no end")
            late.append(retry.started - (failed.ended + failed.delay_after))
    return late


class _Meet:
    """A warm-up step: waits until ``n`` of them run at once, so ``n`` Workers exist."""

    def __init__(self, barrier: threading.Barrier) -> None:
        self.barrier = barrier

    def __call__(self, ctx: sv.StepContext) -> None:
        del ctx
        self.barrier.wait()


def _warm_up(n: int, run: Callable[[threading.Barrier], None]) -> None:
    """Start ``n`` threads of a pool before the clock starts: ``run`` gives them a meeting."""
    barrier = threading.Barrier(n, timeout=WARM_UP_TIMEOUT)
    run(barrier)
    if barrier.broken:
        raise RuntimeError(f"the warm-up did not get {n} threads running at once")


def _run_warm_up(engine: sv.Engine, n: int, barrier: threading.Barrier) -> None:
    meet = _Meet(barrier)
    warm = sv.Workflow("warm-up", [sv.Step(f"w{i:05d}", meet) for i in range(n)])
    result = sv.run(warm, engine=engine, max_parallel=n)
    if result.status is not sv.RunStatus.SUCCEEDED:
        raise RuntimeError(f"the warm-up run ended {result.status.value}: {result.error}")


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
    with sv.Engine(max_parallel=n) as engine:
        _warm_up(n, lambda meet: _run_warm_up(engine, n, meet))
        started = time.perf_counter()
        result = sv.run(wf, engine=engine, max_parallel=n, retry=policy, seed=1)
        elapsed = time.perf_counter() - started
    if result.status is not sv.RunStatus.SUCCEEDED:
        raise RuntimeError(f"the stepvisor run ended {result.status.value}: {result.error}")
    service.lateness = _lateness(result.steps.values())
    return service, elapsed


def _pool_warm_up(pool: ThreadPoolExecutor, n: int, barrier: threading.Barrier) -> None:
    wait([pool.submit(barrier.wait) for _ in range(n)])


def _tenacity_pool(n: int, *, jitter: bool) -> tuple[FakeService, float]:
    service = FakeService()
    wait_strategy = (
        tenacity.wait_random_exponential(multiplier=INITIAL, max=CAP)
        if jitter
        else tenacity.wait_exponential(multiplier=INITIAL, max=CAP)
    )

    lock = threading.Lock()

    def job() -> None:
        due: list[float] = []  # when the next call is due: the failure + the sleep chosen

        def before_sleep(state: tenacity.RetryCallState) -> None:
            assert state.outcome_timestamp is not None
            assert state.next_action is not None
            due.append(state.outcome_timestamp + state.next_action.sleep)

        for attempt in tenacity.Retrying(
            stop=tenacity.stop_after_attempt(FAILURES + 1),
            wait=wait_strategy,
            before_sleep=before_sleep,
            reraise=True,
        ):
            with attempt:
                if due:
                    late = time.monotonic() - due.pop()
                    with lock:
                        service.lateness.append(late)
                service.call(attempt=attempt.retry_state.attempt_number)

    with ThreadPoolExecutor(n) as pool:
        _warm_up(n, lambda meet: _pool_warm_up(pool, n, meet))
        started = time.perf_counter()
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
    late = sorted(service.lateness)
    if len(late) != n * FAILURES:
        raise RuntimeError(f"{len(late)} retries were timed, expected {n * FAILURES}")
    note = f"{n} callers, {service.calls} calls in {elapsed:.2f} s"
    return [
        Measured(service.peak_retries, note),
        Measured(service.peak),
        Measured(statistics.median(late) * 1e3, f"max {late[-1] * 1e3:.1f} ms"),
        Measured(late[int(0.9 * (len(late) - 1))] * 1e3),
    ]


def _rows(system: str, *, target: Target | None = None, late: Target | None = None) -> list[Row]:
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
        Row(scenario=NAME, system=system, metric=METRIC_LATE, value=None, unit="ms", target=late),
        Row(scenario=NAME, system=system, metric=METRIC_LATE_P90, value=None, unit="ms"),
    ]


def run(*, quick: bool) -> list[Row]:
    """Measure peak concurrent calls with and without jitter, stepvisor and tenacity."""
    n = 200 if quick else 1_000  # callers, and slots
    # The ratio is full jitter's peak over this row's: 1.5x lower is <= 1 / 1.5.
    below = Target(on="ratio", op="<=", limit=1 / 1.5, text="full jitter's >= 1.5x lower")
    on_time = Target(on="value", op="<=", limit=5.0, text="<= 5 ms")
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
        late = on_time if system.startswith("stepvisor") else None
        rows += probe(
            _rows(system, target=target, late=late), functools.partial(_figures, runner, n)
        )
    return rows
