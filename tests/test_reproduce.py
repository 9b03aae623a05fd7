"""`make reproduce`: one short run end to end writes a record, RESULTS.md and a curve PNG."""

import json

import pytest

from rllib_ext import reproduce


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    d = tmp_path / "results"
    monkeypatch.setattr(reproduce, "RESULTS_DIR", d)
    return d


def test_local_config_keeps_the_tuned_hyperparameters_and_replaces_placement():
    cfg = reproduce.local_config("CVPO", "SafetyPointGoal1-v0", seed=3, steps=500_000, runners=1)
    assert cfg.env == "SafetyPointGoal1-v0"
    assert (cfg.cost_limit, cfg.gamma, cfg.n_step, cfg.num_envs_per_env_runner) == (
        25.0,
        0.99,
        3,
        4,
    )
    assert (cfg.num_env_runners, cfg.num_learners, cfg.num_gpus_per_learner, cfg.seed) == (
        1,
        0,
        0,
        3,
    )
    assert cfg.evaluation_interval == 20  # 500k steps / (25 points x 1000 steps per iteration)
    assert cfg.evaluation_config["explore"] is False
    assert cfg.evaluation_duration == reproduce.EVAL_EPISODES


def test_unknown_task_is_refused_with_the_list():
    with pytest.raises(SystemExit, match="SafetyPointGoal1-v0"):
        reproduce.tuned_example("CVPO", "SafetyPointGoal9-v0")


@pytest.mark.slow
def test_a_short_run_records_a_row_and_curves(ray_local, results_dir, tmp_path):
    record = reproduce.train(
        "CVPO", "cvpo/PointHazard-v0", seed=0, steps=3000, runners=0, out_dir=tmp_path / "run"
    )
    assert record["env_steps"] >= 3000 and record["budget"] == 3000
    assert record["cost_limit"] == 5.0
    saved = json.loads((results_dir / "cvpo_PointHazard-v0" / "CVPO-seed0.json").read_text())
    assert saved["final_return"] == record["final_return"]
    evals = [p for p in saved["curve"] if p.get("eval_return") is not None]
    assert len(evals) == len(saved["curve"])  # 3000 steps -> evaluation every iteration
    assert [p["env_steps"] for p in saved["curve"]] == sorted(
        p["env_steps"] for p in saved["curve"]
    )
    # best feasible: present iff some evaluation met the limit
    feasible = any(p["eval_cost"] <= 5.0 for p in evals)
    assert (saved["best_feasible_return"] is not None) == feasible
    assert (tmp_path / "run" / "final").is_dir()
    assert saved["training_cost_rate"] == pytest.approx(
        saved["training_cumulative_cost"] / saved["env_steps"]
    )

    md = reproduce.write_results(results_dir, tmp_path / "RESULTS.md")
    text = md.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| cvpo/PointHazard-v0"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:4] == ["CVPO", "0", f"{record['env_steps']:,}"]
    assert float(cells[5]) == pytest.approx(record["final_return"], abs=0.006)
    assert (results_dir / "cvpo_PointHazard-v0.png").stat().st_size > 10_000
    assert "final cost" in text and ("**met**" in text or "**MISSED**" in text)


def test_results_table_and_targets_from_records(results_dir, tmp_path):
    curve = [
        {"env_steps": 1000.0 * i, "eval_return": float(i), "eval_cost": 30.0 - i} for i in (1, 2, 3)
    ]
    for seed, (ret, cost) in enumerate([(21.0, 24.0), (19.0, 26.5)]):
        rec = {
            "task": "SafetyPointGoal1-v0",
            "algo": "CVPO",
            "seed": seed,
            "env_steps": 3000,
            "minutes": 1.5,
            "cost_limit": 25.0,
            "final_return": ret,
            "final_cost": cost,
            "final_cost_se": 1.0,
            "best_feasible_return": None,
            "best_feasible_cost": None,
            "training_cost_rate": 0.02,
            "commit": "abc",
            "curve": curve,
        }
        (results_dir / "SafetyPointGoal1-v0").mkdir(parents=True, exist_ok=True)
        (results_dir / "SafetyPointGoal1-v0" / f"CVPO-seed{seed}.json").write_text(json.dumps(rec))
    text = reproduce.write_results(results_dir, tmp_path / "RESULTS.md").read_text()
    assert "final cost 24.00 (standard error 1.00) vs limit 25: **met**" in text
    assert "final cost 26.50 (standard error 1.00) vs limit 25: **MISSED**" in text
    assert "final return 21.00 vs target 20: **met**" in text
    assert "final return 19.00 vs target 20: **MISSED**" in text
    assert text.count("| SafetyPointGoal1-v0 | CVPO |") == 2
    assert (results_dir / "SafetyPointGoal1-v0.png").exists()


def test_readme_block_is_rewritten_from_the_records(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:start (old) -->\nstale\n<!-- results:end -->\nafter\n")
    recs = [
        {
            "task": "T",
            "algo": "CVPO",
            "seed": s,
            "env_steps": 500_000,
            "final_return": r,
            "final_cost": c,
            "training_cost_rate": 0.01,
        }
        for s, (r, c) in enumerate([(20.0, 24.0), (22.0, 20.0)])
    ]
    assert reproduce.update_readme(recs, readme)
    text = readme.read_text()
    assert "stale" not in text and text.startswith("intro\n") and text.endswith("after\n")
    assert (
        "| T | CVPO | 2 | 500,000 | 21.00 (20.00..22.00) | 22.00 (20.00..24.00) "
        "| 0.0100 (0.0100..0.0100) |" in text
    )
    assert not reproduce.update_readme(recs, tmp_path / "missing.md")


def test_comparison_states_limits_and_differences_from_the_records():
    def rec(algo, seed, ret, cost, steps=500_000, task="T"):
        return {
            "task": task,
            "algo": algo,
            "seed": seed,
            "env_steps": steps,
            "cost_limit": 25.0,
            "final_return": ret,
            "final_cost": cost,
        }

    records = [
        rec("CVPO", 0, 10.0, 20.0),
        rec("CVPO", 1, 12.0, 30.0),
        rec("SACLag", 0, 4.0, 60.0),
        rec("CVPO", 0, 1.0, 1.0, task="U"),
        rec("SACLag", 0, 9.0, 99.0, steps=10),
    ]
    lines = reproduce.comparison_lines(records)
    assert lines == [
        "- T, 500,000 env steps, final return and cost (mean over seeds): CVPO (2 seeds) 11.00 "
        "at cost 25.00; SACLag (1 seed) 4.00 at cost 60.00 (limit 25); within the limit: CVPO; "
        "CVPO vs SACLag: return +7.00, cost -35.00 (on the seed(s) both ran, 0: CVPO 10.00 at "
        "cost 20.00, SACLag 4.00 at cost 60.00)."
    ]  # task U has no second algorithm at CVPO's budget: no line
    worse = reproduce.comparison_lines([rec("CVPO", 0, 1.0, 40.0), rec("SACLag", 0, 5.0, 30.0)])
    assert "neither meets the limit; CVPO vs SACLag: return -4.00, cost +10.00." in worse[0]
