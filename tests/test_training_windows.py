"""benchmarks/constraint_diagnosis.py --windows: per-window means of a progress log."""

import importlib.util
import json
import math
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "constraint_diagnosis.py"


def _module():
    spec = importlib.util.spec_from_file_location("constraint_diagnosis", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(steps, cost, ret, rate):
    return {
        "train/num_env_steps_sampled_lifetime": steps,
        "train/episode_cost_mean": cost,
        "train/episode_return_mean": ret,
        "train/cost_rate": rate,
    }


def test_windows_average_iterations_and_skip_those_without_episodes(tmp_path, capsys):
    rows = [
        _row(1000, 10.0, 1.0, 0.01),
        _row(2000, 30.0, 3.0, 0.02),
        _row(3000, math.nan, math.nan, 0.02),  # no finished episode in this iteration
        _row(4000, 50.0, 5.0, 0.03),
        _row(5000, 70.0, 7.0, 0.04),  # beyond upto: left out
    ]
    mod = _module()
    got = mod.training_windows(rows, window=2000, upto=4000)
    assert got["windows"] == [
        {"env_steps": 2000, "train_cost": 20.0, "train_return": 2.0},
        {"env_steps": 4000, "train_cost": 50.0, "train_return": 5.0},
    ]
    assert got["cost_rate"] == 0.03
    log = tmp_path / "progress.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert mod.main(["--windows", str(log), "--window-steps", "2000", "--upto", "4000"]) == 0
    printed = json.loads(capsys.readouterr().out.strip())
    assert printed["windows"][0]["train_cost"] == 20.0 and printed["log"] == str(log)
