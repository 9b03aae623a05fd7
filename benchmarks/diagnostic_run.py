"""A diagnostic training run: a tuned example with config overrides, not a RESULTS.md row.

Trains the tuned example of ``--task`` (as ``make reproduce`` does: local placement,
evaluation on) with ``--config`` JSON overrides for ``--steps`` env steps, writes the
per-iteration log (the same columns as ``make reproduce``'s progress.jsonl) and the
final checkpoint to ``--out``, evaluates the final checkpoint (20 deterministic
episodes, the reproduce seeds) and prints one JSON document as its last line. Compare
its log with a recorded run's (``benchmarks/constraint_diagnosis.py --critic-tracking``).

  .venv/bin/python benchmarks/diagnostic_run.py --task SafetyPointGoal1-v0 --steps 240000 \\
      --config '{"cost_target_actions": "replay"}' --out results/diagnostic/pg1_replay
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", required=True)
    p.add_argument("--algo", default="CVPO")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--config", default="{}", help="JSON overrides of the tuned example")
    p.add_argument("--out", required=True, help="folder for progress.jsonl and the checkpoint")
    args = p.parse_args(argv)
    overrides = json.loads(args.config)

    import ray

    from rllib_ext import reproduce
    from rllib_ext.cli.evaluate import evaluate_checkpoint
    from rllib_ext.progress import ProgressLine, env_steps

    config = reproduce.local_config(args.algo, args.task, args.seed, args.steps)
    config = config.update_from_dict(overrides)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    algorithm = config.build_algo()
    algorithm.best_feasible_path = str(out / "best_feasible")
    line, t0 = ProgressLine(), time.time()
    with open(out / "progress.jsonl", "w") as log:
        try:
            while True:
                result = algorithm.train()
                print(line(result), flush=True)
                log.write(json.dumps(reproduce._log_row(result)) + "\n")
                log.flush()
                if (env_steps(result) or 0) >= args.steps:
                    break
            algorithm.save_to_path(str(out / "final"))
        finally:
            algorithm.stop()
    final = evaluate_checkpoint(
        out / "final", episodes=reproduce.FINAL_EPISODES, seed=reproduce.FINAL_SEED
    )
    doc = {
        "benchmark": "diagnostic_run",
        "task": args.task,
        "algo": args.algo,
        "seed": args.seed,
        "env_steps": args.steps,
        "overrides": overrides,
        "minutes": round((time.time() - t0) / 60, 1),
        "final_return": final["reward_mean"],
        "final_cost": final["cost_mean"],
        "final_cost_se": final["cost_std"] / math.sqrt(final["episodes"]),
        "commit": reproduce.git_commit(),
    }
    print(json.dumps(doc), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
