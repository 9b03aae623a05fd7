"""``cvpo/PointHazard-v0``: a tiny constrained navigation task in pure numpy.

A point mass moves in the square arena ``[-1.5, 1.5]^2``. It starts near
``(-1, 0)`` (x jittered by +-0.05, y by +-0.1 on ``reset(seed=...)``) and must
reach the goal disc (radius 0.1) around ``(1, 0)``. A hazard disc of radius 0.4
sits at the origin, right on the straight line between start and goal.

Dynamics (one step): the action ``a`` in ``[-1, 1]^2`` (float32 Box; clipped) is
a velocity command with a first-order lag,
``v <- 0.5 * v + 0.5 * MAX_SPEED * a`` with ``MAX_SPEED = 0.06`` per step, then
``p <- clip(p + v, -1.5, 1.5)``.

Reward: ``10 * (d_prev - d)`` (progress toward the goal centre) plus
``GOAL_BONUS = 0.5`` on every step that ends inside the goal disc. There is no
early termination: an agent that reaches the goal keeps collecting the bonus by
staying there until the fixed horizon of 100 steps (``TimeLimit``), so every
episode has the same length, as CVPO's fixed-horizon cost threshold assumes.

Cost: 1.0 on every step that ends strictly inside the hazard disc, else 0.0;
reported as ``info["cost"]`` and ``info["cost_hazard"]``.

Observation (float32, 8 values): position (2), velocity / MAX_SPEED (2),
goal - position (2), hazard centre - position (2).

Measured with :func:`evaluate_policies` (seeds 0..19, 100 steps each; mean,
with min..max over the seeds in brackets):

=================  =====================  ========================
policy             episode cost           episode return
=================  =====================  ========================
straight line      13.3 [13 .. 14]        53.9 [53.6 .. 54.2]
detour (via y=.7)  0.0  [0 .. 0]          49.8 [49.4 .. 50.3]
uniform random     0.0  [0 .. 0]          0.4  [-5.4 .. 6.4]
=================  =====================  ========================

So with a cost limit below ~13 the unconstrained optimum (straight line) is
infeasible, and the best feasible policy gives up ~4 return (~8%) by going
around the hazard (it reaches the goal ~8 steps later, losing that many goal
bonuses; the progress term is path-independent).

It runs at ~300,000 random-action steps/s through ``cvpo.envs.make_env`` on
one core of the 2-core dev machine (``benchmarks/env_speed.py``); the
requirement is >= 20,000.

Rendering: ``make_env("cvpo/PointHazard-v0", render_mode="rgb_array")`` (and
optionally ``render_width`` / ``render_height``, default 256) makes
``render()`` return an ``(H, W, 3)`` uint8 top-down view of the arena, drawn
in numpy (no OpenGL, works on any machine): light floor, grey border, the
hazard disc (:data:`HAZARD_RGB`), the goal disc (:data:`GOAL_RGB`) and the
point (:data:`POINT_RGB`, or :data:`POINT_COST_RGB` while inside the hazard).
Rendering reads the state only; it never changes dynamics, rewards, costs,
observations or random numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import gymnasium
import numpy as np
from gymnasium import spaces

ARENA_HALF_WIDTH = 1.5
START = (-1.0, 0.0)
START_JITTER = (0.05, 0.1)
GOAL = (1.0, 0.0)
GOAL_RADIUS = 0.1
GOAL_BONUS = 0.5
PROGRESS_SCALE = 10.0
HAZARD_CENTER = (0.0, 0.0)
HAZARD_RADIUS = 0.4
MAX_SPEED = 0.06
VELOCITY_LAG = 0.5
HORIZON = 100

_OBS_HIGH = np.array(
    [ARENA_HALF_WIDTH, ARENA_HALF_WIDTH, 1.0, 1.0, 3.0, 3.0, 3.0, 3.0], dtype=np.float32
)


# Rendering (see the module docstring); colours are RGB uint8 triples.
RENDER_SIZE = 256
FLOOR_RGB = (236, 236, 230)
BORDER_RGB = (90, 90, 90)
HAZARD_RGB = (80, 110, 230)
GOAL_RGB = (60, 180, 75)
POINT_RGB = (220, 40, 40)
POINT_COST_RGB = (255, 160, 0)
POINT_RADIUS = 0.06  # drawn size only; the point has no extent in the dynamics
_BORDER_PX = 2


class PointHazardEnv(gymnasium.Env):
    """See the module docstring. Use ``cvpo.envs.make_env("cvpo/PointHazard-v0")``."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 30}

    def __init__(
        self,
        render_mode: str | None = None,
        render_width: int = RENDER_SIZE,
        render_height: int = RENDER_SIZE,
    ) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(
                f"PointHazard-v0 supports render_mode='rgb_array' (or None), got {render_mode!r}"
            )
        if int(render_width) < 16 or int(render_height) < 16:
            raise ValueError(
                f"render_width and render_height must be >= 16, got {render_width}x{render_height}"
            )
        self.render_mode = render_mode
        self._render_size = (int(render_height), int(render_width))
        self._background: np.ndarray | None = None
        self.observation_space = spaces.Box(low=-_OBS_HIGH, high=_OBS_HIGH, dtype=np.float32)
        self.action_space = spaces.Box(low=-1.0, high=1.0, shape=(2,), dtype=np.float32)
        self._x, self._y = START
        self._vx = self._vy = 0.0
        self._dist = self._distance_to_goal()

    @property
    def position(self) -> tuple[float, float]:
        """Current (x, y) of the point (python floats, full precision)."""
        return self._x, self._y

    def _distance_to_goal(self) -> float:
        return math.hypot(GOAL[0] - self._x, GOAL[1] - self._y)

    def _obs(self) -> np.ndarray:
        x, y = self._x, self._y
        return np.array(
            [
                x,
                y,
                self._vx / MAX_SPEED,
                self._vy / MAX_SPEED,
                GOAL[0] - x,
                GOAL[1] - y,
                HAZARD_CENTER[0] - x,
                HAZARD_CENTER[1] - y,
            ],
            dtype=np.float32,
        )

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        jitter = self.np_random.uniform(-1.0, 1.0, size=2)
        self._x = START[0] + START_JITTER[0] * float(jitter[0])
        self._y = START[1] + START_JITTER[1] * float(jitter[1])
        self._vx = self._vy = 0.0
        self._dist = self._distance_to_goal()
        return self._obs(), {}

    def step(self, action: Any):
        ax = float(action[0])
        ay = float(action[1])
        ax = -1.0 if ax < -1.0 else (1.0 if ax > 1.0 else ax)
        ay = -1.0 if ay < -1.0 else (1.0 if ay > 1.0 else ay)
        vx = VELOCITY_LAG * self._vx + (1.0 - VELOCITY_LAG) * MAX_SPEED * ax
        vy = VELOCITY_LAG * self._vy + (1.0 - VELOCITY_LAG) * MAX_SPEED * ay
        x = self._x + vx
        y = self._y + vy
        x = (
            -ARENA_HALF_WIDTH
            if x < -ARENA_HALF_WIDTH
            else (ARENA_HALF_WIDTH if x > ARENA_HALF_WIDTH else x)
        )
        y = (
            -ARENA_HALF_WIDTH
            if y < -ARENA_HALF_WIDTH
            else (ARENA_HALF_WIDTH if y > ARENA_HALF_WIDTH else y)
        )
        self._x, self._y, self._vx, self._vy = x, y, vx, vy

        dist = self._distance_to_goal()
        reached = dist < GOAL_RADIUS
        reward = PROGRESS_SCALE * (self._dist - dist) + (GOAL_BONUS if reached else 0.0)
        self._dist = dist
        hx = x - HAZARD_CENTER[0]
        hy = y - HAZARD_CENTER[1]
        cost = 1.0 if hx * hx + hy * hy < HAZARD_RADIUS * HAZARD_RADIUS else 0.0
        info = {"cost": cost, "cost_hazard": cost, "goal_reached": reached}
        return self._obs(), reward, False, False, info

    # ----------------------------------------------------------------------
    # rendering (numpy only)
    # ----------------------------------------------------------------------

    def _pixel_centres(self) -> tuple[np.ndarray, np.ndarray]:
        """World x of each pixel column and world y of each pixel row (y up)."""
        height, width = self._render_size
        span = 2.0 * ARENA_HALF_WIDTH
        xs = -ARENA_HALF_WIDTH + (np.arange(width) + 0.5) * (span / width)
        ys = ARENA_HALF_WIDTH - (np.arange(height) + 0.5) * (span / height)
        return xs, ys

    def _draw_background(self) -> np.ndarray:
        height, width = self._render_size
        xs, ys = self._pixel_centres()
        image = np.empty((height, width, 3), dtype=np.uint8)
        image[:] = FLOOR_RGB
        for (cx, cy), radius, colour in (
            (HAZARD_CENTER, HAZARD_RADIUS, HAZARD_RGB),
            (GOAL, GOAL_RADIUS, GOAL_RGB),
        ):
            inside = (xs[None, :] - cx) ** 2 + (ys[:, None] - cy) ** 2 < radius * radius
            image[inside] = colour
        image[:_BORDER_PX] = BORDER_RGB
        image[-_BORDER_PX:] = BORDER_RGB
        image[:, :_BORDER_PX] = BORDER_RGB
        image[:, -_BORDER_PX:] = BORDER_RGB
        return image

    def render(self) -> np.ndarray | None:
        """The current frame, ``(H, W, 3)`` uint8, with ``render_mode="rgb_array"``."""
        if self.render_mode is None:
            gymnasium.logger.warn(
                "PointHazard-v0: render() called without a render mode; "
                "make the env with render_mode='rgb_array'"
            )
            return None
        if self._background is None:
            self._background = self._draw_background()
        frame = self._background.copy()
        height, width = self._render_size
        span = 2.0 * ARENA_HALF_WIDTH
        x, y = self._x, self._y
        # Only the pixels around the point.
        col0 = max(0, int((x - POINT_RADIUS + ARENA_HALF_WIDTH) / span * width))
        col1 = min(width, int((x + POINT_RADIUS + ARENA_HALF_WIDTH) / span * width) + 2)
        row0 = max(0, int((ARENA_HALF_WIDTH - y - POINT_RADIUS) / span * height))
        row1 = min(height, int((ARENA_HALF_WIDTH - y + POINT_RADIUS) / span * height) + 2)
        if col0 < col1 and row0 < row1:
            xs, ys = self._pixel_centres()
            inside = (xs[None, col0:col1] - x) ** 2 + (ys[row0:row1, None] - y) ** 2 < (
                POINT_RADIUS * POINT_RADIUS
            )
            hx, hy = x - HAZARD_CENTER[0], y - HAZARD_CENTER[1]
            in_hazard = hx * hx + hy * hy < HAZARD_RADIUS * HAZARD_RADIUS
            frame[row0:row1, col0:col1][inside] = POINT_COST_RGB if in_hazard else POINT_RGB
        return frame


