"""Actor, critic ensemble and polyak averaging."""

import copy
import math

import pytest
import torch
from torch import nn

from cvpo.networks import CriticEnsemble, GaussianActor, mlp, polyak_update

OBS, ACT = 6, 3


def member_forward(ensemble, member, obs, act):
    """Member `member` of the ensemble as a plain MLP on concatenated inputs."""
    h = torch.cat([obs, act], dim=-1)
    last = len(ensemble.weights) - 1
    for i, (weight, bias) in enumerate(zip(ensemble.weights, ensemble.biases)):
        h = h @ weight[member] + bias[member]
        if i < last:
            h = torch.relu(h)
    return h.squeeze(-1)


def test_mlp_shapes():
    net = mlp(4, 2, hidden=(8, 8))
    assert [type(m) for m in net] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert net(torch.randn(5, 4)).shape == (5, 2)
    assert len(mlp(4, 2, hidden=())) == 1
    with pytest.raises(ValueError, match="hidden"):
        mlp(4, 2, hidden=(0,))


@pytest.mark.parametrize(
    "act_dim, hidden",
    [(ACT, (16, 16)), (1, (16, 16)), (10, (16, 16)), (ACT, (16,)), (ACT, (8, 8, 8))],
)
def test_ensemble_batched_pass_equals_member_loop(act_dim, hidden):
    """Both first-layer paths (broadcast multiply-adds for act_dim <= 8, bmm above)
    and the per-member matrix-vector output layer equal a plain MLP per member."""
    torch.manual_seed(0)
    ensemble = CriticEnsemble(OBS, act_dim, num_members=5, hidden=hidden)
    obs, act = torch.randn(7, OBS), torch.randn(7, act_dim)
    values = ensemble(obs, act)
    assert values.shape == (5, 7)
    expected = torch.stack([member_forward(ensemble, m, obs, act) for m in range(5)])
    torch.testing.assert_close(values, expected)
    # gradients agree too
    values.sum().backward()
    batched = [p.grad.clone() for p in ensemble.parameters()]
    ensemble.zero_grad()
    expected = torch.stack([member_forward(ensemble, m, obs, act) for m in range(5)])
    expected.sum().backward()
    for a, p in zip(batched, ensemble.parameters()):
        torch.testing.assert_close(a, p.grad)


@pytest.mark.parametrize("act_dim", [ACT, 10])
def test_ensemble_broadcasts_states_over_sampled_actions(act_dim):
    torch.manual_seed(1)
    ensemble = CriticEnsemble(OBS, act_dim, num_members=3, hidden=(16,))
    B, K = 4, 9
    obs, act = torch.randn(B, OBS), torch.randn(B, K, act_dim)
    values = ensemble(obs, act)
    assert values.shape == (3, B, K)
    repeated = ensemble(obs[:, None].expand(B, K, OBS), act)  # obs materialised per action
    torch.testing.assert_close(values, repeated)
    for m in range(3):
        torch.testing.assert_close(
            values[m], member_forward(ensemble, m, obs[:, None].expand(B, K, OBS), act)
        )
    # K = 1 (the TD target's single action per next state) is the pair layout
    torch.testing.assert_close(ensemble(obs, act[:, :1]), ensemble(obs, act[:, 0]).unsqueeze(-1))
    # arbitrary leading dims and a single pair
    assert ensemble(torch.randn(2, 5, OBS), torch.randn(2, 5, act_dim)).shape == (3, 2, 5)
    assert ensemble(torch.randn(OBS), torch.randn(act_dim)).shape == (3,)
    with pytest.raises(ValueError, match="leading dims"):
        ensemble(torch.randn(4, OBS), torch.randn(5, act_dim))
    with pytest.raises(ValueError, match="obs"):
        ensemble(torch.randn(4, OBS + 1), torch.randn(4, act_dim))


def test_ensemble_members_are_independent():
    torch.manual_seed(2)
    ensemble = CriticEnsemble(OBS, ACT, num_members=4, hidden=(32, 32))
    values = ensemble(torch.randn(50, OBS), torch.randn(50, ACT))  # (4, 50)
    for a in range(4):
        for b in range(a + 1, 4):
            assert not torch.allclose(values[a], values[b], atol=1e-3)
            corr = torch.corrcoef(
                torch.stack([ensemble.weights[0][a].flatten(), ensemble.weights[0][b].flatten()])
            )[0, 1]
            assert abs(corr) < 0.2  # independent draws
    # a gradient step on one member leaves the others unchanged
    before = ensemble(torch.ones(1, OBS), torch.ones(1, ACT)).detach()
    optimizer = torch.optim.SGD(ensemble.parameters(), lr=0.1)
    ensemble(torch.randn(8, OBS), torch.randn(8, ACT))[1].sum().backward()
    optimizer.step()
    after = ensemble(torch.ones(1, OBS), torch.ones(1, ACT)).detach()
    assert torch.equal(after[[0, 2, 3]], before[[0, 2, 3]])
    assert not torch.equal(after[1], before[1])


def test_ensemble_initialisation_matches_nn_linear():
    torch.manual_seed(3)
    ensemble = CriticEnsemble(OBS, ACT, num_members=64, hidden=(64, 64))
    for weight, bias in zip(ensemble.weights, ensemble.biases):
        bound = 1.0 / math.sqrt(weight.shape[1])
        assert weight.abs().max() <= bound and bias.abs().max() <= bound
        # U(-b, b) has standard deviation b / sqrt(3)
        assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
        assert bias.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    reference = nn.Linear(OBS + ACT, 64)
    assert reference.weight.abs().max() <= 1.0 / math.sqrt(OBS + ACT)


