"""A cost-limit sweep with Ray Tune, written in Python, then its report.

The same experiment as ``cost_limit_sweep.yaml`` (cost limits x seeds on
SafetyPointGoal1-v0), for people who drive Tune from Python: it builds the
``param_space`` from a :class:`~rllib_ext.cvpo.CVPOConfig`, runs
``tune.Tuner("CVPO", ...)`` and writes ``report.csv``, ``report.md`` and
``report.png`` (final reward, cost and violation rate per cost limit) into the
experiment folder with :func:`rllib_ext.cli.report.write_report`.

Full sweep (9 trials; on the cluster one trial at a time, one GPU learner each)::

    python tuned_examples/cvpo/cost_limit_sweep.py

A smoke test of the whole pipeline in about a minute on a laptop::

    python tuned_examples/cvpo/cost_limit_sweep.py --env cvpo/PointHazard-v0 \\
        --limits 2 10 --seeds 0 --stop-steps 600 --smoke --storage-path /tmp/sweeps

``--smoke`` only shrinks the networks and the warm-up so that a few hundred env
steps run some updates; it learns nothing. ``--config '{...}'`` sets any other
CVPOConfig key. A local machine without a GPU runs the learner on its CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

# What one trial of the full sweep asks for (as cost_limit_sweep.yaml; see
# cluster/README.md): 15 single-CPU EnvRunners fit one cpu_rollout node (or
# KubeRay pod), the learner takes the GPU node's only GPU, so the cluster runs
# one trial at a time. Without a GPU the learner falls back to the CPU.
CLUSTER_RESOURCES: dict[str, Any] = {
    "num_env_runners": 15,
    "num_learners": 1,
    "num_gpus_per_learner": 1,
}
# Tiny networks and an early start of learning: checks the pipeline, learns nothing.
SMOKE: dict[str, Any] = {
    "num_env_runners": 0,
    "num_learners": 0,
    "num_gpus_per_learner": 0,
    "actor_hiddens": [32, 32],
    "critic_hiddens": [32, 32],
    "train_batch_size_per_learner": 64,
    "num_sampled_actions": 8,
    "updates_per_learner_call": 4,
    "training_intensity": 0.1,
    "num_steps_sampled_before_learning_starts": 200,
    "min_sample_timesteps_per_iteration": 200,
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Sweep CVPO over cost limits (x seeds) with Ray Tune and write a report.",
        epilog="example (about a minute): %(prog)s --env cvpo/PointHazard-v0 --limits 2 10 "
        "--seeds 0 --stop-steps 600 --smoke --storage-path /tmp/sweeps",
    )
    p.add_argument("--env", default="SafetyPointGoal1-v0", help="env id (default %(default)s)")
    p.add_argument(
        "--limits",
        type=float,
        nargs="+",
        default=[10.0, 25.0, 50.0],
        help="episodic cost limits, one grid point each (default %(default)s)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="seeds per limit (default %(default)s)",
    )
    p.add_argument(
        "--stop-steps",
        type=int,
        default=1_000_000,
        help="stop each trial after this many sampled env steps (default %(default)s)",
    )
    p.add_argument(
        "--num-env-runners",
        type=int,
        default=None,
        help=f"EnvRunners per trial (default {CLUSTER_RESOURCES['num_env_runners']}, "
        "or 0 with --smoke)",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny networks and warm-up: a fast check of the pipeline, no learning",
    )
    p.add_argument("--config", default="{}", help="extra CVPOConfig keys as JSON")
    p.add_argument(
        "--max-concurrent-trials",
        type=int,
        default=None,
        help="trials at once (default 1: the cluster has one GPU, and pending "
        "trials would make the autoscaler start CPU nodes they cannot use yet; "
        "with --smoke: as many as fit)",
    )
    p.add_argument(
        "--checkpoint-at-end",
        action="store_true",
        help="save each trial's final policy; on a multi-node cluster this needs a "
        "--storage-path every node can write (trials run on worker nodes)",
    )
    p.add_argument("--experiment-name", default="cvpo-cost-limit-sweep-py")
    p.add_argument(
        "--storage-path",
        default="~/ray_results",
        help="results go here: a folder, or a URI every node can write (s3://...); "
        "default %(default)s",
    )
    p.add_argument(
        "--ray-address", default=None, help="join a running cluster (default: local Ray)"
    )
    p.add_argument("--ray-num-cpus", type=int, default=None, help="CPUs of the local Ray")
    p.add_argument(
        "--report-last",
        type=int,
        default=5,
        help="the report averages the last N iterations of each trial (default %(default)s)",
    )
    return p.parse_args(argv)


def build_param_space(args: argparse.Namespace) -> dict[str, Any]:
    """Tune's param_space: a CVPOConfig as a dict, with grid searches over limits and seeds."""
    from ray import tune

    from rllib_ext.cvpo import CVPOConfig

    try:
        extra = json.loads(args.config)
    except json.JSONDecodeError as err:
        raise SystemExit(f"--config is not valid JSON: {err}") from None
    if not isinstance(extra, dict):
        raise SystemExit("--config must be a JSON object, e.g. '{\"kl_bound\": 0.05}'")
    keys = dict(SMOKE if args.smoke else CLUSTER_RESOURCES)
    if args.num_env_runners is not None:
        keys["num_env_runners"] = args.num_env_runners
    keys.update(extra)

    config = CVPOConfig().environment(args.env)
    unknown = sorted(k for k in keys if not hasattr(config, k))
    if unknown:
        raise SystemExit(f"unknown CVPOConfig key(s): {', '.join(unknown)}")
    config.update_from_dict(keys)
    # Fail fast (bad values, unknown env) before Ray starts, on a throwaway copy.
    # Whether a GPU can be had is left to Tune's driver, which asks once Ray runs
    # (on the cluster: the autoscaler's GPU node); asked here, before ray.init,
    # a head node without a GPU would print a false CPU-fallback notice.
    check = config.copy(copy_frozen=False)
    check.num_gpus_per_learner = 0
    check.validate()

    space = config.to_dict()
    space["cost_limit"] = tune.grid_search([float(c) for c in args.limits])
    space["seed"] = tune.grid_search(list(args.seeds))
    return space


