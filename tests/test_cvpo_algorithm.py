"""CVPO as an RLlib algorithm: metrics, distributed sampling, checkpoints, Tune."""

import numpy as np
import pytest
import torch

from rllib_ext.common import metrics as M
from rllib_ext.common.callbacks import CostMetricsCallback
from rllib_ext.cvpo import CVPO


def learner_state(algo):
    return algo.learner_group._learner.get_cvpo_state()


def module_weights(algo):
    return {
        k: v.detach().clone()
        for k, v in algo.learner_group._learner.module["default_policy"].state_dict().items()
    }


def test_training_reports_cost_and_learner_metrics(ray_local, tiny_config):
    algo = tiny_config().build_algo()
    try:
        r1 = algo.train()
        r2 = algo.train()
        thresholds_now = algo.step_thresholds()
    finally:
        algo.stop()
    er = r2["env_runners"]
    assert er["num_env_steps_sampled_lifetime"] >= 600
    assert er[M.EPISODE_COST_MEAN] >= 0.0
    assert 0.0 <= er[M.COST_VIOLATION_RATE] <= 1.0
    assert np.isfinite(er[M.EPISODE_RETURN_MEAN])
    pol = r2["learners"]["default_policy"]
    for key in (
        M.ETA,
        M.LAMBDA_PREFIX + "cost",
        M.KL_MU,
        M.KL_SIGMA,
        M.ALPHA_MU,
        M.ALPHA_SIGMA,
        M.REWARD_CRITIC_LOSS,
        M.COST_CRITIC_LOSS,
        M.Q_MEAN,
        M.QC_MEAN_PREFIX + "cost",
        M.ESTEP_SOLVE_TIME_S,
    ):
        assert np.isfinite(float(pol[key])), key
    assert float(pol[M.ETA]) > 0
    # the even-spread formula times the measured timing factor and the feedback scale;
    # at T = 100 and gamma = 0.99 the formula's (1 - gamma^T) = 0.63 is one the critics'
    # bootstrap at the time limit does not have, so even spread measures 1 / 0.63 = 1.58
    cv = r2[M.CVPO_RESULTS]
    timing, scale = cv[M.THRESHOLD_TIMING_PREFIX + "cost"], cv[M.THRESHOLD_SCALE_PREFIX + "cost"]
    assert 0.0 < timing <= 2.5
    assert 0.05 <= scale <= 1.0
    assert thresholds_now[0] == pytest.approx(5.0 * (1 - 0.99**100) / (0.01 * 100) * timing * scale)
    # the learner's metric is the mean over the iteration's updates, during which
    # finished episodes moved the threshold
    assert (
        0.5 * thresholds_now[0]
        <= float(pol[M.STEP_THRESHOLD_PREFIX + "cost"])
        <= 2.0 * thresholds_now[0]
    )
    counts = sum(
        int(pol[M.ESTEP_STATUS_PREFIX + s]) for s in ("converged", "max_iter", "infeasible")
    )
    assert counts > 0
    # updates follow the training intensity: 0.1 per env step after warm-up
    updates = r2[M.CVPO_RESULTS][M.UPDATES_LIFETIME]
    sampled = er["num_env_steps_sampled_lifetime"]
    assert updates == int(0.1 * (sampled - 200)) + 1
    assert r1["training_iteration"] == 1 and r2["training_iteration"] == 2


def test_checkpoint_restores_exactly_and_training_continues(ray_local, tmp_path, tiny_config):
    algo = tiny_config().build_algo()
    try:
        algo.train()
        algo.train()
        path = algo.save(str(tmp_path / "ckpt")).checkpoint.path
        saved_state = learner_state(algo)
        saved_weights = module_weights(algo)
        obs = np.random.default_rng(1).normal(size=(16, 8)).astype(np.float32)
        module = algo.learner_group._learner.module["default_policy"]
        with torch.no_grad():
            saved_actions = module.actor(torch.as_tensor(obs))[0].numpy()
        saved_updates = algo._num_updates
    finally:
        algo.stop()

    restored = CVPO.from_checkpoint(path)
    try:
        state = learner_state(restored)
        weights = module_weights(restored)
        assert set(weights) == set(saved_weights)
        for k in saved_weights:
            assert torch.equal(weights[k], saved_weights[k]), k
        mod = restored.learner_group._learner.module["default_policy"]
        with torch.no_grad():
            np.testing.assert_array_equal(mod.actor(torch.as_tensor(obs))[0].numpy(), saved_actions)
        mid = "default_policy"
        assert state[mid]["dual"][0] == saved_state[mid]["dual"][0]
        np.testing.assert_array_equal(state[mid]["dual"][1], saved_state[mid]["dual"][1])
        for k, v in saved_state[mid]["trust_region"].items():
            assert np.array_equal(np.asarray(state[mid]["trust_region"][k]), np.asarray(v)), k
        assert state[mid]["counters"] == saved_state[mid]["counters"]
        np.testing.assert_array_equal(state["generator"], saved_state["generator"])
        # optimizer moments restored
        opt = restored.learner_group._learner.get_optimizer(mid, "critic")
        assert any(len(s) for s in opt.state.values())
        # training continues from the restored counters
        assert restored._num_updates == saved_updates
        assert restored.training_iteration == 2
        r = restored.train()
        assert r["training_iteration"] == 3
        assert (
            learner_state(restored)[mid]["counters"]["updates"]
            > saved_state[mid]["counters"]["updates"]
        )
    finally:
        restored.stop()


