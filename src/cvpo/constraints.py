"""Cost limits: from an episodic budget to a per-step threshold on Q_c.

The critics estimate discounted values, but a cost limit C is an undiscounted
sum over an episode of fixed length T. Assuming the cost is spread evenly over
the episode (shared/design/cvpo.md, "Per-step threshold"):

    eps = C * (1 - gamma**T) / ((1 - gamma) * T)

This mapping is only meaningful if every episode runs its full time limit T.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np

__all__ = ["episodic_to_step_threshold"]


def _check_gamma_horizon(gamma: float, horizon: int) -> tuple[float, int]:
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real):
        raise TypeError(f"gamma must be a real number in the open interval (0, 1), got {gamma!r}")
    gamma = float(gamma)
    if not 0.0 < gamma < 1.0:  # also rejects NaN
        raise ValueError(f"gamma must be in the open interval (0, 1), got {gamma!r}")
    if isinstance(horizon, bool) or not isinstance(horizon, numbers.Integral):
        raise TypeError(
            f"horizon must be an integer >= 1 (the env's time limit T in steps), got {horizon!r}"
        )
    horizon = int(horizon)
    if horizon < 1:
        raise ValueError(
            f"horizon must be an integer >= 1 (the env's time limit T in steps), got {horizon}"
        )
    return gamma, horizon


def episodic_to_step_threshold(
    cost_limit: float | Sequence[float] | np.ndarray,
    gamma: float,
    horizon: int,
) -> float | np.ndarray:
    """Convert episodic cost limits C_k into per-step thresholds eps_k on Q_c.

    eps_k = C_k * (1 - gamma**T) / ((1 - gamma) * T)

    Args:
        cost_limit: the undiscounted episodic cost budget C (cost units per
            episode), a float or a sequence / array of them (one per
            constraint). Must be >= 0; ``math.inf`` means "unconstrained" and
            maps to ``inf``.
        gamma: discount factor of the cost critics, in (0, 1).
        horizon: the episode length T in env steps (the env's time limit), >= 1.

    Returns:
        The threshold(s) on the discounted cost value Q_c (cost units): a
        Python float for a scalar ``cost_limit``, otherwise a float64
        ``np.ndarray`` of the same shape.

    Raises:
        ValueError: ``cost_limit`` negative or NaN, ``gamma`` outside (0, 1),
            ``horizon`` < 1.
        TypeError: non-numeric arguments.

    Example:
        >>> round(episodic_to_step_threshold(25.0, 0.99, 1000), 4)
        2.4999
    """
    gamma, horizon = _check_gamma_horizon(gamma, horizon)
    scalar = isinstance(cost_limit, numbers.Real) and not isinstance(cost_limit, bool)
    try:
        limits = np.asarray(cost_limit, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"cost_limit must be a number or a sequence of numbers, got {cost_limit!r}"
        ) from err
    if np.isnan(limits).any():
        raise ValueError(f"cost_limit must be >= 0 and not NaN, got {cost_limit!r}")
    if (limits < 0).any():
        raise ValueError(f"cost_limit must be >= 0 (cost units per episode), got {cost_limit!r}")

    # (1 - gamma**T) / ((1 - gamma) * T) is the average discount weight over the episode;
    # expm1/log1p keep it accurate for gamma close to 1.
    average_discount = -math.expm1(horizon * math.log(gamma)) / ((1.0 - gamma) * horizon)
    thresholds = limits * average_discount  # inf stays inf
    if scalar:
        return float(thresholds)
    return thresholds
