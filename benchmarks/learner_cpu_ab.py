"""CPU time per learner update of two source trees, alternated (A B A B ...), as JSON.

For comparing a change with its base on a loaded machine: wall-clock updates/s drift
with whatever else runs, the CPU seconds a process spends per update much less. Each
sample runs in a fresh subprocess with that tree's ``src`` and root first on
``sys.path`` and one torch thread, builds the real RLlib learner
(``benchmarks/learner.py``'s ``build_learner``: batch 256, K=16, 128x128,
SafetyPointGoal1 dimensions) and reports the minimum over 6 blocks of 5 learner calls
(8 updates each) of CPU ms per update.

    git worktree add /tmp/base <commit>
    python benchmarks/learner_cpu_ab.py /tmp/base . --rounds 3 --reward-critics 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import types

_ONE_SAMPLE = "one-sample"


def _sample(reward_critics: int) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    import learner as bench  # the tree's own benchmarks/learner.py (on sys.path)
    from ray.rllib.core import DEFAULT_MODULE_ID
    from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch

    args = types.SimpleNamespace(
        batch=256,
        K=16,
        obs_dim=60,
        act_dim=2,
        updates_per_call=8,
        device="cpu",
        reward_critics=reward_critics,
        solver="newton",
        hidden=128,
    )
    _, learner = bench.build_learner(args)
    rng = np.random.default_rng(0)

    def one_call():
        data = bench._fake_batch(rng, 8 * 256, 60, 2, 1)
        batch = MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(data)}, env_steps=8 * 256)
        learner.update(
            batch=batch,
            minibatch_size=256,
            num_epochs=1,
            timesteps={"num_env_steps_sampled_lifetime": 10_000},
        )

    for _ in range(3):
        one_call()
    blocks = []
    for _ in range(6):
        t0 = time.process_time()
        for _ in range(5):
            one_call()
        blocks.append((time.process_time() - t0) / 40 * 1e3)
    return {"cpu_ms_per_update": round(min(blocks), 3)}


def _run(tree: str, reward_critics: int) -> float:
    tree = os.path.abspath(tree)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([f"{tree}/src", tree, f"{tree}/benchmarks"]))
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), _ONE_SAMPLE, str(reward_critics)],
        env=env,
        cwd=tree,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["cpu_ms_per_update"]


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == _ONE_SAMPLE:
        print(json.dumps(_sample(int(sys.argv[2]))))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("base", help="source tree A (e.g. a git worktree of the base commit)")
    p.add_argument("new", help="source tree B")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reward-critics", type=int, default=1)
    args = p.parse_args()
    a, b = [], []
    for _ in range(args.rounds):
        a.append(_run(args.base, args.reward_critics))
        b.append(_run(args.new, args.reward_critics))
    ratios = [x / y for x, y in zip(a, b)]
    print(
        json.dumps(
            {
                "reward_critics": args.reward_critics,
                "base_cpu_ms_per_update": a,
                "new_cpu_ms_per_update": b,
                "speedup_new_vs_base_median": round(sorted(ratios)[len(ratios) // 2], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
