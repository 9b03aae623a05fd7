"""CVPO on a simulated multi-node Ray cluster (ray.cluster_utils.Cluster, one machine).

Every node of the simulated cluster is a real raylet with its own resources, so
RLlib's resource requests are scheduled exactly as on a real cluster:

* placement: EnvRunners spread over the CPU worker nodes, the learner lands on
  the node that advertises the custom resource ``learner`` (as the GPU node of
  cluster/aws.yaml does);
* node loss: a worker node dies mid-training; the run goes on with the EnvRunners
  left, reports the loss in ``result["fault_tolerance"]``, and RLlib restarts the
  lost EnvRunner once a replacement node joins.

These tests need their own Ray, so they shut down any Ray this process runs
(e.g. the ``ray_local`` fixture's) first and leave none behind; the next test
that asks for ``ray_local`` starts a fresh local one.
"""

from __future__ import annotations

import os
import time

import pytest
import ray
from ray.cluster_utils import Cluster

import rllib_ext
from rllib_ext.cvpo import CVPOConfig

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
OBJECT_STORE = 80 * 1024 * 1024  # per node; Ray's minimum is 75 MiB

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster():
    """A head node without CPUs (like cluster/aws.yaml's); tests add worker nodes.

    Any Ray this process runs (e.g. the ``ray_local`` fixture's) is shut down first;
    at the end the cluster goes; the next test's local Ray registers "CVPO" and the
    env ids again (conftest.start_local_ray).
    """
    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "object_store_memory": OBJECT_STORE,
            "include_dashboard": False,
        },
    )
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def _connect(c: Cluster) -> None:
    c.wait_for_nodes()
    # The nodes' workers run this venv's Python, so `import rllib_ext` works there;
    # tests/ goes on their path too (functions defined here are pickled by reference).
    path = os.pathsep.join(p for p in (TESTS_DIR, os.environ.get("PYTHONPATH", "")) if p)
    ray.init(
        address=c.address,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )
    rllib_ext.register()


def _tiny_config(num_env_runners: int) -> CVPOConfig:
    """The tiny config (conftest) with remote EnvRunners and 100-step iterations."""
    from conftest import make_tiny_config

    cfg = make_tiny_config(num_steps_sampled_before_learning_starts=100, training_intensity=0.05)
    cfg.env_runners(num_env_runners=num_env_runners, rollout_fragment_length=50)
    cfg.min_sample_timesteps_per_iteration = 100
    return cfg


def _node_id_of_this_process(*_args) -> str:
    return ray.get_runtime_context().get_node_id()


def _runner_nodes(algo) -> list:
    return algo.env_runner_group.foreach_env_runner(
        _node_id_of_this_process, local_env_runner=False
    )


def test_env_runners_spread_over_cpu_nodes_and_learner_on_learner_node(cluster):
    # Two worker nodes, one EnvRunner slot ("rollout") each; the second also carries
    # the "learner" resource (the GPU node of cluster/aws.yaml, minus the GPU).
    cpu_node = cluster.add_node(
        num_cpus=1, resources={"rollout": 1}, object_store_memory=OBJECT_STORE
    )
    learner_node = cluster.add_node(
        num_cpus=2, resources={"rollout": 1, "learner": 1}, object_store_memory=OBJECT_STORE
    )
    _connect(cluster)
    head_id = cluster.head_node.node_id

    cfg = _tiny_config(num_env_runners=2)
    cfg.env_runners(custom_resources_per_env_runner={"rollout": 1})
    cfg.learners(num_learners=1, custom_resources_per_learner={"learner": 1})
    algo = cfg.build_algo()
    try:
        runner_nodes = _runner_nodes(algo)
        learner_nodes = algo.learner_group.foreach_learner(_node_id_of_this_process)
        learner_nodes = [r.get() for r in learner_nodes.result_or_errors]
        r1 = algo.train()
        r2 = algo.train()
    finally:
        algo.stop()

    assert sorted(runner_nodes) == sorted([cpu_node.node_id, learner_node.node_id])
    assert learner_nodes == [learner_node.node_id]
    assert head_id not in runner_nodes + learner_nodes  # the head has no CPU for them
    assert (r1["training_iteration"], r2["training_iteration"]) == (1, 2)
    assert r2["fault_tolerance"]["num_healthy_workers"] == 2
    assert r2["env_runners"]["num_env_steps_sampled_lifetime"] >= 200
    assert r2["learners"]["default_policy"]  # the remote learner reported metrics


def test_training_survives_the_loss_of_a_worker_node(cluster):
    # Issue "Node loss": one EnvRunner per worker node (1 CPU each).
    node_a = cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE)
    node_b = cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE)
    _connect(cluster)

    cfg = _tiny_config(num_env_runners=2)
    cfg.fault_tolerance(
        restart_failed_env_runners=True,
        delay_between_env_runner_restarts_s=0.5,
        env_runner_health_probe_timeout_s=2.0,
    )
    algo = cfg.build_algo()
    try:
        assert sorted(_runner_nodes(algo)) == sorted([node_a.node_id, node_b.node_id])
        r1 = algo.train()
        assert r1["fault_tolerance"]["num_healthy_workers"] == 2

        cluster.remove_node(node_b)  # its EnvRunner dies with it
        r2 = algo.train()
        r3 = algo.train()

        # A replacement node joins (the autoscaler's job on a real cluster): RLlib
        # restarts the lost EnvRunner there and samples with both again.
        node_c = cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE)
        deadline = time.time() + 40
        r = algo.train()
        while r["fault_tolerance"]["num_healthy_workers"] < 2 and time.time() < deadline:
            r = algo.train()
        final_nodes = _runner_nodes(algo)
        for res in (r1, r2, r3, r):
            print(
                res["training_iteration"],
                res["fault_tolerance"],
                res["env_runners"]["num_env_steps_sampled_lifetime"],
                round(res["time_this_iter_s"], 1),
            )
    finally:
        algo.stop()

    # The run never stopped: every iteration after the loss completed and sampled.
    assert [r2["training_iteration"], r3["training_iteration"]] == [2, 3]
    assert r2["fault_tolerance"]["num_healthy_workers"] == 1
    assert r3["fault_tolerance"]["num_healthy_workers"] == 1
    steps = [x["env_runners"]["num_env_steps_sampled_lifetime"] for x in (r1, r2, r3)]
    assert steps[0] < steps[1] < steps[2], steps  # the surviving EnvRunner kept sampling
    # ... and recovered once capacity came back.
    assert r["fault_tolerance"]["num_healthy_workers"] == 2, r["fault_tolerance"]
    assert r["fault_tolerance"]["num_remote_worker_restarts"] >= 1
    assert sorted(final_nodes) == sorted([node_a.node_id, node_c.node_id])
