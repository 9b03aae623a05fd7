"""Why does a trained policy's episodic cost differ from the limit? Measured, per cause.

Loads a checkpoint (policy AND critics), rolls out stochastic (training-like) and
deterministic (evaluation) episodes, and prints JSON with:

- ``cost_stochastic`` / ``cost_deterministic``: episodic cost of the sampling
  policy and of its mean; their gap is exploration noise;
- ``critic_bias``: the cost critic (with the config's reduction) at the visited
  (s_t, a_t) of the stochastic episodes, minus the Monte-Carlo discounted cost
  to go ``G_t = sum_k gamma^k c_{t+k}`` (bootstrapped with the critic at the
  time limit); ``critic_ratio`` = mean critic / mean G (< 1: underestimation);
- ``actor_std_median`` / ``actor_std_p10`` / ``actor_std_p90``: the actor's standard
  deviation (per action dimension, in action units) on the states the stochastic
  episodes visited, with ``action_half_range``; ``mean_outside_bounds`` is the share
  of those states whose mean action lies outside the bounds (the env clips it);
- ``state_mean_G`` vs ``step_threshold``: what the E-step constrains is the mean
  over states of Q_c; this is its true value on the policy's own states;
  ``episode_cost_at_threshold`` = cost_stochastic * threshold / state_mean_G is
  the episodic cost a policy with the same cost timing would have when the
  E-step constraint holds exactly with a perfect critic (the threshold formula's
  error: it equals the limit only for cost spread evenly over full episodes).

  .venv/bin/python benchmarks/constraint_diagnosis.py CHECKPOINT [--episodes 20]
  .venv/bin/python benchmarks/constraint_diagnosis.py --tiny-ablation \
      --write docs/constraint_tiny.md

``--tiny-ablation`` trains the learning test's configuration on the tiny hazard
task (limit 5, 30 x 1000 steps, seed 0) once per threshold / cost-critic
setting, diagnoses each final policy and writes the table.

``--critic-tracking LOG [LOG ...]`` reads per-iteration logs of Safety-Gymnasium
runs (``progress.jsonl`` of ``make reproduce``; copies in docs/measurements) and
compares, per window of iterations, the learner's mean cost critic over replayed
pairs (``qc_mean``) with the cost the training episodes paid in that window,
as a discounted cost to go: ``rate / (1 - gamma)`` (the mean discounted cost to
go of cost spread evenly, which the measured-timing factor of 1.03-1.05 on
PointGoal1 supports), and with the E-step's step threshold:

  .venv/bin/python benchmarks/constraint_diagnosis.py --critic-tracking \
      docs/measurements/pointgoal1_*.jsonl --write docs/constraint_critic_tracking.md

``--windows LOG [LOG ...]`` prints, per log, the training episodes' mean cost and
return and the evaluations' mean cost and return per window of env steps
(``--window-steps``, default 60k, up to ``--upto``, default 240k) and the training
cost rate at ``--upto``: how diagnostic runs are compared with a recorded run over
the same steps. A LOG is a ``progress.jsonl`` or a ``make reproduce`` record
(``tuned_examples/cvpo/results/<task>/<ALGO>-seed<k>.json``, whose curve holds the
same per-iteration means; its cost rate is known only at the end of the run), or
``COMMIT:PATH`` for a record as committed then; ``--write FILE`` writes the table,
its first line the command (docs/pointgoal1_clip_targets_windows.md: six PointGoal1
records, with and without ``mstep_clip_targets``):

  .venv/bin/python benchmarks/constraint_diagnosis.py --windows \
      81fdd2c:tuned_examples/cvpo/results/SafetyPointGoal1-v0/CVPO-seed0.json \
      86041f2:tuned_examples/cvpo/results/SafetyPointGoal1-v0/CVPO-seed0.json \
      --window-steps 100000 --upto 500000 --write /tmp/windows.md

See docs/constraint.md for the measurements and what was changed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

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


def _actor_spread(module, obs: np.ndarray) -> dict:
    """The actor's std (per dimension, action units) and where its mean lies, on obs."""
    with torch.no_grad():
        mean, scale = module.actor(torch.as_tensor(obs, dtype=torch.float32))
    if scale.dim() == 3:  # a Cholesky factor L: std = sqrt(diag(L L^T))
        scale = (scale**2).sum(-1).sqrt()
    std, mean = scale.numpy().ravel(), mean.numpy()
    low, high = module.action_space.low, module.action_space.high
    return {
        "actor_std_median": float(np.median(std)),
        "actor_std_p10": float(np.quantile(std, 0.1)),
        "actor_std_p90": float(np.quantile(std, 0.9)),
        "action_half_range": float(np.mean((high - low) / 2)),
        "mean_outside_bounds": float(np.mean((mean < low) | (mean > high))),
    }


