"""Lagrange multipliers of a primal-dual baseline (SAC-Lagrangian), Ray-free.

One multiplier lambda_k >= 0 per constraint k with episodic limit C_k. It is
updated from MEASURED episodic costs: the finished training episodes are
grouped ``episodes_per_update`` at a time, and each group's mean episodic
cost J_k drives one update.

Gradient ascent (the default). lambda_k = softplus(nu_k) and nu_k takes a
plain gradient-ascent step on the dual objective ``lambda_k (J_k - C_k)``:

    nu_k <- nu_k + lr * sigmoid(nu_k) * (J_k - C_k)

(d softplus / d nu = sigmoid). lambda_k stays > 0; the step shrinks with
lambda_k, so a multiplier that has decayed toward 0 rises again gradually.

PID (Stooke, Achiam and Abbeel, ICML 2020, Algorithm 2), with gains
(kp, ki, kd) >= 0, per update:

    Delta = J_k - C_k
    D     = max(0, J_k - J_prev)          (J_prev = 0 before the first update)
    I     = max(0, I + Delta)
    lambda_k = max(0, kp * Delta + ki * I + kd * D)
    J_prev = J_k

Until the first update lambda_k is the initial value.

A constraint whose limit is inf is off: its multiplier is 0 and never moves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["LagrangeMultipliers", "inverse_softplus", "softplus"]


def softplus(x: np.ndarray | float) -> np.ndarray:
    """log(1 + exp(x)), without overflow."""
    return np.logaddexp(0.0, np.asarray(x, dtype=np.float64))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -x))


def inverse_softplus(y: np.ndarray | float) -> np.ndarray:
    """x with softplus(x) = y, for y > 0: y + log(1 - exp(-y))."""
    y = np.asarray(y, dtype=np.float64)
    if np.any(~(y > 0)):
        raise ValueError(f"inverse_softplus needs values > 0, got {y!r}")
    return y + np.log(-np.expm1(-y))


def _check_gains(pid) -> tuple[float, float, float]:
    try:
        kp, ki, kd = (float(v) for v in pid)
    except (TypeError, ValueError):
        raise ValueError(f"pid must be three gains (kp, ki, kd), got {pid!r}") from None
    if not all(math.isfinite(v) and v >= 0 for v in (kp, ki, kd)):
        raise ValueError(f"PID gains must be finite numbers >= 0, got {pid!r}")
    return kp, ki, kd


class LagrangeMultipliers:
    """One multiplier per constraint, updated from measured episodic costs.

    Args:
        limits: episodic cost limits C_k (``inf`` turns a constraint off).
        lr: step size of the gradient ascent on nu = softplus^-1(lambda).
        init: the multipliers' initial value (> 0 for gradient ascent: softplus
            never reaches 0; >= 0 with a PID).
        pid: None for gradient ascent, or the gains (kp, ki, kd).
        episodes_per_update: finished episodes whose mean cost makes one update.
    """

    def __init__(
        self,
        limits: Sequence[float],
        lr: float = 0.05,
        init: float = 1.0,
        pid: Sequence[float] | None = None,
        episodes_per_update: int = 1,
    ) -> None:
        self.limits = np.asarray(limits, dtype=np.float64).reshape(-1)
        if np.any(np.isnan(self.limits)) or np.any(self.limits < 0):
            raise ValueError(f"cost limits must be >= 0 (inf: off), got {list(limits)!r}")
        self.active = np.isfinite(self.limits)
        m = len(self.limits)
        if not (math.isfinite(float(lr)) and float(lr) > 0):
            raise ValueError(f"lagrangian lr must be a finite number > 0, got {lr!r}")
        if int(episodes_per_update) != episodes_per_update or episodes_per_update < 1:
            raise ValueError(
                f"episodes_per_update must be an integer >= 1, got {episodes_per_update!r}"
            )
        self.lr = float(lr)
        self.pid = None if pid is None else _check_gains(pid)
        self.episodes_per_update = int(episodes_per_update)
        init = float(init)
        if not math.isfinite(init) or init < 0 or (self.pid is None and init == 0):
            need = ">= 0" if self.pid is not None else "> 0 (softplus never reaches 0)"
            raise ValueError(f"initial multiplier must be finite and {need}, got {init!r}")
        self.init = init
        # gradient ascent: the raw parameter; PID: the multiplier itself
        self._raw = np.full(m, inverse_softplus(init) if self.pid is None else 0.0)
        self._lambda = np.where(self.active, init, 0.0)
        self.integral = np.zeros(m)
        self.prev_cost = np.zeros(m)
        self.last_cost = np.full(m, np.nan)  # J of the latest update
        self.num_updates = 0
        self._pending_sum = np.zeros(m)
        self._pending_count = 0

    @property
    def mode(self) -> str:
        return "gradient" if self.pid is None else "pid"

    @property
    def values(self) -> np.ndarray:
        """lambda_k, shape (m,) (a copy)."""
        return self._lambda.copy()

    @property
    def raw(self) -> np.ndarray:
        """nu_k of the gradient ascent (lambda = softplus(nu)); unused with a PID."""
        return self._raw.copy()

    def add_episodes(self, episode_costs: np.ndarray) -> int:
        """Adds finished episodes' costs (n, m), in order; every
        ``episodes_per_update`` of them make one update with their mean cost.
        Returns the number of updates made."""
        costs = np.asarray(episode_costs, dtype=np.float64).reshape(-1, len(self.limits))
        done = 0
        for row in costs:
            self._pending_sum += row
            self._pending_count += 1
            if self._pending_count == self.episodes_per_update:
                self.step(self._pending_sum / self._pending_count)
                self._pending_sum = np.zeros_like(self._pending_sum)
                self._pending_count = 0
                done += 1
        return done

    def step(self, cost: np.ndarray | Sequence[float]) -> np.ndarray:
        """One update with the measured episodic costs J (m,); returns lambda."""
        J = np.asarray(cost, dtype=np.float64).reshape(len(self.limits))
        if not np.all(np.isfinite(J)):
            raise ValueError(f"episodic costs must be finite, got {J!r}")
        delta = np.where(self.active, J - np.where(self.active, self.limits, 0.0), 0.0)
        if self.pid is None:
            self._raw = np.where(
                self.active, self._raw + self.lr * _sigmoid(self._raw) * delta, self._raw
            )
            self._lambda = np.where(self.active, softplus(self._raw), 0.0)
        else:
            kp, ki, kd = self.pid
            derivative = np.maximum(0.0, J - self.prev_cost)
            self.integral = np.where(self.active, np.maximum(0.0, self.integral + delta), 0.0)
            value = np.maximum(0.0, kp * delta + ki * self.integral + kd * derivative)
            self._lambda = np.where(self.active, value, 0.0)
            self.prev_cost = J.copy()
        self.last_cost = J.copy()
        self.num_updates += 1
        return self.values

    # -- state -----------------------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        """Everything an exact resume needs (plain Python floats and lists)."""
        return {
            "mode": self.mode,
            "raw": self._raw.tolist(),
            "lambda": self._lambda.tolist(),
            "integral": self.integral.tolist(),
            "prev_cost": self.prev_cost.tolist(),
            "last_cost": self.last_cost.tolist(),
            "num_updates": int(self.num_updates),
            "pending_sum": self._pending_sum.tolist(),
            "pending_count": int(self._pending_count),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        m = len(self.limits)
        if len(state["lambda"]) != m:
            raise ValueError(
                f"multiplier state has {len(state['lambda'])} constraints, this one {m}"
            )
        if state["mode"] != self.mode:
            raise ValueError(
                f"multiplier state is of mode {state['mode']!r}, this one {self.mode!r}"
            )
        self._raw = np.asarray(state["raw"], dtype=np.float64)
        self._lambda = np.asarray(state["lambda"], dtype=np.float64)
        self.integral = np.asarray(state["integral"], dtype=np.float64)
        self.prev_cost = np.asarray(state["prev_cost"], dtype=np.float64)
        self.last_cost = np.asarray(state["last_cost"], dtype=np.float64)
        self.num_updates = int(state["num_updates"])
        self._pending_sum = np.asarray(state["pending_sum"], dtype=np.float64)
        self._pending_count = int(state["pending_count"])
