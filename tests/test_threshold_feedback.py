"""Episodic-cost feedback on the E-step threshold (cvpo.threshold, docs/constraint.md)."""

import math

import numpy as np
import pytest

from cvpo.threshold import ThresholdFeedback, TimingCorrection, state_mean_discounted_cost


def test_episodes_over_the_limit_tighten_by_rate_times_bounded_error():
    fb = ThresholdFeedback([10.0], rate=0.1, kappa_range=(0.05, 1.0))
    assert fb.update(np.array([[15.0]]))  # error (10 - 15) / 10 = -0.5
    assert fb.log_kappa[0] == pytest.approx(-0.05)
    fb.update(np.array([[30.0]]))  # -2: counted in full
    assert fb.log_kappa[0] == pytest.approx(-0.25)
    fb.update(np.array([[1000.0]]))  # bounded at -MAX_OVERSHOOT = -4
    assert fb.log_kappa[0] == pytest.approx(-0.65)
    assert fb.kappa[0] == pytest.approx(math.exp(-0.65))
    assert fb.episodes == 3


def test_equilibrium_is_the_mean_episodic_cost_not_the_median():
    """Costs 0 (x3) and 40 (x1) at a limit of 10: mean 10, median 0 -> no net change;
    a [-1, 1] clip would have loosened (3 x +1 - 1 x 1 = +2)."""
    fb = ThresholdFeedback([10.0], rate=0.1, kappa_range=(0.05, 1.0))
    fb.log_kappa[:] = -1.0
    fb.update(np.array([[0.0], [0.0], [0.0], [40.0]]))
    assert fb.log_kappa[0] == pytest.approx(-1.0)


def test_kappa_stays_in_its_range_and_under_limit_episodes_loosen_back_to_the_max():
    fb = ThresholdFeedback([10.0], rate=0.5, kappa_range=(0.2, 1.0))
    fb.update(np.full((50, 1), 100.0))
    assert fb.kappa[0] == pytest.approx(0.2)
    fb.update(np.zeros((3, 1)))  # each +0.5 in log space
    assert fb.kappa[0] == pytest.approx(0.2 * math.exp(1.5))
    fb.update(np.zeros((50, 1)))
    assert fb.kappa[0] == pytest.approx(1.0)
    assert not fb.update(np.zeros((1, 1)))  # at the bound: no change reported


def test_constraints_are_independent_and_an_infinite_limit_is_never_scaled():
    fb = ThresholdFeedback([10.0, math.inf], rate=0.1, kappa_range=(0.05, 1.0))
    fb.update(np.array([[20.0, 1e6]]))
    assert fb.log_kappa.tolist() == pytest.approx([-0.1, 0.0])


def test_rate_zero_is_the_papers_fixed_threshold():
    fb = ThresholdFeedback([5.0], rate=0.0, kappa_range=(0.05, 1.0))
    assert not fb.enabled
    assert not fb.update(np.array([[50.0]]))
    assert fb.kappa.tolist() == [1.0]


def test_state_round_trip_and_shape_check():
    fb = ThresholdFeedback([5.0, 3.0], rate=0.1, kappa_range=(0.05, 1.0))
    fb.update(np.array([[6.0, 1.0], [7.0, 9.0]]))
    other = ThresholdFeedback([5.0, 3.0], rate=0.1, kappa_range=(0.05, 1.0))
    other.set_state(fb.get_state())
    assert other.log_kappa.tolist() == fb.log_kappa.tolist() and other.episodes == 2
    with pytest.raises(ValueError, match="constraints"):
        ThresholdFeedback([5.0], rate=0.1, kappa_range=(0.05, 1.0)).set_state(fb.get_state())


@pytest.mark.parametrize(
    "bad",
    [
        dict(rate=-1.0),
        dict(rate=math.nan),
        dict(kappa_range=(0.0, 1.0)),
        dict(kappa_range=(1.5, 2.0)),
    ],
)
def test_bad_settings_are_refused(bad):
    kwargs = dict(rate=0.1, kappa_range=(0.05, 1.0)) | bad
    with pytest.raises(ValueError):
        ThresholdFeedback([5.0], **kwargs)


