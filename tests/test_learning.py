"""Learning, for real: CVPO keeps the tiny hazard task's cost under its limit.

On ``cvpo/PointHazard-v0`` the straight path to the goal crosses a hazard
(about 13 cost per episode, return about 54) and a detour avoids it (cost 0,
return about 50); a random policy returns about 0. With the constraint on,
CVPO must end below the limit (plus a stated tolerance) with a return far
above random; with the constraint off (limit = inf) the same run must take
the hazard. Both runs are seeded.

The tolerance is stated, and derived: CVPO turns the episodic limit C into the
per-step threshold eps = C (1 - gamma^T) / ((1 - gamma) T), which assumes the
cost is spread evenly over the episode. Here the hazard is crossed early
(steps ~20-35 of 100); with gamma = 0.95 the batch-mean Q_c of such a policy is
about 0.75 C / (T (1 - gamma)), so meeting the per-step threshold allows an
episodic cost up to ~1.33 C. Measured (seed 0, 16 x 1000 steps): constrained
cost ~6.6 at C = 5 with return ~51.5; unconstrained cost 12, return ~53.4.
"""

import math

import numpy as np
import pytest

from cvpo.envs import POINT_HAZARD_ID
from rllib_ext.cvpo import CVPOConfig
from rllib_ext.evaluate import module_policy, rollout

COST_LIMIT = 5.0
TOLERANCE = 2.5  # episodic cost units (the 1.33 C bound above plus noise), 20 deterministic episodes
RANDOM_RETURN = 0.4  # measured: 20 seeds of uniform random actions
ITERATIONS = 16  # x 1000 env steps


def train_and_evaluate(cost_limit: float) -> dict:
    cfg = (
        CVPOConfig()
        .environment(POINT_HAZARD_ID)
        .env_runners(num_env_runners=0, num_envs_per_env_runner=4)
        .training(
            cost_limit=cost_limit,
            gamma=0.95,
            num_sampled_actions=16,
            num_target_actions=4,
            actor_hiddens=[64, 64],
            critic_hiddens=[64, 64],
            train_batch_size_per_learner=128,
            num_steps_sampled_before_learning_starts=1000,
            training_intensity=0.25,
            updates_per_learner_call=16,
        )
        .debugging(seed=0)
    )
    algo = cfg.build_algo()
    try:
        history = []
        for _ in range(ITERATIONS):
            r = algo.train()
            er = r["env_runners"]
            history.append((er.get("episode_return_mean"), er.get("episode_cost_mean")))
        act = module_policy(algo.get_module("default_policy"))
        stats = rollout(act, POINT_HAZARD_ID, {}, episodes=20, seed=1000)
    finally:
        algo.stop()
    return {
        "return": float(np.mean(stats["returns"])),
        "cost": float(np.mean(stats["costs"])),
        "history": history,
    }


@pytest.mark.slow
def test_cvpo_meets_cost_limit_and_unconstrained_does_not(ray_local):
    constrained = train_and_evaluate(COST_LIMIT)
    unconstrained = train_and_evaluate(math.inf)
    print("constrained", constrained)
    print("unconstrained", unconstrained)
    assert constrained["cost"] <= COST_LIMIT + TOLERANCE, constrained
    assert constrained["return"] >= RANDOM_RETURN + 30.0, constrained
    assert unconstrained["cost"] >= COST_LIMIT + 5.0, unconstrained
    assert unconstrained["return"] >= RANDOM_RETURN + 30.0, unconstrained
