"""Progress lines and plots of runs whose episodes end only every few iterations."""

import math

import pandas as pd
import pytest

from rllib_ext.progress import ProgressLine, finite_series, plot_progress, progress_figure

NAN = math.nan


def _result(it, steps, ret=NAN, cost=NAN, eval_ret=None, eval_cost=None):
    r = {
        "training_iteration": it,
        "time_total_s": 10.0 * it,
        "config": {"cost_limit": 25.0},
        "env_runners": {
            "num_env_steps_sampled_lifetime": steps,
            "episode_return_mean": ret,
            "episode_cost_mean": cost,
            "cost_violation_rate": NAN if math.isnan(cost) else 0.5,
        },
    }
    if eval_ret is not None:
        r["evaluation"] = {
            "env_runners": {"episode_return_mean": eval_ret, "episode_cost_mean": eval_cost}
        }
    return r


def test_progress_line_carries_the_last_finished_episodes_forward():
    line = ProgressLine()
    first = line(_result(1, 1000))
    assert "return n/a" in first  # no episode has ended yet
    lines = [line(_result(2, 2000, ret=12.5, cost=30.0))]
    lines += [line(_result(i, 1000 * i)) for i in (3, 4, 5)]  # no episode ends in these
    lines.append(line(_result(6, 6000, ret=14.0, cost=20.0, eval_ret=18.25, eval_cost=22.5)))
    lines.append(line(_result(7, 7000)))
    for text in lines:
        assert "n/a" not in text, text
    assert all("return 12.50 | cost 30.00 (limit 25) | over limit 50%" in t for t in lines[:4])
    assert "steps 5,000" in lines[3]
    assert "eval return 18.25 cost 22.50" in lines[-1]
    assert "return 14.00 | cost 20.00" in lines[-1]


def _frame():
    steps = [1000.0 * i for i in range(1, 13)]
    ret = [NAN, NAN, NAN, 5.0, NAN, NAN, NAN, 9.0, NAN, NAN, NAN, 12.0]
    cost = [NAN, NAN, NAN, 40.0, NAN, NAN, NAN, 30.0, NAN, NAN, NAN, 20.0]
    ev_r = [NAN] * 5 + [7.0] + [NAN] * 5 + [15.0]
    ev_c = [NAN] * 5 + [10.0] + [NAN] * 5 + [18.0]
    return pd.DataFrame(
        {
            "training_iteration": range(1, 13),
            "env_runners/num_env_steps_sampled_lifetime": steps,
            "env_runners/episode_return_mean": ret,
            "env_runners/episode_cost_mean": cost,
            "evaluation/env_runners/episode_return_mean": ev_r,
            "evaluation/env_runners/episode_cost_mean": ev_c,
        }
    )


def test_finite_series_drops_nan_pairs_in_order():
    assert finite_series([1, 2, 3, 4], [NAN, 2.0, None, 4.0]) == ([2.0, 4.0], [2.0, 4.0])


def test_plot_draws_connected_curves_of_the_finite_points_against_env_steps(tmp_path):
    fig = progress_figure(_frame(), "t", 25.0)
    ax_r, ax_c = fig.axes
    assert ax_r.get_xlabel() == ax_c.get_xlabel() == "env steps"
    train_r, eval_r = ax_r.lines
    assert list(train_r.get_xdata()) == [4000.0, 8000.0, 12000.0]
    assert list(train_r.get_ydata()) == [5.0, 9.0, 12.0]
    assert eval_r.get_xydata().tolist() == [[6000.0, 7.0], [12000.0, 15.0]]
    train_c, eval_c, limit = ax_c.lines
    assert list(train_c.get_ydata()) == [40.0, 30.0, 20.0]
    assert list(eval_c.get_ydata()) == [10.0, 18.0]
    assert list(limit.get_ydata()) == [25.0, 25.0]
    png = plot_progress(_frame(), tmp_path / "p.png", "t", 25.0)
    assert png.stat().st_size > 10_000


def test_plot_without_any_finished_episode_is_not_written(tmp_path):
    df = _frame().drop(columns=["env_runners/episode_return_mean"])
    assert plot_progress(df, tmp_path / "p.png", "t", 25.0) is None
    assert not (tmp_path / "p.png").exists()


@pytest.mark.parametrize("limit", [None, math.inf])
def test_no_limit_line_without_a_finite_limit(limit):
    fig = progress_figure(_frame(), "t", limit)
    assert len(fig.axes[1].lines) == 2
