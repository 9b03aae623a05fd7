"""Cost metrics end to end: cumulative cost, several constraints, violation rates.

The envs here record every finished episode's costs themselves (in this
process: num_env_runners=0), so the metrics are checked against what the env
produced, not against a second copy of the callback's arithmetic.
"""

import math
from collections import defaultdict
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import yaml

from cvpo.constraints import cost_limits, violation_rate, violations
from cvpo.envs import POINT_HAZARD_ID, make_env
from rllib_ext.common import metrics as M
from rllib_ext.common.callbacks import CostMetricsCallback
from rllib_ext.cvpo import CVPOConfig

ROOT = Path(__file__).resolve().parents[1]
TWO_COSTS_YAML = ROOT / "tuned_examples" / "cvpo" / "point_goal2_two_costs.yaml"
CYCLIC_ENV = "test/cyclic-two-costs"
RECORDED_ENV = "test/recorded-safety-gymnasium"

# tag -> one dict {cost key: episodic cost} per finished episode, in order
EPISODES = defaultdict(list)


class _Recorder(gym.Wrapper):
    """Sums every ``info`` cost key over each episode; appends the totals to EPISODES[tag]
    when the episode ends (terminated or truncated)."""

    def __init__(self, env, tag, keys):
        super().__init__(env)
        self._tag, self._keys = tag, list(keys)
        self._totals = dict.fromkeys(self._keys, 0.0)

    def reset(self, **kwargs):
        self._totals = dict.fromkeys(self._keys, 0.0)
        return self.env.reset(**kwargs)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        for k in self._keys:
            self._totals[k] += float(info[k])
        if terminated or truncated:
            EPISODES[self._tag].append(dict(self._totals))
        return obs, reward, terminated, truncated, info


class _CyclicCosts(gym.Wrapper):
    """PointHazard plus two synthetic constraints with a known pattern per episode:
    episode 0, 3, 6, ... of this env instance costs 1 per step on ``cost_a``,
    episode 1, 4, ... 1 per step on ``cost_b``, episode 2, 5, ... nothing (on top
    of the hazard's own cost, which stays in ``cost_hazard``). ``info["cost"]`` is
    the sum of the three."""

    def __init__(self, env):
        super().__init__(env)
        self._episode = -1

    def reset(self, **kwargs):
        self._episode += 1
        return self.env.reset(**kwargs)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        phase = self._episode % 3
        info["cost_a"] = 1.0 if phase == 0 else 0.0
        info["cost_b"] = 1.0 if phase == 1 else 0.0
        info["cost"] = info["cost_hazard"] + info["cost_a"] + info["cost_b"]
        return obs, reward, terminated, truncated, info


def _make_cyclic(env_config):
    cfg = dict(env_config or {})
    tag = cfg.pop("tag", "default")
    return _Recorder(
        _CyclicCosts(make_env(POINT_HAZARD_ID, **cfg)),
        tag,
        ["cost", "cost_hazard", "cost_a", "cost_b"],
    )


def _make_recorded(env_config):
    cfg = dict(env_config or {})
    tag, env_id, keys = cfg.pop("tag"), cfg.pop("env_id"), cfg.pop("record_keys")
    return _Recorder(make_env(env_id, **cfg), tag, keys)


@pytest.fixture
def envs(ray_local):
    from ray.tune.registry import register_env

    register_env(CYCLIC_ENV, _make_cyclic)
    register_env(RECORDED_ENV, _make_recorded)
    EPISODES.clear()
    yield EPISODES
    EPISODES.clear()


def _tiny(cfg, **training):
    kw = dict(
        num_sampled_actions=8,
        actor_hiddens=[16, 16],
        critic_hiddens=[16, 16],
        train_batch_size_per_learner=32,
        num_steps_sampled_before_learning_starts=100,
        updates_per_learner_call=2,
        training_intensity=0.02,
        num_reward_critics=1,
    )
    kw.update(training)
    cfg.env_runners(num_env_runners=0, num_envs_per_env_runner=1, rollout_fragment_length=50)
    cfg.learners(num_learners=0, num_gpus_per_learner=0)
    cfg.training(**kw)
    cfg.min_sample_timesteps_per_iteration = 300
    cfg.seed = 0
    return cfg


def _total(episodes, key="cost"):
    return sum(e[key] for e in episodes)