def _episodes(module, env_id, env_config, keys, episodes, seed, explore):
    from cvpo.envs import make_env
    from rllib_ext.cli.evaluate import module_policy

    act = module_policy(module, explore=explore)
    env = make_env(env_id, **env_config)
    low, high = env.action_space.low, env.action_space.high
    out = []
    try:
        for ep in range(episodes):
            obs, _ = env.reset(seed=seed + ep)
            torch.manual_seed(seed + ep)
            seen_obs, seen_act, costs, rewards = [], [], [], []
            done = False
            while not done:
                a = np.clip(act(obs), low, high)
                nxt, r, term, trunc, info = env.step(a)
                seen_obs.append(obs)
                seen_act.append(a)
                costs.append(sum(float(info.get(k, 0.0)) for k in keys))
                rewards.append(float(r))
                obs, done = nxt, term or trunc
            out.append(
                {
                    "obs": np.array(seen_obs),
                    "act": np.array(seen_act),
                    "cost": np.array(costs),
                    "ret": float(np.sum(rewards)),
                    "last_obs": obs,
                    "terminated": bool(term),
                }
            )
    finally:
        env.close()
    return out


def diagnose(checkpoint: str, episodes: int = 20, seed: int = 10_000) -> dict:
    from rllib_ext.checkpoints import load_checkpoint_config, load_module, resolve_checkpoint_dir
    from rllib_ext.cli.evaluate import module_policy

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
            a_last = np.clip(
                sample(e["last_obs"]), module.action_space.low, module.action_space.high
            )
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
    actor = _actor_spread(module, np.concatenate([e["obs"] for e in stoch]))
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
        **actor,
        "state_mean_G": state_mean_g,
        "episode_cost_at_threshold": cost_stoch * eps / state_mean_g if state_mean_g > 0 else None,
    }


#: the settings of the ablation: (name, CVPOConfig.training overrides)
_ONE = dict(num_cost_critics=1, cost_critic_reduction="mean", cost_target_reduction="mean")
_TWO_MAX = dict(num_cost_critics=2, cost_critic_reduction="max", cost_target_reduction="max")
TINY_SETTINGS = [
    (
        "paper: even-spread threshold, 1 cost critic",
        dict(step_threshold_timing="even", threshold_feedback_rate=0.0, **_ONE),
    ),
    (
        "even threshold + episodic-cost feedback (rate 0.05), 1 cost critic",
        dict(step_threshold_timing="even", threshold_feedback_rate=0.05, **_ONE),
    ),
    (
        "measured-timing threshold, 1 cost critic",
        dict(step_threshold_timing="measured", threshold_feedback_rate=0.0, **_ONE),
    ),
    (
        "measured timing + feedback (rate 0.03), 1 cost critic (the defaults)",
        dict(step_threshold_timing="measured", threshold_feedback_rate=0.03, **_ONE),
    ),
    (
        "measured timing, max of 2 cost critics in the E-step and the TD target "
        "(the learning test)",
        dict(step_threshold_timing="measured", threshold_feedback_rate=0.0, **_TWO_MAX),
    ),
]


def train_tiny(out: str, iterations: int = 30, **training) -> str:
    """The learning test's configuration (tests/test_learning.py), trained and saved."""
    import rllib_ext  # noqa: F401
    from rllib_ext.cvpo import CVPOConfig

    cfg = (
        CVPOConfig()
        .environment("cvpo/PointHazard-v0")
        .env_runners(num_env_runners=0, num_envs_per_env_runner=4)
        .training(
            cost_limit=5.0,
            gamma=0.95,
            num_sampled_actions=16,
            num_target_actions=4,
            actor_hiddens=[64, 64],
            critic_hiddens=[64, 64],
            train_batch_size_per_learner=128,
            num_steps_sampled_before_learning_starts=1000,
            training_intensity=0.25,
            updates_per_learner_call=16,
            learner_torch_threads=1,
            **training,
        )
        .debugging(seed=0)
    )
    algo = cfg.build_algo()
    try:
        for _ in range(iterations):
            algo.train()
        return algo.save_to_path(out)
    finally:
        algo.stop()


