"""CVPOConfig checks: every bad value gets a message naming the key and range."""

from __future__ import annotations

import math
import numbers
from typing import Any

import gymnasium as gym

from rllib_ext.cvpo.cvpo import COST_REDUCTIONS, ESTEP_SOLVERS, REWARD_REDUCTIONS


class CVPOConfigError(ValueError):
    """A CVPOConfig value outside its allowed range."""


def _bad(key: str, value: Any, allowed: str) -> CVPOConfigError:
    return CVPOConfigError(f"CVPOConfig: `{key}`={value!r} is invalid; allowed: {allowed}.")


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _positive(cfg, key: str, *, allow_zero: bool = False, integer: bool = False, upper=None):
    v = getattr(cfg, key)
    ok = _is_real(v) and not math.isnan(v) and (v >= 0 if allow_zero else v > 0)
    if integer:
        ok = ok and float(v).is_integer()
    if upper is not None:
        ok = ok and v <= upper
    if not ok:
        kind = "an integer" if integer else "a number"
        rng = ">= 0" if allow_zero else "> 0"
        if upper is not None:
            rng += f" and <= {upper}"
        raise _bad(key, v, f"{kind} {rng}")


def _choice(cfg, key: str, choices) -> None:
    v = getattr(cfg, key)
    if v not in choices:
        raise _bad(key, v, " or ".join(repr(c) for c in choices))


def validate_cvpo_config(cfg) -> None:
    """Checks CVPO's keys, then probes the env (horizon, spaces, cost signal)."""
    if cfg.cost_keys is not None:
        if isinstance(cfg.cost_keys, str) or not all(isinstance(k, str) for k in cfg.cost_keys):
            raise _bad("cost_keys", cfg.cost_keys, "a list of info key strings, e.g. ['cost']")
        if len(cfg.cost_keys) == 0:
            raise _bad("cost_keys", cfg.cost_keys, "a non-empty list (or None for ['cost'])")
    m = len(cfg.constraint_names)
    limits = cfg.cost_limit
    if _is_real(limits):
        limits = [limits]
    elif isinstance(limits, (list, tuple)):
        if len(limits) != m:
            raise _bad(
                "cost_limit",
                cfg.cost_limit,
                f"a float or a list of {m} floats (one per constraint {cfg.constraint_names})",
            )
    else:
        raise _bad("cost_limit", limits, "a float >= 0 (math.inf disables) or a list of them")
    for c in limits:
        if not _is_real(c) or math.isnan(c) or c < 0:
            raise _bad("cost_limit", cfg.cost_limit, "floats >= 0 (inf turns a constraint off)")
    _positive(cfg, "kl_bound")
    k = cfg.num_sampled_actions
    if not (isinstance(k, numbers.Integral) and not isinstance(k, bool) and k >= 2):
        raise _bad("num_sampled_actions", k, "an integer >= 2")
    _choice(cfg, "estep_solver", ESTEP_SOLVERS)
    _positive(cfg, "estep_lambda_max")
    for key in ("mstep_kl_mu", "mstep_kl_sigma", "alpha_lr", "alpha_mu_max", "alpha_sigma_max"):
        _positive(cfg, key)
    for key in ("actor_lr", "critic_lr"):
        _positive(cfg, key)
    _positive(cfg, "tau", upper=1.0)
    _positive(cfg, "n_step", integer=True)
    g = cfg.gamma
    if not (_is_real(g) and 0.0 < g < 1.0):
        raise _bad("gamma", g, "a float strictly between 0 and 1")
    for key in ("num_reward_critics", "num_cost_critics", "num_target_actions"):
        _positive(cfg, key, integer=True)
    _choice(cfg, "reward_critic_reduction", REWARD_REDUCTIONS)
    _choice(cfg, "cost_critic_reduction", COST_REDUCTIONS)
    _positive(cfg, "train_batch_size_per_learner", integer=True)
    _positive(cfg, "training_intensity")
    _positive(cfg, "updates_per_learner_call", integer=True)
    _positive(cfg, "replay_capacity", integer=True)
    _positive(cfg, "num_steps_sampled_before_learning_starts", allow_zero=True, integer=True)
    if not (_is_real(cfg.std_min) and _is_real(cfg.std_max) and 0 < cfg.std_min < cfg.std_max):
        raise _bad("std_min/std_max", (cfg.std_min, cfg.std_max), "0 < std_min < std_max")
    for key in ("actor_hiddens", "critic_hiddens"):
        h = getattr(cfg, key)
        if not (
            isinstance(h, (list, tuple))
            and len(h) > 0
            and all(isinstance(x, numbers.Integral) and x > 0 for x in h)
        ):
            raise _bad(key, h, "a non-empty list of positive layer sizes, e.g. [128, 128]")
    if cfg.episode_horizon is not None:
        _positive(cfg, "episode_horizon", integer=True)
    _probe_env(cfg)


def _probe_env(cfg) -> None:
    """Builds the env once: spaces, horizon, and a clear error for a bad env."""
    from rllib_ext.envs import probe_env

    if cfg.env is None:
        raise CVPOConfigError(
            "CVPOConfig: no env set; call .environment('SafetyPointGoal1-v0') (or any id "
            "cvpo.envs.make_env accepts)."
        )
    info = probe_env(cfg.env, dict(cfg.env_config or {}), cfg.constraint_names)
    if not isinstance(info.action_space, gym.spaces.Box):
        raise CVPOConfigError(
            f"CVPO needs a continuous (Box) action space; env {cfg.env!r} has "
            f"{info.action_space}. Use a continuous-control task."
        )
    if cfg.observation_space is None:
        cfg.observation_space = info.observation_space
    if cfg.action_space is None:
        cfg.action_space = info.action_space
    if cfg.episode_horizon is None:
        if info.horizon is None:
            raise CVPOConfigError(
                f"env {cfg.env!r} has no time limit, so the per-step cost threshold is "
                "undefined; set CVPOConfig.training(episode_horizon=T)."
            )
        cfg.episode_horizon = int(info.horizon)
