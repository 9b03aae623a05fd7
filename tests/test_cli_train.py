"""`rllib train`, `rllib train file` and `rllib evaluate`, end to end (tiny budgets)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

TINY = {
    "cost_limit": 5.0,
    "num_sampled_actions": 8,
    "actor_hiddens": [32, 32],
    "critic_hiddens": [32, 32],
    "train_batch_size_per_learner": 64,
    "num_steps_sampled_before_learning_starts": 200,
    "min_sample_timesteps_per_iteration": 300,
    "num_env_runners": 0,
}


def rllib(*args, timeout=600):
    out = subprocess.run(
        [sys.executable, "-m", "rllib_ext.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return out


def _checkpoint_from(stdout: str) -> Path:
    m = re.search(r"checkpoint (\S+checkpoint_\d+)", stdout)
    assert m, stdout
    return Path(m.group(1))


@pytest.mark.slow
def test_train_then_evaluate(tmp_path):
    out = rllib(
        "train",
        "--algo",
        "CVPO",
        "--env",
        "cvpo/PointHazard-v0",
        "--config",
        json.dumps(TINY),
        "--stop",
        '{"training_iteration": 2}',
        "--storage-path",
        str(tmp_path),
        "--experiment-name",
        "cli-test",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # one progress line per iteration, with cost vs limit
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("iter ")]
    assert len(lines) == 2, out.stdout
    assert re.search(r"\| cost \d+\.\d+ \(limit 5(\.0)?\)", lines[-1]), lines[-1]
    ckpt = _checkpoint_from(out.stdout)
    assert (ckpt / "learner_group").is_dir()
    png = next((tmp_path / "cli-test").glob("*/progress.png"))
    assert png.read_bytes()[:4] == b"\x89PNG"

    ev = rllib("evaluate", str(ckpt), "--episodes", "3", "--out", str(tmp_path / "ev.json"))
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert "3 episodes on cvpo/PointHazard-v0" in ev.stdout
    res = json.loads((tmp_path / "ev.json").read_text())
    assert res["episodes"] == 3 and res["cost_limit"] == 5.0
    assert res["cost_mean"] >= 0 and 0 <= res["violation_rate"] <= 1
    assert res["episode_length_mean"] == 100
    # the per-episode lists are the ones the summary was computed from
    costs, returns = res["episode_costs"], res["episode_returns"]
    assert len(costs) == len(returns) == 3
    assert res["cost_mean"] == pytest.approx(sum(costs) / 3)
    assert res["reward_mean"] == pytest.approx(sum(returns) / 3)
    assert res["cost_max"] == max(costs) and res["cost_median"] == sorted(costs)[1]
    assert res["violation_rate"] == pytest.approx(sum(c > 5.0 for c in costs) / 3)


@pytest.mark.slow
def test_train_file_with_grid_search(tmp_path):
    cfg = dict(TINY)
    cfg["cost_limit"] = {"grid_search": [2.0, 20.0]}
    exp = {
        "cli-file-test": {
            "run": "CVPO",
            "env": "cvpo/PointHazard-v0",
            "stop": {"training_iteration": 1},
            "config": cfg,
        }
    }
    f = tmp_path / "exp.yaml"
    import yaml

    f.write_text(yaml.safe_dump(exp))
    out = rllib("train", "file", str(f), "--storage-path", str(tmp_path / "res"))
    assert out.returncode == 0, out.stderr[-3000:]
    trials = list((tmp_path / "res" / "cli-file-test").glob("*/params.json"))
    limits = sorted(json.loads(p.read_text())["cost_limit"] for p in trials)
    assert limits == [2.0, 20.0]


@pytest.mark.slow
def test_builtin_ppo_trains_with_cost_metrics(tmp_path):
    cfg = {
        "num_env_runners": 0,
        "train_batch_size_per_learner": 200,
        "minibatch_size": 100,
        "num_epochs": 1,
    }
    out = rllib(
        "train",
        "--algo",
        "PPO",
        "--env",
        "cvpo/PointHazard-v0",
        "--config",
        json.dumps(cfg),
        "--stop",
        '{"training_iteration": 1}',
        "--storage-path",
        str(tmp_path),
        "--no-checkpoint-at-end",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("iter ")][-1]
    assert re.search(r"cost \d+\.\d+", line), line