def tiny_ablation(write: str | None, episodes: int) -> list:
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, training) in enumerate(TINY_SETTINGS):
            ckpt = train_tiny(f"{tmp}/run{i}", **training)
            d = diagnose(ckpt, episodes)
            d.update(setting=name, training=training)
            print(json.dumps(d), flush=True)
            rows.append(d)
    if write:
        lines = [
            "<!-- written by `benchmarks/constraint_diagnosis.py --tiny-ablation`; do not edit -->",
            f"Tiny hazard task, limit 5, 30 x 1000 env steps, seed 0; "
            f"{episodes} episodes per policy "
            "(seeds 10000+). Costs are episodic means (standard error).",
            "",
            "| setting | cost, deterministic | cost, stochastic | return, deterministic "
            "| critic / Monte-Carlo "
            "| state-mean G / threshold | episodic cost at the threshold |",
            "|---|---|---|---|---|---|---|",
        ]
        for d in rows:
            lines.append(
                f"| {d['setting']} | {d['cost_deterministic']:.2f} "
                f"({d['cost_deterministic_se']:.2f}) | "
                f"{d['cost_stochastic']:.2f} ({d['cost_stochastic_se']:.2f}) | "
                f"{d['return_deterministic']:.2f} | "
                f"{d['critic_ratio']:.2f} | {d['state_mean_G'] / d['step_threshold']:.2f} | "
                f"{d['episode_cost_at_threshold']:.2f} |"
            )
        Path(write).write_text("\n".join(lines) + "\n")
    return rows


def _first(row: dict, *keys: str):
    for k in keys:
        if k in row:
            return row[k]
    return None


def _cumulative_cost(row: dict, steps):
    """The summed training cost so far (older logs hold the cost rate only)."""
    total = _first(row, "train/cumulative_cost", "cumulative_cost")
    rate = _first(row, "train/cost_rate", "cost_rate")
    if total is None and rate is not None and steps is not None:
        total = rate * steps
    return total


def critic_tracking(rows: list[dict], gamma: float, window: int = 50) -> list[dict]:
    """Per window of ``window`` iterations: the cost critic's mean over replayed pairs
    (at the window's last iteration), the training cost per env step paid in the
    window, that rate as a discounted cost to go ``rate / (1 - gamma)``, their ratio
    (< 1: the critic underestimates what the policy pays) and the step threshold."""
    out = []
    for end in range(window - 1, len(rows), window):
        first, last = rows[end - window + 1], rows[end]
        steps0 = _first(first, "train/num_env_steps_sampled_lifetime", "env_steps")
        steps1 = _first(last, "train/num_env_steps_sampled_lifetime", "env_steps")
        cost0, cost1 = _cumulative_cost(first, steps0), _cumulative_cost(last, steps1)
        qc = _first(last, "learner/qc_mean_cost", "qc_mean")
        if None in (steps0, steps1, cost0, cost1, qc) or steps1 <= steps0:
            continue
        rate = (cost1 - cost0) / (steps1 - steps0)
        to_go = rate / (1.0 - gamma)
        threshold = _first(last, "learner/step_threshold_cost", "step_threshold")
        out.append(
            {
                "iteration": int(_first(last, "iteration") or end + 1),
                "env_steps": int(steps1),
                "qc_mean": float(qc),
                "cost_rate": rate,
                "cost_to_go": to_go,
                "critic_over_paid": float(qc) / to_go if to_go > 0 else float("nan"),
                "step_threshold": None if threshold is None else float(threshold),
                "estep_infeasible": _first(
                    last, "learner/estep_status_infeasible", "estep_infeasible"
                ),
            }
        )
    return out


