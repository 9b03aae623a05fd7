"""Cost limits: from an episodic budget to a per-step threshold on Q_c.

The critics estimate discounted values, but a cost limit C is an undiscounted
sum over an episode of fixed length T. Assuming the cost is spread evenly over
the episode (docs/algorithm.md#per-step-threshold):

    eps = C * (1 - gamma**T) / ((1 - gamma) * T)

This mapping is only meaningful if every episode runs its full time limit T.

Also the one definition of the episodic limits of m >= 1 constraints and of a
violation, used by the training metrics (``rllib_ext.common.callbacks``),
``rllib evaluate``, ``rllib report`` and the progress line:

- :func:`cost_limits` turns ``cost_limit`` (a float for every constraint, or one
  per cost key) into one float per cost key;
- an episode *violates* when ANY constraint's episodic cost exceeds its own
  limit (:func:`violated`; :func:`violations` gives the per-constraint flags,
  :func:`violation_rate` the share of episodes).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np

from cvpo.defaults import DEFAULT_COST_KEY

__all__ = [
    "CostLimitCountError",
    "constraint_names",
    "cost_limits",
    "episodic_to_step_threshold",
    "format_limits",
    "violated",
    "violation_rate",
    "violations",
]


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


# -- episodic limits and violations ------------------------------------------------------
class CostLimitCountError(ValueError):
    """``cost_limit`` is a list whose length is not the number of cost keys."""


def constraint_names(cost_keys: str | Sequence[str] | None = None) -> list[str]:
    """The cost keys of the constraints: ``None`` -> ``["cost"]``, a string -> ``[it]``."""
    if cost_keys is None:
        return [DEFAULT_COST_KEY]
    if isinstance(cost_keys, str):
        return [cost_keys]
    keys = list(cost_keys)
    if not keys:
        return [DEFAULT_COST_KEY]
    return keys


def cost_limits(
    cost_limit: float | Sequence[float], cost_keys: str | Sequence[str] | None = None
) -> list[float]:
    """One episodic limit per constraint (cost units per episode).

    Args:
        cost_limit: a number (the same limit for every cost key) or a sequence
            with one number per cost key, each >= 0 (``math.inf`` turns that
            constraint off).
        cost_keys: the ``info`` keys of the constraints (``None``: ``["cost"]``).

    Returns:
        A list of ``len(cost_keys)`` floats, in the order of ``cost_keys``.

    Raises:
        CostLimitCountError: (a ValueError) a sequence whose length differs from
            the number of cost keys.
        ValueError: a negative or NaN limit.
        TypeError: anything that is not a number or a sequence of numbers.

    Example:
        >>> cost_limits(25, ["cost_hazards", "cost_vases_contact"])
        [25.0, 25.0]
        >>> cost_limits([20, 5], ["cost_hazards", "cost_vases_contact"])
        [20.0, 5.0]
    """
    keys = constraint_names(cost_keys)
    if isinstance(cost_limit, numbers.Real) and not isinstance(cost_limit, bool):
        limits = [float(cost_limit)] * len(keys)
    elif isinstance(cost_limit, (str, bytes)) or not isinstance(cost_limit, (Sequence, np.ndarray)):
        raise TypeError(
            f"cost_limit must be a number or a list of numbers (one per cost key {keys}), "
            f"got {cost_limit!r}"
        )
    else:
        values = list(np.asarray(cost_limit, dtype=object).reshape(-1))
        if len(values) != len(keys):
            raise CostLimitCountError(
                f"cost_limit has {len(values)} value(s) {list(cost_limit)!r} but there are "
                f"{len(keys)} cost key(s) {keys}: give one limit per cost key, or one number "
                "for all of them"
            )
        if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values):
            raise TypeError(f"cost_limit must hold numbers only, got {cost_limit!r}")
        limits = [float(v) for v in values]
    for k, c in zip(keys, limits):
        if math.isnan(c) or c < 0:
            raise ValueError(
                f"cost_limit for {k!r} must be >= 0 (cost units per episode; inf turns the "
                f"constraint off), got {c!r}"
            )
    return limits


def violations(costs: Sequence[float] | np.ndarray, limits: Sequence[float]) -> list[bool]:
    """Per constraint: whether the episode's cost exceeds that constraint's limit.

    ``costs[k]`` is the undiscounted cost of constraint k summed over the
    episode; a cost equal to its limit is not a violation, and an infinite
    limit is never violated.
    """
    costs = np.asarray(costs, dtype=np.float64).reshape(-1)
    limits = np.asarray(limits, dtype=np.float64).reshape(-1)
    if costs.shape != limits.shape:
        raise ValueError(
            f"got {costs.size} episode cost(s) for {limits.size} limit(s); pass one cost per "
            "constraint, in the order of the cost keys"
        )
    return [bool(c > lim) for c, lim in zip(costs, limits)]


def violated(costs: Sequence[float] | np.ndarray, limits: Sequence[float]) -> bool:
    """Whether an episode violates: ANY constraint's episodic cost exceeds its own limit."""
    return any(violations(costs, limits))


def violation_rate(
    episode_costs: Sequence[Sequence[float]] | np.ndarray, limits: Sequence[float]
) -> float | None:
    """The share of episodes that violate (see :func:`violated`).

    Args:
        episode_costs: one row per episode, with one episodic cost per constraint
            (shape (episodes, m)).
        limits: one limit per constraint (:func:`cost_limits`).

    Returns:
        A float in [0, 1]; ``None`` when there is no episode or every limit is
        infinite (nothing can be violated).
    """
    limits = [float(c) for c in limits]
    rows = np.asarray(episode_costs, dtype=np.float64).reshape(-1, len(limits))
    if rows.shape[0] == 0 or all(math.isinf(c) for c in limits):
        return None
    return float(np.mean([violated(row, limits) for row in rows]))


def format_limits(limits: Sequence[float], cost_keys: str | Sequence[str] | None = None) -> str:
    """Human-readable limits: ``"25"`` for one constraint, else
    ``"cost_hazards 20, cost_vases 5"``."""
    keys = constraint_names(cost_keys)
    limits = list(limits)
    if len(limits) == 1:
        return f"{limits[0]:g}"
    return ", ".join(f"{k} {c:g}" for k, c in zip(keys, limits))
