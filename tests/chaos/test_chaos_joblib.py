"""The fault campaign's joblib runs (tests/chaos/joblib_calls.py), a few seeds of it.

Each seed is a program of Parallel calls whose batches crash (a worker
SIGKILLs itself, or is SIGKILLed from outside, mid-call); the program checks
that each call ends as it must and every batch ends exactly once, and the
driver checks that no child outlived it.  ``python -m tests.chaos.joblib_calls
--runs 200`` runs a campaign.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos import joblib_calls


def test_a_seed_draws_the_same_calls_and_some_crash() -> None:
    plans = [joblib_calls.plan(seed) for seed in range(20)]
    assert plans == [joblib_calls.plan(seed) for seed in range(20)]
    faults = {fault for calls in plans for call in calls for fault in call}
    assert faults == {"ok", "sigkill", "outside_kill"}


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 3, 11])
def test_parallel_calls_with_killed_workers_keep_every_invariant(seed: int, tmp_path: Path) -> None:
    assert any(f != "ok" for call in joblib_calls.plan(seed) for f in call)
    assert joblib_calls.run_one(seed, tmp_path) == []
