"""M-step (docs/algorithm.md#m-step): decoupled KLs, weighted MLE, trust region."""

import math

import pytest
import torch
from torch.distributions import Independent, MultivariateNormal, Normal, kl_divergence

from cvpo.mstep import (
    TrustRegion,
    decoupled_kl_chol,
    decoupled_kl_diag,
    diag_gaussian_log_prob,
    mstep_loss,
    mstep_loss_chol,
    tril_gaussian_log_prob,
    weighted_mle_loss,
)
from cvpo.networks import GaussianActor


def random_tril(B, d, generator):
    L = torch.randn(B, d, d, generator=generator, dtype=torch.float64).tril(-1) * 0.5
    diag = 0.2 + torch.rand(B, d, generator=generator, dtype=torch.float64)
    return L + torch.diag_embed(diag)


def diag_gaussian(mu, std):
    return Independent(Normal(mu, std), 1)


def test_decoupled_kl_diag_matches_torch():
    g = torch.Generator().manual_seed(0)
    B, d = 16, 3
    mu_old, mu = torch.randn(2, B, d, generator=g, dtype=torch.float64)
    std_old, std = 0.1 + torch.rand(2, B, d, generator=g, dtype=torch.float64)
    kl_mu, kl_sigma = decoupled_kl_diag(mu_old, std_old, mu, std, reduce=False)
    old = diag_gaussian(mu_old, std_old)
    torch.testing.assert_close(kl_mu, kl_divergence(old, diag_gaussian(mu, std_old)))
    torch.testing.assert_close(kl_sigma, kl_divergence(old, diag_gaussian(mu_old, std)))
    mean_mu, mean_sigma = decoupled_kl_diag(mu_old, std_old, mu, std)
    assert mean_mu.shape == () and mean_mu.item() == pytest.approx(kl_mu.mean().item(), rel=1e-12)
    assert mean_sigma.item() == pytest.approx(kl_sigma.mean().item(), rel=1e-12)
    # identical policies: both KLs vanish
    zero_mu, zero_sigma = decoupled_kl_diag(mu_old, std_old, mu_old, std_old)
    assert zero_mu.item() == 0.0 and abs(zero_sigma.item()) < 1e-15


def test_decoupled_kl_chol_matches_torch():
    g = torch.Generator().manual_seed(1)
    B, d = 16, 4
    mu_old, mu = torch.randn(2, B, d, generator=g, dtype=torch.float64)
    L_old, L = random_tril(B, d, g), random_tril(B, d, g)
    kl_mu, kl_sigma = decoupled_kl_chol(mu_old, L_old, mu, L, reduce=False)
    old = MultivariateNormal(mu_old, scale_tril=L_old)
    torch.testing.assert_close(kl_mu, kl_divergence(old, MultivariateNormal(mu, scale_tril=L_old)))
    torch.testing.assert_close(
        kl_sigma, kl_divergence(old, MultivariateNormal(mu_old, scale_tril=L))
    )
    # diagonal factors reduce to the diagonal formula
    std_old, std = torch.rand(2, B, d, generator=g, dtype=torch.float64) + 0.1
    chol = decoupled_kl_chol(mu_old, torch.diag_embed(std_old), mu, torch.diag_embed(std))
    diag = decoupled_kl_diag(mu_old, std_old, mu, std)
    torch.testing.assert_close(chol[0], diag[0])
    torch.testing.assert_close(chol[1], diag[1])


def test_log_probs_match_torch():
    g = torch.Generator().manual_seed(2)
    B, K, d = 8, 5, 3
    actions = torch.randn(B, K, d, generator=g, dtype=torch.float64)
    mu = torch.randn(B, d, generator=g, dtype=torch.float64)
    std = 0.2 + torch.rand(B, d, generator=g, dtype=torch.float64)
    L = random_tril(B, d, g)
    expected = diag_gaussian(mu[:, None], std[:, None]).log_prob(actions)
    torch.testing.assert_close(diag_gaussian_log_prob(actions, mu, std), expected)
    expected = MultivariateNormal(mu[:, None], scale_tril=L[:, None]).log_prob(actions)
    torch.testing.assert_close(tril_gaussian_log_prob(actions, mu, L), expected)


def test_weighted_mle_loss_definition():
    g = torch.Generator().manual_seed(3)
    log_mu, log_sigma = torch.randn(2, 6, 4, generator=g)
    weights = torch.softmax(torch.randn(6, 4, generator=g), dim=1)
    loss = weighted_mle_loss(log_mu, log_sigma, weights)
    # - (1/B) sum_i sum_j q_ij (log pi_mu + log pi_Sigma)
    expected = (
        -sum(
            (weights[i, j] * (log_mu[i, j] + log_sigma[i, j])).item()
            for i in range(6)
            for j in range(4)
        )
        / 6
    )
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="shapes must match"):
        weighted_mle_loss(log_mu, log_sigma, weights[:, :3])


