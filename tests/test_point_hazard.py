"""cvpo/PointHazard-v0: determinism, cost semantics, reference policies, speed."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from cvpo.envs import POINT_HAZARD_ID, can_terminate_early, episode_horizon, make_env
from cvpo.envs import point_hazard as ph

SEEDS = range(10)


@pytest.fixture
def env():
    e = make_env(POINT_HAZARD_ID)
    yield e
    e.close()


def _inside_hazard(position):
    x, y = position
    return math.hypot(x - ph.HAZARD_CENTER[0], y - ph.HAZARD_CENTER[1]) < ph.HAZARD_RADIUS


def test_spaces_and_horizon(env):
    assert env.observation_space.dtype == np.float32 and env.observation_space.shape == (8,)
    assert env.action_space.dtype == np.float32 and env.action_space.shape == (2,)
    np.testing.assert_array_equal(env.action_space.low, [-1, -1])
    np.testing.assert_array_equal(env.action_space.high, [1, 1])
    assert episode_horizon(env) == 100 <= 100
    assert env.spec.max_episode_steps == 100
    assert can_terminate_early(POINT_HAZARD_ID) is False


def test_seeded_determinism():
    def trajectory(seed):
        env = make_env(POINT_HAZARD_ID)
        obs, _ = env.reset(seed=seed)
        env.action_space.seed(seed)
        out = [obs]
        for _ in range(50):
            obs, reward, _, _, info = env.step(env.action_space.sample())
            out.append(np.concatenate([obs, [reward, info["cost"]]]))
        env.close()
        return out

    a, b, c = trajectory(3), trajectory(3), trajectory(4)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    # reset(seed) on the same env instance reproduces the start as well
    env = make_env(POINT_HAZARD_ID)
    first, _ = env.reset(seed=11)
    env.step(np.ones(2, dtype=np.float32))
    again, _ = env.reset(seed=11)
    np.testing.assert_array_equal(first, again)


@pytest.mark.parametrize("policy", ["straight", "detour", "random", "corner"])
def test_cost_semantics_and_observations(env, policy):
    policies = {
        "straight": ph.straight_line_policy,
        "detour": ph.detour_policy,
        "corner": lambda obs: np.array([-1.0, -1.0], dtype=np.float32),  # pushes into a wall
    }
    for seed in SEEDS:
        obs, _ = env.reset(seed=seed)
        env.action_space.seed(seed)
        assert obs.dtype == np.float32 and env.observation_space.contains(obs)
        steps = 0
        while True:
            action = env.action_space.sample() if policy == "random" else policies[policy](obs)
            obs, reward, terminated, truncated, info = env.step(action)
            steps += 1
            expected = 1.0 if _inside_hazard(env.unwrapped.position) else 0.0
            assert info["cost"] == expected and info["cost_hazard"] == expected
            assert type(info["cost"]) is float
            assert obs.dtype == np.float32 and env.observation_space.contains(obs)
            np.testing.assert_allclose(obs[:2], env.unwrapped.position, atol=1e-6)
            assert not terminated
            if truncated:
                break
        assert steps == 100


def test_reference_policies():
    results = ph.evaluate_policies(seeds=SEEDS)
    straight, detour, random = results["straight_line"], results["detour"], results["random"]
    # The unconstrained optimum pays a lot of cost on every seed ...
    assert straight["cost_min"] > 5
    assert 10 <= straight["cost"] <= 20
    # ... a detour pays none, at a moderately lower return ...
    assert detour["cost_max"] == 0.0
    assert straight["return"] > detour["return"] > 0.8 * straight["return"]
    # ... and both beat random actions by far.
    assert detour["return_min"] > random["return_max"] + 20
    for summary in results.values():
        assert summary["length_min"] == summary["length_max"] == 100


def test_straight_line_cost_counts_steps_in_hazard(env):
    obs, _ = env.reset(seed=0)
    inside = total = 0
    for _ in range(100):
        obs, _, _, truncated, info = env.step(ph.straight_line_policy(obs))
        inside += _inside_hazard(env.unwrapped.position)
        total += info["cost"]
    assert total == inside > 5


def test_speed_through_make_env(env):
    """>= 20,000 steps/s on one core, wrappers included (typically ~300,000)."""
    env.reset(seed=0)
    actions = np.random.default_rng(0).uniform(-1, 1, size=(20_000, 2)).astype(np.float32)
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        for action in actions:
            _, _, terminated, truncated, _ = env.step(action)
            if terminated or truncated:
                env.reset()
        best = max(best, len(actions) / (time.perf_counter() - start))
    assert best >= 20_000, best
