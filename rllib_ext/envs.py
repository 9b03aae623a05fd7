"""Env registration for RLlib and Tune, and a one-off env probe.

Every id that :func:`cvpo.envs.make_env` accepts is registered with
``ray.tune.registry.register_env`` under its own name, so
``config.environment("SafetyPointGoal1-v0")`` builds our converted env
(5-tuple ``step``, ``info["cost"]``) on every EnvRunner.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Sequence

import gymnasium as gym
from ray.tune.registry import ENV_CREATOR, _global_registry, register_env

from cvpo import envs as cvpo_envs

_REGISTERED: set = set()


def env_creator(env_id: str) -> Callable[[Dict[str, Any]], gym.Env]:
    """An RLlib env creator for ``env_id`` (env_config -> make_env kwargs)."""

    def _create(env_config: Dict[str, Any]) -> gym.Env:
        return cvpo_envs.make_env(env_id, **dict(env_config or {}))

    _create.__name__ = f"make_{env_id.replace('/', '_').replace('-', '_')}"
    return _create


def ensure_registered(env_id: str) -> None:
    """Registers ``env_id`` with Tune's registry (idempotent)."""
    if env_id in _REGISTERED:
        return
    if _global_registry.contains(ENV_CREATOR, env_id) and env_id not in _REGISTERED:
        # a user registered their own creator under this name: keep it
        _REGISTERED.add(env_id)
        return
    register_env(env_id, env_creator(env_id))
    _REGISTERED.add(env_id)


def register_all(force: bool = False) -> int:
    """Registers the tiny task and every Safety-Gymnasium id; returns the count.

    ``force`` registers again ids registered before (Tune's registry forgets
    them when Ray is shut down and started again in the same process).
    """
    if force:
        _REGISTERED.clear()
    ids = [cvpo_envs.POINT_HAZARD_ID]
    try:
        ids += cvpo_envs.list_safety_gymnasium_ids()
    except ImportError:  # safety-gymnasium missing: make_env explains when used
        pass
    for env_id in ids:
        ensure_registered(env_id)
    return len(ids)


@dataclasses.dataclass
class EnvInfo:
    observation_space: gym.Space
    action_space: gym.Space
    horizon: Optional[int]


def probe_env(env: Any, env_config: Dict[str, Any], cost_keys: Sequence[str]) -> EnvInfo:
    """Builds the env once to read its spaces and horizon and check its cost keys.

    ``env`` is an id string (made by ``make_env``, or a creator registered with
    Tune under that name) or a gym.Env subclass.
    """
    if isinstance(env, str):
        if _global_registry.contains(ENV_CREATOR, env) and env not in _REGISTERED:
            instance = _global_registry.get(ENV_CREATOR, env)(env_config)
        else:
            instance = cvpo_envs.make_env(env, **env_config)  # clear errors for bad ids
            ensure_registered(env)
    elif isinstance(env, type) and issubclass(env, gym.Env):
        instance = env(env_config) if env_config else env()
    else:
        raise ValueError(f"env must be an id string or a gym.Env subclass, got {env!r}")
    try:
        obs, info = instance.reset(seed=0)
        _, _, _, _, info = instance.step(instance.action_space.sample())
        missing = [k for k in cost_keys if k not in info]
        if missing:
            raise cvpo_envs.NoCostSignalError(
                f"env {env!r} reports no {missing} in its step info (keys: {sorted(info)}); "
                "CVPO needs a cost signal: wrap the env so info['cost'] is set every step, "
                "or set CVPOConfig.training(cost_keys=[...]) to the keys it does report."
            )
        horizon = None
        spec = getattr(instance, "spec", None)
        if spec is not None and spec.max_episode_steps:
            horizon = int(spec.max_episode_steps)
        return EnvInfo(instance.observation_space, instance.action_space, horizon)
    finally:
        instance.close()
