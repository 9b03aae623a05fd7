"""The ``rllib`` command (Ray 2.60 ships none): train, train file, resume, evaluate, report.

Shape of the CLI Ray last shipped in 2.40::

    rllib train --algo CVPO --env SafetyPointGoal1-v0 [--config JSON] [--stop JSON]
    rllib train file tuned_examples/cvpo/point_hazard.yaml
    rllib resume ~/ray_results/EXPERIMENT
    rllib evaluate CHECKPOINT [--env ID] [--episodes N] [--render OUT.gif]
    rllib report EXPERIMENT_DIR

Everything runs on a local Ray by default (``--ray-address`` joins a cluster).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

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


# Keys of one experiment in a Tune experiment file that `rllib train file` honours.
EXPERIMENT_KEYS = {
    "run": "the algorithm: CVPO, PPO, SAC, ...",
    "env": "the env id (or config.env)",
    "config": "the algorithm config",
    "stop": "stop criteria, e.g. {training_iteration: 100}",
    "checkpoint_config": "when to checkpoint (see its keys)",
    "num_samples": "repeat each trial N times",
    "storage_path": "where results go",
    "max_concurrent_trials": "run at most N trials at a time",
    "max_failures": "restart a failed trial from its last checkpoint up to N times",
}
CHECKPOINT_KEYS = (
    "checkpoint_frequency",
    "checkpoint_at_end",
    "num_to_keep",
    "checkpoint_score_attribute",
    "checkpoint_score_order",
)
# Older Tune / RLlib names users still write: (section or None for the top level, key).
LEGACY_KEYS = {
    "algo": (None, "run"),
    "local_dir": (None, "storage_path"),
    "checkpoint_freq": ("checkpoint_config", "checkpoint_frequency"),
    "checkpoint_at_end": ("checkpoint_config", "checkpoint_at_end"),
    "keep_checkpoints_num": ("checkpoint_config", "num_to_keep"),
    "checkpoint_score_attr": ("checkpoint_config", "checkpoint_score_attribute"),
}
# Keys that cannot be honoured here, with what to do instead.
REFUSED_KEYS = {
    "name": "the experiment's name is its key in the file (or pass --experiment-name)",
    "resources_per_trial": "RLlib sizes a trial from its config (num_env_runners, num_gpus_per_learner, ...)",
    "resume": "run `rllib resume <storage>/<experiment>` or pass --resume",
    "restore": "run `rllib resume <storage>/<experiment>` or pass --resume",
    "callbacks": "algorithm callbacks go in config: {callbacks: ...}",
}


from rllib_ext.evaluate import CheckpointError  # noqa: E402
from rllib_ext.progress import _fmt, plot_progress, progress_callback  # noqa: E402
from rllib_ext.report import ReportError  # noqa: E402


# -- parsing ------------------------------------------------------------------------------
def _json_arg(text: str, flag: str) -> Dict[str, Any]:
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


def _add_ray_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ray")
    g.add_argument("--ray-address", default=None, help="join a running cluster (default: start a local Ray)")
    g.add_argument("--ray-num-cpus", type=int, default=None, help="CPUs for the local Ray")
    g.add_argument("--ray-num-gpus", type=int, default=None, help="GPUs for the local Ray")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stop", "-s", default=None, help='stop criteria as JSON, e.g. \'{"training_iteration": 10}\'')
    p.add_argument("--experiment-name", default=None, help="folder name under the storage path")
    # None = not given: the experiment file's value, else the default named in the help
    p.add_argument("--num-samples", type=int, default=None, help="repeat each trial N times (default 1)")
    p.add_argument("--checkpoint-freq", type=int, default=None, help="checkpoint every N iterations (default 0: never)")
    p.add_argument("--checkpoint-at-end", dest="checkpoint_at_end", action="store_true", default=None,
                   help="write a checkpoint when a trial ends (default)")
    p.add_argument("--no-checkpoint-at-end", dest="checkpoint_at_end", action="store_false",
                   help="do not write a checkpoint when a trial ends")
    p.add_argument("--keep-checkpoints-num", type=int, default=None, help="keep only the N newest checkpoints")
    p.add_argument("--storage-path", default=None, help="where results go (default ~/ray_results)")
    p.add_argument("--max-failures", type=int, default=None,
                   help="restart a failed trial (e.g. its node died) from its last checkpoint up to N "
                   "times (default 0; -1: without limit)")
    p.add_argument("--resume", action="store_true",
                   help="resume an interrupted experiment of the same name and storage path from its "
                   "checkpoints (same as `rllib resume <storage>/<name>`)")
    p.add_argument("--wandb-project", default=None,
                   help="also log every trial to this Weights & Biases project (pip install wandb; "
                   "`wandb login`, or WANDB_MODE=offline)")
    p.add_argument("--plot", default=None, help="write reward/cost per iteration to this PNG (default: <trial>/progress.png)")
    p.add_argument("-v", action="count", default=0, help="more output (-vv: Tune's own tables)")
    _add_ray_args(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rllib",
        description="Train and evaluate RLlib algorithms (CVPO, PPO, SAC, ...) on constrained tasks.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="{train,train file,resume,evaluate,report}")

    train = sub.add_parser(
        "train",
        help="train an algorithm; `rllib train file FILE.yaml` runs a Tune experiment file",
        description="Train an algorithm with Ray Tune. Use `rllib train file FILE.yaml` to run "
        "a Tune experiment file (grid_search allowed; see `rllib train file --help`).",
        epilog=EPILOG + "\n" + RESULTS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--algo", "-a", default=None, help="algorithm name: CVPO, PPO, SAC, ...")
    train.add_argument("--env", "-e", default=None, help="env id, e.g. SafetyPointGoal1-v0 or cvpo/PointHazard-v0")
    train.add_argument("--config", "-c", default="{}", help="algorithm config as JSON (keys of AlgorithmConfig)")
    _add_run_args(train)

    res = sub.add_parser(
        "resume",
        help="resume an interrupted experiment from its checkpoints",
        description="Continue an interrupted experiment (Ctrl-C, a killed driver, a lost node): "
        "unfinished trials restart from their newest checkpoint, errored ones too; finished "
        "trials are kept. The algorithm is read from the experiment folder.",
        epilog=RESULTS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    res.add_argument("experiment_dir", help="the experiment folder, <storage>/<experiment> (holds tuner.pkl)")
    res.add_argument("--restart-errored", action="store_true",
                     help="restart errored trials from scratch instead of from their last checkpoint")
    res.add_argument("--plot", default=None, help="write reward/cost per iteration to this PNG (one trial only)")
    res.add_argument("-v", action="count", default=0, help="more output (-vv: Tune's own tables)")
    _add_ray_args(res)

    ev = sub.add_parser(
        "evaluate",
        help="roll out a checkpoint; print mean reward, mean cost, violation rate",
        description="Roll out the deterministic policy of a checkpoint and report mean "
        "episode reward, mean episode cost and the rate of episodes over the cost limit.",
    )
    ev.add_argument("checkpoint", help="checkpoint directory written by `rllib train`")
    ev.add_argument("--env", "-e", default=None, help="env id (default: the one trained on)")
    ev.add_argument("--episodes", type=int, default=10, help="episodes to roll out (default 10)")
    ev.add_argument("--steps", type=int, default=None, help="stop after this many env steps in total")
    ev.add_argument("--explore", action="store_true", help="sample actions instead of the mean")
    ev.add_argument("--cost-limit", type=float, default=None, help="limit for the violation rate (default: the trained one)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the first episode's reset; episode i uses seed+i (default 0)")
    ev.add_argument("--render", default=None, help="write a video of the first episode (.mp4 or .gif)")
    ev.add_argument("--out", default=None, help="also write the results as JSON here")

    rep = sub.add_parser(
        "report",
        help="table (CSV, markdown) and PNG of a finished or interrupted sweep",
        description="Reads Tune's result files of an experiment directory and writes a table of "
        "final reward, final cost and violation rate (and final evaluation return and cost, when "
        "the trials evaluated) per group of trials that share every parameter but the seed, plus "
        "a PNG of the learning curves against env steps (mean over seeds, min-max band).",
    )
    rep.add_argument("experiment_dir", help="the experiment folder (contains one folder per trial)")
    rep.add_argument("--out", default=None, help="output folder (default: the experiment folder)")
    rep.add_argument("--last", type=int, default=5, help="average the last N iterations (default 5)")
    return parser


def build_train_file_parser() -> argparse.ArgumentParser:
    """``rllib train file FILE.yaml`` (a parser of its own: argparse has no two-word commands)."""
    p = argparse.ArgumentParser(
        prog="rllib train file",
        description="Run a Tune experiment file: {name: {run: ALGO, env: ID, config: {...}, "
        "stop: {...}, ...}}. Keys: " + ", ".join(EXPERIMENT_KEYS) + "; checkpoint_config keys: "
        + ", ".join(CHECKPOINT_KEYS) + ". Flags given here override the file's values.",
        epilog=EPILOG + "\n" + RESULTS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", help="YAML experiment file")
    _add_run_args(p)
    return p


# -- helpers --------------------------------------------------------------------------------
#: this project's algorithms (their configs set the cost callbacks and are checked here)
OWN_ALGORITHMS = ("CVPO", "SACLag")


def _own_algorithm(name: str):
    """(Algorithm class, config class) of one of :data:`OWN_ALGORITHMS`."""
    if name == "CVPO":
        from rllib_ext.cvpo import CVPO, CVPOConfig

        return CVPO, CVPOConfig
    from rllib_ext.sac_lag import SACLag, SACLagConfig

    return SACLag, SACLagConfig


def _known_algorithms() -> List[str]:
    from ray.rllib.algorithms.registry import ALGORITHMS

    return sorted(set(ALGORITHMS) | set(OWN_ALGORITHMS))


def resolve_algorithm(name: Optional[str]):
    """The Algorithm class for ``name`` (registered CVPO or SACLag, or an RLlib built-in)."""
    import rllib_ext  # noqa: F401  (registers CVPO and SACLag)

    if not name:
        raise CLIError("no algorithm given: pass --algo CVPO (or SACLag, PPO, SAC, ...)")
    if name in OWN_ALGORITHMS:
        return _own_algorithm(name)[0]
    known = _known_algorithms()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise CLIError(f"unknown algorithm {name!r}.{hint} Known: {', '.join(known)}")
    from ray.tune.registry import get_trainable_cls

    return get_trainable_cls(name)


def check_env(env: Optional[str], env_config: Dict[str, Any]) -> None:
    """Clear errors for an unknown env or one without a cost signal, before Ray starts."""
    if not env:
        raise CLIError("no env given: pass --env SafetyPointGoal1-v0 (or cvpo/PointHazard-v0)")
    from cvpo import envs as cvpo_envs
    from rllib_ext.envs import probe_env

    try:
        probe_env(env, dict(env_config), ["cost"])
    except (
        cvpo_envs.UnknownEnvError,
        cvpo_envs.UnsupportedEnvError,
        cvpo_envs.NoCostSignalError,
        ImportError,
    ) as err:
        raise CLIError(str(err)) from None
    except Exception as err:  # noqa: BLE001 (the env's constructor, reset or step failed)
        first = str(err).splitlines()[0] if str(err) else ""
        raise CLIError(
            f"env {env!r} could not be built and stepped with env_config={dict(env_config)!r}: "
            f"{type(err).__name__}: {first}"
        ) from None


def _init_ray(args) -> None:
    import ray

    if ray.is_initialized():
        return
    kwargs: Dict[str, Any] = {"log_to_driver": bool(getattr(args, "v", 0))}
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


# -- train -----------------------------------------------------------------------------------
def _experiment_config(algo_name: str, env: str, config: Dict[str, Any]) -> Dict[str, Any]:
    from rllib_ext.cvpo.callbacks import CostMetricsCallback

    param_space = dict(config)
    param_space["env"] = env
    if algo_name not in OWN_ALGORITHMS:
        param_space.setdefault("callbacks", CostMetricsCallback)
    return param_space


def _check_cvpo_config(param_space: Dict[str, Any], algo_name: str = "CVPO") -> None:
    """Validates a CVPO (or SACLag) config before Tune starts (grid-search values are skipped)."""
    config_cls = _own_algorithm(algo_name)[1]

    plain = {k: v for k, v in param_space.items() if not (isinstance(v, dict) and "grid_search" in v)}
    unknown = [k for k in plain if k != "env" and not hasattr(config_cls(), k)]
    if unknown:
        known = [k for k in vars(config_cls()) if not k.startswith("_")]
        hints = {k: difflib.get_close_matches(k, known, n=2) for k in unknown}
        msg = "; ".join(f"{k!r}" + (f" (did you mean {h}?)" if h else "") for k, h in hints.items())
        raise CLIError(f"unknown {algo_name} config key(s): {msg}")
    try:
        check = config_cls().update_from_dict(plain)
        check.num_gpus_per_learner = 0  # GPUs are Tune's business once Ray runs
        check.validate()
    except ValueError as err:
        raise CLIError(str(err).splitlines()[0]) from None


def _pick(flag: Any, from_file: Any, default: Any) -> Any:
    """A flag given on the command line wins over the experiment file, which wins over the default."""
    if flag is not None:
        return flag
    return from_file if from_file is not None else default


def _local_abspath(path: str) -> str:
    """``path`` made absolute when it is a local path (pyarrow reads a relative one as a bad URI)."""
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def _wandb_callback(project: str):
    """Tune's W&B logger for ``project``, or a CLIError saying how to get it working."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise CLIError(
            "--wandb-project needs the wandb package: pip install wandb (or pip install -e '.[wandb]')"
        ) from None
    from ray.air.integrations.wandb import WandbLoggerCallback

    callback = WandbLoggerCallback(project=project)
    try:
        callback.setup()  # checks the API key now rather than once Tune runs
    except ValueError as err:
        raise CLIError(
            f"--wandb-project {project}: {str(err).splitlines()[0]} "
            "(or set WANDB_MODE=offline to log locally, `wandb sync` later)"
        ) from None
    return callback


