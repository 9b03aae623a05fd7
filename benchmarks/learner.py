"""Learner updates/s of CVPO at the reference hyper-parameters, with a time breakdown.

Reference (FSRL's CVPO on this 2-core machine): batch 256, K=16, 128x128
networks, one reward and one cost critic (FSRL's default ``double_critic=False``),
~120 gradient updates/s. This script builds the real RLlib learner
(no EnvRunners), fills a replay buffer with random SafetyPointGoal1-shaped
transitions, and times ``learner_group.update`` calls of
``updates_per_learner_call`` minibatches each. The share of time in critic
update, E-step (critic evaluation / dual solve), M-step and target update is
measured by timing the same math outside RLlib on the same data; the rest of
an update is RLlib overhead (batch conversion, metrics).

The reference's 120 updates/s was measured once on a VM whose speed drifts, so
the script also times ``reference_style.py`` (the same work per update written
straightforwardly in plain PyTorch) in the same process, and reports our
updates/s as a ratio to it, with the machine's current matmul rate.

Prints one JSON document as its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _fake_batch(rng, n, obs_dim, act_dim, m):
    return {
        "obs": rng.normal(size=(n, obs_dim)).astype(np.float32),
        "actions": rng.uniform(-1, 1, size=(n, act_dim)).astype(np.float32),
        "rewards": rng.normal(size=n).astype(np.float32),
        "costs": rng.integers(0, 2, size=(n, m)).astype(np.float32),
        "next_obs": rng.normal(size=(n, obs_dim)).astype(np.float32),
        "discounts": np.full(n, 0.99**3, np.float32),
    }


# (label, function name as cProfile reports it, file fragment)
_PHASES = (
    ("learner_update_total", "update", "core/learner/learner.py"),
    ("loss_total", "compute_loss_for_module", "cvpo_torch_learner.py"),
    ("forward_train", "_forward_train", "default_cvpo_torch_rl_module.py"),
    ("critic_evaluation", "q_values", "default_cvpo_torch_rl_module.py"),
    ("dual_solve", "solve_dual", "cvpo/estep.py"),
    ("mstep_loss", "mstep_loss", "cvpo/mstep.py"),
    ("backward", "compute_gradients", "common/torch_learner.py"),
    ("optimizer_and_target_update", "apply_gradients", "common/torch_learner.py"),
    ("target_update", "polyak_update", "cvpo/networks.py"),
    ("metrics_logging", "record_metrics", "common/torch_learner.py"),
)


def profile_shares(one_call, updates_per_call: int, calls: int) -> dict:
    """Shares of learner time per phase, from cProfile's cumulative times.

    ``critic_evaluation`` covers the E-step's and the TD target's batched critic
    passes (the E-step's own share is ``estep_critic_eval_ms``); the rest of
    the critic update is in ``loss_total`` and ``backward``. ``forward_train`` is the
    module's training forward (the actor at s, the critics at the replayed pairs).
    ``rllib_overhead`` is the part of ``Learner.update`` outside the training
    forward, loss, backward and optimizer steps (batch conversion, minibatch
    iteration, metrics reduction). Profiling
    inflates Python-heavy phases a little; the shares are indicative.
    """
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        one_call()
    prof.disable()
    stats = pstats.Stats(prof).stats
    cum = {}
    for (file, _line, func), (_cc, _nc, _tt, ct, _callers) in stats.items():
        for label, name, frag in _PHASES:
            if func == name and frag in file:
                cum[label] = cum.get(label, 0.0) + ct
    total = cum.get("learner_update_total", float("nan"))
    inner = sum(
        cum.get(k, 0.0)
        for k in ("loss_total", "forward_train", "backward", "optimizer_and_target_update")
    )
    out = {k: round(v / total, 3) for k, v in cum.items() if k != "learner_update_total"}
    out["rllib_overhead"] = round((total - inner) / total, 3)
    out["profiled_ms_per_update"] = round(1000 * total / (calls * updates_per_call), 3)
    return out


def build_learner(args, learner_class=None):
    """(config, learner) for CVPO on SafetyPointGoal1-shaped spaces, no EnvRunners.

    ``args`` needs batch, K, obs_dim, act_dim, updates_per_call and device;
    hidden (128), solver ("newton") and reward_critics (1, the reference's
    single reward critic: FSRL's ``double_critic=False``) are optional.
    """
    import gymnasium as gym

    from rllib_ext.cvpo import CVPOConfig

    hidden = getattr(args, "hidden", 128)
    obs_space = gym.spaces.Box(-np.inf, np.inf, (args.obs_dim,), np.float32)
    act_space = gym.spaces.Box(-1.0, 1.0, (args.act_dim,), np.float32)
    config = (
        CVPOConfig()
        .environment(observation_space=obs_space, action_space=act_space)
        .training(
            train_batch_size_per_learner=args.batch,
            num_sampled_actions=args.K,
            actor_hiddens=[hidden, hidden],
            critic_hiddens=[hidden, hidden],
            updates_per_learner_call=args.updates_per_call,
            estep_solver=getattr(args, "solver", "newton"),
            num_reward_critics=getattr(args, "reward_critics", 1),
            num_cost_critics=1,  # the reference (FSRL) has one cost critic
            cost_critic_reduction="mean",
            episode_horizon=1000,
        )
        .learners(num_gpus_per_learner=1 if args.device == "cuda" else 0)
    )
    if learner_class is not None:
        config.learners(learner_class=learner_class)
    config.seed = 0
    spaces = {"__env__": (obs_space, act_space), "default_policy": (obs_space, act_space)}
    return config, config.build_learner(env=None, spaces=spaces)


def _gemm_gflops() -> float:
    """This core's speed right now: a 4096x128 @ 128x128 float32 matmul (the E-step's
    hidden layer for one critic), median of 50. The VM's rate drifts (37-67
    GFLOPS measured on the same day), so absolute updates/s are only comparable
    together with it."""
    x, w = torch.randn(4096, 128), torch.randn(128, 128)
    times = []
    for _ in range(60):
        t0 = time.perf_counter()
        torch.mm(x, w)
        times.append(time.perf_counter() - t0)
    return 2 * 4096 * 128 * 128 / sorted(times[10:])[25] / 1e9


def update_gflop(
    batch: int,
    K: int,
    obs_dim: int,
    act_dim: int,
    hidden: int = 128,
    critics: int = 2,
    target_actions: int = 1,
) -> float:
    """Floating-point work of one CVPO update in GFLOP (a multiply-add counts 2), from
    the layer sizes: the arithmetic that no implementation of the same math avoids.

    - E-step: the target critics on B states x K actions (observation part of the
      first layer once per state, hidden layer and output per pair);
    - TD target: the target critics on B x ``target_actions`` pairs at s';
    - critic loss: the critics on the B replayed pairs, forward and backward (2x);
    - actor: pi_old at s and s', the online actor at s forward and backward (2x).
    Elementwise work (activations, the dual, Adam) is left out: it is small."""

    def mlp(rows: int, n_in: int, n_out: int) -> float:  # 2 hidden layers of `hidden`
        return 2.0 * rows * (n_in * hidden + hidden * hidden + hidden * n_out)

    pairs = batch * K
    estep = critics * (
        2.0 * batch * obs_dim * hidden  # observation part, once per state
        + 2.0 * pairs * act_dim * hidden  # action part, per pair
        + 2.0 * pairs * hidden * hidden  # hidden layer
        + 2.0 * pairs * hidden  # output
    )
    target = critics * mlp(batch * target_actions, obs_dim + act_dim, 1)
    critic_train = 3 * critics * mlp(batch, obs_dim + act_dim, 1)  # forward + backward
    actor_out = 2 * act_dim  # mean and scale
    actor = 2 * mlp(batch, obs_dim, actor_out) + 3 * mlp(batch, obs_dim, actor_out)
    return (estep + target + critic_train + actor) / 1e9


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--K", type=int, default=16)
    p.add_argument("--obs-dim", type=int, default=60)  # SafetyPointGoal1
    p.add_argument("--act-dim", type=int, default=2)
    p.add_argument("--updates-per-call", type=int, default=8)
    p.add_argument("--calls", type=int, default=30)
    p.add_argument("--solver", default="newton")
    p.add_argument(
        "--reward-critics",
        type=int,
        default=1,
        help="reward critics (1: the reference, FSRL's double_critic=False; "
        "CVPOConfig's default is 2)",
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from ray.rllib.core import DEFAULT_MODULE_ID
    from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch

    config, learner = build_learner(args)
    rng = np.random.default_rng(0)
    B, U = args.batch, args.updates_per_call

    def one_call():
        data = _fake_batch(rng, U * B, args.obs_dim, args.act_dim, 1)
        batch = MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(data)}, env_steps=U * B)
        return learner.update(
            batch=batch,
            minibatch_size=B,
            num_epochs=1,
            timesteps={"num_env_steps_sampled_lifetime": 10_000},
        )

    for _ in range(3):  # warm-up
        one_call()
    if args.device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.calls):
        res = one_call()
    if args.device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    updates = args.calls * U
    ups = updates / elapsed
    pol = res["default_policy"]

    def peek(k):
        v = pol.get(k)
        v = getattr(v, "peek", lambda: v)()
        return float(v)

    per_update = elapsed / updates
    # the same work written straightforwardly, timed right after ours in this process
    from reference_style import updates_per_s as reference_style_updates_per_s

    ref_style = (
        reference_style_updates_per_s(
            seconds=3.0 if args.calls <= 10 else 6.0,
            obs_dim=args.obs_dim,
            act_dim=args.act_dim,
            batch=B,
            K=args.K,
        )
        if args.device == "cpu"
        else float("nan")
    )
    eval_s, solve_s = peek("estep_critic_eval_time_s"), peek("estep_solve_time_s")
    shares = profile_shares(one_call, updates_per_call=U, calls=max(3, args.calls // 3))
    gflops = _gemm_gflops()
    work = update_gflop(B, args.K, args.obs_dim, args.act_dim, critics=args.reward_critics + 1)
    out = {
        "benchmark": "learner",
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "batch": B,
        "K": args.K,
        "updates_per_learner_call": U,
        "estep_solver": args.solver,
        "num_reward_critics": args.reward_critics,
        "updates_per_s": round(ups, 1),
        "reference_updates_per_s": 120.0,
        "ratio_vs_reference": round(ups / 120.0, 2),
        "ms_per_update": round(1000 * per_update, 3),
        "reference_style_updates_per_s": round(ref_style, 1),
        "ratio_vs_reference_style_same_process": round(ups / ref_style, 2),
        "matmul_gflops_4096x128x128": round(gflops, 1),
        # the update's matmul work at this core's current matmul rate: what an update
        # costs with zero overhead (docs/performance.md)
        "update_gflop": round(work, 4),
        "arithmetic_floor_ms": round(1000 * work / gflops, 3),
        "estep_critic_eval_ms": round(1000 * eval_s, 3),
        "estep_dual_solve_ms": round(1000 * solve_s, 3),
        "estep_share": round((eval_s + solve_s) / per_update, 3),
        "time_shares_profiled": shares,
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
