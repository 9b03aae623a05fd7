"""End-to-end throughput of CVPO on a Safety-Gymnasium task, and EnvRunner scaling.

For each N in --runners, a CVPO run with N EnvRunners (1 CPU each) on
SafetyPointGoal1-v0 at update ratio 0.2 (the reference's setting) is timed
after a warm-up: env steps/s and gradient updates/s of the whole loop
(sampling, replay, learner updates, weight sync). The same N is also run with
sampling only (no learner updates) to isolate rollout scaling. The raw
random-action step rate of the env on one core, measured in the same process,
is the ceiling. Scaling efficiency = throughput(N) / (N * throughput(1)).

Reference (FSRL's CVPO on this 2-core machine): 185 env steps/s end to end on
SafetyPointGoal1 at update ratio 0.2.

Prints one JSON document as its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def raw_env_rate(env_id: str, seconds: float) -> float:
    from cvpo.envs import make_env

    env = make_env(env_id)
    env.reset(seed=0)
    env.action_space.seed(0)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        _, _, term, trunc, _ = env.step(env.action_space.sample())
        n += 1
        if term or trunc:
            env.reset()
    rate = n / (time.perf_counter() - t0)
    env.close()
    return rate


def run(
    env_id: str,
    runners: int,
    seconds: float,
    intensity: float,
    learn: bool,
    args,
    async_sampling: bool | None = None,
) -> dict:
    from rllib_ext.common import metrics as M
    from rllib_ext.cvpo import CVPOConfig

    cfg = (
        CVPOConfig()
        .environment(env_id)
        .env_runners(
            num_env_runners=runners,
            num_envs_per_env_runner=args.envs_per_runner,
            rollout_fragment_length=args.fragment,
        )
        .training(
            training_intensity=intensity if learn else 1e-9,
            num_sampled_actions=16,
            actor_hiddens=[128, 128],
            critic_hiddens=[128, 128],
            train_batch_size_per_learner=256,
            num_steps_sampled_before_learning_starts=1000,
            updates_per_learner_call=args.updates_per_call,
            num_reward_critics=args.reward_critics,
            num_cost_critics=1,  # the reference (FSRL) has one cost critic
            cost_critic_reduction="mean",
            async_sampling=(not args.sync) if async_sampling is None else async_sampling,
        )
        .debugging(seed=0)
    )
    cfg.min_sample_timesteps_per_iteration = 1000
    algo = cfg.build_algo()
    try:
        # warm-up: past the learning start, so the timed window includes updates
        while True:
            r = algo.train()
            if r["env_runners"]["num_env_steps_sampled_lifetime"] >= 2000:
                break
        s0 = r["env_runners"]["num_env_steps_sampled_lifetime"]
        u0 = r[M.CVPO_RESULTS][M.UPDATES_LIFETIME]
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            r = algo.train()
        dt = time.perf_counter() - t0
        steps = r["env_runners"]["num_env_steps_sampled_lifetime"] - s0
        updates = r[M.CVPO_RESULTS][M.UPDATES_LIFETIME] - u0
    finally:
        algo.stop()
    return {
        "runners": runners,
        "learn": learn,
        "async_sampling": bool(cfg.async_sampling),
        "env_steps_per_s": round(steps / dt, 1),
        "updates_per_s": round(updates / dt, 1),
        "seconds": round(dt, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env", default="SafetyPointGoal1-v0")
    p.add_argument(
        "--runners",
        default=None,
        help="comma list (default: 1..cores-1 end to end, 1..cores sampling only)",
    )
    p.add_argument("--seconds", type=float, default=60.0, help="timed window per run")
    p.add_argument("--intensity", type=float, default=0.2)
    p.add_argument(
        "--envs-per-runner",
        type=int,
        default=4,
        help="vectorized envs per EnvRunner (one policy forward per step for all)",
    )
    p.add_argument("--fragment", type=int, default=100)
    p.add_argument("--updates-per-call", type=int, default=8)
    p.add_argument(
        "--reward-critics",
        type=int,
        default=1,
        help="reward critics (1: the reference, FSRL's double_critic=False)",
    )
    p.add_argument("--sync", action="store_true", help="sample and update in lockstep")
    p.add_argument("--quick", action="store_true", help="20 s windows")
    args = p.parse_args()
    if args.quick:
        args.seconds = 20.0
    cores = os.cpu_count() or 1
    if args.runners:
        runners = sampling_runners = [int(x) for x in args.runners.split(",")]
    else:
        # end to end, the learner needs a core of its own; sampling only, the
        # driver idles and every core can run an EnvRunner
        runners = list(range(1, max(cores - 1, 1) + 1))
        sampling_runners = list(range(1, cores + 1))
    import ray

    ray.init(
        num_cpus=max(cores, max(sampling_runners) + 1), include_dashboard=False, log_to_driver=False
    )
    ceiling = raw_env_rate(args.env, 5.0 if args.quick else 10.0)
    results = []
    for learn, counts in ((True, runners), (False, sampling_runners)):
        for n in counts:
            res = run(args.env, n, args.seconds, args.intensity, learn, args)
            print(json.dumps(res), flush=True)
            results.append(res)
    # the same-run baseline of the overlap: 1 runner, sample-then-update in lockstep
    lockstep = None
    if not args.sync:
        lockstep = run(
            args.env, runners[0], args.seconds, args.intensity, True, args, async_sampling=False
        )
        print(json.dumps(lockstep), flush=True)
    ray.shutdown()

    def eff(rows):
        base = rows[0]["env_steps_per_s"]
        return {
            str(r["runners"]): round(r["env_steps_per_s"] / (r["runners"] * base), 3) for r in rows
        }

    e2e = [r for r in results if r["learn"]]
    sampling = [r for r in results if not r["learn"]]
    best = max(r["env_steps_per_s"] for r in e2e)
    out = {
        "benchmark": "throughput",
        "env": args.env,
        "cpu_count": cores,
        "update_ratio": args.intensity,
        "num_reward_critics": args.reward_critics,
        "async_sampling": not args.sync,
        "envs_per_runner": args.envs_per_runner,
        "raw_env_steps_per_s_one_core": round(ceiling, 1),
        "end_to_end": e2e,
        "sampling_only": sampling,
        "scaling_efficiency_end_to_end": eff(e2e),
        "scaling_efficiency_sampling_only": eff(sampling),
        "best_env_steps_per_s": best,
        "lockstep_sampling_end_to_end": lockstep,
        "async_over_lockstep": None
        if lockstep is None
        else round(e2e[0]["env_steps_per_s"] / lockstep["env_steps_per_s"], 2),
        "reference_env_steps_per_s": 185.0,
        "ratio_vs_reference": round(best / 185.0, 2),
        "note": "efficiency beyond cores-1 runners is bounded by the cores left for the learner",
    }
    print(json.dumps(out))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
