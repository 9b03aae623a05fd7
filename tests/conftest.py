"""Shared fixtures: a local Ray with tests/ importable by its workers."""

import os

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

#: the tiny training of the fast tests (CVPO and SACLag alike, on cvpo/PointHazard-v0):
#: small networks, a short warm-up, few updates per env step; tests override what they test
TINY_TRAINING = {
    "cost_limit": 5.0,
    "actor_hiddens": [32, 32],
    "critic_hiddens": [32, 32],
    "train_batch_size_per_learner": 64,
    "num_steps_sampled_before_learning_starts": 200,
    "updates_per_learner_call": 4,
    "training_intensity": 0.1,
}
TINY_CVPO = {"num_sampled_actions": 8}  # CVPO's own tiny key
TINY_ITERATION_STEPS = 300  # min_sample_timesteps_per_iteration


def make_tiny_config(algo: str = "CVPO", env: str | None = None, **training):
    """The tiny config: local sampling (no remote EnvRunners), seed 0."""
    from cvpo.envs import POINT_HAZARD_ID
    from rllib_ext.cvpo import CVPOConfig
    from rllib_ext.sac_lag import SACLagConfig

    config_class = {"CVPO": CVPOConfig, "SACLag": SACLagConfig}[algo]
    keys = TINY_TRAINING | (TINY_CVPO if algo == "CVPO" else {}) | training
    cfg = (
        config_class()
        .environment(env or POINT_HAZARD_ID)
        .env_runners(num_env_runners=0)
        .training(**keys)
    )
    cfg.min_sample_timesteps_per_iteration = TINY_ITERATION_STEPS
    cfg.seed = 0
    return cfg


@pytest.fixture(scope="session")
def tiny_config():
    """``tiny_config(algo="CVPO", env=None, **training)``: the fast tests' config."""
    return make_tiny_config


@pytest.fixture(scope="session")
def tiny_training():
    """The tiny training keys as a dict (for ``rllib train --config`` JSON)."""
    return dict(TINY_TRAINING)


def start_local_ray(num_cpus: int = 2):
    """Starts a local Ray whose workers can import test-only modules from tests/."""
    import ray

    path = os.pathsep.join(p for p in (TESTS_DIR, os.environ.get("PYTHONPATH", "")) if p)
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )
    import rllib_ext

    rllib_ext.register()  # a new Ray session: Tune's registry starts empty
    return ray


@pytest.fixture
def ray_local():
    """A local 2-CPU Ray, started on first use and kept for later tests.

    Tests that need their own cluster (ray.cluster_utils.Cluster) shut Ray down;
    the next test using this fixture starts a fresh local one.
    """
    import ray

    if not ray.is_initialized():
        start_local_ray()
    yield ray


def pytest_sessionfinish(session, exitstatus):
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
