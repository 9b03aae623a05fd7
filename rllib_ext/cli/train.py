"""``rllib train``: train an algorithm with Ray Tune (and what ``train file`` and ``resume`` share).

``run_experiments`` runs Tune experiments given as ``{name: {run, env, config,
stop, ...}}``: the one ``rllib train`` builds from its flags, or those of an
experiment file (:mod:`rllib_ext.cli.experiment_file`). The algorithm and the
env are checked before Ray starts; each trial's checkpoint and progress PNG are
printed at the end (:func:`report_results`, also used by ``rllib resume``).
"""

from __future__ import annotations

import argparse
import difflib
import os
from pathlib import Path
from typing import Any

from rllib_ext.cli import common
from rllib_ext.cli.common import EPILOG, RESULTS_EPILOG, CLIError, json_arg, local_abspath
from rllib_ext.progress import plot_progress, progress_callback

#: this project's algorithms (their configs set the cost callbacks and are checked here)
OWN_ALGORITHMS = ("CVPO", "SACLag")


# -- parsing ------------------------------------------------------------------------------
def add_run_args(p: argparse.ArgumentParser) -> None:
    """Flags of a Tune run (``rllib train`` and ``rllib train file``)."""
    p.add_argument(
        "--stop",
        "-s",
        default=None,
        help="stop criteria as JSON, e.g. '{\"training_iteration\": 10}'",
    )
    p.add_argument("--experiment-name", default=None, help="folder name under the storage path")
    # None = not given: the experiment file's value, else the default named in the help
    p.add_argument(
        "--num-samples", type=int, default=None, help="repeat each trial N times (default 1)"
    )
    p.add_argument(
        "--checkpoint-freq",
        type=int,
        default=None,
        help="checkpoint every N iterations (default 0: never)",
    )
    p.add_argument(
        "--checkpoint-at-end",
        dest="checkpoint_at_end",
        action="store_true",
        default=None,
        help="write a checkpoint when a trial ends (default)",
    )
    p.add_argument(
        "--no-checkpoint-at-end",
        dest="checkpoint_at_end",
        action="store_false",
        help="do not write a checkpoint when a trial ends",
    )
    p.add_argument(
        "--keep-checkpoints-num", type=int, default=None, help="keep only the N newest checkpoints"
    )
    p.add_argument("--storage-path", default=None, help="where results go (default ~/ray_results)")
    p.add_argument(
        "--max-failures",
        type=int,
        default=None,
        help="restart a failed trial (e.g. its node died) from its last checkpoint "
        "up to N times (default 0; -1: without limit)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="resume an interrupted experiment of the same name and storage path "
        "from its checkpoints (same as `rllib resume <storage>/<name>`)",
    )
    p.add_argument(
        "--wandb-project",
        default=None,
        help="also log every trial to this Weights & Biases project (pip install wandb; "
        "`wandb login`, or WANDB_MODE=offline)",
    )
    p.add_argument(
        "--plot",
        default=None,
        help="write reward/cost per iteration to this PNG (default: <trial>/progress.png)",
    )
    p.add_argument("-v", action="count", default=0, help="more output (-vv: Tune's own tables)")
    common.add_ray_args(p)


