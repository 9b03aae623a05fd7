"""``rllib evaluate CHECKPOINT``: roll out a checkpoint's policy; mean reward, mean cost,
violation rate, optionally a video.

Works for any new-API-stack RLlib checkpoint (CVPO, PPO, SAC): the RLModule is
loaded from the checkpoint without starting Ray
(:mod:`rllib_ext.checkpoints`), and the env is rebuilt with
:func:`cvpo.envs.make_env` from the config stored in the checkpoint.

Security: checkpoints are pickles. Load only checkpoints you trust.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from cvpo.constraints import constraint_names, cost_limits, violation_rate
from rllib_ext.checkpoints import (
    CheckpointError,
    load_checkpoint_config,
    load_module,
    resolve_checkpoint_dir,
)
from rllib_ext.cli.common import CLIError
from rllib_ext.cli.video import check_render_backend, render_frame, write_video
from rllib_ext.progress import _fmt


def add_parser(sub) -> None:
    """``rllib evaluate`` on the subcommands of the main parser."""
    ev = sub.add_parser(
        "evaluate",
        help="roll out a checkpoint; print mean reward, mean cost, violation rate",
        description="Roll out the deterministic policy of a checkpoint and report mean "
        "episode reward, mean episode cost and the rate of episodes over the cost limit.",
    )
    ev.add_argument("checkpoint", help="checkpoint directory written by `rllib train`")
    ev.add_argument("--env", "-e", default=None, help="env id (default: the one trained on)")
    ev.add_argument("--episodes", type=int, default=10, help="episodes to roll out (default 10)")
    ev.add_argument(
        "--steps", type=int, default=None, help="stop after this many env steps in total"
    )
    ev.add_argument("--explore", action="store_true", help="sample actions instead of the mean")
    ev.add_argument(
        "--cost-limit",
        type=float,
        default=None,
        help="limit for the violation rate (default: the trained one)",
    )
    ev.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the first episode's reset; episode i uses seed+i (default 0)",
    )
    ev.add_argument(
        "--render", default=None, help="write a video of the first episode (.mp4 or .gif)"
    )
    ev.add_argument(
        "--out",
        default=None,
        help="also write the results as JSON here, with the per-episode returns and costs",
    )


def _limits_text(res: dict[str, Any]) -> str:
    from cvpo.constraints import format_limits

    limits = res.get("cost_limits")
    return "n/a" if not limits else format_limits(list(limits.values()), list(limits))


def cmd_evaluate(args) -> int:
    try:
        res = evaluate_checkpoint(
            args.checkpoint,
            env_id=args.env,
            episodes=args.episodes,
            max_steps=args.steps,
            explore=args.explore,
            cost_limit=args.cost_limit,
            seed=args.seed,
            render=args.render,
        )
    except RuntimeError as err:  # rendering: no offscreen GL backend, no ffmpeg
        raise CLIError(str(err)) from None
    print(
        f"{res['episodes']} episodes on {res['env']}: mean reward {res['reward_mean']:.3f} "
        f"(std {res['reward_std']:.3f}), mean cost {res['cost_mean']:.3f} "
        f"(limit {_limits_text(res)}), violation rate {_fmt(res['violation_rate'], '.2f')}"
    )
    if res.get("cost_mean_per_key"):
        per_key = res["cost_mean_per_key"]
        print("mean cost per constraint: " + ", ".join(f"{k} {v:.3f}" for k, v in per_key.items()))
    if res.get("video"):
        print(f"video: {res['video']}")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    return 0


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    *,
    env_id: str | None = None,
    episodes: int = 10,
    max_steps: int | None = None,
    explore: bool = False,
    cost_limit: float | None = None,
    seed: int = 0,
    render: str | None = None,
) -> dict[str, Any]:
    """Rolls out the checkpoint's policy; returns means and the violation rate."""
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    import rllib_ext  # noqa: F401  (registers the env ids and algorithms)

    ckpt = resolve_checkpoint_dir(checkpoint)
    algo_cls, config = load_checkpoint_config(ckpt)
    env_id = env_id or config.env
    if not isinstance(env_id, str):
        raise CheckpointError(f"the checkpoint's env {env_id!r} is not an id; pass --env ID")
    env_config = dict(config.env_config or {})
    keys = constraint_names(getattr(config, "cost_keys", None))
    # one limit per constraint; --cost-limit X applies X to each of them
    limit_spec = cost_limit if cost_limit is not None else getattr(config, "cost_limit", None)
    limits = cost_limits(limit_spec, keys) if limit_spec is not None else None
    module = load_module(ckpt)
    act = _policy(module, explore)
    frames = []
    if render:
        ext = Path(render).suffix.lower()
        if ext not in (".mp4", ".gif"):
            raise ValueError(f"--render must end in .mp4 or .gif, got {render!r}")
        check_render_backend(env_id, render)
        env_config["render_mode"] = "rgb_array"
    stats = rollout(
        act,
        env_id,
        env_config,
        keys,
        episodes=episodes,
        seed=seed,
        max_steps=max_steps,
        frames=frames if render else None,
    )
    returns, costs, lengths = stats["returns"], stats["costs"], stats["lengths"]
    per_key = np.asarray(stats["costs_per_key"], dtype=np.float64).reshape(len(returns), len(keys))
    result: dict[str, Any] = {
        "checkpoint": str(ckpt),
        "algorithm": algo_cls.__name__,
        "env": env_id,
        "episodes": len(returns),
        "reward_mean": float(np.mean(returns)),
        "reward_std": float(np.std(returns)),
        "cost_mean": float(np.mean(costs)),
        "cost_std": float(np.std(costs)),
        "cost_median": float(np.median(costs)),
        "cost_max": float(np.max(costs)),
        "episode_length_mean": float(np.mean(lengths)),
        # the episode cost is summed over the constraints; so is this limit (display only)
        "cost_limit": None if limits is None else float(sum(limits)),
        "cost_limits": None if limits is None else dict(zip(keys, limits)),
        # an episode violates when ANY constraint's cost exceeds its own limit
        "violation_rate": None if limits is None else violation_rate(per_key, limits),
    }
    if len(keys) > 1:
        result["cost_mean_per_key"] = dict(zip(keys, per_key.mean(axis=0).tolist()))
    # per episode, in rollout order (episode i reset with seed + i): the spread behind the
    # means (a few episodes that pay hundreds move a 5-episode mean far from the median)
    result["episode_returns"] = [float(r) for r in returns]
    result["episode_costs"] = [float(c) for c in costs]
    if render:
        result["video"] = write_video(frames, render)
    return result