def make_batch(seed=0, B=64, d=2, K=32, obs_dim=4):
    """An actor, its snapshot pi_old, actions sampled from pi_old and E-step-like
    weights that prefer a large first action coordinate."""
    torch.manual_seed(seed)
    actor = GaussianActor(obs_dim, d, hidden=(32, 32))
    obs = torch.randn(B, obs_dim)
    with torch.no_grad():
        mu_old, std_old = actor(obs)
        actions = mu_old[:, None] + std_old[:, None] * torch.randn(B, K, d)  # (B, K, d)
        weights = torch.softmax(3 * actions[..., 0] / std_old[:, None, 0], dim=1)  # (B, K)
    return actor, obs, mu_old, std_old, actions, weights


@pytest.fixture
def one_thread():
    """Tiny networks: intra-op threads only add OpenMP barriers, which stall
    for a scheduler slice each when other processes load the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_mstep(trust_region, steps=50, lr=1e-3):
    actor, obs, mu_old, std_old, actions, weights = make_batch()
    optimizer = torch.optim.Adam(actor.parameters(), lr=lr)
    for _ in range(steps):
        mu, std = actor(obs)
        loss, stats = mstep_loss(mu, std, mu_old, std_old, actions, weights, trust_region)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        trust_region.update(stats["kl_mu"], stats["kl_sigma"])
    with torch.no_grad():
        mu, std = actor(obs)
        kl_mu, kl_sigma = decoupled_kl_diag(mu_old, std_old, mu, std)
    target = (weights[..., None] * actions).sum(1)  # (B, d) the weighted mean of the samples
    return mu_old, mu, target, kl_mu.item(), kl_sigma.item()


def test_mstep_moves_mean_toward_weighted_mean_within_trust_region(one_thread):
    eps_mu, eps_sigma = 0.01, 1e-3
    region = TrustRegion(
        eps_mu, eps_sigma, alpha_lr=100.0, alpha_mu_max=10.0, alpha_sigma_max=100.0, alpha_init=10.0
    )
    mu_old, mu, target, kl_mu, kl_sigma = run_mstep(region)
    before = (mu_old - target).norm(dim=-1).mean()
    after = (mu - target).norm(dim=-1).mean()
    assert after < before - 0.05
    cosine = torch.nn.functional.cosine_similarity(mu - mu_old, target - mu_old, dim=-1)
    assert cosine.mean() > 0.8
    # both KLs end near their bounds (MLE alone would overshoot them by far)
    assert 0.5 * eps_mu < kl_mu < 2.0 * eps_mu
    assert 0.3 * eps_sigma < kl_sigma < 2.0 * eps_sigma

    unconstrained = TrustRegion(
        eps_mu, eps_sigma, alpha_lr=1.0, alpha_mu_max=0.0, alpha_sigma_max=0.0
    )
    _, mu_free, _, kl_mu_free, kl_sigma_free = run_mstep(unconstrained)
    assert kl_mu_free > 10 * eps_mu and kl_sigma_free > 3 * eps_sigma
    assert (mu_free - target).norm(dim=-1).mean() < after


def test_mstep_loss_composition_and_gradients():
    actor, obs, mu_old, std_old, actions, weights = make_batch(seed=1)
    region = TrustRegion(0.01, 0.001, 1.0, 1.0, 1.0, alpha_init=0.5)
    mu, std = actor(obs)
    loss, stats = mstep_loss(mu, std, mu_old, std_old, actions, weights, region)
    mle = weighted_mle_loss(
        diag_gaussian_log_prob(actions, mu, std_old),
        diag_gaussian_log_prob(actions, mu_old, std),
        weights,
    )
    kl_mu, kl_sigma = decoupled_kl_diag(mu_old, std_old, mu, std)
    expected = mle + 0.5 * (kl_mu - 0.01) + 0.5 * (kl_sigma - 0.001)
    torch.testing.assert_close(loss, expected)
    assert set(stats) == {"loss", "mle", "kl_mu", "kl_sigma", "alpha_mu", "alpha_sigma"}
    assert not any(v.requires_grad for v in stats.values())
    loss.backward()
    assert all(p.grad is not None for p in actor.parameters())


def test_mstep_loss_chol():
    torch.manual_seed(4)
    B, K, d, obs_dim = 16, 8, 3, 5
    actor = GaussianActor(obs_dim, d, hidden=(16,), cholesky=True)
    obs = torch.randn(B, obs_dim)
    with torch.no_grad():
        mu_old, L_old = actor(obs)
        actions = actor.dist(obs).sample((K,)).transpose(0, 1)  # (B, K, d)
    weights = torch.softmax(torch.randn(B, K), 1)
    region = TrustRegion(0.01, 0.001, 1.0, 1.0, 1.0, alpha_init=1.0)
    mu, L = actor(obs)
    loss, stats = mstep_loss_chol(mu, L, mu_old, L_old, actions, weights, region)
    # at pi = pi_old both KLs are 0 and the loss is the weighted NLL twice
    assert stats["kl_mu"].item() == pytest.approx(0.0, abs=1e-6)
    assert stats["kl_sigma"].item() == pytest.approx(0.0, abs=1e-5)
    nll = -(weights * actor.dist(obs).log_prob(actions.transpose(0, 1)).T).sum(1).mean()
    assert stats["mle"].item() == pytest.approx(2 * nll.item(), rel=1e-5)
    loss.backward()
    assert actor.tril_head.weight.grad is not None


def test_shape_errors():
    actor, obs, mu_old, std_old, actions, weights = make_batch(B=4, K=3)
    region = TrustRegion(0.01, 0.001, 1.0, 1.0, 1.0)
    mu, std = actor(obs)
    with pytest.raises(ValueError, match="weights"):
        mstep_loss(mu, std, mu_old, std_old, actions, weights[:, :2], region)
    with pytest.raises(ValueError, match="actions"):
        mstep_loss(mu, std, mu_old, std_old, actions[..., :1], weights, region)
    with pytest.raises(ValueError, match="L_old"):
        decoupled_kl_chol(
            mu_old, torch.eye(3).expand(4, 3, 3), mu_old, torch.eye(2).expand(4, 2, 2)
        )


# --- TrustRegion -------------------------------------------------------------


def test_trust_region_update_direction_and_clipping():
    region = TrustRegion(
        eps_mu=0.1,
        eps_sigma=0.01,
        alpha_lr=2.0,
        alpha_mu_max=1.0,
        alpha_sigma_max=0.5,
        alpha_init=0.2,
    )
    region.update(0.15, 0.01)  # KL_mu above its bound: alpha_mu grows by lr * 0.05
    assert region.alpha_mu.item() == pytest.approx(0.3)
    assert region.alpha_sigma.item() == pytest.approx(0.2)  # exactly at the bound: unchanged
    region.update(0.05, 0.0)  # below: both shrink
    assert region.alpha_mu.item() == pytest.approx(0.2)
    assert region.alpha_sigma.item() == pytest.approx(0.18)
    region.update(10.0, 10.0)  # clipped at alpha_max
    assert region.alpha_mu.item() == 1.0 and region.alpha_sigma.item() == 0.5
    region.update(0.0, 0.0)
    region.update(-10.0, -10.0)  # clipped at 0
    assert region.alpha_mu.item() == 0.0 and region.alpha_sigma.item() == 0.0


def test_trust_region_tensor_kls_keep_tensors():
    region = TrustRegion(0.1, 0.01, 1.0, 1.0, 1.0)
    kl = torch.tensor(0.6, requires_grad=True) * 1.0
    region.update(kl, kl)
    assert isinstance(region.alpha_mu, torch.Tensor) and region.alpha_mu.shape == ()
    assert not region.alpha_mu.requires_grad
    assert region.alpha_mu.item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="scalars"):
        region.update(torch.ones(2), kl)


def test_trust_region_penalty_treats_alphas_as_constants():
    region = TrustRegion(0.1, 0.01, 1.0, 1.0, 1.0, alpha_init=0.5)
    kl_mu = torch.tensor(0.3, requires_grad=True)
    kl_sigma = torch.tensor(0.02, requires_grad=True)
    penalty = region.penalty(kl_mu, kl_sigma)
    assert penalty.item() == pytest.approx(0.5 * 0.2 + 0.5 * 0.01)
    penalty.backward()
    assert kl_mu.grad.item() == pytest.approx(0.5) and kl_sigma.grad.item() == pytest.approx(0.5)
    assert not region.alpha_mu.requires_grad


def test_trust_region_state_round_trip():
    region = TrustRegion(0.1, 0.01, 0.7, 1.0, 2.0, alpha_init=0.3)
    region.update(torch.tensor(0.4), 0.5)
    state = region.state_dict()
    restored = TrustRegion(0.5, 0.5, 0.1, 5.0, 5.0)
    restored.load_state_dict(state)
    assert torch.equal(restored.alpha_mu, region.alpha_mu)
    assert torch.equal(restored.alpha_sigma, region.alpha_sigma)
    assert (restored.eps_mu, restored.eps_sigma, restored.alpha_lr) == (0.1, 0.01, 0.7)
    assert (restored.alpha_mu_max, restored.alpha_sigma_max) == (1.0, 2.0)
    # the state is a copy: later updates do not leak into it
    region.update(1.0, 1.0)
    assert not torch.equal(state["alpha_mu"], region.alpha_mu)
    restored.update(1.0, 1.0)
    assert torch.equal(restored.alpha_mu, region.alpha_mu)
    with pytest.raises(ValueError, match="alpha_mu"):
        restored.load_state_dict({"alpha_sigma": 1.0})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"eps_mu": 0.0}, "eps_mu"),
        ({"eps_sigma": -1.0}, "eps_sigma"),
        ({"alpha_lr": math.nan}, "alpha_lr"),
        ({"alpha_mu_max": -1.0}, "alpha_mu_max"),
        ({"alpha_init": 2.0}, "alpha_init"),
    ],
)
def test_trust_region_validation(kwargs, match):
    args = {
        "eps_mu": 0.1,
        "eps_sigma": 0.01,
        "alpha_lr": 1.0,
        "alpha_mu_max": 1.0,
        "alpha_sigma_max": 1.0,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        TrustRegion(**args)
