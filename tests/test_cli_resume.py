"""Interrupted runs continue from their checkpoints, and relative paths work.

One tiny CVPO run on cvpo/PointHazard-v0 (200 env steps per iteration, a
checkpoint every iteration, stop at iteration 6), all paths RELATIVE to the
working folder, is started with ``rllib train`` and SIGKILLed (the driver and
its local Ray: what losing the head node does) once Tune's experiment state
has recorded a checkpoint, then continued with ``rllib resume res/kr``. The
continuation must start one iteration after a recorded checkpoint (never at
iteration 1) and reach the stop criterion. (``rllib train ... --resume`` makes
the same ``Tuner.restore`` call: see test_cli_experiment_file.py.) The
checkpoints then load from relative paths with ``rllib evaluate`` and
``CVPO.from_checkpoint``.

Tune snapshots its experiment state (which checkpoint each trial has) every
``TUNE_GLOBAL_CHECKPOINT_S`` seconds (default: 10 s or more); a run killed
before a snapshot restarts from the last snapshotted checkpoint. The test sets
0.5 s so that a snapshot follows the first checkpoints quickly.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
STOP = 6
TRAIN = [
    "train",
    "--algo",
    "CVPO",
    "--env",
    "cvpo/PointHazard-v0",
    "--config",
    json.dumps(CONFIG),
    "--stop",
    json.dumps({"training_iteration": STOP}),
    "--checkpoint-freq",
    "1",
    "--storage-path",
    "res",
    "--experiment-name",
    "kr",
]
ITER = re.compile(r"^iter\s+(\d+) \|")


def _rllib() -> list:
    script = Path(sys.executable).with_name("rllib")
    return [str(script)] if script.exists() else [sys.executable, "-m", "rllib_ext.cli"]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # always a local Ray
    env["TUNE_GLOBAL_CHECKPOINT_S"] = "0.5"
    return env


def _recorded_checkpoints(work: Path) -> set:
    """Checkpoint indices Tune's experiment state knows of (it stores them pickled, as hex)."""
    text = "".join(
        p.read_text(errors="replace") for p in (work / "res" / "kr").glob("experiment_state-*.json")
    )
    return {k for k in range(20) if f"checkpoint_{k:06d}".encode().hex() in text}


def _checkpoints(work: Path) -> set:
    return {int(p.name.split("_")[1]) for p in (work / "res" / "kr").glob("*/checkpoint_*")}


