"""Episodic-cost feedback on the E-step's per-step cost threshold.

The E-step constrains the mean over replay states of the cost critic,
``E_s E_q[Q_c(s, a)] <= eps``, with ``eps = C (1 - gamma^T) / ((1 - gamma) T)``
(:func:`cvpo.constraints.episodic_to_step_threshold`). The episodic cost that
this lets through differs from C, measured in docs/constraint.md:

- the formula holds for cost spread evenly over full episodes; cost met early
  in the episode weighs less in the state-averaged discounted Q_c, so more of it
  passes (tiny hazard task: a policy at the threshold pays ~1.55 C);
- the cost critics underestimate the cost of the actions the E-step prefers
  (selection among K sampled actions; measured ratio ~0.73 on the tiny task);
- the mean runs over replay states, not the current policy's.

None of these is known in advance, so the threshold is corrected by what is
measured: per constraint k, ``eps_k' = kappa_k * eps_k`` with, after every
finished training episode with cost J,

    log kappa_k <- clip(log kappa_k + rate * max((C_k - J_k) / C_k, -MAX_OVERSHOOT),
                        log kappa_min, log kappa_max)

an integral controller on the episodic cost itself: at equilibrium the mean of
the relative error is 0, i.e. the mean episodic cost is C (the error is
bounded below only for episodes over (1 + MAX_OVERSHOOT) C, so one wild episode
moves kappa by at most ``rate * MAX_OVERSHOOT``; a first version clipped it to
[-1, 1], which balances something near the median instead: on PointGoal1,
training episodes that paid 0-20 and 50-160 held kappa at 0.77-0.95 while their
mean stayed ~40). Training episodes over the limit tighten the threshold,
episodes under it loosen it again, up to ``kappa_max``. ``rate = 0`` switches it
off (the paper's fixed threshold).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: episodes over (1 + MAX_OVERSHOOT) C count as (1 + MAX_OVERSHOOT) C in the feedback
MAX_OVERSHOOT = 4.0

__all__ = ["ThresholdFeedback", "TimingCorrection", "state_mean_discounted_cost"]


def state_mean_discounted_cost(costs: np.ndarray, gamma: float, truncated: bool) -> np.ndarray:
    """Mean over an episode's states of the discounted cost to go, per constraint.

    ``costs`` (T, m) are the per-step costs. ``G_t = sum_{k>=t} gamma^(k-t) c_k``; a
    truncated episode (time limit, not a terminal state) continues after T at its
    own average cost rate, as the critics' bootstrap assumes:
    ``G_t += gamma^(T-t) * (J / T) / (1 - gamma)``.
    """
    costs = np.asarray(costs, dtype=np.float64)
    T = len(costs)
    if T == 0:
        return np.zeros(costs.shape[1:])
    acc = costs.mean(axis=0) / (1.0 - gamma) if truncated else np.zeros(costs.shape[1:])
    total = np.zeros(costs.shape[1:])
    for t in range(T - 1, -1, -1):
        acc = costs[t] + gamma * acc
        total += acc
    return total / T


class TimingCorrection:
    """The step threshold from the cost timing of recent episodes, instead of even spread.

    The E-step bounds the state-averaged discounted cost to go. For finished
    episodes the ratio rho = mean_t G_t / J of that quantity to the episodic cost
    is measured (ratio of sums over a window of recent episodes), and the
    threshold becomes eps = C * rho. With cost spread evenly over a truncated
    episode rho = 1 / ((1 - gamma) T), the even-spread formula; cost met early
    in the episode gives a smaller rho, so a tighter threshold. Until an episode
    with cost has finished, the formula's value stands.
    """

    def __init__(self, num_constraints: int, gamma: float, window: int):
        if window < 1:
            raise ValueError(f"timing window must be >= 1 episodes, got {window!r}")
        self.gamma = float(gamma)
        self.window = int(window)
        self.g_sum = np.zeros(num_constraints)
        self.j_sum = np.zeros(num_constraints)
        self._recent: list = []

    def update(self, costs: np.ndarray, truncated: bool) -> None:
        costs = np.asarray(costs, dtype=np.float64).reshape(len(costs), len(self.g_sum))
        g, j = state_mean_discounted_cost(costs, self.gamma, truncated), costs.sum(axis=0)
        self._recent.append((g, j))
        self.g_sum += g
        self.j_sum += j
        if len(self._recent) > self.window:
            g_old, j_old = self._recent.pop(0)
            self.g_sum -= g_old
            self.j_sum -= j_old

    def rho(self, default: np.ndarray) -> np.ndarray:
        """Per constraint: measured rho where the window holds cost, else ``default``."""
        has = self.j_sum > 1e-9
        return np.where(has, self.g_sum / np.where(has, self.j_sum, 1.0), default)

    def get_state(self) -> dict:
        return {"recent": [(g.tolist(), j.tolist()) for g, j in self._recent]}

    def set_state(self, state: dict) -> None:
        self._recent = [
            (np.asarray(g, np.float64), np.asarray(j, np.float64)) for g, j in state["recent"]
        ]
        self.g_sum = (
            np.sum([g for g, _ in self._recent], axis=0)
            if self._recent
            else np.zeros_like(self.g_sum)
        )
        self.j_sum = (
            np.sum([j for _, j in self._recent], axis=0)
            if self._recent
            else np.zeros_like(self.j_sum)
        )


class ThresholdFeedback:
    """Per-constraint multipliers kappa of the step thresholds, driven by episode costs."""

    def __init__(self, cost_limits: Sequence[float], rate: float, kappa_range: Sequence[float]):
        lo, hi = (float(x) for x in kappa_range)
        if not (0.0 < lo <= 1.0 <= hi):
            raise ValueError(
                f"kappa range must satisfy 0 < min <= 1 <= max, got {tuple(kappa_range)}"
            )
        if not (math.isfinite(rate) and rate >= 0.0):
            raise ValueError(f"threshold feedback rate must be a finite number >= 0, got {rate!r}")
        self.limits = np.asarray([float(c) for c in cost_limits], dtype=np.float64)
        self.rate = float(rate)
        self.log_bounds = (math.log(lo), math.log(hi))
        self.log_kappa = np.zeros(len(self.limits))
        self.episodes = 0

    @property
    def kappa(self) -> np.ndarray:
        return np.exp(self.log_kappa)

    @property
    def enabled(self) -> bool:
        return self.rate > 0.0

    def update(self, episode_costs: np.ndarray) -> bool:
        """Feeds finished episodes' costs, shape (n, m). Returns whether kappa changed."""
        costs = np.asarray(episode_costs, dtype=np.float64).reshape(-1, len(self.limits))
        if not self.enabled or len(costs) == 0:
            return False
        finite = np.isfinite(self.limits)
        before = self.log_kappa.copy()
        for j in costs:
            err = np.zeros_like(self.limits)
            err[finite] = (self.limits[finite] - j[finite]) / np.maximum(self.limits[finite], 1e-8)
            err = np.maximum(err, -MAX_OVERSHOOT)  # (C - J) / C <= 1 always
            self.log_kappa = np.clip(self.log_kappa + self.rate * err, *self.log_bounds)
        self.episodes += len(costs)
        return not np.array_equal(before, self.log_kappa)

    def get_state(self) -> dict:
        return {"log_kappa": self.log_kappa.tolist(), "episodes": self.episodes}

    def set_state(self, state: dict) -> None:
        log_kappa = np.asarray(state["log_kappa"], dtype=np.float64)
        if log_kappa.shape != self.log_kappa.shape:
            raise ValueError(
                f"threshold feedback state has {log_kappa.size} constraints, "
                f"the config {self.log_kappa.size}"
            )
        self.log_kappa = log_kappa
        self.episodes = int(state.get("episodes", 0))
