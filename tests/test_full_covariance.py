"""actor_covariance="full": the original CVPO's Cholesky actor, wired through training.

The module samples N(mu, L L^T) for the E-step and for exploration, the M-step uses
the Cholesky form of the decoupled KLs (cvpo.mstep.mstep_loss_chol), and a training
run on the tiny hazard task learns with it.
"""

import math

import numpy as np
import pytest
import torch

from cvpo.envs import POINT_HAZARD_ID
from rllib_ext.cli.evaluate import module_policy, rollout
from rllib_ext.cvpo import CVPOConfig
from rllib_ext.cvpo.torch.default_cvpo_torch_rl_module import sample_gaussian


def test_samples_have_the_cholesky_covariance():
    gen = torch.Generator().manual_seed(0)
    mean = torch.tensor([[1.0, -2.0], [0.0, 0.5]])
    L = torch.tensor([[[0.5, 0.0], [0.3, 0.2]], [[1.0, 0.0], [-0.8, 0.1]]])
    x = sample_gaussian(mean, L, 200_000, gen)  # (2, n, 2)
    for i in range(2):
        centred = x[i] - x[i].mean(0)
        cov = centred.T @ centred / (x.shape[1] - 1)
        np.testing.assert_allclose(x[i].mean(0), mean[i], atol=0.01)
        np.testing.assert_allclose(cov, L[i] @ L[i].T, atol=0.01)
    # the diagonal form: std per dimension, the same draws scaled
    std = torch.tensor([[0.5, 2.0]])
    d = sample_gaussian(torch.zeros(1, 2), std, 200_000, gen)[0]
    np.testing.assert_allclose(d.std(0), std[0], rtol=0.02)


def hazard_config(covariance: str) -> CVPOConfig:
    """The learning test's run on the tiny task, without a constraint."""
    from test_learning import learning_config

    return learning_config(math.inf, actor_covariance=covariance)


@pytest.mark.slow
def test_full_covariance_actor_trains_and_learns(ray_local):
    """12k env steps without a constraint: the full-covariance actor goes for the goal
    (a random policy returns ~0, the straight path ~54), the M-step moves the
    off-diagonal entries of its Cholesky factors, and the M-step's KLs stay inside the
    trust region."""
    algo = hazard_config("full").build_algo()
    try:
        module = algo.get_module("default_policy")
        obs = torch.as_tensor(
            np.random.default_rng(0).normal(size=(32, module.obs_dim)), dtype=torch.float32
        )
        _, L0 = module.actor(obs)
        assert L0.shape == (32, module.act_dim, module.act_dim)
        for _ in range(12):
            result = algo.train()
        learner = result["learners"]["default_policy"]
        _, L = algo.get_module("default_policy").actor(obs)
        act = module_policy(algo.get_module("default_policy"))
        stats = rollout(act, POINT_HAZARD_ID, {}, episodes=10, seed=1000)
    finally:
        algo.stop()
    assert learner["num_updates_skipped_nonfinite"] == 0
    assert learner["num_gradient_updates"] > 2000
    assert torch.all(torch.triu(L.detach(), diagonal=1) == 0)  # lower-triangular
    # the M-step moves the off-diagonal entries (measured: mean |change| 0.069 from 0.020)
    change = torch.tril(L.detach() - L0.detach(), diagonal=-1).abs().mean()
    assert change > 0.02, float(change)
    assert learner["kl_mu"] < 5 * 0.01 and learner["kl_sigma"] < 5 * 0.0005, learner
    # measured 53.5 (the straight path); a random policy returns ~0, the detour ~50
    assert np.mean(stats["returns"]) > 40.0, stats["returns"]
