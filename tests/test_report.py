"""`rllib report` from Tune-style result files (synthetic trials: no training).

Each fake trial folder holds a params.json (the trial's config) and a
progress.csv whose episode metrics are NaN (empty) on iterations where no
episode ended, as RLlib writes them.
"""

import csv
import json
import math

import numpy as np
import pytest

from rllib_ext.cli.report import (
    group_trials,
    plot_report,
    read_trials,
    summarize,
    varying_params,
    write_report,
)

STEPS = "env_runners/num_env_steps_sampled_lifetime"
RET = "env_runners/episode_return_mean"
COST = "env_runners/episode_cost_mean"
VIOL = "env_runners/cost_violation_rate"
EVAL_RET = "evaluation/env_runners/episode_return_mean"
EVAL_COST = "evaluation/env_runners/episode_cost_mean"


def _trial(root, name, params, returns, costs, steps_per_iter=200, evals=None):
    """A trial folder; None in returns/costs is an iteration without a finished episode."""
    d = root / name
    d.mkdir(parents=True)
    (d / "params.json").write_text(json.dumps(params))
    limit = params.get("cost_limit", math.inf)
    cols = ["training_iteration", STEPS, RET, COST, VIOL] + ([EVAL_RET, EVAL_COST] if evals else [])
    with open(d / "progress.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for i, (r, c) in enumerate(zip(returns, costs)):
            row = [
                i + 1,
                (i + 1) * steps_per_iter,
                "" if r is None else r,
                "" if c is None else c,
                "" if c is None else float(c > limit),
            ]
            if evals:
                e = evals.get(i + 1)
                row += ["", ""] if e is None else list(e)
            w.writerow(row)
    return d


def test_report_groups_by_limit_with_mean_and_spread(tmp_path):
    base = {"env": "x", "lr": 0.001}
    _trial(tmp_path, "t0", {**base, "cost_limit": 10.0, "seed": 0}, [1, 2, 3, 4], [30, 20, 9, 8])
    _trial(tmp_path, "t1", {**base, "cost_limit": 10.0, "seed": 1}, [1, 2, 5, 6], [30, 20, 11, 12])
    _trial(tmp_path, "t2", {**base, "cost_limit": 50.0, "seed": 0}, [5, 6, 7, 9], [60, 55, 40, 45])
    # an interrupted trial with no iterations yet is ignored
    (tmp_path / "t3").mkdir()
    (tmp_path / "t3" / "params.json").write_text(json.dumps({**base, "cost_limit": 25.0}))
    rows = summarize(read_trials(tmp_path), last_n=2)
    # only cost_limit varies (seed is ignored; env and lr are the same everywhere)
    assert [r["cost_limit"] for r in rows] == [10.0, 50.0]
    assert "lr" not in rows[0] and "seed" not in rows[0] and "env" not in rows[0]
    r10 = rows[0]
    assert r10["trials"] == 2 and r10["iterations"] == 4 and r10["env_steps"] == 800
    assert r10["reward_mean"] == pytest.approx(np.mean([3.5, 5.5]))
    assert (r10["reward_min"], r10["reward_max"]) == (3.5, 5.5)
    assert r10["reward_std"] == pytest.approx(1.0)
    assert r10["cost_mean"] == pytest.approx(np.mean([8.5, 11.5]))
    assert (r10["cost_min"], r10["cost_max"]) == (8.5, 11.5)
    assert r10["violation_rate_mean"] == pytest.approx(0.5)
    assert "eval_return_mean" not in r10  # no evaluation columns in these trials
    out = write_report(tmp_path, last_n=2)
    with open(out["csv"]) as f:
        csv_rows = list(csv.DictReader(f))
    assert [float(r["cost_limit"]) for r in csv_rows] == [10.0, 50.0]
    assert [int(r["trials"]) for r in csv_rows] == [2, 1]
    md = open(out["markdown"]).read()
    assert "| cost limit | trials | iterations | env steps | reward | cost | violation rate |" in md
    assert (
        "| 10 | 2 | 4 | 800 | 4.50 (3.50..5.50) | 10.00 (8.50..11.50) | 0.50 (0.00..1.00) |" in md
    )
    assert "| 50 | 1 | 4 | 800 | 8.00 | 42.50 | 0.00 |" in md
    png = open(out["png"], "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_report_groups_by_every_varying_parameter(tmp_path):
    """lr and a nested env_config value vary too: one group per combination."""

    def params(limit, lr, size, seed):
        return {
            "cost_limit": limit,
            "lr": lr,
            "seed": seed,
            "env": "x",
            "env_config": {"size": size, "fixed": 1},
            "actor_hiddens": [32, 32],
        }

    _trial(tmp_path, "a0", params(5.0, 0.01, 2, 0), [1, 2], [3, 4])
    _trial(tmp_path, "a1", params(5.0, 0.01, 2, 1), [3, 4], [5, 6])
    _trial(tmp_path, "b0", params(5.0, 0.001, 2, 0), [10, 20], [1, 1])
    _trial(tmp_path, "c0", params(5.0, 0.001, 3, 0), [7, 7], [2, 2])
    trials = read_trials(tmp_path)
    assert trials[0]["params"]["env_config/size"] == 2
    assert trials[0]["params"]["actor_hiddens"] == (32, 32)
    assert varying_params(trials) == ["env_config/size", "lr"]
    keys, groups = group_trials(trials)
    assert keys == ["env_config/size", "lr"]
    assert [(values, sorted(t["trial"] for t in g)) for values, g in groups] == [
        ((2, 0.001), ["b0"]),
        ((2, 0.01), ["a0", "a1"]),
        ((3, 0.001), ["c0"]),
    ]
    rows = summarize(trials, last_n=1)
    assert [(r["env_config/size"], r["lr"], r["trials"]) for r in rows] == [
        (2, 0.001, 1),
        (2, 0.01, 2),
        (3, 0.001, 1),
    ]
    assert rows[1]["reward_mean"] == pytest.approx(3.0)  # last values 2 and 4
    assert (rows[1]["reward_min"], rows[1]["reward_max"]) == (2.0, 4.0)
    assert "cost_limit" not in rows[0]  # the same in every trial
    md = open(write_report(tmp_path, last_n=1)["markdown"]).read()
    assert "| env config/size | lr | trials |" in md
    assert "| 2 | 0.01 | 2 | 2 | 400 | 3.00 (2.00..4.00) | 5.00 (4.00..6.00) |" in md
    assert "Cost limit 5 in all trials." in md


def test_report_plots_env_steps_with_finite_points_only(tmp_path):
    """Episodes end every few iterations: NaN gaps must not blank the curves."""
    nan = None
    # seed 0 and 1 of one config: episode metrics on iterations 2, 4, 6 only
    _trial(
        tmp_path,
        "s0",
        {"cost_limit": 5.0, "seed": 0},
        [nan, 1.0, nan, 3.0, nan, 5.0],
        [nan, 10.0, nan, 8.0, nan, 6.0],
    )
    _trial(
        tmp_path,
        "s1",
        {"cost_limit": 5.0, "seed": 1},
        [nan, 3.0, nan, 5.0, nan, 7.0],
        [nan, 12.0, nan, 6.0, nan, 4.0],
    )
    # another config with a single finite point
    _trial(tmp_path, "t0", {"cost_limit": 20.0, "seed": 0}, [nan, nan, 2.0], [nan, nan, 30.0])
    trials = read_trials(tmp_path)
    fig = plot_report(trials, last_n=1)
    try:
        ax_ret, ax_cost = fig.axes[1], fig.axes[2]
        assert ax_ret.get_xlabel() == "env steps"
        curves = [ln for ln in ax_ret.get_lines() if len(ln.get_xdata()) > 0]
        assert len(curves) == 2
        x0, y0 = np.asarray(curves[0].get_xdata(), float), np.asarray(curves[0].get_ydata(), float)
        # x in env steps (200 per iteration), only the finite iterations, mean over the seeds
        assert x0.tolist() == [400.0, 800.0, 1200.0]
        assert y0.tolist() == [2.0, 4.0, 6.0]
        x1, y1 = np.asarray(curves[1].get_xdata(), float), np.asarray(curves[1].get_ydata(), float)
        assert x1.tolist() == [600.0] and y1.tolist() == [2.0]
        assert curves[1].get_marker() not in (None, "None", "")  # a single point stays visible
        for ln in ax_ret.get_lines() + ax_cost.get_lines():
            assert np.all(np.isfinite(np.asarray(ln.get_ydata(), float)))
        # the min-max band of the two seeds: PolyCollection from 1 to 3 at 400 steps
        (band,) = ax_ret.collections[:1]
        verts = band.get_paths()[0].vertices
        at400 = verts[np.isclose(verts[:, 0], 400.0), 1]
        assert sorted(set(at400.round(6))) == [1.0, 3.0]
        cost_means = [
            np.asarray(ln.get_ydata(), float).tolist()
            for ln in ax_cost.get_lines()
            if len(ln.get_xdata()) == 3
        ]
        assert cost_means == [[11.0, 7.0, 5.0]]
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    rows = summarize(trials, last_n=2)
    assert rows[0]["reward_mean"] == pytest.approx(np.mean([4.0, 6.0]))  # last 2 finite values
    assert rows[1]["reward_mean"] == pytest.approx(2.0)


def test_report_shows_final_evaluation(tmp_path):
    _trial(
        tmp_path,
        "e0",
        {"cost_limit": 5.0, "seed": 0},
        [1, 2, 3, 4],
        [9, 8, 7, 6],
        evals={2: (10.0, 3.0), 4: (12.0, 2.0)},
    )
    _trial(
        tmp_path,
        "e1",
        {"cost_limit": 5.0, "seed": 1},
        [1, 2, 3, 4],
        [9, 8, 7, 6],
        evals={2: (11.0, 4.0), 4: (16.0, 6.0)},
    )
    _trial(
        tmp_path,
        "f0",
        {"cost_limit": 9.0, "seed": 0},
        [1, 2, 3, 4],
        [9, 8, 7, 6],
        evals={3: (20.0, 1.0)},
    )
    rows = summarize(read_trials(tmp_path), last_n=1)
    assert rows[0]["eval_return_mean"] == pytest.approx(14.0)
    assert (rows[0]["eval_return_min"], rows[0]["eval_return_max"]) == (12.0, 16.0)
    assert rows[0]["eval_cost_mean"] == pytest.approx(4.0)
    assert rows[1]["eval_return_mean"] == 20.0 and rows[1]["eval_cost_mean"] == 1.0
    out = write_report(tmp_path, last_n=1)
    md = open(out["markdown"]).read()
    assert "| eval return | eval cost |" in md
    assert "| 14.00 (12.00..16.00) | 4.00 (2.00..6.00) |" in md
    assert "| 20.00 | 1.00 |" in md
    with open(out["csv"]) as f:
        csv_rows = list(csv.DictReader(f))
    assert [float(r["eval_return_mean"]) for r in csv_rows] == [14.0, 20.0]


def test_report_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_trials(tmp_path / "nope")
    with pytest.raises(ValueError, match="no Tune trials"):
        read_trials(tmp_path)


def test_episode_metrics_that_appear_after_the_first_iteration_are_read(tmp_path):
    """Tune fixes progress.csv's columns at the first iteration; the first episode of a
    1000-step task ends later, so its metrics exist only in result.json (make train)."""
    trial = tmp_path / "exp" / "t0"
    trial.mkdir(parents=True)
    (trial / "params.json").write_text(json.dumps({"cost_limit": 25.0, "seed": 0}))
    results = []
    for it in range(1, 9):
        er = {"num_env_steps_sampled_lifetime": 1000 * it}
        if it % 4 == 0:
            er.update(episode_return_mean=float(it), episode_cost_mean=10.0 * it)
        results.append({"training_iteration": it, "env_runners": er})
    (trial / "result.json").write_text("\n".join(json.dumps(r) for r in results) + "\n")
    with open(trial / "progress.csv", "w", newline="") as f:  # what Tune writes: no episode columns
        w = csv.writer(f)
        w.writerow(["training_iteration", "env_runners/num_env_steps_sampled_lifetime"])
        w.writerows(
            [
                [r["training_iteration"], r["env_runners"]["num_env_steps_sampled_lifetime"]]
                for r in results
            ]
        )
    (t,) = read_trials(tmp_path / "exp")
    assert np.isfinite(t["return"]).sum() == 2
    assert t["return"][np.isfinite(t["return"])].tolist() == [4.0, 8.0]
    assert t["cost"][np.isfinite(t["cost"])].tolist() == [40.0, 80.0]
    assert t["steps"].tolist() == [1000.0 * i for i in range(1, 9)]