def rollout(
    act,
    env_id: str,
    env_config: dict[str, Any],
    cost_keys=("cost",),
    *,
    episodes: int = 10,
    seed: int = 0,
    max_steps: int | None = None,
    frames: list | None = None,
) -> dict[str, list]:
    """Runs ``act(obs) -> action`` for some episodes; per-episode return, cost (summed over
    ``cost_keys``, and per key), length.

    Actions are clipped to the action bounds, as the EnvRunners do. With
    ``frames`` (a list), the first episode's rendered frames are appended to it.
    """
    from cvpo.envs import make_env

    env = make_env(env_id, **env_config)
    low, high = env.action_space.low, env.action_space.high
    returns, costs, lengths, per_key = [], [], [], []
    steps_total = 0
    try:
        for ep in range(episodes):
            obs, _ = env.reset(seed=seed + ep)
            ret, n, done = 0.0, 0, False
            key_costs = np.zeros(len(cost_keys))
            while not done:
                obs, r, term, trunc, info = env.step(np.clip(act(obs), low, high))
                ret += float(r)
                key_costs += [float(info.get(k, 0.0)) for k in cost_keys]
                n += 1
                steps_total += 1
                done = term or trunc or (max_steps is not None and steps_total >= max_steps)
                if frames is not None and ep == 0:
                    frames.append(render_frame(env))
            returns.append(ret)
            costs.append(float(key_costs.sum()))
            per_key.append(key_costs.tolist())
            lengths.append(n)
            if max_steps is not None and steps_total >= max_steps:
                break
    finally:
        env.close()
    return {"returns": returns, "costs": costs, "lengths": lengths, "costs_per_key": per_key}


def module_policy(module, explore: bool = False):
    """``act(obs) -> action`` from an RLModule (deterministic unless ``explore``)."""
    return _policy(module, explore)


def _policy(module, explore: bool):
    import torch
    from ray.rllib.core.columns import Columns

    dist_cls = (
        module.get_exploration_action_dist_cls()
        if explore
        else module.get_inference_action_dist_cls()
    )

    def act(obs: np.ndarray) -> np.ndarray:
        batch = {Columns.OBS: torch.as_tensor(np.asarray(obs, np.float32)[None])}
        with torch.no_grad():
            out = module.forward_exploration(batch) if explore else module.forward_inference(batch)
            if Columns.ACTIONS in out:
                return out[Columns.ACTIONS][0].cpu().numpy()
            dist = dist_cls.from_logits(out[Columns.ACTION_DIST_INPUTS])
            if not explore:
                dist = dist.to_deterministic()
            return dist.sample()[0].cpu().numpy()

    return act
