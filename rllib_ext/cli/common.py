"""What the ``rllib`` commands share: the user error, help texts, JSON flags, Ray start-up."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

EPILOG = """examples:
  rllib train --algo CVPO --env cvpo/PointHazard-v0 --stop '{"training_iteration": 5}'
  rllib train --algo CVPO --env SafetyPointGoal1-v0 --config '{"cost_limit": 25}'
  rllib train file tuned_examples/cvpo/point_hazard_sweep.yaml
  rllib resume ~/ray_results/CVPO_SafetyPointGoal1-v0
  rllib evaluate ~/ray_results/CVPO_.../checkpoint_000004 --episodes 10
  rllib report ~/ray_results/cvpo-point-hazard-sweep
"""

RESULTS_EPILOG = """results:
  Tune writes progress.csv, result.json and TensorBoard event files into
  <storage>/<experiment>/<trial>/; open the curves with
    tensorboard --logdir <storage>/<experiment>
  (pip install tensorboard). --wandb-project NAME also logs to Weights & Biases.
"""


class CLIError(Exception):
    """A user error: printed as one clear message, exit status 2."""


def json_arg(text: str, flag: str) -> dict[str, Any]:
    """``text`` parsed as a JSON object, or a CLIError naming ``flag`` and the problem."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise CLIError(
            f"{flag} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}): "
            f"{text!r}. Example: {flag} '{{\"cost_limit\": 25}}'"
        ) from None
    if not isinstance(value, dict):
        raise CLIError(f"{flag} must be a JSON object, e.g. '{{\"key\": 1}}'; got {text!r}")
    return value


def local_abspath(path: str) -> str:
    """``path`` made absolute when local (pyarrow reads a relative path as a bad URI)."""
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def add_ray_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ray")
    g.add_argument(
        "--ray-address", default=None, help="join a running cluster (default: start a local Ray)"
    )
    g.add_argument("--ray-num-cpus", type=int, default=None, help="CPUs for the local Ray")
    g.add_argument("--ray-num-gpus", type=int, default=None, help="GPUs for the local Ray")


def init_ray(args) -> None:
    """Starts a fresh local Ray, or joins ``--ray-address`` / ``RAY_ADDRESS`` (once)."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"log_to_driver": bool(getattr(args, "v", 0))}
    if args.ray_address:
        kwargs["address"] = args.ray_address
    elif os.environ.get("RAY_ADDRESS"):
        pass  # inside `ray job submit` / a cluster: join it
    else:
        kwargs["address"] = "local"  # a fresh local Ray, even if another runs
        if args.ray_num_cpus is not None:
            kwargs["num_cpus"] = args.ray_num_cpus
        if args.ray_num_gpus is not None:
            kwargs["num_gpus"] = args.ray_num_gpus
        kwargs["include_dashboard"] = False
    ray.init(**kwargs)
    import rllib_ext

    rllib_ext.register()  # Tune's registry is per Ray session


#: the per-trial logs Tune appends one line per iteration to
TRIAL_LOGS = ("result.json", "progress.csv")


def repair_trial_logs(experiment_dir: str) -> list[str]:
    """Cuts a partial last line off each trial's ``result.json`` / ``progress.csv``.

    A driver killed while Tune was writing a line leaves the line half written; after
    a restore Tune appends behind it, and reading the trial's results back then fails
    (``JSONDecodeError``: its metrics and dataframe come back empty). The cut bytes go
    to ``<file>.partial`` next to the file, so nothing is deleted. Local folders only
    (a bucket is returned unchanged). Returns the files repaired."""
    if "://" in experiment_dir or not Path(experiment_dir).is_dir():
        return []
    repaired = []
    for trial in sorted(Path(experiment_dir).iterdir()):
        for name in TRIAL_LOGS if trial.is_dir() else ():
            path = trial / name
            if not path.is_file():
                continue
            data = path.read_bytes()
            end = len(data)
            if data and not data.endswith(b"\n"):
                end = data.rfind(b"\n") + 1  # keep whole lines only
            elif name.endswith(".json") and data:
                last = data[data.rfind(b"\n", 0, len(data) - 1) + 1 :]
                try:
                    json.loads(last)
                except ValueError:
                    end = len(data) - len(last)
            if end == len(data):
                continue
            with open(path.with_name(name + ".partial"), "ab") as f:
                f.write(data[end:])
            with open(path, "r+b") as f:
                f.truncate(end)
            repaired.append(str(path))
    return repaired