def tune_callbacks(args) -> list:
    """Tune callbacks of a run: the progress lines, plus W&B with --wandb-project.

    TensorBoard needs none: Tune writes event files into every trial folder.
    """
    callbacks = [progress_callback()]
    if getattr(args, "wandb_project", None):
        callbacks.append(_wandb_callback(args.wandb_project))
    return callbacks


def _report_results(results, args, algo_name: str, exp_dir: str) -> int:
    """Prints each trial's checkpoint and writes its progress PNG.

    Returns 1 if a trial failed, 130 if the run was interrupted before every
    trial reached its stop criterion (Ctrl-C: Tune saves the state and returns), else 0.
    """
    status = 0
    unfinished = 0
    for res in results:
        trial_dir = Path(res.path)
        if res.error:
            print(f"trial {trial_dir.name} failed: {str(res.error).splitlines()[0]}", flush=True)
            status = 1
            continue
        if not (res.metrics or {}).get("done"):
            unfinished += 1
        config = res.config or {}
        limit = config.get("cost_limit")
        limit = limit if isinstance(limit, (int, float)) else None
        out = Path(args.plot) if (args.plot and len(results) == 1) else trial_dir / "progress.png"
        png = plot_progress(res.metrics_dataframe, out, f"{algo_name} on {config.get('env')}", limit)
        ckpt_path = res.checkpoint.path if res.checkpoint else None
        print(f"trial {trial_dir.name}: checkpoint {ckpt_path}; plot {png}", flush=True)
    print(f"curves: tensorboard --logdir {exp_dir}", flush=True)
    if unfinished:
        print(f"interrupted: {unfinished} trial(s) did not reach the stop criterion; continue with "
              f"`rllib resume {exp_dir}`", flush=True)
        return max(status, 130)
    return status


