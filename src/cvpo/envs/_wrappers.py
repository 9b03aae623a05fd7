"""Light wrappers that give every env the same contract (see ``cvpo.envs.make_env``).

They sit on the hot path of every rollout step, so they avoid anything beyond a
few float conversions: no per-step space checks, no copies of ``info``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import gymnasium
import numpy as np
from gymnasium import spaces

from cvpo.envs import _render
from cvpo.envs._errors import NoCostSignalError, NonFiniteSignalError

ON_NONFINITE_MODES = ("raise", "drop")


def float32_space(space: gymnasium.Space) -> gymnasium.Space:
    """The float32 version of a Box space (other spaces are returned unchanged)."""
    if not isinstance(space, spaces.Box) or space.dtype == np.float32:
        return space
    with np.errstate(over="ignore"):  # e.g. +-1e308 bounds become +-inf, which is what they mean
        low = space.low.astype(np.float32)
        high = space.high.astype(np.float32)
    return spaces.Box(low=low, high=high, shape=space.shape, dtype=np.float32)


def _scalar(value: Any, what: str, env_id: str, step: int) -> float:
    try:
        return float(value)
    except TypeError:
        array = np.asarray(value)
        if array.size == 1:
            return float(array.reshape(-1)[0])
        raise ValueError(
            f"{env_id}: {what} at step {step} of the episode must be a scalar, "
            f"got {type(value).__name__} with shape {array.shape}"
        ) from None


class _CostSignalWrapper(gymnasium.Wrapper):
    """Shared logic: cost in ``info``, finiteness checks, float32 observations."""

    def __init__(self, env: gymnasium.Env, env_id: str, on_nonfinite: str = "raise") -> None:
        super().__init__(env)
        if on_nonfinite not in ON_NONFINITE_MODES:
            raise ValueError(
                f"on_nonfinite must be one of {ON_NONFINITE_MODES}, got {on_nonfinite!r}"
            )
        self.env_id = env_id
        self.on_nonfinite = on_nonfinite
        self._episode_step = 0
        self._warned_nonfinite = False
        self._cast_obs = isinstance(env.observation_space, spaces.Box) and (
            env.observation_space.dtype != np.float32
        )
        if self._cast_obs:
            self.observation_space = float32_space(env.observation_space)

    def _obs(self, obs: Any) -> Any:
        if self._cast_obs:
            return np.asarray(obs, dtype=np.float32)
        return obs

    def _handle_nonfinite(
        self, reward: float, cost: float, info: dict, step: int
    ) -> tuple[float, float]:
        bad = [
            name for name, value in (("reward", reward), ("cost", cost)) if not math.isfinite(value)
        ]
        values = ", ".join(
            f"{name}={value!r}"
            for name, value in (("reward", reward), ("cost", cost))
            if name in bad
        )
        if self.on_nonfinite == "raise":
            error = NonFiniteSignalError(
                f"{self.env_id} returned a non-finite {' and '.join(bad)} ({values}) at step "
                f"{step} of the episode (0-based, counted from reset()). Pass "
                "on_nonfinite='drop' to make_env to zero it and truncate the episode instead."
            )
            error.env_id = self.env_id
            error.step = step
            error.signals = tuple(bad)
            raise error
        if not self._warned_nonfinite:
            self._warned_nonfinite = True
            warnings.warn(
                f"{self.env_id} returned a non-finite {' and '.join(bad)} ({values}) at step "
                f"{step} of the episode; replaced by 0.0 and truncated the episode "
                "(on_nonfinite='drop'; this warning is shown once per env).",
                RuntimeWarning,
                stacklevel=3,
            )
        info["nonfinite"] = True
        info["nonfinite_signals"] = tuple(bad)
        if "reward" in bad:
            reward = 0.0
        if "cost" in bad:
            cost = 0.0
        return reward, cost

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        self._episode_step = 0
        return self._obs(obs), info


class SafetyGymnasiumAdapter(_CostSignalWrapper):
    """Safety-Gymnasium 6-tuple ``(obs, r, c, term, trunc, info)`` -> gymnasium 5-tuple.

    ``info["cost"]`` is the task's total cost (``cost_sum`` for navigation
    tasks); the per-term ``cost_*`` entries of ``info`` are kept as they are.
    Observations become float32. The action is passed on as an ndarray of the
    action space's dtype (``Builder.step`` uses ``np.array(a, copy=False)``,
    which numpy 2 rejects for lists).

    With an offscreen ``render_mode`` (``rgb_array``, ``depth_array``) the
    MuJoCo GL backend is checked here, before anything renders
    (:func:`cvpo.envs._render.ensure_offscreen_backend`; raises
    :class:`~cvpo.envs._render.NoOffscreenBackendError`, a ``RuntimeError``).
    ``close()`` frees the task's GL contexts (upstream's ``Builder`` has no
    ``close``).
    """

    def __init__(self, env: gymnasium.Env, env_id: str, on_nonfinite: str = "raise") -> None:
        if getattr(env, "render_mode", None) in _render.OFFSCREEN_RENDER_MODES:
            try:
                _render.ensure_offscreen_backend()
            except BaseException:
                env.close()
                raise
        super().__init__(env, env_id, on_nonfinite)
        self._action_dtype = getattr(env.action_space, "dtype", None)

    def close(self) -> None:
        try:
            _render.close_task_viewers(self.env)
        finally:
            super().close()

    def step(self, action: Any):
        obs, reward, cost, terminated, truncated, info = self.env.step(
            np.asarray(action, dtype=self._action_dtype)
        )
        step = self._episode_step
        self._episode_step = step + 1
        reward = _scalar(reward, "reward", self.env_id, step)
        cost = _scalar(cost, "cost", self.env_id, step)
        if not (math.isfinite(reward) and math.isfinite(cost)):
            reward, cost = self._handle_nonfinite(reward, cost, info, step)
            truncated = True
        info["cost"] = cost
        return self._obs(obs), reward, bool(terminated), bool(truncated), info


class CostInfoWrapper(_CostSignalWrapper):
    """For gymnasium envs that already put the cost in ``info["cost"]``.

    Validates it on every step (missing -> :class:`NoCostSignalError`,
    non-finite -> see ``on_nonfinite``), stores it back as a python float, and
    casts Box observations to float32 when the env's space is not float32.
    """

    def step(self, action: Any):
        obs, reward, terminated, truncated, info = self.env.step(action)
        step = self._episode_step
        self._episode_step = step + 1
        try:
            raw_cost = info["cost"]
        except (KeyError, TypeError):
            raise NoCostSignalError(
                f"{self.env_id} reports no cost signal: info['cost'] is missing at step {step} "
                "of the episode. cvpo needs a per-step cost; wrap the env so that it sets "
                "info['cost'] (a float >= 0) on every step, or use a Safety-Gymnasium id "
                "(see cvpo.envs.list_safety_gymnasium_ids()) or cvpo/PointHazard-v0."
            ) from None
        reward = _scalar(reward, "reward", self.env_id, step)
        cost = _scalar(raw_cost, "info['cost']", self.env_id, step)
        if not (math.isfinite(reward) and math.isfinite(cost)):
            reward, cost = self._handle_nonfinite(reward, cost, info, step)
            truncated = True
        info["cost"] = cost
        return self._obs(obs), reward, bool(terminated), bool(truncated), info