# -- A. cumulative cost --------------------------------------------------------------------
def test_cumulative_cost_sums_training_episodes_only(envs):
    cfg = _tiny(CVPOConfig().environment(CYCLIC_ENV, env_config={"tag": "train"}), cost_limit=50.0)
    cfg.keep_best_feasible_checkpoint = False
    # evaluation EnvRunner (local to the driver): 2 episodes per iteration, recorded apart
    cfg.evaluation(
        evaluation_interval=1,
        evaluation_duration=2,
        evaluation_duration_unit="episodes",
        evaluation_num_env_runners=0,
        evaluation_config={"env_config": {"tag": "eval"}},
    )
    algo = cfg.build_algo()
    results = []
    try:
        for _ in range(3):
            r = algo.train()
            results.append((r, list(envs["train"]), list(envs["eval"])))
    finally:
        algo.stop()

    previous = -1.0
    for r, train_eps, eval_eps in results:
        er = r["env_runners"]
        cumulative = er[M.CUMULATIVE_COST]
        # every finished training episode's cost, from the env itself
        assert cumulative == pytest.approx(_total(train_eps), rel=1e-12, abs=1e-9)
        assert cumulative >= previous
        previous = cumulative
        steps = er["num_env_steps_sampled_lifetime"]
        assert er[M.COST_RATE] == pytest.approx(cumulative / steps, rel=1e-12)
        # evaluation episodes ran, cost something, and stayed out of the sum
        assert len(eval_eps) > 0 and _total(eval_eps) > 0
        assert M.CUMULATIVE_COST not in r[M.EVALUATION_RESULTS]["env_runners"]
    # 300 steps (3 episodes of 100 steps) per iteration; 2 of every 3 cost >= 100
    first, last = results[0][0]["env_runners"], results[-1][0]["env_runners"]
    assert first[M.CUMULATIVE_COST] >= 100.0
    assert last[M.CUMULATIVE_COST] > first[M.CUMULATIVE_COST] + 100.0
    assert last["num_env_steps_sampled_lifetime"] == 900 and len(results[-1][1]) == 9
    assert 0.0 < last[M.COST_RATE] < 1.5


def test_cumulative_cost_survives_a_checkpoint(envs, tmp_path):
    cfg = _tiny(CVPOConfig().environment(CYCLIC_ENV, env_config={"tag": "ckpt"}), cost_limit=50.0)
    algo = cfg.build_algo()
    try:
        saved = algo.train()["env_runners"][M.CUMULATIVE_COST]
        path = algo.save(str(tmp_path / "ckpt")).checkpoint.path
    finally:
        algo.stop()
    assert saved == pytest.approx(_total(envs["ckpt"]))
    from rllib_ext.cvpo import CVPO

    restored = CVPO.from_checkpoint(path)
    try:
        before = len(envs["ckpt"])
        r = restored.train()["env_runners"]
    finally:
        restored.stop()
    added = _total(envs["ckpt"][before:])
    assert r[M.CUMULATIVE_COST] == pytest.approx(saved + added)
    assert r[M.COST_RATE] == pytest.approx(
        r[M.CUMULATIVE_COST] / r["num_env_steps_sampled_lifetime"]
    )


# -- B. several constraints ----------------------------------------------------------------
def _check_iteration(er, episodes, keys, limits):
    """The iteration's reported rates are the exact shares of its episodes."""
    rows = [[e[k] for k in keys] for e in episodes]
    assert er[M.NUM_EPISODES_CHECKED] == len(rows)
    assert er[M.COST_VIOLATION_RATE] == pytest.approx(violation_rate(rows, limits), abs=1e-12)
    for i, k in enumerate(keys):
        share = float(np.mean([violations(row, limits)[i] for row in rows]))
        assert er[M.COST_VIOLATION_RATE_PREFIX + k] == pytest.approx(share, abs=1e-12), k
        assert math.isfinite(er[M.EPISODE_COST_MEAN_PREFIX + k]), k


def test_two_constraints_each_with_its_own_limit(envs):
    keys, limits = ["cost_a", "cost_b"], [50.0, 50.0]
    cfg = _tiny(
        CVPOConfig().environment(CYCLIC_ENV, env_config={"tag": "two"}),
        cost_keys=keys,
        cost_limit=limits,
    )
    algo = cfg.build_algo()
    try:
        seen = 0
        for _ in range(2):
            r = algo.train()
            episodes = envs["two"][seen:]
            seen = len(envs["two"])
            er = r["env_runners"]
            _check_iteration(er, episodes, keys, limits)
            # the pattern: (100, 0), (0, 100), (0, 0) per 3 episodes -> any: 2/3, each: 1/3
            assert len(episodes) == 3
            assert er[M.COST_VIOLATION_RATE] == pytest.approx(2 / 3)
            assert er[M.COST_VIOLATION_RATE_PREFIX + "cost_a"] == pytest.approx(1 / 3)
            assert er[M.COST_VIOLATION_RATE_PREFIX + "cost_b"] == pytest.approx(1 / 3)
            # a summed-cost definition (100 vs a summed limit 100) would say 0
            assert not any(sum(e[k] for k in keys) > sum(limits) for e in episodes)
            assert er[M.NUM_EPISODES_VIOLATED] == 2
        pol = r["learners"]["default_policy"]
        for k in keys:
            assert math.isfinite(float(pol[M.LAMBDA_PREFIX + k])), k
            assert float(pol[M.LAMBDA_PREFIX + k]) >= 0.0
        assert M.LAMBDA_PREFIX + "cost" not in pol
    finally:
        algo.stop()