def run_experiments(experiments: Dict[str, Dict[str, Any]], args) -> int:
    """Runs Tune experiments ({name: {run, env, config, stop, ...}}) one after another.

    Each spec holds only the keys of :data:`EXPERIMENT_KEYS` (see
    :func:`normalize_experiment`); command-line flags override its values.
    """
    from ray import tune
    from ray.tune import CheckpointConfig, FailureConfig, RunConfig, TuneConfig

    import rllib_ext  # noqa: F401

    stop_override = _json_arg(args.stop, "--stop") if args.stop else None
    prepared = []
    for name, spec in experiments.items():
        algo_name = spec.get("run") or spec.get("algo")
        algo_cls = resolve_algorithm(algo_name)
        config = dict(spec.get("config") or {})
        env = spec.get("env") or config.pop("env", None)
        env_grid = isinstance(env, dict) and "grid_search" in env
        for e in env["grid_search"] if env_grid else [env]:
            check_env(e, config.get("env_config") or {})
        param_space = _experiment_config(algo_name, env, config)
        if algo_name in OWN_ALGORITHMS and not env_grid:
            _check_cvpo_config(param_space, algo_name)
        prepared.append((name, spec, algo_cls, param_space))

    tune_callbacks(args)  # a missing wandb or W&B login fails here, before Ray starts
    _init_ray(args)
    status = 0
    for name, spec, algo_cls, param_space in prepared:
        stop = stop_override if stop_override is not None else (spec.get("stop") or {})
        ckpt = spec.get("checkpoint_config") or {}
        checkpoint_config = CheckpointConfig(
            checkpoint_frequency=int(_pick(args.checkpoint_freq, ckpt.get("checkpoint_frequency"), 0)),
            checkpoint_at_end=bool(_pick(args.checkpoint_at_end, ckpt.get("checkpoint_at_end"), True)),
            num_to_keep=_pick(args.keep_checkpoints_num, ckpt.get("num_to_keep"), None),
            checkpoint_score_attribute=ckpt.get("checkpoint_score_attribute"),
            checkpoint_score_order=ckpt.get("checkpoint_score_order", "max"),
        )
        # s3://, gs:// stay as they are; a local path is made absolute
        storage = _local_abspath(args.storage_path or spec.get("storage_path") or "~/ray_results")
        run_config = RunConfig(
            name=name,
            stop=stop,
            storage_path=storage,
            checkpoint_config=checkpoint_config,
            failure_config=FailureConfig(
                max_failures=int(_pick(args.max_failures, spec.get("max_failures"), 0))
            ),
            callbacks=tune_callbacks(args),
            verbose=1 if args.v >= 2 else 0,
        )
        num_samples = int(_pick(args.num_samples, spec.get("num_samples"), 1))
        exp_dir = os.path.join(storage, name)
        args.experiment_dirs = getattr(args, "experiment_dirs", []) + [exp_dir]
        print(f"== {name}: {algo_cls.__name__} on {param_space['env']} -> {exp_dir}", flush=True)
        if args.resume and tune.Tuner.can_restore(exp_dir):
            print(f"resuming {exp_dir} from its checkpoints", flush=True)
            tuner = tune.Tuner.restore(exp_dir, trainable=algo_cls, resume_errored=True)
        else:
            if args.resume:
                print(f"nothing to resume at {exp_dir}; starting a new experiment", flush=True)
            tuner = tune.Tuner(
                algo_cls,
                param_space=param_space,
                run_config=run_config,
                tune_config=TuneConfig(
                    num_samples=num_samples,
                    max_concurrent_trials=spec.get("max_concurrent_trials"),
                ),
            )
        status = max(status, _report_results(tuner.fit(), args, algo_cls.__name__, exp_dir))
    return status


