"""``cost_target_actions="replay"``: the cost critics' TD target bootstraps on the
behaviour's action at s' (docs/constraint.md), in CVPO and SACLag."""

import numpy as np
import pytest
import torch

from cvpo.networks import CriticEnsemble
from rllib_ext.common.torch_learner import cost_values_at_replay_actions


def test_replay_bootstrap_uses_the_stored_action_where_valid_and_the_fallback_elsewhere():
    torch.manual_seed(0)
    E, m, Ec, B = 2, 2, 2, 5
    critics = CriticEnsemble(4, 3, E + m * Ec, hidden=(8,))
    next_obs = torch.randn(B, 4)
    next_actions = torch.randn(B, 3)
    valid = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    fallback = torch.full((m, B), -7.0)
    batch = {"next_actions": next_actions, "next_action_valid": valid}
    with torch.no_grad():
        q = critics(next_obs, next_actions)  # (M, B)
        for how, reduce in (("mean", lambda x: x.mean(1)), ("max", lambda x: x.amax(1))):
            got = cost_values_at_replay_actions(
                critics,
                next_obs,
                batch,
                fallback,
                num_reward_critics=E,
                num_constraints=m,
                num_cost_critics=Ec,
                reduction=how,
            )
            expected = reduce(q[E:].reshape(m, Ec, B))
            assert got.shape == (m, B)
            np.testing.assert_allclose(got[:, [0, 2, 3]], expected[:, [0, 2, 3]], rtol=1e-6)
            assert torch.all(got[:, [1, 4]] == -7.0)
            # the reward members do not leak into the cost values
            assert not torch.allclose(got[:, 0], q[0, 0].expand(m))


_LEARNER_MODULES = {
    "CVPO": "rllib_ext.cvpo.torch.cvpo_torch_learner",
    "SACLag": "rllib_ext.sac_lag.torch.sac_lag_torch_learner",
}


@pytest.mark.parametrize("algo", ["CVPO", "SACLag"])
def test_training_with_replay_cost_targets_stores_next_actions(tiny_config, monkeypatch, algo):
    import importlib

    # the learner runs in this process (no remote learners): count its calls of the
    # replay bootstrap, which must happen once per update
    module = importlib.import_module(_LEARNER_MODULES[algo])
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return cost_values_at_replay_actions(*args, **kwargs)

    monkeypatch.setattr(module, "cost_values_at_replay_actions", counted)
    cfg = tiny_config(algo, cost_target_actions="replay")
    algo_ = cfg.build_algo()
    try:
        for _ in range(2):
            result = algo_.train()
        sample = algo_._replay.sample(64)
        assert sample["next_actions"].shape == (64, 2)
        valid = sample["next_action_valid"]
        assert set(np.unique(valid)) <= {0.0, 1.0} and valid.mean() > 0.9
        assert np.isfinite(result["learners"]["default_policy"]["cost_critic_loss"])
        updates = algo_._num_updates
        assert updates > 0 and len(calls) == updates
    finally:
        algo_.stop()


def test_unknown_cost_target_actions_is_a_clear_error(tiny_config):
    from rllib_ext.cvpo.validation import ConfigError

    with pytest.raises(ConfigError, match="cost_target_actions"):
        tiny_config("CVPO", cost_target_actions="behaviour").validate()


def test_policy_cost_targets_do_not_call_the_replay_bootstrap(tiny_config, monkeypatch):
    import importlib

    module = importlib.import_module(_LEARNER_MODULES["CVPO"])
    monkeypatch.setattr(module, "cost_values_at_replay_actions", lambda *a, **k: 1 / 0)
    algo_ = tiny_config("CVPO").build_algo()
    try:
        algo_.train()
        algo_.train()
        assert algo_._num_updates > 0
        assert "next_actions" not in algo_._replay.sample(4)
    finally:
        algo_.stop()


def test_a_stored_buffer_without_next_actions_is_refused_with_the_fix(
    ray_local, tmp_path, tiny_config
):
    algo = tiny_config(store_buffer_in_checkpoints=True).build_algo()
    try:
        algo.train()
        path = algo.save_to_path(str(tmp_path / "ckpt"))
    finally:
        algo.stop()
    other = tiny_config(store_buffer_in_checkpoints=True, cost_target_actions="replay")
    other = other.build_algo()
    try:
        with pytest.raises(ValueError, match="cost_target_actions='policy'"):
            other.restore_from_path(path)
    finally:
        other.stop()
