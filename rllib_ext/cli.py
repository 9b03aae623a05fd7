"""The ``rllib`` command (Ray 2.60 ships none): train, train file, evaluate, report.

Shape of the CLI Ray last shipped in 2.40::

    rllib train --algo CVPO --env SafetyPointGoal1-v0 [--config JSON] [--stop JSON]
    rllib train file tuned_examples/cvpo/point_hazard.yaml
    rllib evaluate CHECKPOINT [--env ID] [--episodes N] [--render OUT.gif]
    rllib report EXPERIMENT_DIR

Everything runs on a local Ray by default (``--ray-address`` joins a cluster).
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

EPILOG = """examples:
  rllib train --algo CVPO --env cvpo/PointHazard-v0 --stop '{"training_iteration": 5}'
  rllib train --algo CVPO --env SafetyPointGoal1-v0 --config '{"cost_limit": 25}'
  rllib train file tuned_examples/cvpo/cost_limit_sweep.yaml
  rllib evaluate ~/ray_results/CVPO_.../checkpoint_000004 --episodes 10
  rllib report ~/ray_results/cost_limit_sweep
"""


class CLIError(Exception):
    """A user error: printed as one clear message, exit status 2."""


from rllib_ext.evaluate import CheckpointError  # noqa: E402
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
    p.add_argument("--num-samples", type=int, default=1, help="repeat each trial N times (default 1)")
    p.add_argument("--checkpoint-freq", type=int, default=0, help="checkpoint every N iterations (0: never)")
    p.add_argument("--checkpoint-at-end", dest="checkpoint_at_end", action="store_true", default=True,
                   help="write a checkpoint when a trial ends (default)")
    p.add_argument("--no-checkpoint-at-end", dest="checkpoint_at_end", action="store_false")
    p.add_argument("--keep-checkpoints-num", type=int, default=None, help="keep only the N newest checkpoints")
    p.add_argument("--storage-path", default=None, help="where results go (default ~/ray_results)")
    p.add_argument("--resume", action="store_true", help="resume an interrupted experiment of the same name")
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
    sub = parser.add_subparsers(dest="command", metavar="{train,evaluate,report}")

    train = sub.add_parser(
        "train",
        help="train an algorithm (or `rllib train file FILE` for a YAML experiment)",
        description="Train an algorithm with Ray Tune. Use `rllib train file FILE.yaml` to run "
        "a Tune experiment file (grid_search allowed).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--algo", "-a", default=None, help="algorithm name: CVPO, PPO, SAC, ...")
    train.add_argument("--env", "-e", default=None, help="env id, e.g. SafetyPointGoal1-v0 or cvpo/PointHazard-v0")
    train.add_argument("--config", "-c", default="{}", help="algorithm config as JSON (keys of AlgorithmConfig)")
    _add_run_args(train)

    train_file = sub.add_parser(
        "train-file",
        help=argparse.SUPPRESS,
        description="Run a Tune experiment file: {name: {run: ALGO, env: ID, stop: {...}, config: {...}}}.",
    )
    train_file.add_argument("file", help="YAML experiment file")
    _add_run_args(train_file)

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
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--render", default=None, help="write a video of the first episode (.mp4 or .gif)")
    ev.add_argument("--out", default=None, help="also write the results as JSON here")

    rep = sub.add_parser(
        "report",
        help="table (CSV, markdown) and PNG of a finished or interrupted sweep",
        description="Reads Tune's result files of an experiment directory and writes a table of "
        "final reward, final cost and violation rate per cost limit plus a PNG.",
    )
    rep.add_argument("experiment_dir", help="the experiment folder (contains one folder per trial)")
    rep.add_argument("--out", default=None, help="output folder (default: the experiment folder)")
    rep.add_argument("--last", type=int, default=5, help="average the last N iterations (default 5)")
    return parser


# -- helpers --------------------------------------------------------------------------------
def _known_algorithms() -> List[str]:
    from ray.rllib.algorithms.registry import ALGORITHMS

    return sorted(set(ALGORITHMS) | {"CVPO"})


def resolve_algorithm(name: Optional[str]):
    """The Algorithm class for ``name`` (registered CVPO, or an RLlib built-in)."""
    import rllib_ext  # noqa: F401  (registers CVPO)

    if not name:
        raise CLIError("no algorithm given: pass --algo CVPO (or PPO, SAC, ...)")
    if name == "CVPO":
        from rllib_ext.cvpo import CVPO

        return CVPO
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


def _fmt(x: Any, spec: str = ".2f") -> str:
    try:
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)
    except (TypeError, ValueError):
        return str(x)


def progress_line(result: Dict[str, Any]) -> str:
    """One line per iteration: steps, reward, cost vs limit, updates, time."""
    from rllib_ext.cvpo import metrics as M

    er = result.get("env_runners", {}) or {}
    cfg = result.get("config", {}) or {}
    limit = cfg.get("cost_limit")
    steps = er.get("num_env_steps_sampled_lifetime", result.get("num_env_steps_sampled_lifetime"))
    parts = [
        f"iter {result.get('training_iteration', '?'):>4}",
        f"steps {_fmt(steps, ',.0f')}",
        f"return {_fmt(er.get(M.EPISODE_RETURN_MEAN))}",
        f"cost {_fmt(er.get(M.EPISODE_COST_MEAN))}" + (f" (limit {limit})" if limit is not None else ""),
    ]
    if M.COST_VIOLATION_RATE in er:
        parts.append(f"over limit {_fmt(100 * er[M.COST_VIOLATION_RATE], '.0f')}%")
    cv = result.get(M.CVPO_RESULTS, {}) or {}
    if M.UPDATES_LIFETIME in cv:
        parts.append(f"updates {_fmt(cv[M.UPDATES_LIFETIME], ',.0f')}")
    parts.append(f"time {_fmt(result.get('time_total_s'), '.1f')}s")
    return " | ".join(parts)


def _progress_callback():
    from ray.tune import Callback

    class _Progress(Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            prefix = f"[{trial.trial_id}] " if len(trials) > 1 else ""
            print(prefix + progress_line(result), flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"[{trial.trial_id}] trial failed; see {trial.local_path}/error.txt", flush=True)

    return _Progress()


def plot_progress(df, out: Path, title: str, cost_limit: Optional[float]) -> Optional[Path]:
    """PNG of reward and cost per iteration, with the cost limit drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rllib_ext.cvpo import metrics as M

    r_col = f"env_runners/{M.EPISODE_RETURN_MEAN}"
    c_col = f"env_runners/{M.EPISODE_COST_MEAN}"
    if df is None or r_col not in df:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(df["training_iteration"], df[r_col], color="tab:blue")
    ax1.set_xlabel("iteration")
    ax1.set_ylabel("mean episode return")
    ax1.grid(alpha=0.3)
    if c_col in df:
        ax2.plot(df["training_iteration"], df[c_col], color="tab:red", label="mean episode cost")
    if cost_limit is not None and math.isfinite(cost_limit):
        ax2.axhline(cost_limit, color="k", ls="--", label=f"cost limit {cost_limit:g}")
    ax2.set_xlabel("iteration")
    ax2.set_ylabel("mean episode cost")
    ax2.grid(alpha=0.3)
    ax2.legend(loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# -- train -----------------------------------------------------------------------------------
def _experiment_config(algo_name: str, env: str, config: Dict[str, Any]) -> Dict[str, Any]:
    from rllib_ext.cvpo.callbacks import CostMetricsCallback

    param_space = dict(config)
    param_space["env"] = env
    if algo_name != "CVPO":
        param_space.setdefault("callbacks", CostMetricsCallback)
    return param_space


def _check_cvpo_config(param_space: Dict[str, Any]) -> None:
    """Validates a CVPO config before Tune starts (grid-search values are skipped)."""
    from rllib_ext.cvpo import CVPOConfig

    plain = {k: v for k, v in param_space.items() if not (isinstance(v, dict) and "grid_search" in v)}
    unknown = [k for k in plain if k != "env" and not hasattr(CVPOConfig(), k)]
    if unknown:
        known = [k for k in vars(CVPOConfig()) if not k.startswith("_")]
        hints = {k: difflib.get_close_matches(k, known, n=2) for k in unknown}
        msg = "; ".join(f"{k!r}" + (f" (did you mean {h}?)" if h else "") for k, h in hints.items())
        raise CLIError(f"unknown CVPO config key(s): {msg}")
    try:
        check = CVPOConfig().update_from_dict(plain)
        check.num_gpus_per_learner = 0  # GPUs are Tune's business once Ray runs
        check.validate()
    except ValueError as err:
        raise CLIError(str(err).splitlines()[0]) from None


def run_experiments(experiments: Dict[str, Dict[str, Any]], args) -> int:
    """Runs Tune experiments ({name: {run, env, config, stop, ...}}) one after another."""
    from ray import tune
    from ray.tune import CheckpointConfig, RunConfig, TuneConfig

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
        if algo_name == "CVPO" and not env_grid:
            _check_cvpo_config(param_space)
        prepared.append((name, spec, algo_cls, param_space))

    _init_ray(args)
    status = 0
    for name, spec, algo_cls, param_space in prepared:
        stop = stop_override if stop_override is not None else (spec.get("stop") or {})
        ckpt = spec.get("checkpoint_config") or {}
        checkpoint_config = CheckpointConfig(
            checkpoint_frequency=int(ckpt.get("checkpoint_frequency", args.checkpoint_freq)),
            checkpoint_at_end=bool(ckpt.get("checkpoint_at_end", args.checkpoint_at_end)),
            num_to_keep=ckpt.get("num_to_keep", args.keep_checkpoints_num),
        )
        storage = args.storage_path or spec.get("storage_path") or os.path.expanduser("~/ray_results")
        if "://" not in storage:  # s3://, gs:// stay as they are
            storage = os.path.abspath(os.path.expanduser(storage))
        run_config = RunConfig(
            name=name,
            stop=stop,
            storage_path=storage,
            checkpoint_config=checkpoint_config,
            callbacks=[_progress_callback()],
            verbose=1 if args.v >= 2 else 0,
        )
        num_samples = int(spec.get("num_samples", args.num_samples))
        exp_dir = os.path.join(storage, name)
        print(f"== {name}: {algo_cls.__name__} on {param_space['env']} -> {exp_dir}", flush=True)
        if args.resume and tune.Tuner.can_restore(exp_dir):
            tuner = tune.Tuner.restore(exp_dir, trainable=algo_cls, resume_errored=True)
        else:
            tuner = tune.Tuner(
                algo_cls,
                param_space=param_space,
                run_config=run_config,
                tune_config=TuneConfig(
                    num_samples=num_samples,
                    max_concurrent_trials=spec.get("max_concurrent_trials"),
                ),
            )
        results = tuner.fit()
        for res in results:
            trial_dir = Path(res.path)
            if res.error:
                print(f"trial {trial_dir.name} failed: {str(res.error).splitlines()[0]}", flush=True)
                status = 1
                continue
            limit = (res.config or {}).get("cost_limit")
            limit = limit if isinstance(limit, (int, float)) else None
            out = Path(args.plot) if (args.plot and len(results) == 1) else trial_dir / "progress.png"
            png = plot_progress(res.metrics_dataframe, out, f"{algo_cls.__name__} on {res.config.get('env')}", limit)
            ckpt_path = res.checkpoint.path if res.checkpoint else None
            print(f"trial {trial_dir.name}: checkpoint {ckpt_path}; plot {png}", flush=True)
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
    for name, spec in data.items():
        if not isinstance(spec, dict) or not (spec.get("run") or spec.get("algo")):
            raise CLIError(f"{path}: experiment {name!r} needs a `run:` key naming the algorithm")
    return data


def cmd_train_file(args) -> int:
    return run_experiments(load_experiment_file(args.file), args)


# -- evaluate --------------------------------------------------------------------------------
def cmd_evaluate(args) -> int:
    try:
        res = _evaluate(args)
    except RuntimeError as err:  # rendering: no offscreen GL backend, no ffmpeg
        raise CLIError(str(err)) from None
    print(
        f"{res['episodes']} episodes on {res['env']}: mean reward {res['reward_mean']:.3f} "
        f"(std {res['reward_std']:.3f}), mean cost {res['cost_mean']:.3f} "
        f"(limit {_fmt(res['cost_limit'], 'g')}), violation rate {_fmt(res['violation_rate'], '.2f')}"
    )
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
    if len(argv) >= 2 and argv[0] == "train" and argv[1] == "file":
        argv = ["train-file"] + argv[2:]
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    handlers = {
        "train": cmd_train,
        "train-file": cmd_train_file,
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
        print(f"\ninterrupted after {time.time() - t0:.0f}s; results so far are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
