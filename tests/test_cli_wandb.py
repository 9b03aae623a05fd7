"""`rllib train --wandb-project` with the real wandb package, offline (no account needed).

wandb is an optional dependency (``pip install -e '.[wandb]'``); without it this
test is skipped and test_cli_experiment_file.py checks the wiring with a fake
callback and the `pip install wandb` message.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("wandb")

pytestmark = pytest.mark.slow

CONFIG = {
    "num_env_runners": 0,
    "num_steps_sampled_before_learning_starts": 200,
    "min_sample_timesteps_per_iteration": 200,
    "actor_hiddens": [32, 32],
    "critic_hiddens": [32, 32],
    "train_batch_size_per_learner": 64,
    "num_sampled_actions": 8,
}


def test_wandb_offline_run_is_logged(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "WANDB_API_KEY")}
    env.update(WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_SILENT="true")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "rllib_ext.cli",
            "train",
            "--algo",
            "CVPO",
            "--env",
            "cvpo/PointHazard-v0",
            "--config",
            json.dumps(CONFIG),
            "--stop",
            '{"training_iteration": 2}',
            "--no-checkpoint-at-end",
            "--storage-path",
            str(tmp_path / "res"),
            "--experiment-name",
            "wb",
            "--wandb-project",
            "cvpo-test",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list(tmp_path.rglob("*"))[:50]
    (log,) = runs[0].glob("run-*.wandb")
    data = log.read_bytes()  # wandb's record log: the project and the metric names are in it
    assert b"cvpo-test" in data
    assert b"episode_return_mean" in data
    assert b"training_iteration" in data
    assert Path(tmp_path / "res" / "wb").is_dir()
