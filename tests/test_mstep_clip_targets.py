"""``mstep_clip_targets``: the M-step fits the actor to pi_old's samples clamped to the
action bounds (docs/constraint.md, item 6)."""

import pytest
import torch


def _capture_mstep_actions(monkeypatch):
    import rllib_ext.cvpo.torch.cvpo_torch_learner as learner_module

    seen = []
    original = learner_module.mstep_loss

    def captured(mu, std, mu_old, std_old, actions, weights, trust_region):
        seen.append(actions.detach().clone())
        return original(mu, std, mu_old, std_old, actions, weights, trust_region)

    monkeypatch.setattr(learner_module, "mstep_loss", captured)
    return seen


@pytest.mark.parametrize("clip", [True, False])
def test_the_mstep_fits_clamped_samples_only_when_asked(tiny_config, monkeypatch, clip):
    seen = _capture_mstep_actions(monkeypatch)
    algo = tiny_config("CVPO", mstep_clip_targets=clip, std_max=2.0).build_algo()
    try:
        for _ in range(2):
            algo.train()
        module = algo.learner_group._learner.module["default_policy"].unwrapped()
        low, high = module.action_low, module.action_high
        assert len(seen) == algo._num_updates > 0
        actions = torch.stack(seen)  # (updates, B, K, d)
        outside = ((actions < low) | (actions > high)).float().mean().item()
        if clip:
            assert outside == 0.0
            # the bounds themselves are hit: samples beyond them were clamped, not dropped
            at_bound = ((actions == low) | (actions == high)).float().mean().item()
            assert at_bound > 0.01
        else:
            # std up to 2 around means in [-1, 1]: a share of the raw samples lies outside
            assert outside > 0.01
    finally:
        algo.stop()


def test_mstep_targets_is_the_clamp_of_the_samples(tiny_config):
    from rllib_ext.cvpo.torch.cvpo_torch_learner import CVPOTorchLearner

    algo = tiny_config("CVPO", mstep_clip_targets=True).build_algo()
    try:
        module = algo.learner_group._learner.module["default_policy"].unwrapped()
        sampled = 3.0 * torch.randn(8, 5, module.action_high.numel(), generator=None)
        got = CVPOTorchLearner.mstep_targets(module, algo.config, sampled)
        expected = sampled.clamp(module.action_low.min().item(), module.action_high.max().item())
        torch.testing.assert_close(got, expected)
        off = algo.config.copy(copy_frozen=False).training(mstep_clip_targets=False)
        assert CVPOTorchLearner.mstep_targets(module, off, sampled) is sampled
    finally:
        algo.stop()


def test_a_non_bool_mstep_clip_targets_is_a_clear_error(tiny_config):
    from rllib_ext.cvpo.validation import ConfigError

    with pytest.raises(ConfigError, match="mstep_clip_targets"):
        tiny_config("CVPO", mstep_clip_targets="yes").validate()
