"""A same-process stand-in for the reference's update, to turn times into ratios.

The reference numbers of the performance issue (FSRL's CVPO: ~120 updates/s on
this machine) were measured once, on a VM whose speed drifts: a plain
4096x128x128 matmul on one core ran at 37-67 GFLOPS on different hours of the
same day. ``learner.py`` therefore also times this straightforward update in the
same process, right after ours, and reports the ratio.

It does the reference's work per gradient update the way a direct PyTorch
implementation does it (written for this benchmark from the algorithm, not
taken from FSRL): one reward and one cost critic as separate ``nn.Sequential``
MLPs on concatenated (obs, action); TD targets from the target critics and one
action of the old policy; both critics regressed with one Adam step; the E-step
evaluates both critics on the B*K (state, sampled action) pairs with the state
repeated K times, takes one Adam step on the dual (eta, lambda) and forms the
softmax weights; the M-step fits the actor by weighted maximum likelihood with
the decoupled KL terms and Lagrange multipliers; polyak averaging of critics
and old actor. Same batch 256, K=16, 128x128 networks.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn


def _mlp(n_in: int, n_out: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(n_in, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, n_out),
    )


class _Actor(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hidden: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(obs_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.mu = nn.Linear(hidden, act_dim)
        self.sigma = nn.Linear(hidden, act_dim)

    def forward(self, obs):
        h = self.body(obs)
        return self.mu(h), nn.functional.softplus(self.sigma(h)) + 1e-3


class ReferenceStyleUpdate:
    """One call of :meth:`update` = one gradient update of the whole algorithm."""

    def __init__(self, obs_dim=60, act_dim=2, hidden=128, batch=256, K=16, seed=0):
        torch.manual_seed(seed)
        self.B, self.K, self.obs_dim, self.act_dim = batch, K, obs_dim, act_dim
        self.critics = nn.ModuleList(_mlp(obs_dim + act_dim, 1, hidden) for _ in range(2))
        self.critics_old = nn.ModuleList(_mlp(obs_dim + act_dim, 1, hidden) for _ in range(2))
        self.critics_old.load_state_dict(self.critics.state_dict())
        self.actor = _Actor(obs_dim, act_dim, hidden)
        self.actor_old = _Actor(obs_dim, act_dim, hidden)
        self.actor_old.load_state_dict(self.actor.state_dict())
        self.critic_optim = torch.optim.Adam(self.critics.parameters(), lr=1e-3)
        self.actor_optim = torch.optim.Adam(self.actor.parameters(), lr=5e-4)
        self.dual = torch.tensor([1.0, 0.0], requires_grad=True)
        self.dual_optim = torch.optim.Adam([self.dual], lr=0.02)
        self.mstep_dual = torch.zeros(2, requires_grad=True)
        self.mstep_optim = torch.optim.Adam([self.mstep_dual], lr=0.1)
        self.threshold, self.kl, self.gamma = 0.25, 0.1, 0.99**3

    def _q(self, critics, obs, act):
        x = torch.cat([obs, act], dim=-1)
        return [c(x).squeeze(-1) for c in critics]

    def update(self, batch) -> None:
        obs, act, rew, cost, next_obs = batch
        B, K = self.B, self.K
        with torch.no_grad():
            mu, std = self.actor_old(next_obs)
            a_next = mu + std * torch.randn_like(mu)
            q_next = self._q(self.critics_old, next_obs, a_next)
            targets = [rew + self.gamma * q_next[0], cost + self.gamma * q_next[1]]
        q = self._q(self.critics, obs, act)
        critic_loss = sum(((qi - ti) ** 2).mean() for qi, ti in zip(q, targets))
        self.critic_optim.zero_grad()
        critic_loss.backward()
        self.critic_optim.step()

        with torch.no_grad():  # E-step
            mu_old, std_old = self.actor_old(obs)
            sampled = mu_old + std_old * torch.randn(K, B, self.act_dim)  # (K, B, d)
            rep = obs.unsqueeze(0).expand(K, -1, -1)
            qr, qc = self._q(self.critics, rep.reshape(K * B, -1), sampled.reshape(K * B, -1))
            qr, qc = qr.reshape(K, B), qc.reshape(K, B)
        eta, lam = self.dual[0], self.dual[1]
        dual_loss = (
            eta * self.kl
            + lam * self.threshold
            + eta * torch.mean(torch.logsumexp((qr - lam * qc) / eta, dim=0) - math.log(K))
        )
        self.dual_optim.zero_grad()
        dual_loss.backward()
        self.dual_optim.step()
        with torch.no_grad():
            self.dual.clamp_(min=1e-6, max=20.0)
            weights = torch.softmax((qr - self.dual[1] * qc) / self.dual[0], dim=0)

        mu, std = self.actor(obs)  # M-step
        d1 = torch.distributions.Normal(mu, std_old)
        d2 = torch.distributions.Normal(mu_old, std)
        loglik = d1.log_prob(sampled).sum(-1) + d2.log_prob(sampled).sum(-1)  # (K, B)
        mle = -(weights * loglik).mean()
        kl_mu = (0.5 * (mu - mu_old) ** 2 / std_old**2).sum(-1).mean()
        kl_std = (0.5 * (torch.log(std**2 / std_old**2) + std_old**2 / std**2 - 1)).sum(-1).mean()
        m_loss = (
            self.mstep_dual[0] * (0.01 - kl_mu).detach()
            + self.mstep_dual[1] * (5e-4 - kl_std).detach()
        )
        self.mstep_optim.zero_grad()
        m_loss.backward()
        self.mstep_optim.step()
        alpha = self.mstep_dual.detach().clamp(0.0, 0.5)
        actor_loss = mle + alpha[0] * kl_mu + alpha[1] * kl_std
        self.actor_optim.zero_grad()
        actor_loss.backward()
        self.actor_optim.step()

        with torch.no_grad():  # polyak
            for old, new in ((self.critics_old, self.critics), (self.actor_old, self.actor)):
                for po, pn in zip(old.parameters(), new.parameters()):
                    po.mul_(0.95).add_(pn, alpha=0.05)


def updates_per_s(seconds: float = 5.0, **kwargs) -> float:
    """Updates/s of :class:`ReferenceStyleUpdate` on random data (after a warm-up)."""
    ref = ReferenceStyleUpdate(**kwargs)
    gen = torch.Generator().manual_seed(1)
    B, o, d = ref.B, ref.obs_dim, ref.act_dim

    def batch():
        return (
            torch.randn(B, o, generator=gen),
            torch.rand(B, d, generator=gen) * 2 - 1,
            torch.randn(B, generator=gen),
            torch.randint(0, 2, (B,), generator=gen).float(),
            torch.randn(B, o, generator=gen),
        )

    data = [batch() for _ in range(16)]
    for i in range(5):
        ref.update(data[i])
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        ref.update(data[n % len(data)])
        n += 1
    return n / (time.perf_counter() - t0)


if __name__ == "__main__":
    import json
    import sys

    if len(sys.argv) > 1:
        torch.set_num_threads(int(sys.argv[1]))
    print(
        json.dumps(
            {
                "reference_style_updates_per_s": round(updates_per_s(), 1),
                "torch_threads": torch.get_num_threads(),
            }
        )
    )
