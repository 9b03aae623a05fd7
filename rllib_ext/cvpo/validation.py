"""Config checks of CVPOConfig (and, shared, of SACLagConfig): every bad value gets
a message naming the key and range.

:func:`validate_off_policy_config` checks the keys every
:class:`rllib_ext.common.off_policy.ConstrainedOffPolicyConfig` has and probes
the env; :func:`validate_cvpo_config` adds CVPO's own keys
(:mod:`rllib_ext.sac_lag.validation` adds SACLag's). Also: the GPU fallback
(``num_gpus_per_learner`` > 0 where no GPU can be had becomes 0, with a
one-line notice). Checkpoint checks live in :mod:`rllib_ext.checkpoints`.
"""

from __future__ import annotations

import logging
import math
import numbers
from typing import Any

import gymnasium as gym

from cvpo.constraints import CostLimitCountError, cost_limits
from cvpo.defaults import (
    ACTOR_COVARIANCES,
    COST_REDUCTIONS,
    COST_TARGET_ACTIONS,
    ESTEP_SOLVERS,
    REWARD_REDUCTIONS,
    THRESHOLD_TIMINGS,
)

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config value of one of this project's algorithms outside its allowed range."""


class CVPOConfigError(ConfigError):
    """A CVPOConfig value outside its allowed range."""


def _config_name(cfg) -> str:
    return "CVPOConfig" if cfg is None else type(cfg).__name__


def _algo_name(cfg) -> str:
    return _config_name(cfg).removesuffix("Config")


def _error(cfg) -> type:
    return getattr(type(cfg), "config_error", CVPOConfigError)


def _bad(key: str, value: Any, allowed: str, cfg=None) -> ConfigError:
    """The error for ``key``; its class is the config's ``config_error`` (CVPOConfigError)."""
    error = _error(cfg) if cfg is not None else CVPOConfigError
    return error(f"{_config_name(cfg)}: `{key}`={value!r} is invalid; allowed: {allowed}.")


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _positive(cfg, key: str, *, allow_zero: bool = False, integer: bool = False, upper=None):
    v = getattr(cfg, key)
    ok = _is_real(v) and math.isfinite(v) and (v >= 0 if allow_zero else v > 0)
    if integer:
        ok = ok and float(v).is_integer()
    if upper is not None:
        ok = ok and v <= upper
    if not ok:
        kind = "an integer" if integer else "a finite number"
        rng = ">= 0" if allow_zero else "> 0"
        if upper is not None:
            rng += f" and <= {upper}"
        raise _bad(key, v, f"{kind} {rng}", cfg)


def _choice(cfg, key: str, choices) -> None:
    v = getattr(cfg, key)
    if v not in choices:
        raise _bad(key, v, " or ".join(repr(c) for c in choices), cfg)


def _check_bool(cfg, key: str) -> None:
    if not isinstance(getattr(cfg, key), bool):
        raise _bad(key, getattr(cfg, key), "True or False", cfg)


def check_constraint_keys(cfg) -> None:
    """cost_keys and cost_limit (one limit per constraint, >= 0, inf turns one off)."""
    if cfg.cost_keys is not None:
        if isinstance(cfg.cost_keys, str) or not all(isinstance(k, str) for k in cfg.cost_keys):
            raise _bad("cost_keys", cfg.cost_keys, "a list of info key strings, e.g. ['cost']", cfg)
        if len(cfg.cost_keys) == 0:
            raise _bad("cost_keys", cfg.cost_keys, "a non-empty list (or None for ['cost'])", cfg)
    names = cfg.constraint_names
    try:
        cost_limits(cfg.cost_limit, names)  # the one normalisation of the limits
    except TypeError:
        raise _bad(
            "cost_limit", cfg.cost_limit, "a float >= 0 (math.inf disables) or a list of them", cfg
        ) from None
    except CostLimitCountError:
        raise _bad(
            "cost_limit",
            cfg.cost_limit,
            f"a float or a list of {len(names)} floats (one per constraint {names})",
            cfg,
        ) from None
    except ValueError:
        raise _bad(
            "cost_limit", cfg.cost_limit, "floats >= 0 (inf turns a constraint off)", cfg
        ) from None