# --------------------------------------------------------------------------
# scripted reference policies (used by the tests and the docstring numbers)
# --------------------------------------------------------------------------


def _toward(dx: float, dy: float, slow_radius: float) -> np.ndarray:
    norm = math.hypot(dx, dy)
    if norm < 1e-9:
        return np.zeros(2, dtype=np.float32)
    scale = min(1.0, norm / slow_radius) / norm if slow_radius > 0 else 1.0 / norm
    return np.array([dx * scale, dy * scale], dtype=np.float32)


def straight_line_policy(obs: np.ndarray) -> np.ndarray:
    """Head straight for the goal (the unconstrained optimum; crosses the hazard)."""
    return _toward(float(obs[4]), float(obs[5]), slow_radius=0.15)


DETOUR_WAYPOINT_Y = 0.7


def detour_policy(obs: np.ndarray) -> np.ndarray:
    """Go around the hazard: to ``(0, +-0.7)`` first (side of the start), then to the goal."""
    x, y = float(obs[0]), float(obs[1])
    if x < HAZARD_CENTER[0]:
        side = 1.0 if y >= HAZARD_CENTER[1] else -1.0
        return _toward(HAZARD_CENTER[0] - x, HAZARD_CENTER[1] + side * DETOUR_WAYPOINT_Y - y, 0.0)
    return straight_line_policy(obs)


