"""SACLag's Lagrange multipliers (cvpo.lagrange): gradient ascent on softplus(nu), the PID
of Stooke et al. 2020, the episode window, and the state round trip."""

import math

import numpy as np
import pytest

from cvpo.lagrange import LagrangeMultipliers, inverse_softplus, softplus


def test_gradient_ascent_step_is_lr_times_sigmoid_times_violation():
    lag = LagrangeMultipliers([10.0], lr=0.1, init=1.0)
    nu0 = math.log(math.e - 1.0)  # softplus^-1(1)
    assert lag.raw[0] == pytest.approx(nu0) and lag.values[0] == pytest.approx(1.0)
    lag.step([15.0])  # J - C = +5, sigmoid(nu0) = 1 - e^-1
    nu1 = nu0 + 0.1 * (1.0 - math.exp(-1.0)) * 5.0
    assert lag.raw[0] == pytest.approx(nu1, abs=1e-12)
    assert lag.values[0] == pytest.approx(math.log1p(math.exp(nu1)), abs=1e-12)
    assert lag.values[0] > 1.0  # over the limit: lambda rises
    lag.step([2.0])  # under the limit: it falls
    nu2 = nu1 + 0.1 * (1.0 / (1.0 + math.exp(-nu1))) * (2.0 - 10.0)
    assert lag.raw[0] == pytest.approx(nu2, abs=1e-12)
    assert lag.values[0] < math.log1p(math.exp(nu1))
    lag.step([10.0])  # at the limit: no move
    assert lag.raw[0] == pytest.approx(nu2, abs=1e-15)


def test_softplus_keeps_lambda_positive_and_equal_to_softplus_of_nu():
    lag = LagrangeMultipliers([5.0], lr=1.0, init=0.5)
    for _ in range(200):
        lag.step([0.0])  # far under the limit for a long time
        assert lag.values[0] > 0.0
        assert lag.values[0] == softplus(lag.raw)[0]
    low = lag.values[0]
    assert low < 0.05
    lag.step([50.0])  # and it comes back up
    assert lag.values[0] > low
    assert inverse_softplus(softplus(np.array([-3.0, 0.0, 4.0]))) == pytest.approx([-3.0, 0.0, 4.0])


def test_pid_terms_with_exact_numbers():
    lag = LagrangeMultipliers([10.0], pid=(1.0, 0.5, 2.0), init=0.0)
    assert lag.values.tolist() == [0.0]
    # J=14: Delta=4, D=max(0, 14-0)=14, I=4 -> 4 + 0.5*4 + 2*14
    assert lag.step([14.0]).tolist() == [34.0]
    assert lag.integral.tolist() == [4.0]
    # J=12: Delta=2, D=max(0, 12-14)=0, I=6 -> 2 + 3 + 0
    assert lag.step([12.0]).tolist() == [5.0]
    # J=5: Delta=-5, D=0, I=max(0, 6-5)=1 -> max(0, -5 + 0.5) = 0
    assert lag.step([5.0]).tolist() == [0.0]
    assert lag.integral.tolist() == [1.0]
    # J=2: Delta=-8, I=max(0, 1-8)=0 (anti-windup at 0) -> 0
    assert lag.step([2.0]).tolist() == [0.0]
    assert lag.integral.tolist() == [0.0]
    # J=30: Delta=20, D=28, I=20 -> 20 + 10 + 56
    assert lag.step([30.0]).tolist() == [86.0]
    assert lag.prev_cost.tolist() == [30.0]


def test_constraints_are_independent_and_an_inf_limit_stays_at_zero():
    for pid in (None, (1.0, 1.0, 0.0)):
        lag = LagrangeMultipliers([10.0, math.inf], lr=0.1, init=1.0, pid=pid)
        assert lag.values[1] == 0.0
        lag.step([20.0, 1e6])
        lag.step([20.0, 1e6])
        assert lag.values[0] > 1.0 and lag.values[1] == 0.0


def test_episode_window_and_state_round_trip_continue_exactly():
    def make():
        return LagrangeMultipliers(
            [5.0, 3.0], pid=(0.1, 0.05, 0.2), init=0.0, episodes_per_update=3
        )

    rng = np.random.default_rng(0)
    costs = rng.uniform(0.0, 12.0, size=(11, 2))
    whole = make()
    assert whole.add_episodes(costs[:5]) == 1  # 3 episodes -> 1 update, 2 pending
    assert whole.last_cost.tolist() == pytest.approx(costs[:3].mean(axis=0).tolist())
    state = whole.get_state()
    resumed = make()
    resumed.set_state(state)
    assert whole.add_episodes(costs[5:]) == resumed.add_episodes(costs[5:]) == 2
    assert whole.get_state() == resumed.get_state()
    assert whole.values.tolist() == resumed.values.tolist()
    # gradient ascent state too
    ga = LagrangeMultipliers([5.0], lr=0.05, init=0.2)
    ga.add_episodes(costs[:4, :1])
    other = LagrangeMultipliers([5.0], lr=0.05, init=0.2)
    other.set_state(ga.get_state())
    assert other.raw.tolist() == ga.raw.tolist() and other.values.tolist() == ga.values.tolist()
    with pytest.raises(ValueError, match="constraints"):
        LagrangeMultipliers([5.0, 1.0], lr=0.05, init=0.2).set_state(ga.get_state())
    with pytest.raises(ValueError, match="mode"):
        LagrangeMultipliers([5.0], pid=(1, 1, 1), init=0.2).set_state(ga.get_state())


@pytest.mark.parametrize(
    "bad",
    [
        dict(lr=0.0),
        dict(lr=math.nan),
        dict(init=0.0),
        dict(init=-1.0),
        dict(pid=(1.0, -1.0, 0.0)),
        dict(pid=(1.0, 2.0)),
        dict(episodes_per_update=0),
        dict(limits=[-1.0]),
    ],
)
def test_bad_settings_are_refused(bad):
    kwargs = dict(limits=[5.0], lr=0.1, init=1.0) | bad
    with pytest.raises(ValueError):
        LagrangeMultipliers(**kwargs)
