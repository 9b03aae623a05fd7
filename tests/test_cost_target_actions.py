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


# -- cost_target_actions="mean": a cost critic of the deterministic policy ------------------


def test_cost_values_at_reduces_each_constraints_members_at_the_given_actions():
    from rllib_ext.common.torch_learner import cost_values_at

    torch.manual_seed(1)
    E, m, Ec, B = 2, 2, 3, 6
    critics = CriticEnsemble(4, 3, E + m * Ec, hidden=(8,))
    obs, actions = torch.randn(B, 4), torch.randn(B, 3)
    with torch.no_grad():
        q = critics(obs, actions)  # (M, B)
        got = cost_values_at(
            critics,
            obs,
            actions,
            num_reward_critics=E,
            num_constraints=m,
            num_cost_critics=Ec,
            reduction="max",
        )
    assert got.shape == (m, B)
    for k in range(m):
        members = q[E + k * Ec : E + (k + 1) * Ec]
        np.testing.assert_allclose(got[k], members.amax(0), rtol=1e-6)


def test_cvpo_mean_cost_targets_bootstrap_on_pi_olds_mean_action(tiny_config):
    """The learner's cost bootstrap equals the target cost critic at (s', mean of
    pi_old(.|s')), clamped to the bounds, to float precision: recomputed here from the
    module's own networks on one minibatch."""
    from rllib_ext.cvpo.torch.default_cvpo_torch_rl_module import OLD_MEAN_NEXT, VC_NEXT

    algo_ = tiny_config("CVPO", cost_target_actions="mean").build_algo()
    try:
        algo_.train()
        learner = algo_.learner_group._learner
        module = learner.module["default_policy"].unwrapped()
        sample = algo_._replay.sample(32)
        batch = {k: torch.as_tensor(v) for k, v in sample.items()}
        old = module.forward_target(batch, generator=torch.Generator().manual_seed(0))
        next_obs = batch["next_obs"].reshape(32, -1).float()
        with torch.no_grad():
            mean_next, _ = module.target_actor(next_obs)
            a = torch.maximum(torch.minimum(mean_next, module.action_high), module.action_low)
            q = module.target_critics(next_obs, a)  # (M, B)
        torch.testing.assert_close(old[OLD_MEAN_NEXT], mean_next)
        E = module.num_reward_critics
        expected = q[E:].reshape(module.num_constraints, module.num_cost_critics, 32).mean(1)
        got = learner.cost_bootstrap(module, algo_.config, batch, old)  # the loss's path
        assert got.shape == (module.num_constraints, 32)
        torch.testing.assert_close(got, expected)
        # it differs from the paper's bootstrap on pi_old's samples
        assert not torch.allclose(got, old[VC_NEXT])
        paper = learner.cost_bootstrap(
            module,
            algo_.config.copy(copy_frozen=False).training(cost_target_actions="policy"),
            batch,
            old,
        )
        assert paper is old[VC_NEXT]
        result = algo_.train()
        assert np.isfinite(result["learners"]["default_policy"]["cost_critic_loss"])
        assert "next_actions" not in algo_._replay.sample(4)  # nothing extra is stored
    finally:
        algo_.stop()


def test_saclag_mean_cost_targets_use_the_deterministic_action(tiny_config, monkeypatch):
    """Each update's cost bootstrap is the target cost critics at (s', tanh(mu(s'))) in
    env units, mu from the actor as it is at that moment: checked inside the call."""
    import importlib

    learner_module = importlib.import_module(_LEARNER_MODULES["SACLag"])
    original, holder, gaps = learner_module.cost_values_at, {}, []

    def checked(critics, obs, actions, **kwargs):
        module = holder["module"]
        with torch.no_grad():
            mu, _ = module.actor(obs)
            expected = module.to_env_units(torch.tanh(mu))
        gaps.append(float((actions - expected).abs().max()))
        assert critics is module.target_critics
        return original(critics, obs, actions, **kwargs)

    monkeypatch.setattr(learner_module, "cost_values_at", checked)
    algo_ = tiny_config("SACLag", cost_target_actions="mean").build_algo()
    try:
        holder["module"] = algo_.learner_group._learner.module["default_policy"].unwrapped()
        for _ in range(2):
            result = algo_.train()
        assert algo_._num_updates > 0 and len(gaps) == algo_._num_updates
        assert max(gaps) == 0.0
        assert np.isfinite(result["learners"]["default_policy"]["cost_critic_loss"])
    finally:
        algo_.stop()