def test_state_mean_discounted_cost_matches_closed_forms():
    g, T = 0.9, 50
    even = np.full((T, 1), 0.2)  # truncated: continues at its own rate -> G_t = c / (1 - g)
    assert state_mean_discounted_cost(even, g, truncated=True)[0] == pytest.approx(0.2 / (1 - g))
    first = np.zeros((T, 1))
    first[0] = 1.0  # terminal episode, cost at t = 0 only: G_0 = 1, else 0
    assert state_mean_discounted_cost(first, g, truncated=False)[0] == pytest.approx(1.0 / T)
    last = np.zeros((T, 1))
    last[-1] = 1.0  # cost on the last step: G_t = g^(T-1-t)
    assert state_mean_discounted_cost(last, g, truncated=False)[0] == pytest.approx(
        (1 - g**T) / ((1 - g) * T)
    )


def test_timing_correction_is_the_even_formula_for_even_cost_and_tighter_for_early_cost():
    g, T = 0.95, 100
    tc = TimingCorrection(2, g, window=3)
    default = np.array([0.7, 0.7])
    assert tc.rho(default).tolist() == [0.7, 0.7]  # nothing measured yet
    costs = np.zeros((T, 2))
    costs[:, 0] = 0.05  # constraint 0: even spread
    costs[10:20, 1] = 1.0  # constraint 1: early
    tc.update(costs, truncated=True)
    rho = tc.rho(default)
    assert rho[0] == pytest.approx(1 / ((1 - g) * T))
    assert rho[1] < 0.75 / ((1 - g) * T)
    # the window forgets: three later episodes without cost on constraint 1 leave the default
    for _ in range(3):
        tc.update(np.column_stack([np.full(T, 0.05), np.zeros(T)]), truncated=True)
    assert tc.rho(default)[1] == 0.7
    clone = TimingCorrection(2, g, window=3)
    clone.set_state(tc.get_state())
    np.testing.assert_allclose(clone.rho(default), tc.rho(default))


def test_cvpo_adapts_the_learner_threshold_from_finished_episodes_and_checkpoints_it(
    ray_local, tmp_path
):
    """Finished training episodes set the timing factor and kappa; the learner uses
    eps_even * timing * kappa; a restore keeps all three."""
    from rllib_ext.cvpo import CVPO, CVPOConfig

    cfg = (
        CVPOConfig()
        .environment("cvpo/PointHazard-v0")
        .env_runners(num_env_runners=0, num_envs_per_env_runner=2)
        .training(
            cost_limit=0.5,
            threshold_feedback_rate=0.05,
            actor_hiddens=[16],
            critic_hiddens=[16],
            train_batch_size_per_learner=32,
            num_sampled_actions=4,
            num_steps_sampled_before_learning_starts=200,
            updates_per_learner_call=2,
        )
        .reporting(min_sample_timesteps_per_iteration=400)
        .debugging(seed=0)
    )
    algo = cfg.build_algo()
    try:
        for _ in range(3):
            result = algo.train()
        assert algo._feedback.episodes >= 8  # 100-step episodes, 1200+ steps
        cv = result["cvpo"]
        assert cv["threshold_scale_cost"] == pytest.approx(float(algo._feedback.kappa[0]))
        eps = (
            algo.config.step_thresholds() * cv["threshold_timing_cost"] * cv["threshold_scale_cost"]
        )
        np.testing.assert_allclose(algo.step_thresholds(), eps)
        learner = algo.learner_group._learner
        np.testing.assert_allclose(learner.step_thresholds("default_policy"), eps)
        path = algo.save_to_path(str(tmp_path / "ckpt"))
    finally:
        algo.stop()
    restored = CVPO.from_checkpoint(path)
    try:
        np.testing.assert_allclose(restored.step_thresholds(), eps)
        learner = restored.learner_group._learner
        np.testing.assert_allclose(learner.step_thresholds("default_policy"), eps)
    finally:
        restored.stop()
