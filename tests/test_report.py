"""Sweep report from Tune-style result files (synthetic trials: no training)."""

import csv
import json

import numpy as np
import pytest

from rllib_ext.report import read_trials, summarize, write_report


def _trial(root, name, limit, seed, returns, costs):
    d = root / name
    d.mkdir(parents=True)
    (d / "params.json").write_text(json.dumps({"cost_limit": limit, "seed": seed, "env": "x"}))
    with open(d / "progress.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["training_iteration", "env_runners/episode_return_mean",
                    "env_runners/episode_cost_mean", "env_runners/cost_violation_rate"])
        for i, (r, c) in enumerate(zip(returns, costs)):
            w.writerow([i + 1, r, c, float(c > limit)])


def test_report_groups_by_limit_with_mean_and_spread(tmp_path):
    _trial(tmp_path, "t0", 10.0, 0, [1, 2, 3, 4], [30, 20, 9, 8])
    _trial(tmp_path, "t1", 10.0, 1, [1, 2, 5, 6], [30, 20, 11, 12])
    _trial(tmp_path, "t2", 50.0, 0, [5, 6, 7, 9], [60, 55, 40, 45])
    # an interrupted trial with no iterations yet is ignored
    (tmp_path / "t3").mkdir()
    (tmp_path / "t3" / "params.json").write_text(json.dumps({"cost_limit": 25.0}))
    rows = summarize(read_trials(tmp_path), last_n=2)
    assert [r["cost_limit"] for r in rows] == [10.0, 50.0]
    r10 = rows[0]
    assert r10["trials"] == 2
    assert r10["reward_mean"] == pytest.approx(np.mean([3.5, 5.5]))
    assert r10["reward_std"] == pytest.approx(1.0)
    assert r10["cost_mean"] == pytest.approx(np.mean([8.5, 11.5]))
    assert r10["violation_rate_mean"] == pytest.approx(0.5)
    out = write_report(tmp_path, last_n=2)
    with open(out["csv"]) as f:
        assert len(list(csv.DictReader(f))) == 2
    md = open(out["markdown"]).read()
    assert "| 10 | 2 | 4 |" in md and "| 50 | 1 | 4 |" in md
    png = open(out["png"], "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_report_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_trials(tmp_path / "nope")
    with pytest.raises(ValueError, match="no Tune trials"):
        read_trials(tmp_path)