def critic_tracking_report(paths: list[str], gamma: float, write: str | None) -> list:
    import os

    lines = [
        "<!-- written by `benchmarks/constraint_diagnosis.py --critic-tracking`; do not edit -->",
        f"Per window of 50 iterations (50k env steps): the cost critic's mean over "
        f"replayed pairs at the window's end, the cost the training episodes paid in "
        f"the window as a discounted cost to go (rate / (1 - gamma), gamma = {gamma}), "
        f"their ratio, the E-step's step threshold and the infeasible E-steps (of 200) "
        f"in the window's last iteration.",
        "",
        "| run | env steps | critic mean Q_c | paid: rate / (1 - gamma) | critic / paid "
        "| step threshold | infeasible E-steps |",
        "|---|---|---|---|---|---|---|",
    ]
    result = []
    for path in paths:
        rows = read_log(path)
        name = os.path.basename(path).removesuffix(".jsonl")
        for r in critic_tracking(rows, gamma):
            r["run"] = name
            result.append(r)
            thr = "n/a" if r["step_threshold"] is None else f"{r['step_threshold']:.2f}"
            inf = "n/a" if r["estep_infeasible"] is None else f"{r['estep_infeasible']:.0f}"
            lines.append(
                f"| {name} | {r['env_steps']:,} | {r['qc_mean']:.2f} | {r['cost_to_go']:.2f} "
                f"| {r['critic_over_paid']:.2f} | {thr} | {inf} |"
            )
    for r in result:
        print(json.dumps(r))
    if write:
        Path(write).write_text("\n".join(lines) + "\n")
    return result


def rows_from_record(record: dict) -> list[dict]:
    """A ``make reproduce`` record (``tuned_examples/cvpo/results/<task>/<ALGO>-seed<k>.json``)
    as per-iteration rows in the progress log's keys: its curve holds each iteration's
    training means and, at the evaluation iterations, the evaluation's. The training cost
    rate is known only at the end of the run (the record's)."""
    rows = []
    for point in record["curve"]:
        row = {
            "train/num_env_steps_sampled_lifetime": point["env_steps"],
            "train/episode_cost_mean": point.get("train_cost"),
            "train/episode_return_mean": point.get("train_return"),
        }
        if point.get("eval_cost") is not None:
            row["eval/episode_cost_mean"] = point["eval_cost"]
            row["eval/episode_return_mean"] = point.get("eval_return")
            row["eval/num_env_steps_sampled_lifetime"] = point["env_steps"]
        rows.append(row)
    if rows and record.get("training_cost_rate") is not None:
        rows[-1]["train/cost_rate"] = record["training_cost_rate"]
    return rows


def read_log(path: str) -> list[dict]:
    """Per-iteration rows of a progress log (``.jsonl``) or of a reproduce record (``.json``).
    ``COMMIT:PATH`` reads the file as committed at COMMIT (``git show``), so a record that
    a later run replaced in RESULTS.md can still be compared with its successor."""
    if not Path(path).exists() and ":" in path:
        import subprocess

        shown = subprocess.run(["git", "show", path], capture_output=True, text=True)
        if shown.returncode != 0:
            raise SystemExit(f"--windows: cannot read {path}: {shown.stderr.strip()}")
        text = shown.stdout
    else:
        text = Path(path).read_text()
    if path.endswith(".json"):
        return rows_from_record(json.loads(text))
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def windows_report(paths: list[str], window: int, upto: int, write: str | None) -> list[dict]:
    """``training_windows`` of each log, printed as JSON lines and, with ``write``, as a
    markdown table (one row per log and window)."""

    def fmt(v, spec=".2f"):
        return "n/a" if v is None else format(v, spec)

    lines = [
        "<!-- written by `.venv/bin/python benchmarks/constraint_diagnosis.py --windows "
        + " ".join(paths)
        + f" --window-steps {window} --upto {upto} --write {write}`; do not edit -->",
        f"Per window of {window:,} env steps up to {upto:,}: the training (sampling) "
        "episodes' mean cost and return, averaged over the window's iterations, and the "
        "deterministic evaluations' mean cost and return, averaged over the window's "
        "evaluations; the training cost rate (summed training cost / env steps) at the "
        "end. Limit 25 per 1000-step episode, i.e. a cost rate of 0.025.",
        "",
        "| log | env steps | training cost | training return | evaluation cost "
        "| evaluation return | evaluations |",
        "|---|---|---|---|---|---|---|",
    ]
    out = []
    for path in paths:
        got = {"log": path, **training_windows(read_log(path), window, upto)}
        print(json.dumps(got))
        out.append(got)
        for w in got["windows"]:
            lines.append(
                f"| {path} | {w['env_steps']:,} | {fmt(w['train_cost'])} "
                f"| {fmt(w['train_return'])} | {fmt(w['eval_cost'])} "
                f"| {fmt(w['eval_return'])} | {w['evaluations']} |"
            )
    lines += ["", "| log | training cost rate |", "|---|---|"]
    lines += [f"| {g['log']} | {fmt(g['cost_rate'], '.4f')} |" for g in out]
    if write:
        Path(write).write_text("\n".join(lines) + "\n")
    return out


