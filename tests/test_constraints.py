"""Per-step cost thresholds (cvpo.md, "Per-step threshold")."""

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