def validate_cvpo_config(cfg) -> None:
    """Checks CVPO's keys, then the shared ones, then probes the env (horizon, spaces,
    cost signal)."""
    check_constraint_keys(cfg)
    _check_num_learners(cfg)
    _positive(cfg, "estep_kl")
    k = cfg.num_sampled_actions
    if not (isinstance(k, numbers.Integral) and not isinstance(k, bool) and k >= 2):
        raise _bad("num_sampled_actions", k, "an integer >= 2")
    _choice(cfg, "estep_solver", ESTEP_SOLVERS)
    _choice(cfg, "actor_covariance", ACTOR_COVARIANCES)
    _positive(cfg, "estep_lambda_max")
    _choice(cfg, "step_threshold_timing", THRESHOLD_TIMINGS)
    _positive(cfg, "threshold_timing_window", integer=True)
    _positive(cfg, "threshold_feedback_rate", allow_zero=True)
    kr = cfg.threshold_kappa_range
    if not (
        isinstance(kr, (list, tuple))
        and len(kr) == 2
        and all(_is_real(x) for x in kr)
        and 0 < kr[0] <= 1 <= kr[1]
    ):
        raise _bad("threshold_kappa_range", kr, "(min, max) with 0 < min <= 1 <= max")
    for key in (
        "mstep_kl_mu",
        "mstep_kl_sigma",
        "mstep_alpha_lr",
        "alpha_mu_max",
        "alpha_sigma_max",
    ):
        _positive(cfg, key)
    _positive(cfg, "num_target_actions", integer=True)
    _check_bool(cfg, "mstep_clip_targets")
    validate_off_policy_config(cfg)


def validate_off_policy_config(cfg) -> None:
    """The keys of every ConstrainedOffPolicyConfig (after the algorithm's own), the GPU
    fallback, and the env probe."""
    _check_bool(cfg, "keep_best_feasible_checkpoint")
    for key in ("actor_lr", "critic_lr"):
        _positive(cfg, key)
    _positive(cfg, "tau", upper=1.0)
    _positive(cfg, "n_step", integer=True)
    g = cfg.gamma
    if not (_is_real(g) and 0.0 < g < 1.0):
        raise _bad("gamma", g, "a float strictly between 0 and 1", cfg)
    for key in ("num_reward_critics", "num_cost_critics"):
        _positive(cfg, key, integer=True)
    _choice(cfg, "reward_critic_reduction", REWARD_REDUCTIONS)
    _choice(cfg, "cost_critic_reduction", COST_REDUCTIONS)
    _choice(cfg, "cost_target_reduction", COST_REDUCTIONS)
    _choice(cfg, "cost_target_actions", COST_TARGET_ACTIONS)
    _positive(cfg, "train_batch_size_per_learner", integer=True)
    _positive(cfg, "training_intensity")
    _positive(cfg, "updates_per_learner_call", integer=True)
    _positive(cfg, "replay_capacity", integer=True)
    if cfg.replay_capacity < cfg.train_batch_size_per_learner:
        raise _bad(
            "replay_capacity",
            cfg.replay_capacity,
            f"at least train_batch_size_per_learner={cfg.train_batch_size_per_learner} "
            "(a smaller buffer never fills a minibatch, so learning would never start)",
            cfg,
        )
    _positive(cfg, "num_steps_sampled_before_learning_starts", allow_zero=True, integer=True)
    if not (_is_real(cfg.std_min) and _is_real(cfg.std_max) and 0 < cfg.std_min < cfg.std_max):
        raise _bad("std_min/std_max", (cfg.std_min, cfg.std_max), "0 < std_min < std_max", cfg)
    for key in ("actor_hiddens", "critic_hiddens"):
        h = getattr(cfg, key)
        if not (
            isinstance(h, (list, tuple))
            and len(h) > 0
            and all(isinstance(x, numbers.Integral) and x > 0 for x in h)
        ):
            raise _bad(key, h, "a non-empty list of positive layer sizes, e.g. [128, 128]", cfg)
    if cfg.episode_horizon is not None:
        _positive(cfg, "episode_horizon", integer=True)
    _check_bool(cfg, "async_sampling")
    if cfg.learner_torch_threads is not None:
        _positive(cfg, "learner_torch_threads", integer=True)
    _gpu_fallback(cfg)
    _probe_env(cfg)


CVPO_LEARNER_STATE_WHY = (
    "CVPO's learner keeps the E-step duals (eta, lambda) and the M-step trust-region "
    "multipliers (alpha_mu, alpha_sigma) as its own state, which data-parallel learners "
    "would update apart and let diverge."
)


