"""Resuming CVPO: a checkpoint restored in a NEW process, the optional replay
buffer, and Tune's restore of an interrupted (SIGKILLed) experiment.

This file doubles as the helper script run in the subprocesses:
``python tests/test_resume.py dump CKPT OUT.pkl`` and
``python tests/test_resume.py tune STORAGE NAME STOP_ITER``.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent
MID = "default_policy"


def fast_config(**training):
    """A tiny CVPO config whose iterations take a few seconds (updates from iteration 1)."""
    from conftest import make_tiny_config

    kw = dict(num_steps_sampled_before_learning_starts=100, train_batch_size_per_learner=32)
    cfg = make_tiny_config(**(kw | training))
    cfg.min_sample_timesteps_per_iteration = 150
    return cfg


# -- the state that must survive a restore -------------------------------------------------
def _np(x):
    """Tensors -> numpy, recursively (so pickles compare without torch)."""
    import torch

    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy().copy()
    if isinstance(x, dict):
        return {k: _np(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_np(v) for v in x)
    return x


def collect_state(algo, with_replay: bool = True) -> dict:
    """Networks, optimizer states, eta/lambdas/alphas, counters, (replay buffer)."""
    from ray.rllib.utils.metrics import ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME

    learner = algo.learner_group._learner
    module = learner.module[MID]
    out = {
        "module": _np(dict(module.state_dict())),
        "optimizers": {
            name: _np(learner.get_optimizer(MID, name).state_dict()) for name in ("critic", "actor")
        },
        "cvpo": _np(learner.get_cvpo_state()),
        "num_updates": int(algo._num_updates),
        "training_iteration": int(algo.training_iteration),
        "env_steps_sampled_lifetime": float(
            algo.metrics.peek((ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME), default=0)
        ),
    }
    if with_replay:
        out["replay"] = _np(algo._replay.get_state())
    return out


def assert_bit_identical(a, b, where="state"):
    """Equal structure; arrays equal in dtype, shape and every byte; scalars equal."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            assert_bit_identical(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bit_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape, (
            f"{where}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
        )
        assert a.tobytes() == b.tobytes(), f"{where}: values differ"
    else:
        assert type(a) is type(b) and a == b, f"{where}: {a!r} vs {b!r}"


def _subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS_DIR), env.get("PYTHONPATH")) if p)
    env["RAY_ADDRESS"] = "local"  # a fresh Ray of its own, never another process's cluster
    return env


def _run_helper(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(Path(__file__)), *args],
        cwd=str(REPO),
        env=_subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# -- tests ----------------------------------------------------------------------------------------
def test_restore_in_new_process_is_bit_identical_with_replay(ray_local, tmp_path):
    algo = fast_config(store_buffer_in_checkpoints=True).build_algo()
    try:
        for _ in range(2):
            algo.train()
        ckpt = algo.save(str(tmp_path / "ckpt")).checkpoint.path
        saved = collect_state(algo)
    finally:
        algo.stop()
    assert saved["num_updates"] > 0 and saved["training_iteration"] == 2
    assert any(k.startswith("actor") for k in saved["module"]), sorted(saved["module"])
    assert saved["cvpo"][MID]["dual"] is not None  # eta and lambdas exist
    assert any(len(s) for s in saved["optimizers"]["actor"]["state"].values())
    assert saved["replay"]["size"] > 0

    out = tmp_path / "restored.pkl"
    proc = _run_helper("dump", ckpt, str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out, "rb") as f:
        restored = pickle.load(f)
    assert restored["pid"] != os.getpid()
    del restored["pid"]
    assert_bit_identical(saved, restored)


def test_replay_buffer_not_in_checkpoint_by_default(ray_local, tmp_path):
    from rllib_ext.common.off_policy import REPLAY_STATE_KEY

    algo = fast_config().build_algo()
    try:
        algo.train()
        ckpt = Path(algo.save(str(tmp_path / "ckpt")).checkpoint.path)
        replay_bytes = algo._replay.nbytes()
        assert len(algo._replay) > 0
    finally:
        algo.stop()
    state_file = ckpt / "algorithm_state.pkl"
    with open(state_file, "rb") as f:
        state = pickle.load(f)
    assert REPLAY_STATE_KEY not in state
    assert "cvpo_num_updates" in state
    # the whole checkpoint folder's top-level state is smaller than the buffer's arrays
    assert state_file.stat().st_size < replay_bytes, (state_file.stat().st_size, replay_bytes)


def _trial_dir(exp_dir: Path):
    found = [p for p in exp_dir.glob("CVPO_*") if p.is_dir()]
    return found[0] if found else None


def test_tune_restores_sigkilled_experiment(ray_local, tmp_path):
    from ray import tune

    import rllib_ext  # noqa: F401  (registers "CVPO" in this process)

    name, stop = "interrupted", 4
    exp_dir = tmp_path / name
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__)), "tune", str(tmp_path), name, str(stop)],
        cwd=str(REPO),
        env=_subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: SIGKILL reaches its local Ray too
    )
    deadline = time.time() + 150
    try:
        # wait for the second checkpoint: by then the experiment state lists the first
        while time.time() < deadline and proc.poll() is None:
            trial = _trial_dir(exp_dir)
            if trial is not None and (trial / "checkpoint_000001").is_dir():
                break
            time.sleep(0.2)
        assert proc.poll() is None, (
            "the Tune run ended before it was killed:\n"
            + (proc.stdout.read().decode(errors="replace")[-3000:])
        )
        assert time.time() < deadline, "no checkpoint appeared in time"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL

    assert tune.Tuner.can_restore(str(exp_dir))
    # as `rllib resume` does: a kill during a log write leaves a partial line
    from rllib_ext.cli.common import repair_trial_logs

    repair_trial_logs(str(exp_dir))
    tuner = tune.Tuner.restore(str(exp_dir), trainable="CVPO", resume_unfinished=True)
    results = tuner.fit()
    assert len(results) == 1
    res = results[0]
    assert res.error is None, res.error
    m = res.metrics
    assert m["training_iteration"] == stop
    # resumed from a checkpoint, not restarted from scratch
    assert 0 < m["iterations_since_restore"] < m["training_iteration"], m[
        "iterations_since_restore"
    ]
    df = res.metrics_dataframe
    assert df["training_iteration"].max() == stop


# -- subprocess entry points -------------------------------------------------------------------
def _main_dump(ckpt: str, out: str) -> int:
    import ray

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    from rllib_ext.cvpo import CVPO

    algo = CVPO.from_checkpoint(ckpt)
    try:
        state = collect_state(algo)
    finally:
        algo.stop()
    state["pid"] = os.getpid()
    with open(out, "wb") as f:
        pickle.dump(state, f)
    ray.shutdown()
    return 0


def _main_tune(storage: str, name: str, stop: str) -> int:
    import ray

    # Save the experiment state on every controller step (default: at most every 10 s),
    # so a SIGKILL right after a checkpoint still finds it in the experiment state.
    os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = "0"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    from ray import tune

    import rllib_ext  # noqa: F401

    tuner = tune.Tuner(
        "CVPO",
        param_space=fast_config().to_dict(),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            stop={"training_iteration": int(stop)},
            checkpoint_config=tune.CheckpointConfig(checkpoint_frequency=1),
            verbose=0,
        ),
    )
    tuner.fit()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(TESTS_DIR))
    cmd, *rest = sys.argv[1:]
    sys.exit({"dump": _main_dump, "tune": _main_tune}[cmd](*rest))
