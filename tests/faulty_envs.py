"""Test-only envs and wrappers that misbehave on purpose.

Importing this module registers them (idempotently), in the driver and in any
Ray worker that imports it (tests/ is on the workers' PYTHONPATH, see
conftest.start_local_ray):

* Tune env ``CRASH_ONCE_ID``: ``cvpo/PointHazard-v0`` wrapped in
  :class:`CrashOnceWrapper`, which raises inside ``step`` once per EnvRunner
  at a seeded random step. A marker file per EnvRunner in ``crash_dir``
  (env_config) makes a restarted runner (same ``worker_index``) run cleanly.
* gymnasium ids (namespace ``cvpotest``), reachable from any process through
  gymnasium's ``"module:id"`` form, e.g. ``make_env("faulty_envs:" + NONFINITE_ID)``
  imports this module first:

  - ``NONFINITE_ID``: a 2-D point task with ``info["cost"]`` that returns a
    NaN/inf reward or cost at step ``bad_step`` of every episode;
  - ``DISCRETE_ID``: has a cost signal but ``Discrete`` actions;
  - ``NO_COST_ID``: a Box-action task that never reports a cost.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

CRASH_ONCE_ID = "cvpotest/CrashOncePointHazard-v0"
NONFINITE_ID = "cvpotest/NonFinite-v0"
DISCRETE_ID = "cvpotest/DiscreteCost-v0"
NO_COST_ID = "cvpotest/NoCost-v0"
MODULE_PREFIX = "faulty_envs:"  # make_env / RLlib import this module for the ids below

_CRASH_KEYS = ("crash_dir", "crash_seed", "crash_window", "crash_runners")


class InjectedCrash(RuntimeError):
    """The deliberate failure raised by :class:`CrashOnceWrapper`."""


class CrashOnceWrapper(gym.Wrapper):
    """Raises :class:`InjectedCrash` in ``step`` once per EnvRunner.

    The crash step is drawn from ``crash_window = (lo, hi)`` (env steps since
    the env was built) with ``np.random.default_rng(seed + worker_index)``.
    Before raising, a marker ``runner<worker_index>.crashed`` is written to
    ``crash_dir``; an env built while the marker exists never crashes, so the
    runner Ray restarts after the crash samples normally.
    """

    def __init__(self, env: gym.Env, crash_dir: str, seed: int, worker_index: int, window=(5, 40)):
        super().__init__(env)
        self.marker = Path(crash_dir) / f"runner{worker_index}.crashed"
        self.crash_at: int | None = None
        if not self.marker.exists():
            lo, hi = int(window[0]), int(window[1])
            self.crash_at = int(np.random.default_rng(seed + worker_index).integers(lo, hi))
        self._t = 0

    def step(self, action):
        self._t += 1
        if self.crash_at is not None and self._t == self.crash_at and not self.marker.exists():
            self.marker.parent.mkdir(parents=True, exist_ok=True)
            self.marker.write_text(f"pid {os.getpid()} step {self._t}\n")
            raise InjectedCrash(f"injected crash at env step {self._t} ({self.marker.name})")
        return self.env.step(action)


def crash_once_creator(env_config: Any) -> gym.Env:
    """Tune env creator: PointHazard, crashing once on each remote EnvRunner.

    env_config: ``crash_dir`` (markers; no crash without it), ``crash_seed``,
    ``crash_window`` (lo, hi) and ``crash_runners`` (worker indices that crash;
    default: every remote one). The local EnvRunner and the config probe
    (``worker_index`` 0) never crash.
    """
    from cvpo.envs import POINT_HAZARD_ID, make_env

    cfg = dict(env_config or {})
    crash_dir = cfg.get("crash_dir")
    kwargs = {k: v for k, v in cfg.items() if k not in _CRASH_KEYS}
    env = make_env(POINT_HAZARD_ID, **kwargs)
    worker_index = int(getattr(env_config, "worker_index", 0) or 0)
    runners = cfg.get("crash_runners")
    if crash_dir and worker_index >= 1 and (runners is None or worker_index in runners):
        env = CrashOnceWrapper(
            env,
            crash_dir,
            int(cfg.get("crash_seed", 0)),
            worker_index,
            tuple(cfg.get("crash_window", (5, 40))),
        )
    return env


class _PointEnv(gym.Env):
    """A 2-D point that moves toward the origin; cost 1 inside a disk at (0.5, 0)."""

    metadata = {"render_modes": []}

    def __init__(self, discrete: bool = False, report_cost: bool = True):
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
        if discrete:
            self.action_space = gym.spaces.Discrete(4)
        else:
            self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self._discrete = discrete
        self._report_cost = report_cost
        self._pos = np.zeros(2, np.float32)
        self._t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._pos = self.np_random.uniform(-1, 1, size=2).astype(np.float32)
        self._t = 0
        return self._pos.copy(), {}

    def _move(self, action) -> None:
        if self._discrete:
            action = np.array([[1, 0], [-1, 0], [0, 1], [0, -1]][int(action)], np.float32)
        self._pos = np.clip(self._pos + 0.1 * np.asarray(action, np.float32), -2, 2)

    def step(self, action):
        self._move(action)
        t = self._t
        self._t += 1
        reward = -float(np.linalg.norm(self._pos))
        info = {}
        if self._report_cost:
            info["cost"] = float(np.linalg.norm(self._pos - np.array([0.5, 0.0])) < 0.3)
        return self._pos.copy(), self._signal(t, reward, info), False, False, info

    def _signal(self, t: int, reward: float, info: dict) -> float:
        return reward


class NonFiniteSignalEnv(_PointEnv):
    """Returns ``value`` as the ``signal`` ("reward" or "cost") at step ``bad_step``
    (0-based, counted from reset) of every episode."""

    def __init__(self, bad_step: int = 5, signal: str = "reward", value: float = math.nan):
        super().__init__()
        self.bad_step, self.signal, self.value = int(bad_step), signal, float(value)

    def _signal(self, t: int, reward: float, info: dict) -> float:
        if t == self.bad_step:
            if self.signal == "reward":
                return self.value
            info["cost"] = self.value
        return reward


class DiscreteCostEnv(_PointEnv):
    def __init__(self):
        super().__init__(discrete=True)


class NoCostEnv(_PointEnv):
    def __init__(self):
        super().__init__(report_cost=False)


def register() -> None:
    """Registers the gymnasium ids and the Tune env (idempotent)."""
    for env_id, entry in (
        (NONFINITE_ID, "NonFiniteSignalEnv"),
        (DISCRETE_ID, "DiscreteCostEnv"),
        (NO_COST_ID, "NoCostEnv"),
    ):
        if env_id not in gym.envs.registry:
            gym.register(
                id=env_id,
                entry_point=f"faulty_envs:{entry}",
                max_episode_steps=50,
                disable_env_checker=True,
            )
    from ray.tune.registry import register_env

    register_env(CRASH_ONCE_ID, crash_once_creator)


register()