def cmd_train(args) -> int:
    config = _json_arg(args.config, "--config")
    name = args.experiment_name or f"{args.algo}_{(args.env or '').replace('/', '_')}"
    experiments = {name: {"run": args.algo, "env": args.env, "config": config}}
    return run_experiments(experiments, args)


def load_experiment_file(path: str) -> Dict[str, Dict[str, Any]]:
    """Reads a Tune experiment YAML; errors name the file and line."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise CLIError(f"experiment file {path} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else path
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise CLIError(f"YAML syntax error in {where}: {problem}") from None
    if not isinstance(data, dict) or not data:
        raise CLIError(f"{path}: expected a mapping {{experiment_name: {{run: ..., env: ..., config: ...}}}}")
    return {name: normalize_experiment(name, spec, path) for name, spec in data.items()}


def _unknown_key(key: str, known, where: str, what: str) -> CLIError:
    close = difflib.get_close_matches(key, list(known) + list(LEGACY_KEYS), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return CLIError(f"{where}: unknown {what} {key!r}{hint}; supported keys: {', '.join(known)}")


def normalize_experiment(name: str, spec: Any, path: str) -> Dict[str, Any]:
    """One experiment of a file with only the keys :func:`run_experiments` honours.

    Old Tune names (``checkpoint_freq``, ``checkpoint_at_end``,
    ``keep_checkpoints_num``, ``checkpoint_score_attr``, ``local_dir``) are
    moved to their current place with a note on stderr; any other key is
    refused with a one-line CLIError naming the supported keys.
    """
    where = f"{path}: experiment {name!r}"
    if not isinstance(spec, dict):
        raise CLIError(f"{where} must be a mapping {{run: ..., env: ..., config: ...}}, got {spec!r}")
    out: Dict[str, Any] = {}
    ckpt_in = spec.get("checkpoint_config", {}) or {}
    if not isinstance(ckpt_in, dict):
        raise CLIError(f"{where}: checkpoint_config must be a mapping with keys {', '.join(CHECKPOINT_KEYS)}")
    ckpt: Dict[str, Any] = {}
    origin: Dict[Any, str] = {}  # (section, key) -> the label it was written as
    notes: List[str] = []
    moves = [(None, k, v) for k, v in spec.items() if k != "checkpoint_config"]
    moves += [("checkpoint_config", k, v) for k, v in ckpt_in.items()]
    for section, key, value in moves:
        label = key if section is None else f"{section}.{key}"
        legacy = LEGACY_KEYS.get(key)
        if legacy and legacy != (section, key) and section in (None, legacy[0]):
            new_section, new_key = legacy
            new_label = new_key if new_section is None else f"{new_section}.{new_key}"
            if key != "algo":
                notes.append(f"note: {where}: `{label}` is Tune's old name for `{new_label}`; using it as that")
            if new_key == "checkpoint_score_attribute" and str(value).startswith("min-"):
                value = str(value)[4:]
                ckpt.setdefault("checkpoint_score_order", "min")
            section, key = new_section, new_key
        elif section is None and key in REFUSED_KEYS:
            raise CLIError(f"{where}: key {key!r} is not supported here: {REFUSED_KEYS[key]}")
        elif section is None and key not in EXPERIMENT_KEYS:
            raise _unknown_key(key, EXPERIMENT_KEYS, where, "key")
        elif section == "checkpoint_config" and key not in CHECKPOINT_KEYS:
            raise _unknown_key(key, CHECKPOINT_KEYS, where, "checkpoint_config key")
        target = out if section is None else ckpt
        if key in target and target[key] != value:
            first = origin[(section, key)]
            current = key if section is None else f"{section}.{key}"
            raise CLIError(f"{where}: {first!r} ({target[key]!r}) and {label!r} ({value!r}) set the same "
                           f"thing differently; keep only {current!r}")
        target[key] = value
        origin[(section, key)] = label
    if ckpt:
        out["checkpoint_config"] = ckpt
    if not out.get("run"):
        raise CLIError(f"{where} needs a `run:` key naming the algorithm")
    for key in ("config", "stop"):
        if out.get(key) is not None and not isinstance(out[key], dict):
            raise CLIError(f"{where}: `{key}` must be a mapping, got {out[key]!r}")
    for key, low in (("num_samples", 1), ("max_concurrent_trials", 1), ("max_failures", -1),
                     ("checkpoint_frequency", 0), ("num_to_keep", 1)):
        value = (ckpt if key in CHECKPOINT_KEYS else out).get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise CLIError(f"{where}: `{key}` must be an integer >= {low}, got {value!r}")
    for note in notes:
        print(note, file=sys.stderr)
    return out


def cmd_train_file(args) -> int:
    experiments = load_experiment_file(args.file)
    if args.experiment_name:
        if len(experiments) != 1:
            raise CLIError(
                f"--experiment-name renames the experiment of a file with one, but {args.file} has "
                f"{len(experiments)} ({', '.join(map(str, experiments))}); drop the flag or split the file"
            )
        (spec,) = experiments.values()
        experiments = {args.experiment_name: spec}
    return run_experiments(experiments, args)


def read_trainable_name(experiment_dir: str) -> str:
    """The trainable (algorithm) name stored in an experiment folder's ``tuner.pkl``."""
    import pyarrow.fs
    from ray import cloudpickle

    import rllib_ext  # noqa: F401  (unpickling may need CVPO)

    if "://" in experiment_dir:
        fs, fs_path = pyarrow.fs.FileSystem.from_uri(experiment_dir)
    else:
        fs, fs_path = pyarrow.fs.LocalFileSystem(), experiment_dir
        p = Path(experiment_dir)
        if not p.is_dir():
            raise CLIError(f"experiment folder {p} does not exist")
        if not (p / "tuner.pkl").is_file():
            hint = (f"; it looks like a trial folder, did you mean {p.parent}?"
                    if (p.parent / "tuner.pkl").is_file() else
                    "; pass <storage>/<experiment>, the folder `rllib train` printed after '->'")
            raise CLIError(f"{p} is not a Tune experiment folder (no tuner.pkl){hint}")
    try:
        with fs.open_input_file(f"{fs_path.rstrip('/')}/tuner.pkl") as f:
            state = cloudpickle.loads(f.readall())
        name = state["__trainable_name"]
    except Exception as err:  # noqa: BLE001 (unreadable or cut-off state)
        raise CLIError(
            f"cannot read the experiment state {experiment_dir}/tuner.pkl "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from None
    if not name:
        raise CLIError(f"{experiment_dir}/tuner.pkl names no trainable; resume it with tune.Tuner.restore")
    return name


def cmd_resume(args) -> int:
    from ray import tune

    exp_dir = _local_abspath(args.experiment_dir)
    algo_cls = resolve_algorithm(read_trainable_name(exp_dir))
    args.experiment_dirs = [exp_dir]
    _init_ray(args)
    print(f"== resuming {exp_dir}: {algo_cls.__name__}", flush=True)
    tuner = tune.Tuner.restore(
        exp_dir,
        trainable=algo_cls,
        resume_unfinished=True,
        resume_errored=not args.restart_errored,
        restart_errored=args.restart_errored,
    )
    return _report_results(tuner.fit(), args, algo_cls.__name__, exp_dir)


# -- evaluate --------------------------------------------------------------------------------
def _limits_text(res: Dict[str, Any]) -> str:
    from cvpo.constraints import format_limits

    limits = res.get("cost_limits")
    return "n/a" if not limits else format_limits(list(limits.values()), list(limits))


def cmd_evaluate(args) -> int:
    try:
        res = _evaluate(args)
    except RuntimeError as err:  # rendering: no offscreen GL backend, no ffmpeg
        raise CLIError(str(err)) from None
    print(
        f"{res['episodes']} episodes on {res['env']}: mean reward {res['reward_mean']:.3f} "
        f"(std {res['reward_std']:.3f}), mean cost {res['cost_mean']:.3f} "
        f"(limit {_limits_text(res)}), violation rate {_fmt(res['violation_rate'], '.2f')}"
    )
    if res.get("cost_mean_per_key"):
        print("mean cost per constraint: " + ", ".join(f"{k} {v:.3f}" for k, v in res["cost_mean_per_key"].items()))
    if res.get("video"):
        print(f"video: {res['video']}")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    return 0


def _evaluate(args):
    from rllib_ext.evaluate import evaluate_checkpoint

    return evaluate_checkpoint(
        args.checkpoint,
        env_id=args.env,
        episodes=args.episodes,
        max_steps=args.steps,
        explore=args.explore,
        cost_limit=args.cost_limit,
        seed=args.seed,
        render=args.render,
    )


def cmd_report(args) -> int:
    from rllib_ext.report import write_report

    out = write_report(args.experiment_dir, out_dir=args.out, last_n=args.last)
    for k, v in out.items():
        print(f"{k}: {v}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["train", "file"]:
        args = build_train_file_parser().parse_args(argv[2:])
        args.command = "train file"
    else:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
    handlers = {
        "train": cmd_train,
        "train file": cmd_train_file,
        "resume": cmd_resume,
        "evaluate": cmd_evaluate,
        "report": cmd_report,
    }
    t0 = time.time()
    try:
        return handlers[args.command](args)
    except (CLIError, CheckpointError, ReportError) as err:
        print(f"rllib {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        dirs = getattr(args, "experiment_dirs", [])
        again = f"; continue with `rllib resume {dirs[-1]}`" if dirs else ""
        print(f"\ninterrupted after {time.time() - t0:.0f}s; results so far are kept{again}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