def _run_until(work: Path, argv: list, kill_after: int, timeout: float = 150):
    """Runs `rllib argv` in its own process group; SIGKILLs the group once
    iteration ``kill_after`` is printed and the experiment state records a
    checkpoint. Returns (iterations printed, checkpoint indices recorded just
    before the kill, checkpoint indices on disk at the kill)."""
    proc = subprocess.Popen(
        [*_rllib(), *argv],
        cwd=work,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    iters, deadline = [], time.time() + timeout
    try:
        for line in proc.stdout:
            m = ITER.match(line)
            if m:
                iters.append(int(m.group(1)))
                if iters[-1] >= kill_after:
                    break
            assert time.time() < deadline, f"no iteration {kill_after} within {timeout}s: {iters}"
        while not _recorded_checkpoints(work) and time.time() < deadline:
            time.sleep(0.1)
        recorded = _recorded_checkpoints(work)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    assert iters and iters[-1] >= kill_after, iters
    assert recorded, "Tune's experiment state recorded no checkpoint"
    return iters, recorded, _checkpoints(work)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    work = tmp_path_factory.mktemp("cli_resume")
    first = _run_until(work, TRAIN, kill_after=2)
    final = subprocess.run(
        [*_rllib(), "resume", "res/kr"],
        cwd=work,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    return work, first, final


def test_killed_run_resumes_from_its_checkpoints(resumed):
    work, (first, recorded, on_disk), final = resumed
    assert first[0] == 1 and max(first) >= 2
    assert final.returncode == 0, final.stdout[-2000:] + final.stderr[-3000:]
    assert f"== resuming {work / 'res' / 'kr'}: CVPO" in final.stdout
    second = [int(m.group(1)) for m in map(ITER.match, final.stdout.splitlines()) if m]
    # checkpoint_00000k holds iteration k + 1: the continuation starts right after one
    assert second and second[0] >= 2, f"`rllib resume` started over: {second}"
    assert second[0] - 2 >= max(recorded) and second[0] - 2 in on_disk, (second, recorded, on_disk)
    assert second == list(range(second[0], STOP + 1))
    (trial,) = (work / "res" / "kr").glob("*/params.json")
    with open(trial.parent / "progress.csv") as f:
        rows = f.read().splitlines()[1:]
    assert len(rows) >= STOP  # the rows of every attempt, the last at the stop
    assert re.search(rf"checkpoint \S+/checkpoint_00000{STOP - 1}", final.stdout), final.stdout[
        -1500:
    ]


def test_tensorboard_event_files_are_written(resumed):
    work = resumed[0]
    (trial,) = (work / "res" / "kr").glob("*/params.json")
    events = sorted(trial.parent.glob("events.out.tfevents.*"))
    assert events, list(trial.parent.iterdir())
    data = b"".join(e.read_bytes() for e in events)
    assert b"ray/tune/env_runners/episode_return_mean" in data


def _relative_checkpoint(work: Path) -> str:
    (trial,) = (work / "res" / "kr").glob("*/params.json")
    return os.path.relpath(trial.parent / "checkpoint_000001", work)


def test_evaluate_relative_checkpoint_path(resumed, monkeypatch, capsys, tmp_path):
    from rllib_ext import cli

    work = resumed[0]
    monkeypatch.chdir(work)
    rel = _relative_checkpoint(work)
    assert not os.path.isabs(rel) and rel.startswith("res/kr/")
    code = cli.main(["evaluate", rel, "--episodes", "2", "--out", str(tmp_path / "ev.json")])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "2 episodes on cvpo/PointHazard-v0" in out.out
    res = json.loads((tmp_path / "ev.json").read_text())
    assert res["checkpoint"] == str(work / rel) and res["episode_length_mean"] == 100


def test_from_checkpoint_relative_path(resumed, monkeypatch):
    from rllib_ext.cvpo import CVPO

    work = resumed[0]
    monkeypatch.chdir(work)
    algo = CVPO.from_checkpoint(_relative_checkpoint(work))
    try:
        assert algo.iteration == 2  # checkpoint_000001 was written after iteration 2
        assert algo.config.actor_hiddens == [32, 32]
    finally:
        algo.stop()


def test_repair_trial_logs_cuts_only_a_partial_last_line(tmp_path):
    """A driver killed mid-write leaves half a line; the repair keeps every whole line
    and moves the partial bytes to <file>.partial (nothing is deleted)."""
    from rllib_ext.cli.common import repair_trial_logs

    trial = tmp_path / "exp" / "CVPO_x_00000"
    trial.mkdir(parents=True)
    whole = b'{"training_iteration": 1}\n{"training_iteration": 2}\n'
    (trial / "result.json").write_bytes(whole + b'{"training_iter')
    (trial / "progress.csv").write_bytes(b"a,b\n1,2\n3,")
    ok = tmp_path / "exp" / "CVPO_y_00001"
    ok.mkdir()
    (ok / "result.json").write_bytes(whole)
    repaired = repair_trial_logs(str(tmp_path / "exp"))
    assert sorted(repaired) == sorted([str(trial / "result.json"), str(trial / "progress.csv")])
    assert (trial / "result.json").read_bytes() == whole
    assert (trial / "result.json.partial").read_bytes() == b'{"training_iter'
    assert (trial / "progress.csv").read_bytes() == b"a,b\n1,2\n"
    assert (trial / "progress.csv.partial").read_bytes() == b"3,"
    assert (ok / "result.json").read_bytes() == whole
    # a second pass finds nothing to cut; a bucket URI is left alone
    assert repair_trial_logs(str(tmp_path / "exp")) == []
    assert repair_trial_logs("s3://bucket/exp") == []


def test_repair_trial_logs_drops_a_newline_terminated_line_that_is_not_json(tmp_path):
    from rllib_ext.cli.common import repair_trial_logs

    trial = tmp_path / "exp" / "T"
    trial.mkdir(parents=True)
    (trial / "result.json").write_bytes(b'{"a": 1}\n{"a": \n')
    assert repair_trial_logs(str(tmp_path / "exp")) == [str(trial / "result.json")]
    assert (trial / "result.json").read_bytes() == b'{"a": 1}\n'