def _check_num_learners(cfg, why: str = CVPO_LEARNER_STATE_WHY) -> None:
    """More than one learner is refused (one line: what to use, and why)."""
    n = getattr(cfg, "num_learners", 0)
    if _is_real(n) and n > 1:
        raise _error(cfg)(
            f"{_config_name(cfg)}: `num_learners`={n!r} is not supported; use num_learners=0 "
            "(learner in the driver) or 1 (one remote learner, e.g. on a GPU): " + why
        )


# -- GPU fallback ---------------------------------------------------------------------------
def _gpu_reachable() -> tuple[bool, str]:
    """(whether a learner GPU can be had, where we looked).

    A GPU counts when torch sees one in this process, when the Ray cluster this
    process is connected to has one, or when its autoscaler may add a node with
    one (e.g. cluster/aws.yaml's gpu_learner type with min_workers: 0).
    """
    try:
        import torch

        if torch.cuda.is_available():
            return True, "torch sees a GPU"
    except ImportError:  # RLlib's framework check reports a missing torch
        return True, "torch is not importable"
    import ray

    if not ray.is_initialized():
        return False, "torch.cuda.is_available() is False on this machine"
    try:
        if ray.cluster_resources().get("GPU", 0) > 0:
            return True, "the Ray cluster has a GPU"
        from ray._private.state import state

        max_resources = state.get_max_resources_from_cluster_config() or {}
        if max_resources.get("GPU", 0) > 0:
            return True, "the Ray autoscaler can add a GPU node"
    except Exception:  # noqa: BLE001 (unknown: keep the user's request, Ray schedules it)
        return True, "the cluster's resources are unknown"
    return False, "neither this machine nor the connected Ray cluster has a GPU"


def _gpu_fallback(cfg) -> None:
    """``num_gpus_per_learner`` > 0 without any GPU -> 0, with a one-line notice.

    RLlib itself does not check this: a local learner dies in
    ``get_device`` with an AssertionError ("local_gpu_idx 0 is not a valid GPU
    ID"), and under Tune the trial waits forever for a GPU bundle.
    """
    n = getattr(cfg, "num_gpus_per_learner", 0)
    if not (_is_real(n) and n > 0):
        return
    ok, why = _gpu_reachable()
    if ok:
        return
    logger.warning(
        "%s: num_gpus_per_learner=%s but no GPU is available (%s); "
        "falling back to num_gpus_per_learner=0: the learner runs on CPU.",
        _algo_name(cfg),
        n,
        why,
    )
    cfg.num_gpus_per_learner = 0


def _probe_env(cfg) -> None:
    """Builds the env once: spaces, horizon, and a clear error for a bad env."""
    from rllib_ext.envs import probe_env

    if cfg.env is None:
        raise _error(cfg)(
            f"{_config_name(cfg)}: no env set; call .environment('SafetyPointGoal1-v0') (or any "
            "id cvpo.envs.make_env accepts)."
        )
    from cvpo import envs as cvpo_envs

    env_config = dict(cfg.env_config or {})
    try:
        info = probe_env(cfg.env, env_config, cfg.constraint_names)
    except (
        cvpo_envs.UnknownEnvError,
        cvpo_envs.UnsupportedEnvError,
        cvpo_envs.NoCostSignalError,
        cvpo_envs.NonFiniteSignalError,
        ImportError,
    ):
        raise  # already one clear message naming the env
    except Exception as err:  # noqa: BLE001 (the env's own constructor/reset/step failed)
        first = str(err).splitlines()[0] if str(err) else ""
        raise _error(cfg)(
            f"{_config_name(cfg)}: env {cfg.env!r} could not be built and stepped with "
            f"env_config={env_config!r}: {type(err).__name__}: {first}. Check the env_config "
            "keys (they go to cvpo.envs.make_env and the env's constructor)."
        ) from None
    if not isinstance(info.action_space, gym.spaces.Box):
        raise _error(cfg)(
            f"{_algo_name(cfg)} needs a continuous (Box) action space; env {cfg.env!r} has "
            f"{info.action_space}. Use a continuous-control task."
        )
    if cfg.observation_space is None:
        cfg.observation_space = info.observation_space
    if cfg.action_space is None:
        cfg.action_space = info.action_space
    if cfg.episode_horizon is None:
        if info.horizon is None:
            if not getattr(type(cfg), "needs_episode_horizon", True):
                return  # SACLag: nothing depends on T
            raise _error(cfg)(
                f"env {cfg.env!r} has no time limit, so the per-step cost threshold is "
                f"undefined; set {_config_name(cfg)}.training(episode_horizon=T)."
            )
        cfg.episode_horizon = int(info.horizon)
