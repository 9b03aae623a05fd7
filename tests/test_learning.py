"""Learning, for real: CVPO keeps the tiny hazard task's cost under its limit.

On ``cvpo/PointHazard-v0`` the straight path to the goal crosses a hazard
(about 13 cost per episode, return about 54) and a detour avoids it (cost 0,
return about 50); a random policy returns about 0. With a limit of 5 the best
policy spends its budget: it cuts through the hazard's edge, paying at most 5,
and returns more than the detour. With the constraint on, CVPO's deterministic
policy must meet the limit (up to two standard errors of its own evaluation)
and return more than the detour; with the constraint off (limit = inf) the
same run must take the hazard. Both runs are seeded.

History (docs/constraint.md): with the paper's even-spread threshold and one
cost critic this run ended at cost ~6.0-6.9 (the test then allowed 7.5); the
hazard is crossed early in the episode, where the state-averaged discounted Q_c
that the E-step bounds counts it less, and the single cost critic
underestimated the chosen actions' cost by ~10 %. The test runs the defaults:
the measured-timing threshold with the episodic-cost feedback and one cost
critic (docs/algorithm.md#per-step-threshold).
"""

import math

import numpy as np
import pytest

from cvpo.envs import POINT_HAZARD_ID, make_env
from cvpo.envs.point_hazard import detour_policy, run_episode
from rllib_ext.cli.evaluate import module_policy, rollout
from rllib_ext.cvpo import CVPOConfig

COST_LIMIT = 5.0
EVAL_EPISODES = 20
EVAL_SEED = 1000
ITERATIONS = {"constrained": 30, "unconstrained": 16}  # x 1000 env steps


def learning_config(cost_limit: float, **training) -> CVPOConfig:
    """The tiny task's learning run (also tests/test_full_covariance.py's)."""
    keys = dict(
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
        learner_torch_threads=1,
    )
    return (
        CVPOConfig()
        .environment(POINT_HAZARD_ID)
        .env_runners(num_env_runners=0, num_envs_per_env_runner=4)
        .training(**(keys | training))
        .debugging(seed=0)
    )


def train_and_evaluate(cost_limit: float, iterations: int) -> dict:
    cfg = learning_config(cost_limit)
    algo = cfg.build_algo()
    try:
        for _ in range(iterations):
            algo.train()
        act = module_policy(algo.get_module("default_policy"))
        stats = rollout(act, POINT_HAZARD_ID, {}, episodes=EVAL_EPISODES, seed=EVAL_SEED)
    finally:
        algo.stop()
    costs = np.asarray(stats["costs"])
    return {
        "return": float(np.mean(stats["returns"])),
        "cost": float(costs.mean()),
        "cost_se": float(costs.std(ddof=1) / math.sqrt(len(costs))),
    }


def detour_return() -> float:
    env = make_env(POINT_HAZARD_ID)
    try:
        return float(
            np.mean(
                [
                    run_episode(env, detour_policy, EVAL_SEED + i)["return"]
                    for i in range(EVAL_EPISODES)
                ]
            )
        )
    finally:
        env.close()


@pytest.mark.slow
def test_cvpo_meets_cost_limit_and_unconstrained_does_not(ray_local):
    constrained = train_and_evaluate(COST_LIMIT, ITERATIONS["constrained"])
    unconstrained = train_and_evaluate(math.inf, ITERATIONS["unconstrained"])
    detour = detour_return()
    print("constrained", constrained, "unconstrained", unconstrained, "detour return", detour)
    assert constrained["cost"] <= COST_LIMIT + 2 * constrained["cost_se"], constrained
    assert constrained["return"] >= detour + 1.5, (constrained, detour)  # more than the detour
    assert unconstrained["cost"] >= COST_LIMIT + 5.0, unconstrained
    assert unconstrained["return"] >= detour, (unconstrained, detour)