def add_parser(sub) -> None:
    """``rllib train`` on the subcommands of the main parser."""
    train = sub.add_parser(
        "train",
        help="train an algorithm; `rllib train file FILE.yaml` runs a Tune experiment file",
        description="Train an algorithm with Ray Tune. Use `rllib train file FILE.yaml` to run "
        "a Tune experiment file (grid_search allowed; see `rllib train file --help`).",
        epilog=EPILOG + "\n" + RESULTS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--algo", "-a", default=None, help="algorithm name: CVPO, PPO, SAC, ...")
    train.add_argument(
        "--env", "-e", default=None, help="env id, e.g. SafetyPointGoal1-v0 or cvpo/PointHazard-v0"
    )
    train.add_argument(
        "--config", "-c", default="{}", help="algorithm config as JSON (keys of AlgorithmConfig)"
    )
    add_run_args(train)


# -- algorithm and env ----------------------------------------------------------------------
def _own_algorithm(name: str):
    """(Algorithm class, config class) of one of :data:`OWN_ALGORITHMS`."""
    if name == "CVPO":
        from rllib_ext.cvpo import CVPO, CVPOConfig

        return CVPO, CVPOConfig
    from rllib_ext.sac_lag import SACLag, SACLagConfig

    return SACLag, SACLagConfig


def _known_algorithms() -> list[str]:
    from ray.rllib.algorithms.registry import ALGORITHMS

    return sorted(set(ALGORITHMS) | set(OWN_ALGORITHMS))


def resolve_algorithm(name: str | None):
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


def check_env(env: str | None, env_config: dict[str, Any]) -> None:
    """Clear errors for an unknown env or one without a cost signal, before Ray starts."""
    if not env:
        raise CLIError("no env given: pass --env SafetyPointGoal1-v0 (or cvpo/PointHazard-v0)")
    from cvpo import envs as cvpo_envs
    from cvpo.defaults import DEFAULT_COST_KEY
    from rllib_ext.envs import probe_env

    try:
        probe_env(env, dict(env_config), [DEFAULT_COST_KEY])
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


def _experiment_config(algo_name: str, env: str, config: dict[str, Any]) -> dict[str, Any]:
    from rllib_ext.common.callbacks import CostMetricsCallback

    param_space = dict(config)
    param_space["env"] = env
    if algo_name not in OWN_ALGORITHMS:
        param_space.setdefault("callbacks", CostMetricsCallback)
    return param_space


def _check_own_config(param_space: dict[str, Any], algo_name: str = "CVPO") -> None:
    """Validates a CVPO (or SACLag) config before Tune starts (grid-search values are skipped)."""
    config_cls = _own_algorithm(algo_name)[1]

    plain = {
        k: v for k, v in param_space.items() if not (isinstance(v, dict) and "grid_search" in v)
    }
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
    """A command-line flag wins over the experiment file, which wins over the default."""
    if flag is not None:
        return flag
    return from_file if from_file is not None else default


# -- Tune callbacks and results ---------------------------------------------------------------
def _wandb_callback(project: str):
    """Tune's W&B logger for ``project``, or a CLIError saying how to get it working."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise CLIError(
            "--wandb-project needs the wandb package: pip install wandb "
            "(or pip install -e '.[wandb]')"
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


def report_results(results, args, algo_name: str, exp_dir: str) -> int:
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
        title = f"{algo_name} on {config.get('env')}"
        png = plot_progress(res.metrics_dataframe, out, title, limit)
        ckpt_path = res.checkpoint.path if res.checkpoint else None
        print(f"trial {trial_dir.name}: checkpoint {ckpt_path}; plot {png}", flush=True)
    print(f"curves: tensorboard --logdir {exp_dir}", flush=True)
    if unfinished:
        print(
            f"interrupted: {unfinished} trial(s) did not reach the stop criterion; continue with "
            f"`rllib resume {exp_dir}`",
            flush=True,
        )
        return max(status, 130)
    return status


# -- running ---------------------------------------------------------------------------------
def run_experiments(experiments: dict[str, dict[str, Any]], args) -> int:
    """Runs Tune experiments ({name: {run, env, config, stop, ...}}) one after another.

    Each spec holds only the keys of
    :data:`rllib_ext.cli.experiment_file.EXPERIMENT_KEYS` (see
    :func:`rllib_ext.cli.experiment_file.normalize_experiment`); command-line
    flags override its values.
    """
    from ray import tune
    from ray.tune import CheckpointConfig, FailureConfig, RunConfig, TuneConfig

    import rllib_ext  # noqa: F401

    stop_override = json_arg(args.stop, "--stop") if args.stop else None
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
            _check_own_config(param_space, algo_name)
        prepared.append((name, spec, algo_cls, param_space))

    tune_callbacks(args)  # a missing wandb or W&B login fails here, before Ray starts
    common.init_ray(args)
    status = 0
    for name, spec, algo_cls, param_space in prepared:
        stop = stop_override if stop_override is not None else (spec.get("stop") or {})
        ckpt = spec.get("checkpoint_config") or {}
        checkpoint_config = CheckpointConfig(
            checkpoint_frequency=int(
                _pick(args.checkpoint_freq, ckpt.get("checkpoint_frequency"), 0)
            ),
            checkpoint_at_end=bool(
                _pick(args.checkpoint_at_end, ckpt.get("checkpoint_at_end"), True)
            ),
            num_to_keep=_pick(args.keep_checkpoints_num, ckpt.get("num_to_keep"), None),
            checkpoint_score_attribute=ckpt.get("checkpoint_score_attribute"),
            checkpoint_score_order=ckpt.get("checkpoint_score_order", "max"),
        )
        # s3://, gs:// stay as they are; a local path is made absolute
        storage = local_abspath(args.storage_path or spec.get("storage_path") or "~/ray_results")
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
            for path in common.repair_trial_logs(exp_dir):
                print(f"cut a partial last line off {path} (kept in {path}.partial)", flush=True)
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
        status = max(status, report_results(tuner.fit(), args, algo_cls.__name__, exp_dir))
    return status


def cmd_train(args) -> int:
    config = json_arg(args.config, "--config")
    name = args.experiment_name or f"{args.algo}_{(args.env or '').replace('/', '_')}"
    experiments = {name: {"run": args.algo, "env": args.env, "config": config}}
    return run_experiments(experiments, args)
