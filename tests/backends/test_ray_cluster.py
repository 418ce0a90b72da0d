"""Ray steps on a multi-node cluster: pinned by resources, and moved when a node dies.

The cluster is a head and two worker nodes simulated on this machine with
``ray.cluster_utils.Cluster``: ``node_a`` and ``node_b`` each offer one CPU,
a resource naming the node, and a shared resource ``pin`` that only they have,
so a step asking for ``{"pin": 1}`` runs on one of the two and, when that node
dies, can be retried on the other.  stepvisor connects to it through
``ray_address`` as it would to a real cluster, and disconnects after each run.
The health checks of the head are tightened so that a killed node is declared
dead in about a second rather than the default half minute.

As in ``test_ray_backend.py``, the cluster's processes run under a marker of
their own instead of the suite's, and the module checks that none is left.
"""

from __future__ import annotations

import importlib
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import stepvisor as sv
from tests.backends.test_ray_backend import ray_environment, wait_all_gone
from tests.conftest import NO_RAY, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]

FAST_HEALTH_CHECKS = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 200,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 3,
}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """A head node and two worker nodes, ``node_a`` and ``node_b``."""
    ray = pytest.importorskip("ray", reason=NO_RAY)
    cluster_utils = importlib.import_module("ray.cluster_utils")
    assert not ray.is_initialized(), "another test left Ray initialized"
    mark = uuid.uuid4().hex
    with ray_environment(mark):
        made: Any = cluster_utils.Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 1,
                "include_dashboard": False,
                "_system_config": FAST_HEALTH_CHECKS,
            },
        )
        try:
            made.nodes = {
                "node_a": made.add_node(num_cpus=1, resources={"node_a": 1, "pin": 1}),
                "node_b": made.add_node(num_cpus=1, resources={"node_b": 1, "pin": 1}),
            }
            made.wait_for_nodes()
        except BaseException:
            made.shutdown()
            raise
    try:
        yield made
    finally:
        made.shutdown()
        wait_all_gone(mark, timeout=20.0, what="the cluster's shutdown")
    assert not ray.is_initialized(), "stepvisor left the driver connected"


def _make_steps() -> SimpleNamespace:
    """Step functions sent by value: the cluster's workers need not import this module."""

    def where(ctx: Any) -> dict[str, Any]:
        ray = importlib.import_module("ray")
        return {ctx.step_id: ray.get_runtime_context().get_node_id()}

    def node_of_first_attempt(ctx: Any) -> dict[str, Any]:
        """Attempt 1 says where it runs, then waits to be killed with its node."""
        ray = importlib.import_module("ray")
        node = ray.get_runtime_context().get_node_id()
        if ctx.attempt == 1:
            tmp = os.path.join(ctx.params["dir"], ".node.tmp")
            with open(tmp, "w") as fh:
                fh.write(node)
            os.replace(tmp, os.path.join(ctx.params["dir"], "node"))
            time.sleep(120)
        return {"ran_on": node}

    return SimpleNamespace(where=where, node_of_first_attempt=node_of_first_attempt)


S = _make_steps()


def test_a_step_pinned_by_a_custom_resource_runs_on_that_node(
    cluster: Any, chdir_tmp: Path
) -> None:
    wf = sv.Workflow(
        "pinned",
        [
            sv.Step("on_a", S.where, resources={"node_a": 1}),
            sv.Step("on_b", S.where, resources={"node_b": 1}),
        ],
        settings=sv.Settings(executor="ray", max_parallel=2),
    )
    result = sv.run(wf, ray_address=cluster.address)
    assert result.status is sv.RunStatus.SUCCEEDED, result.error
    assert result.artifacts["on_a"] == cluster.nodes["node_a"].node_id
    assert result.artifacts["on_b"] == cluster.nodes["node_b"].node_id


def test_killing_the_node_mid_step_is_a_crash_retried_on_the_other_node(
    cluster: Any, chdir_tmp: Path
) -> None:
    # Run last in this module: it removes one of the two pin nodes for good.
    policy = sv.RetryPolicy(max_attempts=2, backoff=sv.Backoff.none(), retry_crashes=True)
    wf = sv.Workflow(
        "node-dies",
        [
            sv.Step(
                "work",
                S.node_of_first_attempt,
                resources={"pin": 1},
                retry=policy,
                params={"dir": str(chdir_tmp)},
            )
        ],
        settings=sv.Settings(executor="ray"),
    )
    handle = sv.start(wf, ray_address=cluster.address)
    marker = chdir_tmp / "node"
    wait_for(marker.exists, timeout=30.0, what="attempt 1 to say where it runs")
    first = marker.read_text()
    by_id = {node.node_id: name for name, node in cluster.nodes.items()}
    victim = by_id[first]
    cluster.remove_node(cluster.nodes.pop(victim), allow_graceful=False)
    result = handle.wait(timeout=60.0)

    assert result.status is sv.RunStatus.SUCCEEDED, result.error
    attempts = result.steps["work"].attempts
    assert [(a.outcome, a.error_type) for a in attempts] == [
        ("crashed", "stepvisor.errors.WorkerCrashedError"),
        ("succeeded", None),
    ]
    assert "Ray worker" in (attempts[0].error_message or "")
    (survivor,) = cluster.nodes.values()
    assert result.artifacts["ran_on"] == survivor.node_id != first
