"""The Executor fault campaign (tests/chaos/executors.py): a bounded run, and proof it can fail.

Every pairing of call kind (thread, process) and ending (shutdown,
cancel_futures, stop_running, both, interpreter exit) runs once, on the first
seed that generates it; ``make chaos`` runs a long campaign.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import stepvisor as sv
from tests.chaos import executors as campaign


def _first_seeds() -> dict[tuple[str, str], int]:
    seeds: dict[tuple[str, str], int] = {}
    for seed in range(1000):
        sc = campaign.generate(seed)
        seeds.setdefault((sc.executor, sc.ending), seed)
    return seeds


SEEDS = _first_seeds()


def test_every_kind_and_ending_is_generated() -> None:
    assert set(SEEDS) == {(k, e) for k in ("thread", "process") for e in campaign.ENDINGS}
    kinds = {kind for s in range(200) for kind, _ in campaign.generate(s).calls}
    assert kinds == {"ok", "raise", "slow", "kill"}


def test_a_scenario_is_a_function_of_its_seed() -> None:
    assert campaign.generate(12345) == campaign.generate(12345)


@pytest.mark.parametrize(("kind", "ending"), sorted(SEEDS))
def test_the_invariants_hold(kind: str, ending: str, tmp_path: Path) -> None:
    report = campaign.run_one(SEEDS[kind, ending], tmp_path)
    assert not report.violations, report.violations
    assert report.checked["once"] or ending == "exit"
    assert report.checked["no-orphans"] == 1


def test_the_campaign_sees_running_calls_stopped_by_cancel_futures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What sv.Executor did before issue 26: cancel_futures=True stopped the running calls.
    shutdown = sv.Executor.shutdown

    def old(self: sv.Executor, wait: bool = True, **kw: Any) -> None:
        kw["stop_running"] = kw.get("stop_running") or kw.get("cancel_futures", False)
        shutdown(self, wait, **kw)

    monkeypatch.setattr(sv.Executor, "shutdown", old)
    seeds = [s for s in range(200) if campaign.generate(s).ending == "cancel_futures"][:6]
    found = [v for s in seeds for v in campaign.run_one(s, tmp_path).violations]
    assert any("[not-started]" in v for v in found), found
