"""Cost-limit sweeps end to end: Tune runs the grid, `rllib report` tabulates it.

Both entry points users have are run as users run them, in a subprocess with a
tiny budget on the tiny hazard task (3 iterations of 200 env steps per trial):

* the CLI: ``rllib train file tuned_examples/cvpo/point_hazard_sweep.yaml``
  followed by ``rllib report``;
* the Python example ``tuned_examples/cvpo/cost_limit_sweep.py`` (Tuner("CVPO")
  plus rllib_ext.cli.report.write_report).

The report must have exactly one row per cost limit, also for an experiment
that was interrupted (trials with fewer rows, or none yet).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SWEEP_YAML = ROOT / "tuned_examples" / "cvpo" / "point_hazard_sweep.yaml"
EXAMPLE = ROOT / "tuned_examples" / "cvpo" / "cost_limit_sweep.py"
LIMITS = [2.0, 10.0]  # the grid of point_hazard_sweep.yaml
ITERATIONS = 3  # 600 env steps at 200 per iteration
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.slow


def _rllib() -> list:
    """The installed console script (next to this Python), else the module."""
    script = Path(sys.executable).with_name("rllib")
    return [str(script)] if script.exists() else [sys.executable, "-m", "rllib_ext.cli"]


def _run(cmd, timeout=240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # always a local Ray
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    return proc


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


def _report_rows(exp_dir: Path) -> list:
    with open(exp_dir / "report.csv", newline="") as f:
        return list(csv.DictReader(f))


def check_report(exp_dir: Path, limits=LIMITS, trials_per_limit=1, iterations=ITERATIONS):
    """report.csv / .md / .png exist, with exactly one row per cost limit."""
    rows = _report_rows(exp_dir)
    assert [float(r["cost_limit"]) for r in rows] == limits
    assert [int(r["trials"]) for r in rows] == [trials_per_limit] * len(limits)
    assert [int(r["iterations"]) for r in rows] == [iterations] * len(limits)
    for r in rows:
        assert float(r["reward_mean"]) == float(r["reward_mean"])  # a number, not nan
        assert float(r["cost_mean"]) >= 0.0
    md = (exp_dir / "report.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ") and "cost limit" not in line]
    assert len(table) == len(limits), md
    for lim, line in zip(limits, table):
        assert line.startswith(f"| {lim:g} | {trials_per_limit} | {iterations} |"), line
    png = (exp_dir / "report.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 10_000
    return rows, md


@pytest.fixture(scope="module")
def cli_sweep(tmp_path_factory):
    """Runs the tiny sweep YAML once through the CLI; returns the experiment folder."""
    storage = tmp_path_factory.mktemp("cli_sweep")
    proc = _ok(_run([*_rllib(), "train", "file", SWEEP_YAML, "--storage-path", storage]))
    (name,) = yaml.safe_load(SWEEP_YAML.read_text())
    exp_dir = storage / name
    assert exp_dir.is_dir(), proc.stdout[-2000:]
    return exp_dir, proc


def test_sweep_yaml_is_a_tiny_two_limit_grid():
    (spec,) = yaml.safe_load(SWEEP_YAML.read_text()).values()
    assert spec["run"] == "CVPO" and spec["env"] == "cvpo/PointHazard-v0"
    assert spec["config"]["cost_limit"] == {"grid_search": LIMITS}
    assert spec["stop"] == {"num_env_steps_sampled_lifetime": 600}


def test_cli_sweep_then_report(cli_sweep):
    exp_dir, train = cli_sweep
    trial_dirs = sorted(p.parent for p in exp_dir.glob("*/params.json"))
    assert len(trial_dirs) == len(LIMITS)
    limits = sorted(json.loads((d / "params.json").read_text())["cost_limit"] for d in trial_dirs)
    assert limits == LIMITS
    # the CLI prints one line per iteration and trial; each trial reached the stop
    last_lines = [
        line for line in train.stdout.splitlines() if f"iter {ITERATIONS:>4} | steps 600 |" in line
    ]
    assert sorted(float(line.split("(limit ")[1].split(")")[0]) for line in last_lines) == LIMITS

    # each trial's learner works with its own limit: the per-step threshold
    # C (1 - gamma^T) / ((1 - gamma) T) of the tiny task (T = 100, gamma = 0.99), times
    # the measured cost-timing factor that the trial reports (docs/constraint.md)
    for d in trial_dirs:
        limit = json.loads((d / "params.json").read_text())["cost_limit"]
        with open(d / "progress.csv", newline="") as f:
            last = list(csv.DictReader(f))[-1]
        threshold = float(last["learners/default_policy/step_threshold_cost"])
        timing = float(last["cvpo/threshold_timing_cost"])
        scale = float(last["cvpo/threshold_scale_cost"])
        assert 0.0 < timing <= 2.5 and 0.05 <= scale <= 1.0
        # the learner's metric is the mean over the iteration's updates, during which
        # finished episodes moved the threshold; the last value is timing * scale * formula
        expected = limit * (1 - 0.99**100) / (0.01 * 100) * timing * scale
        assert 0.5 * expected <= threshold <= 2.0 * expected

    rep = _ok(_run([*_rllib(), "report", exp_dir]))
    for kind in ("csv", "markdown", "png"):
        assert f"{kind}: {exp_dir}" in rep.stdout
    rows, md = check_report(exp_dir)
    print(md)  # visible with -s: the sweep's table


def test_python_example_sweep_and_report(tmp_path):
    proc = _ok(
        _run(
            [
                sys.executable,
                EXAMPLE,
                "--env",
                "cvpo/PointHazard-v0",
                "--limits",
                *LIMITS,
                "--seeds",
                "0",
                "--stop-steps",
                "600",
                "--smoke",
                "--experiment-name",
                "py-sweep",
                "--storage-path",
                tmp_path,
            ]
        )
    )
    exp_dir = tmp_path / "py-sweep"
    check_report(exp_dir)
    assert "| cost limit | trials |" in proc.stdout  # the table is printed too


def _truncate_progress(trial_dir: Path, keep_rows: int) -> None:
    """What Tune leaves of a trial interrupted after ``keep_rows`` iterations: both of
    its per-iteration files (the report reads result.json, else progress.csv)."""
    progress = trial_dir / "progress.csv"
    lines = progress.read_text().splitlines(keepends=True)
    progress.write_text("".join(lines[: 1 + keep_rows]))
    result = trial_dir / "result.json"
    lines = result.read_text().splitlines(keepends=True)
    result.write_text("".join(lines[:keep_rows]))


def test_report_on_an_interrupted_experiment(cli_sweep, tmp_path):
    src, _ = cli_sweep
    exp_dir = tmp_path / "interrupted"
    shutil.copytree(src, exp_dir, ignore=shutil.ignore_patterns("report.*"))
    trials = {
        json.loads((p.parent / "params.json").read_text())["cost_limit"]: p.parent
        for p in exp_dir.glob("*/params.json")
    }
    # limit 2 stopped after its first iteration; limit 10 finished
    _truncate_progress(trials[2.0], keep_rows=1)
    # a third trial started (params written) but reported nothing: header only ...
    header_only = exp_dir / "CVPO_header_only"
    shutil.copytree(trials[10.0], header_only)
    (header_only / "params.json").write_text(json.dumps({"cost_limit": 25.0, "seed": 0}))
    _truncate_progress(header_only, keep_rows=0)
    # ... and a fourth one whose progress.csv is still empty
    empty = exp_dir / "CVPO_empty"
    empty.mkdir()
    (empty / "params.json").write_text(json.dumps({"cost_limit": 50.0, "seed": 0}))
    (empty / "progress.csv").write_text("")

    _ok(_run([*_rllib(), "report", exp_dir]))
    rows = _report_rows(exp_dir)
    # one row per limit that has at least one iteration; the others are left out
    assert [(float(r["cost_limit"]), int(r["trials"]), int(r["iterations"])) for r in rows] == [
        (2.0, 1, 1),
        (10.0, 1, ITERATIONS),
    ]
    png = (exp_dir / "report.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 10_000


def test_report_before_any_iteration_is_a_clear_error(cli_sweep, tmp_path):
    src, _ = cli_sweep
    exp_dir = tmp_path / "just_started"
    shutil.copytree(src, exp_dir, ignore=shutil.ignore_patterns("report.*"))
    for progress in [*exp_dir.glob("*/progress.csv"), *exp_dir.glob("*/result.json")]:
        progress.write_text("")
    proc = _run([*_rllib(), "report", exp_dir])
    assert proc.returncode == 2, proc.stderr
    assert "no trial has reported an iteration yet" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (exp_dir / "report.csv").exists()
