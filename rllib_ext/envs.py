"""Env registration for RLlib and Tune, and a one-off env probe.

Every id that :func:`cvpo.envs.make_env` accepts is registered with
``ray.tune.registry.register_env`` under its own name, so
``config.environment("SafetyPointGoal1-v0")`` builds our converted env
(5-tuple ``step``, ``info["cost"]``) on every EnvRunner.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
from ray.tune.registry import ENV_CREATOR, register_env

from cvpo import envs as cvpo_envs

_REGISTERED: set = set()


def env_creator(env_id: str) -> Callable[[dict[str, Any]], gym.Env]:
    """An RLlib env creator for ``env_id`` (env_config -> make_env kwargs)."""

    def _create(env_config: dict[str, Any]) -> gym.Env:
        return cvpo_envs.make_env(env_id, **dict(env_config or {}))

    _create.__name__ = f"make_{env_id.replace('/', '_').replace('-', '_')}"
    return _create


def _registry_has(env_id: str) -> bool:
    """Whether Tune's registry (this Ray session's, once Ray runs) knows ``env_id``.

    Tune has no public lookup; its registry object is read here, at call time only."""
    from ray.tune.registry import _global_registry

    return _global_registry.contains(ENV_CREATOR, env_id)


def ensure_registered(env_id: str) -> None:
    """Registers ``env_id`` with Tune's registry unless it knows the id already (ours,
    or a creator a user registered under that name, which is kept)."""
    if not _registry_has(env_id):
        register_env(env_id, env_creator(env_id))
        _REGISTERED.add(env_id)


def register_all() -> int:
    """Registers the tiny task and every Safety-Gymnasium id that the registry does not
    know yet (Tune's registry forgets them when Ray is shut down and started again in
    the same process); returns the count."""
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
    horizon: int | None


def probe_env(env: Any, env_config: dict[str, Any], cost_keys: Sequence[str]) -> EnvInfo:
    """Builds the env once to read its spaces and horizon and check its cost keys.

    ``env`` is an id string (made by ``make_env``, or a creator registered with
    Tune under that name) or a gym.Env subclass.
    """
    if isinstance(env, str):
        if _registry_has(env) and env not in _REGISTERED:  # a user's own creator
            from ray.tune.registry import _global_registry

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