def progress_printer():
    """A Tune callback printing one line per trial iteration (reward, cost vs limit)."""
    from ray.tune import Callback

    from rllib_ext.progress import progress_line

    class _Progress(Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            print(f"[{trial.trial_id}] {progress_line(result)}", flush=True)

    return _Progress()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    import ray
    from ray import tune

    import rllib_ext  # registers "CVPO" and the envs with Tune
    from rllib_ext.cli.report import write_report

    param_space = build_param_space(args)
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"log_to_driver": False}
        if args.ray_address:
            kwargs["address"] = args.ray_address
        else:
            kwargs["include_dashboard"] = False
            if args.ray_num_cpus is not None:
                kwargs["num_cpus"] = args.ray_num_cpus
        ray.init(**kwargs)
        rllib_ext.register()  # Tune's registry is per Ray session

    storage = args.storage_path
    if "://" not in storage:  # keep s3://, gs://, ... URIs as they are
        storage = os.path.abspath(os.path.expanduser(storage))
    max_concurrent = args.max_concurrent_trials
    if max_concurrent is None and not args.smoke:
        max_concurrent = 1
    tuner = tune.Tuner(
        "CVPO",
        param_space=param_space,
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent),
        run_config=tune.RunConfig(
            name=args.experiment_name,
            storage_path=storage,
            stop={"num_env_steps_sampled_lifetime": args.stop_steps},
            checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=args.checkpoint_at_end),
            callbacks=[progress_printer()],
            verbose=0,
        ),
    )
    results = tuner.fit()
    failed: list[str] = [os.path.basename(r.path) for r in results if r.error]
    for name in failed:
        print(f"trial {name} failed; see its error.txt", flush=True)

    exp_dir = os.path.join(storage, args.experiment_name)
    if "://" in exp_dir:
        print(f"results are in {exp_dir}; fetch them, then: rllib report <folder>", flush=True)
        return 1 if failed else 0
    out = write_report(exp_dir, last_n=args.report_last)
    print(open(out["markdown"]).read(), flush=True)
    for kind, path in out.items():
        print(f"{kind}: {path}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
