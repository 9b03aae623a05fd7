"""Per-step cost thresholds (docs/algorithm.md#per-step-threshold)."""

import math

import numpy as np
import pytest

from cvpo.constraints import episodic_to_step_threshold


def test_cvpo_md_example():
    # T = 1000, gamma = 0.99, C = 25: eps = 25 * (1 - 0.99**1000) / 10 ~= 2.5
    eps = episodic_to_step_threshold(25.0, 0.99, 1000)
    assert isinstance(eps, float)
    assert eps == pytest.approx(25.0 * (1 - 0.99**1000) / (0.01 * 1000), rel=1e-12)
    assert eps == pytest.approx(2.4999, abs=1e-4)


def test_known_values():
    # gamma**T -> 0: eps = C / ((1 - gamma) T); T = 1: eps = C.
    assert episodic_to_step_threshold(10.0, 0.5, 1) == pytest.approx(10.0, rel=1e-15)
    assert episodic_to_step_threshold(10.0, 0.9, 2) == pytest.approx(10.0 * 1.9 / 2, rel=1e-14)
    assert episodic_to_step_threshold(0.0, 0.99, 400) == 0.0
    # gamma close to 1: the average discount tends to 1 and eps to C.
    assert episodic_to_step_threshold(25.0, 1 - 1e-12, 1000) == pytest.approx(25.0, rel=1e-6)


def test_vectorised_and_infinite():
    limits = [25.0, 10.0, math.inf]
    eps = episodic_to_step_threshold(limits, 0.99, 1000)
    assert isinstance(eps, np.ndarray) and eps.dtype == np.float64 and eps.shape == (3,)
    np.testing.assert_allclose(
        eps[:2], [episodic_to_step_threshold(c, 0.99, 1000) for c in limits[:2]], rtol=1e-15
    )
    assert eps[2] == math.inf
    assert episodic_to_step_threshold(math.inf, 0.99, 1000) == math.inf
    out = episodic_to_step_threshold(np.array([[1.0, 2.0]]), 0.9, 10)
    assert out.shape == (1, 2) and out[0, 1] == pytest.approx(2 * out[0, 0])


@pytest.mark.parametrize(
    "limit, gamma, horizon, match",
    [
        (-1.0, 0.99, 1000, "cost_limit"),
        (math.nan, 0.99, 1000, "cost_limit"),
        ([1.0, -2.0], 0.99, 1000, "cost_limit"),
        (25.0, 0.0, 1000, "gamma"),
        (25.0, 1.0, 1000, "gamma"),
        (25.0, math.nan, 1000, "gamma"),
        (25.0, 0.99, 0, "horizon"),
    ],
)
def test_input_errors(limit, gamma, horizon, match):
    with pytest.raises(ValueError, match=match):
        episodic_to_step_threshold(limit, gamma, horizon)


def test_type_errors():
    with pytest.raises(TypeError, match="horizon"):
        episodic_to_step_threshold(25.0, 0.99, 1000.5)
    with pytest.raises(TypeError, match="cost_limit"):
        episodic_to_step_threshold("a lot", 0.99, 1000)


# -- the one definition of the limits and of a violation -----------------------------------
from cvpo.constraints import (  # noqa: E402
    CostLimitCountError,
    constraint_names,
    cost_limits,
    format_limits,
    violated,
    violation_rate,
    violations,
)

TWO = ["cost_hazards", "cost_vases_contact"]


def test_cost_limits_one_per_key():
    assert constraint_names(None) == ["cost"]
    assert constraint_names("cost_hazards") == ["cost_hazards"]
    assert cost_limits(25) == [25.0]
    assert cost_limits(25.0, None) == [25.0]
    assert cost_limits(25, TWO) == [25.0, 25.0]
    assert cost_limits([20, 5], TWO) == [20.0, 5.0]
    assert cost_limits((20.0, math.inf), TWO) == [20.0, math.inf]
    assert cost_limits(np.array([1.5, 2.5]), TWO) == [1.5, 2.5]
    assert all(isinstance(c, float) for c in cost_limits([20, 5], TWO))


@pytest.mark.parametrize(
    "limit, keys, exc, match",
    [
        ([1.0, 2.0], None, CostLimitCountError, r"2 value\(s\).*1 cost key\(s\) \['cost'\]"),
        ([1.0], TWO, CostLimitCountError, r"1 value\(s\).*2 cost key\(s\)"),
        ([1.0, 2.0, 3.0], TWO, CostLimitCountError, "one limit per cost key"),
        ([1.0, -2.0], TWO, ValueError, "'cost_vases_contact' must be >= 0"),
        (math.nan, TWO, ValueError, "'cost_hazards' must be >= 0"),
        ("25", TWO, TypeError, "number or a list of numbers"),
        (None, TWO, TypeError, "number or a list of numbers"),
        ([1.0, "a"], TWO, TypeError, "numbers only"),
    ],
)
def test_cost_limits_errors(limit, keys, exc, match):
    with pytest.raises(exc, match=match):
        cost_limits(limit, keys)
    assert issubclass(CostLimitCountError, ValueError)


def test_violated_means_any_constraint_over_its_own_limit():
    limits = [20.0, 5.0]
    assert violations([21.0, 0.0], limits) == [True, False]
    assert violations([0.0, 6.0], limits) == [False, True]
    assert violations([20.0, 5.0], limits) == [False, False]  # at the limit: not over
    assert violated([21.0, 0.0], limits) and violated([0.0, 6.0], limits)
    assert violated([25.0, 6.0], limits)
    assert not violated([20.0, 5.0], limits)
    # not the sum: 15 + 4 = 19 < 25 = 20 + 5, yet nothing is violated and 3 + 6 violates
    assert not violated([15.0, 4.0], limits) and violated([3.0, 6.0], limits)
    assert not violated([1e9], [math.inf])
    with pytest.raises(ValueError, match="2 episode cost"):
        violated([1.0, 2.0], [1.0])


def test_violation_rate_is_the_share_of_violating_episodes():
    limits = [20.0, 5.0]
    episodes = [[21.0, 0.0], [0.0, 6.0], [20.0, 5.0], [1.0, 1.0], [30.0, 9.0]]
    assert violation_rate(episodes, limits) == pytest.approx(3 / 5)
    assert violation_rate(np.array(episodes), limits) == pytest.approx(0.6)
    assert violation_rate([[3.0], [0.0]], [2.0]) == 0.5
    assert violation_rate([], limits) is None
    assert violation_rate(episodes, [math.inf, math.inf]) is None


def test_format_limits():
    assert format_limits([25.0]) == "25"
    assert format_limits([20.0, 5.0], TWO) == "cost_hazards 20, cost_vases_contact 5"
    assert format_limits(cost_limits(2.5, TWO), TWO) == "cost_hazards 2.5, cost_vases_contact 2.5"