def test_tuned_example_with_two_safety_gymnasium_costs_trains(envs):
    experiments = yaml.safe_load(TWO_COSTS_YAML.read_text())
    ((name, spec),) = experiments.items()
    assert spec["run"] == "CVPO"
    keys, limit = spec["config"]["cost_keys"], spec["config"]["cost_limit"]
    assert len(keys) == 2 and isinstance(limit, list) and len(set(limit)) == 2
    limits = cost_limits(limit, keys)

    # the keys are in the env's step info
    env = make_env(spec["env"], max_episode_steps=5)
    env.reset(seed=0)
    info = env.step(env.action_space.sample())[-1]
    env.close()
    assert set(keys) <= set(info), sorted(info)

    cfg = CVPOConfig().update_from_dict({**spec["config"], "env": RECORDED_ENV})
    cfg.env_config = {
        "tag": "sg",
        "env_id": spec["env"],
        "record_keys": keys,
        "max_episode_steps": 100,
    }
    cfg = _tiny(cfg, num_steps_sampled_before_learning_starts=100, training_intensity=0.02)
    assert cfg.cost_keys == keys and cfg.cost_limit == limit
    algo = cfg.build_algo()
    try:
        seen = 0
        for _ in range(2):
            r = algo.train()
            episodes = envs["sg"][seen:]
            seen = len(envs["sg"])
            assert len(episodes) == 3
            er = r["env_runners"]
            _check_iteration(er, episodes, keys, limits)
            for k in keys:
                assert er[M.EPISODE_COST_MEAN_PREFIX + k] >= 0.0
            assert er[M.CUMULATIVE_COST] == pytest.approx(
                sum(e[k] for e in envs["sg"] for k in keys)
            )
        pol = r["learners"]["default_policy"]
        for k in keys:
            assert math.isfinite(float(pol[M.LAMBDA_PREFIX + k])), k
            assert math.isfinite(float(pol[M.QC_MEAN_PREFIX + k])), k
    finally:
        algo.stop()


# -- the driver's exact rates (several EnvRunners' counts) -----------------------------------
def test_rates_are_exact_shares_of_the_summed_counts():
    # two runners: one finished 1 episode (violating cost_a), the other 4 (1 violating
    # cost_b): the mean of the runners' means would be (1 + 0.25) / 2 = 0.625
    result = {
        "env_runners": {
            M.COST_VIOLATION_RATE: 0.625,
            M.NUM_EPISODES_CHECKED: 5,
            M.NUM_EPISODES_VIOLATED: 2,
            M.NUM_EPISODES_VIOLATED_PREFIX + "cost_a": 1,
            M.NUM_EPISODES_VIOLATED_PREFIX + "cost_b": 1,
            M.CUMULATIVE_COST: 30.0,
            "num_env_steps_sampled_lifetime": 600,
        },
        M.EVALUATION_RESULTS: {
            "env_runners": {M.NUM_EPISODES_CHECKED: 4, M.NUM_EPISODES_VIOLATED: 1}
        },
    }
    CostMetricsCallback().on_train_result(algorithm=None, result=result)
    er = result["env_runners"]
    assert er[M.COST_VIOLATION_RATE] == 0.4
    assert er[M.COST_VIOLATION_RATE_PREFIX + "cost_a"] == 0.2
    assert er[M.COST_VIOLATION_RATE_PREFIX + "cost_b"] == 0.2
    assert er[M.COST_RATE] == 0.05
    assert result[M.EVALUATION_RESULTS]["env_runners"][M.COST_VIOLATION_RATE] == 0.25
    # no episode finished yet: no rate invented, cumulative cost 0
    empty = {"env_runners": {"num_env_steps_sampled_lifetime": 50}}
    CostMetricsCallback().on_train_result(algorithm=None, result=empty)
    assert M.COST_VIOLATION_RATE not in empty["env_runners"]
    assert empty["env_runners"][M.CUMULATIVE_COST] == 0.0
    assert empty["env_runners"][M.COST_RATE] == 0.0
