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
    no_eval = {"eval_cost": None, "eval_return": None, "evaluations": 0}
    assert got["windows"] == [
        {"env_steps": 2000, "train_cost": 20.0, "train_return": 2.0, **no_eval},
        {"env_steps": 4000, "train_cost": 50.0, "train_return": 5.0, **no_eval},
    ]
    assert got["cost_rate"] == 0.03
    log = tmp_path / "progress.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert mod.main(["--windows", str(log), "--window-steps", "2000", "--upto", "4000"]) == 0
    printed = json.loads(capsys.readouterr().out.strip())
    assert printed["windows"][0]["train_cost"] == 20.0 and printed["log"] == str(log)


def test_evaluations_count_once_although_the_log_repeats_them():
    # the progress log carries the last evaluation's metrics on every later iteration
    rows = [_row(1000, 10.0, 1.0, 0.01) for _ in range(5)]
    for i, r in enumerate(rows):
        r["train/num_env_steps_sampled_lifetime"] = 1000 * (i + 1)
    rows[0].update(
        {
            "eval/num_env_steps_sampled_lifetime": 500,
            "eval/episode_cost_mean": 40.0,
            "eval/episode_return_mean": 2.0,
        }
    )
    rows[1].update(
        {
            "eval/num_env_steps_sampled_lifetime": 500,
            "eval/episode_cost_mean": 40.0,
            "eval/episode_return_mean": 2.0,
        }
    )  # repeated, not a new evaluation
    rows[2].update(
        {
            "eval/num_env_steps_sampled_lifetime": 1000,
            "eval/episode_cost_mean": 10.0,
            "eval/episode_return_mean": 8.0,
        }
    )
    rows[3].update(
        {
            "eval/num_env_steps_sampled_lifetime": 1000,
            "eval/episode_cost_mean": 10.0,
            "eval/episode_return_mean": 8.0,
        }
    )
    # between evaluations the logged counter can fall back to one evaluation's steps
    rows[4].update(
        {
            "eval/num_env_steps_sampled_lifetime": 500,
            "eval/episode_cost_mean": 10.0,
            "eval/episode_return_mean": 8.0,
        }
    )
    got = _module().training_windows(rows, window=5000, upto=5000)["windows"][0]
    assert got["evaluations"] == 2
    assert got["eval_cost"] == 25.0 and got["eval_return"] == 5.0  # not (40*2+10*2)/4 weighted


def test_a_reproduce_record_reads_like_its_progress_log(tmp_path, capsys):
    record = {
        "training_cost_rate": 0.05,
        "curve": [
            {"env_steps": 1000.0, "train_return": None, "train_cost": None},
            {
                "env_steps": 2000.0,
                "train_return": 1.0,
                "train_cost": 30.0,
                "eval_return": 4.0,
                "eval_cost": 12.0,
            },
            {"env_steps": 3000.0, "train_return": 3.0, "train_cost": 50.0},
            {
                "env_steps": 4000.0,
                "train_return": 5.0,
                "train_cost": 70.0,
                "eval_return": 6.0,
                "eval_cost": 20.0,
            },
        ],
    }
    path = tmp_path / "CVPO-seed0.json"
    path.write_text(json.dumps(record))
    mod = _module()
    assert mod.main(["--windows", str(path), "--window-steps", "2000", "--upto", "4000"]) == 0
    printed = json.loads(capsys.readouterr().out.strip())
    assert printed["windows"] == [
        {
            "env_steps": 2000,
            "train_cost": 30.0,
            "train_return": 1.0,
            "eval_cost": 12.0,
            "eval_return": 4.0,
            "evaluations": 1,
        },
        {
            "env_steps": 4000,
            "train_cost": 60.0,
            "train_return": 4.0,
            "eval_cost": 20.0,
            "eval_return": 6.0,
            "evaluations": 1,
        },
    ]
    assert printed["cost_rate"] == 0.05  # the record's, at the end of the run


def test_write_a_table_and_read_a_record_as_committed(tmp_path, monkeypatch, capsys):
    import subprocess

    def record(cost):
        return {
            "training_cost_rate": cost / 1000,
            "curve": [
                {
                    "env_steps": 1000.0,
                    "train_return": 1.0,
                    "train_cost": cost,
                    "eval_return": 2.0,
                    "eval_cost": cost / 2,
                },
            ],
        }

    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.chdir(repo)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], check=True)
    Path("r.json").write_text(json.dumps(record(40.0)))
    subprocess.run(git + ["add", "r.json"], check=True)
    subprocess.run(git + ["commit", "-qm", "old row"], check=True)
    Path("r.json").write_text(json.dumps(record(20.0)))  # a later run replaced the row
    mod = _module()
    table = tmp_path / "windows.md"
    argv = [
        "--windows",
        "r.json",
        "HEAD:r.json",
        "--window-steps",
        "1000",
        "--upto",
        "1000",
        "--write",
        str(table),
    ]
    assert mod.main(argv) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [p["windows"][0]["train_cost"] for p in printed] == [20.0, 40.0]
    assert [p["cost_rate"] for p in printed] == [0.02, 0.04]
    text = table.read_text()
    assert "| r.json | 1,000 | 20.00 | 1.00 | 10.00 | 2.00 | 1 |" in text
    assert "| HEAD:r.json | 1,000 | 40.00 | 1.00 | 20.00 | 2.00 | 1 |" in text
    assert "| HEAD:r.json | 0.0400 |" in text
    with __import__("pytest").raises(SystemExit, match="cannot read nosuchcommit:r.json"):
        mod.main(["--windows", "nosuchcommit:r.json"])
