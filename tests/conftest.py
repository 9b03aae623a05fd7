"""Shared fixtures: a local Ray with tests/ importable by its workers."""

import os

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


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
