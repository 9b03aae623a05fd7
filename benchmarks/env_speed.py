"""Random-action environment step rate through ``cvpo.envs.make_env`` (one process).

Usage::

    python benchmarks/env_speed.py                      # SafetyPointGoal1-v0, cvpo/PointHazard-v0
    python benchmarks/env_speed.py SafetyCarGoal1-v0 --steps 5000

For each id: make the env, ``reset(seed)``, pre-sample ``--steps`` actions
from the seeded action space (sampling is not timed), then time ``step()``
over them, calling ``reset()`` whenever an episode ends (resets are timed:
they are part of every rollout). Also reported: the time to construct the env
and do its first reset. Progress lines go to stderr; the last line of stdout
is one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

DEFAULT_IDS = ("SafetyPointGoal1-v0", "cvpo/PointHazard-v0")


def measure(env_id: str, steps: int, seed: int) -> dict:
    from cvpo.envs import make_env

    start = time.perf_counter()
    env = make_env(env_id)
    env.reset(seed=seed)
    setup_s = time.perf_counter() - start

    env.action_space.seed(seed)
    actions = [env.action_space.sample() for _ in range(steps)]
    episodes = 0
    cost = 0.0
    start = time.perf_counter()
    for action in actions:
        _, _, terminated, truncated, info = env.step(action)
        cost += info["cost"]
        if terminated or truncated:
            episodes += 1
            env.reset()
    elapsed = time.perf_counter() - start
    env.close()
    return {
        "steps": steps,
        "seconds": round(elapsed, 4),
        "steps_per_s": round(steps / elapsed, 1),
        "episodes_finished": episodes,
        "mean_cost_per_step": round(cost / steps, 5),
        "make_and_first_reset_s": round(setup_s, 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("env_ids", nargs="*", default=list(DEFAULT_IDS))
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="steps per id (default: 5000 for Safety ids, 200000 otherwise)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import mujoco

    results = {}
    for env_id in args.env_ids:
        steps = args.steps or (5_000 if env_id.startswith("Safety") else 200_000)
        results[env_id] = measure(env_id, steps, args.seed)
        print(f"{env_id}: {results[env_id]['steps_per_s']:,.0f} steps/s", file=sys.stderr)
    document = {
        "benchmark": "env_speed",
        "unit": "random-action env steps per second, one process, through cvpo.envs.make_env",
        "results": results,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "mujoco": mujoco.__version__,
        "cpu_count": os.cpu_count(),
        "skybox": os.environ.get("CVPO_SAFETY_SKYBOX", "low"),
    }
    print(json.dumps(document))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