def test_replay_buffer_in_checkpoint_when_asked(ray_local, tmp_path, tiny_config):
    algo = tiny_config(store_buffer_in_checkpoints=True).build_algo()
    try:
        algo.train()
        path = algo.save(str(tmp_path / "ckpt")).checkpoint.path
        size, added = len(algo._replay), algo._replay.num_added
        sample = algo._replay.sample(32)
        algo._replay._rng = np.random.default_rng(123)  # perturb the live buffer
    finally:
        algo.stop()
    restored = CVPO.from_checkpoint(path)
    try:
        assert len(restored._replay) == size and restored._replay.num_added == added
        assert len(restored._replay.sample(8)["obs"]) == 8
        assert sample["obs"].shape[1] == 8
    finally:
        restored.stop()


class _CountSteps(CostMetricsCallback):
    """Remembers on each EnvRunner how many env steps it sampled."""

    def on_sample_end(self, *, env_runner=None, samples=None, **kwargs):
        env_runner._test_steps = getattr(env_runner, "_test_steps", 0) + sum(
            len(e) for e in samples
        )


@pytest.mark.parametrize("async_sampling", [True, False])
def test_two_env_runners_on_safety_point_goal(ray_local, async_sampling, tiny_config):
    """Both runners sample; with async sampling each keeps one 50-step chunk in
    flight while the driver learns, and every other chunk is in the driver's count."""
    cfg = tiny_config(
        env="SafetyPointGoal1-v0",
        num_steps_sampled_before_learning_starts=100,
        async_sampling=async_sampling,
    )
    cfg.env_runners(num_env_runners=2, rollout_fragment_length=50)
    cfg.callbacks(_CountSteps)
    cfg.min_sample_timesteps_per_iteration = 200
    algo = cfg.build_algo()
    try:
        for _ in range(2):
            result = algo.train()
        in_flight = algo.env_runner_group.num_in_flight_async_reqs(tag="cvpo_sample")
        per_runner = algo.env_runner_group.foreach_env_runner(  # waits for in-flight chunks
            lambda er: getattr(er, "_test_steps", 0),
            local_env_runner=False,
        )
    finally:
        algo.stop()
    er = result["env_runners"]
    assert in_flight == (2 if async_sampling else 0)
    assert sum(per_runner) == er["num_env_steps_sampled_lifetime"] + 50 * in_flight, per_runner
    # both runners deliver chunks; how the 400+ steps split between them depends on the
    # machine's load (a CI run beside a training run saw 150 and 350), so no even split
    assert len(per_runner) == 2 and all(s >= 50 for s in per_runner), per_runner
    assert er["num_env_steps_sampled_lifetime"] >= 400
    assert M.EPISODE_COST_MEAN in er or er.get("num_episodes_lifetime", 0) == 0
    assert result[M.CVPO_RESULTS][M.UPDATES_LIFETIME] > 0


def test_learner_threads_leave_the_env_runners_their_cores(monkeypatch, tiny_config):
    from rllib_ext.common import torch_learner as L

    monkeypatch.setattr(L.os, "cpu_count", lambda: 16)
    cfg = tiny_config()
    assert L.learner_threads(cfg) is None  # no remote runners: torch's default
    cfg.env_runners(num_env_runners=6)
    assert L.learner_threads(cfg) == 10
    cfg.env_runners(num_env_runners=6, num_cpus_per_env_runner=2)
    assert L.learner_threads(cfg) == 4
    cfg.env_runners(num_env_runners=20, num_cpus_per_env_runner=1)
    assert L.learner_threads(cfg) == 1  # never below one
    cfg.training(learner_torch_threads=3)
    assert L.learner_threads(cfg) == 3  # explicit setting wins
    cfg.training(learner_torch_threads=None)
    cfg.learners(num_learners=1)
    assert L.learner_threads(cfg) is None  # a learner actor: Ray sets its threads


def test_tune_runs_cvpo_by_name(ray_local, tmp_path, tiny_config):
    from ray import tune

    param_space = tiny_config().to_dict()
    tuner = tune.Tuner(
        "CVPO",
        param_space=param_space,
        run_config=tune.RunConfig(
            stop={"training_iteration": 1}, storage_path=str(tmp_path), verbose=0
        ),
    )
    results = tuner.fit()
    assert len(results) == 1 and results[0].error is None
    assert results[0].metrics["training_iteration"] == 1
    assert M.EPISODE_COST_MEAN in results[0].metrics["env_runners"]
