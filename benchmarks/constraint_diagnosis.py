"""Why does a trained policy's episodic cost differ from the limit? Measured, per cause.

Loads a checkpoint (policy AND critics), rolls out stochastic (training-like) and
deterministic (evaluation) episodes, and prints JSON with:

- ``cost_stochastic`` / ``cost_deterministic``: episodic cost of the sampling
  policy and of its mean; their gap is exploration noise;
- ``critic_bias``: the cost critic (with the config's reduction) at the visited
  (s_t, a_t) of the stochastic episodes, minus the Monte-Carlo discounted cost
  to go ``G_t = sum_k gamma^k c_{t+k}`` (bootstrapped with the critic at the
  time limit); ``critic_ratio`` = mean critic / mean G (< 1: underestimation);
- ``state_mean_G`` vs ``step_threshold``: what the E-step constrains is the mean
  over states of Q_c; this is its true value on the policy's own states;
  ``episode_cost_at_threshold`` = cost_stochastic * threshold / state_mean_G is
  the episodic cost a policy with the same cost timing would have when the
  E-step constraint holds exactly with a perfect critic (the threshold formula's
  error: it equals the limit only for cost spread evenly over full episodes).

  .venv/bin/python benchmarks/constraint_diagnosis.py CHECKPOINT [--episodes 20]

See docs/constraint.md for the measurements and what was changed.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch


def _critic_costs(module, cfg, obs: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """Q_c(s, a) per constraint with the config's ensemble reduction: (m, N)."""
    low = torch.as_tensor(module.action_space.low, dtype=torch.float32)
    high = torch.as_tensor(module.action_space.high, dtype=torch.float32)
    with torch.no_grad():
        o = torch.as_tensor(obs, dtype=torch.float32).reshape(len(obs), -1)
        a = torch.clamp(torch.as_tensor(actions, dtype=torch.float32), low, high)
        q_all = module.critics(o, a)  # (M, N)
        E, m, Ec = module.num_reward_critics, module.num_constraints, module.num_cost_critics
        qc = q_all[E:].reshape(m, Ec, -1)
        qc = qc.max(dim=1).values if cfg.cost_critic_reduction == "max" else qc.mean(dim=1)
    return qc.numpy()


def _episodes(module, env_id, env_config, keys, episodes, seed, explore):
    from cvpo.envs import make_env
    from rllib_ext.evaluate import module_policy

    act = module_policy(module, explore=explore)
    env = make_env(env_id, **env_config)
    low, high = env.action_space.low, env.action_space.high
    out = []
    try:
        for ep in range(episodes):
            obs, _ = env.reset(seed=seed + ep)
            torch.manual_seed(seed + ep)
            O, A, C, R = [], [], [], []
            done = False
            while not done:
                a = np.clip(act(obs), low, high)
                nxt, r, term, trunc, info = env.step(a)
                O.append(obs)
                A.append(a)
                C.append(sum(float(info.get(k, 0.0)) for k in keys))
                R.append(float(r))
                obs, done = nxt, term or trunc
            out.append({"obs": np.array(O), "act": np.array(A), "cost": np.array(C),
                        "ret": float(np.sum(R)), "last_obs": obs, "terminated": bool(term)})
    finally:
        env.close()
    return out


def diagnose(checkpoint: str, episodes: int = 20, seed: int = 10_000) -> dict:
    from rllib_ext.evaluate import load_checkpoint_config, load_module, module_policy, resolve_checkpoint_dir

    ckpt = resolve_checkpoint_dir(checkpoint)
    _, cfg = load_checkpoint_config(ckpt)
    module = load_module(ckpt)
    keys = list(cfg.cost_keys or ["cost"])
    env_config = dict(cfg.env_config or {})
    gamma = float(cfg.gamma)
    cfg.validate()  # fills episode_horizon from the env
    eps = float(np.sum(cfg.step_thresholds()))
    limit = float(np.sum(cfg.cost_limits))

    stoch = _episodes(module, cfg.env, env_config, keys, episodes, seed, explore=True)
    det = _episodes(module, cfg.env, env_config, keys, episodes, seed, explore=False)
    sample = module_policy(module, explore=True)

    q_hat, g_true, state_means = [], [], []
    for e in stoch:
        c = e["cost"]
        tail = 0.0
        if not e["terminated"]:  # bootstrap at the time limit with the critic
            a_last = np.clip(sample(e["last_obs"]), module.action_space.low, module.action_space.high)
            tail = float(_critic_costs(module, cfg, e["last_obs"][None], a_last[None]).sum(0)[0])
        G = np.empty(len(c))
        acc = tail
        for t in range(len(c) - 1, -1, -1):
            acc = c[t] + gamma * acc
            G[t] = acc
        qh = _critic_costs(module, cfg, e["obs"], e["act"]).sum(0)
        q_hat.append(qh)
        g_true.append(G)
        state_means.append(G.mean())
    q_hat, g_true = np.concatenate(q_hat), np.concatenate(g_true)
    cost_stoch = float(np.mean([e["cost"].sum() for e in stoch]))
    cost_det = float(np.mean([e["cost"].sum() for e in det]))
    state_mean_g = float(np.mean(state_means))
    return {
        "checkpoint": str(ckpt),
        "env": cfg.env,
        "episodes": episodes,
        "cost_limit": limit,
        "step_threshold": eps,
        "gamma": gamma,
        "return_stochastic": float(np.mean([e["ret"] for e in stoch])),
        "return_deterministic": float(np.mean([e["ret"] for e in det])),
        "cost_stochastic": cost_stoch,
        "cost_stochastic_se": float(np.std([e["cost"].sum() for e in stoch]) / np.sqrt(episodes)),
        "cost_deterministic": cost_det,
        "cost_deterministic_se": float(np.std([e["cost"].sum() for e in det]) / np.sqrt(episodes)),
        "critic_mean": float(q_hat.mean()),
        "mc_mean": float(g_true.mean()),
        "critic_bias": float((q_hat - g_true).mean()),
        "critic_ratio": float(q_hat.mean() / g_true.mean()) if g_true.mean() > 0 else None,
        "state_mean_G": state_mean_g,
        "episode_cost_at_threshold": cost_stoch * eps / state_mean_g if state_mean_g > 0 else None,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--seed", type=int, default=10_000)
    args = p.parse_args(argv)
    print(json.dumps(diagnose(args.checkpoint, args.episodes, args.seed), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