def _evaluations(rows: list[dict]) -> list[dict]:
    """One row per evaluation: the progress log repeats the last evaluation's metrics
    on the iterations between evaluations, so a row counts only where the evaluation's
    lifetime step counter reached a new maximum (between evaluations the logged value
    can also fall back to one evaluation's steps, which is not a new evaluation)."""
    out, top = [], None
    for r in rows:
        marker = r.get("eval/num_env_steps_sampled_lifetime")
        if r.get("eval/episode_cost_mean") is None or marker is None:
            continue
        if top is not None and marker <= top:
            continue
        top = marker
        out.append(r)
    return out


def training_windows(rows: list[dict], window: int, upto: int) -> dict:
    """Per window of ``window`` env steps up to ``upto``: the mean over iterations of the
    training episodes' mean cost and return (iterations without a finished episode
    skipped), the mean over the window's evaluations of their cost and return (the
    deterministic policy; ``None`` without an evaluation), and the training cost rate
    at ``upto``."""
    steps_key = "train/num_env_steps_sampled_lifetime"

    def mean(rows_in, key):
        v = [r[key] for r in rows_in if r.get(key) is not None and r[key] == r[key]]
        return float(np.mean(v)) if v else None

    evaluations = _evaluations(rows)
    out = []
    for lo in range(0, upto, window):
        w = [r for r in rows if lo < (r.get(steps_key) or 0) <= lo + window]
        ev = [r for r in evaluations if lo < (r.get(steps_key) or 0) <= lo + window]
        out.append(
            {
                "env_steps": lo + window,
                "train_cost": mean(w, "train/episode_cost_mean"),
                "train_return": mean(w, "train/episode_return_mean"),
                "eval_cost": mean(ev, "eval/episode_cost_mean"),
                "eval_return": mean(ev, "eval/episode_return_mean"),
                "evaluations": len(ev),
            }
        )
    rates = [
        r["train/cost_rate"]
        for r in rows
        if (r.get(steps_key) or 0) <= upto and r.get("train/cost_rate") is not None
    ]
    return {"windows": out, "cost_rate": rates[-1] if rates else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", nargs="?")
    p.add_argument("--episodes", type=int, default=40)
    p.add_argument("--seed", type=int, default=10_000)
    p.add_argument(
        "--tiny-ablation", action="store_true", help="train and diagnose the tiny task's settings"
    )
    p.add_argument(
        "--write",
        default=None,
        help="with --tiny-ablation / --critic-tracking / --windows: write the markdown table here",
    )
    p.add_argument(
        "--critic-tracking",
        nargs="+",
        metavar="LOG",
        help="per-iteration logs (progress.jsonl) to compare the cost critic with the cost paid",
    )
    p.add_argument("--gamma", type=float, default=0.99, help="with --critic-tracking")
    p.add_argument(
        "--windows",
        nargs="+",
        metavar="LOG",
        help="per-iteration logs (progress.jsonl) or reproduce records (.json): training and "
        "evaluation cost and return per window of env steps (JSON)",
    )
    p.add_argument("--window-steps", type=int, default=60_000, help="with --windows")
    p.add_argument("--upto", type=int, default=240_000, help="with --windows")
    args = p.parse_args(argv)
    if args.windows:
        windows_report(args.windows, args.window_steps, args.upto, args.write)
        return 0
    if args.critic_tracking:
        critic_tracking_report(args.critic_tracking, args.gamma, args.write)
        return 0
    if args.tiny_ablation:
        tiny_ablation(args.write, args.episodes)
        return 0
    if not args.checkpoint:
        p.error("pass a CHECKPOINT or --tiny-ablation")
    print(json.dumps(diagnose(args.checkpoint, args.episodes, args.seed), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