def run_episode(
    env: gymnasium.Env,
    policy: Callable[[np.ndarray], np.ndarray] | None,
    seed: int,
) -> dict[str, float]:
    """Roll one episode; ``policy=None`` means uniform random actions (seeded)."""
    obs, _ = env.reset(seed=seed)
    env.action_space.seed(seed)
    total_reward = total_cost = 0.0
    steps = 0
    while True:
        action = env.action_space.sample() if policy is None else policy(obs)
        obs, reward, terminated, truncated, info = env.step(action)
        total_reward += reward
        total_cost += info["cost"]
        steps += 1
        if terminated or truncated:
            break
    return {"return": total_reward, "cost": total_cost, "length": steps}


def evaluate_policies(seeds: range = range(20)) -> dict[str, dict[str, float]]:
    """Mean/min/max episode return and cost of the three reference policies."""
    from cvpo.envs import make_env

    env = make_env("cvpo/PointHazard-v0")
    results = {}
    for name, policy in (
        ("straight_line", straight_line_policy),
        ("detour", detour_policy),
        ("random", None),
    ):
        episodes = [run_episode(env, policy, seed) for seed in seeds]
        summary = {}
        for key in ("return", "cost", "length"):
            values = [episode[key] for episode in episodes]
            summary[key] = sum(values) / len(values)
            summary[f"{key}_min"] = min(values)
            summary[f"{key}_max"] = max(values)
        results[name] = summary
    env.close()
    return results