def test_ensemble_is_a_normal_module():
    ensemble = CriticEnsemble(OBS, ACT, num_members=2, hidden=(8,))
    state = ensemble.state_dict()
    assert state["weights.0"].shape == (2, OBS + ACT, 8)
    assert state["biases.1"].shape == (2, 1)
    clone = CriticEnsemble(OBS, ACT, num_members=2, hidden=(8,))
    clone.load_state_dict(state)
    obs, act = torch.randn(3, OBS), torch.randn(3, ACT)
    torch.testing.assert_close(clone(obs, act), ensemble(obs, act))
    double = clone.to(torch.float64)
    assert double(obs.double(), act.double()).dtype == torch.float64


def test_polyak_update_is_exact():
    torch.manual_seed(4)
    source = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    target = copy.deepcopy(source)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))
    source.train()(torch.randn(16, 4))  # changes the running stats and num_batches_tracked
    old = {k: v.clone() for k, v in target.state_dict().items()}
    polyak_update(target, source, tau=0.25)
    for name, value in target.state_dict().items():
        src = source.state_dict()[name]
        if value.is_floating_point():
            expected = (0.75 * old[name].double() + 0.25 * src.double()).float()
            torch.testing.assert_close(value, expected, atol=1e-7, rtol=1e-6)
        else:
            assert torch.equal(value, src)
    polyak_update(target, source, tau=1.0)
    for name, value in target.state_dict().items():
        assert torch.equal(value, source.state_dict()[name])
    frozen = {k: v.clone() for k, v in target.state_dict().items()}
    with torch.no_grad():
        source[0].weight.add_(1.0)
    polyak_update(target, source, tau=0.0)
    assert all(torch.equal(v, frozen[k]) for k, v in target.state_dict().items())


def test_polyak_update_errors():
    with pytest.raises(ValueError, match="tau"):
        polyak_update(nn.Linear(2, 2), nn.Linear(2, 2), tau=1.5)
    with pytest.raises(ValueError, match="architecture"):
        polyak_update(nn.Linear(2, 2), nn.Linear(2, 3), tau=0.1)


def test_polyak_update_on_ensemble_does_not_track_gradients():
    source = CriticEnsemble(OBS, ACT, 2, hidden=(8,))
    target = CriticEnsemble(OBS, ACT, 2, hidden=(8,))
    polyak_update(target, source, 0.5)
    assert all(p.grad_fn is None for p in target.parameters())


@pytest.mark.parametrize("cholesky", [False, True])
def test_actor_scale_bounds(cholesky):
    torch.manual_seed(5)
    actor = GaussianActor(OBS, ACT, hidden=(16,), std_min=0.05, std_max=0.8, cholesky=cholesky)
    obs = torch.randn(256, OBS) * torch.logspace(-2, 4, 256)[:, None]  # down to saturation
    mean, scale = actor(obs)
    assert mean.shape == (256, ACT)
    diag = torch.diagonal(scale, dim1=-2, dim2=-1) if cholesky else scale
    assert diag.shape == (256, ACT)
    assert diag.min() >= 0.05 and diag.max() <= 0.8
    assert diag.min() < 0.06 and diag.max() > 0.75  # the bounds are reached, not just respected
    # near the midpoint at initialisation for ordinary inputs
    _, scale0 = actor(torch.randn(64, OBS))
    diag0 = torch.diagonal(scale0, dim1=-2, dim2=-1) if cholesky else scale0
    assert 0.2 < diag0.mean() < 0.65


def test_actor_cholesky_factor_is_lower_triangular_with_positive_diagonal():
    torch.manual_seed(6)
    actor = GaussianActor(OBS, ACT, hidden=(16, 16), cholesky=True)
    obs = torch.randn(2, 5, OBS)
    mean, L = actor(obs)
    assert mean.shape == (2, 5, ACT) and L.shape == (2, 5, ACT, ACT)
    assert torch.equal(L, L.tril())
    assert (torch.diagonal(L, dim1=-2, dim2=-1) > 0).all()
    assert (L.tril(-1).abs() > 0).any()  # a full covariance, not a diagonal one
    dist = actor.dist(obs)
    assert isinstance(dist, torch.distributions.MultivariateNormal)
    sample = dist.sample()
    assert sample.shape == (2, 5, ACT)
    torch.testing.assert_close(dist.covariance_matrix, L @ L.transpose(-2, -1))
    L.sum().backward()
    assert actor.tril_head.weight.grad is not None


def test_actor_diagonal_distribution_and_deterministic():
    torch.manual_seed(7)
    actor = GaussianActor(OBS, ACT, hidden=(16,))
    obs = torch.randn(10, OBS)
    mean, std = actor(obs)
    dist = actor.dist(obs)
    assert isinstance(dist, torch.distributions.Independent)
    assert dist.sample((4,)).shape == (4, 10, ACT)
    action = torch.randn(10, ACT)
    expected = torch.distributions.Normal(mean, std).log_prob(action).sum(-1)
    torch.testing.assert_close(dist.log_prob(action), expected)
    torch.testing.assert_close(actor.deterministic(obs), mean)


def test_actor_validation():
    with pytest.raises(ValueError, match="std_min"):
        GaussianActor(OBS, ACT, std_min=0.0)
    with pytest.raises(ValueError, match="std_min"):
        GaussianActor(OBS, ACT, std_min=1.0, std_max=0.5)
    with pytest.raises(ValueError, match="act_dim"):
        GaussianActor(OBS, 0)
    with pytest.raises(ValueError, match="obs"):
        GaussianActor(OBS, ACT)(torch.randn(3, OBS + 1))
