"""Overhead of the learner's non-finite guard on CVPO learner updates/s (A/B, one process).

A: the real ``CVPOTorchLearner``: one ``bool(torch.isfinite(total))`` per update
   in ``compute_loss_for_module`` (a host sync on a GPU), which skips the
   update when the loss is NaN/inf.
B: the same learner with the guard disabled: a subclass runs the very same
   ``compute_loss_for_module`` with the learner module's ``torch.isfinite``
   answering a plain ``True`` (no kernel, no sync), so ``_skip_update`` is
   always False. Nothing else differs: same config, seed, batches and code.

Both learners are built once; timed blocks of ``--calls`` learner calls
alternate A/B (order flipped every round) on the same pre-generated batches,
so machine-load drift hits both alike. The guard op alone is also timed
(``guard_op_us``) for a noise-free estimate of its share of an update.

Prints one JSON document as its last line: updates/s of both, the ratio
guarded/unguarded (1.0 = no overhead; below 1 = the guard costs), the
per-round ratios and the guard op's share.

    .venv/bin/python benchmarks/nan_check_overhead.py            # CPU, 1 thread
    .venv/bin/python benchmarks/nan_check_overhead.py --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import types

import numpy as np
import torch


class _TorchWithoutIsfinite(types.ModuleType):
    """``torch`` as seen by the learner module, except ``isfinite`` -> True.

    torch's namespace is copied in, so every other ``torch.X`` costs the same
    dict lookup as on the real module.
    """

    def __init__(self):
        super().__init__("torch")
        self.__dict__.update(vars(torch))
        self.isfinite = lambda tensor: True

    def __getattr__(self, name):  # torch's lazily loaded attributes
        return getattr(torch, name)


@contextlib.contextmanager
def _guard_disabled():
    from rllib_ext.common import torch_learner as mod

    mod.torch = _TorchWithoutIsfinite()
    try:
        yield
    finally:
        mod.torch = torch


def _unguarded_class():
    from rllib_ext.cvpo.torch.cvpo_torch_learner import CVPOTorchLearner

    class UnguardedCVPOTorchLearner(CVPOTorchLearner):
        def compute_loss_for_module(self, **kwargs):
            with _guard_disabled():
                return super().compute_loss_for_module(**kwargs)

    return UnguardedCVPOTorchLearner


def build_learner(args, learner_class=None):
    # benchmarks/ is on sys.path when this runs as a script
    from learner import build_learner as build

    return build(args, learner_class)[1]


def _batches(args, n):
    from ray.rllib.core import DEFAULT_MODULE_ID
    from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch

    rng = np.random.default_rng(0)
    rows = args.updates_per_call * args.batch
    out = []
    for _ in range(n):
        data = {
            "obs": rng.normal(size=(rows, args.obs_dim)).astype(np.float32),
            "actions": rng.uniform(-1, 1, size=(rows, args.act_dim)).astype(np.float32),
            "rewards": rng.normal(size=rows).astype(np.float32),
            "costs": rng.integers(0, 2, size=(rows, 1)).astype(np.float32),
            "next_obs": rng.normal(size=(rows, args.obs_dim)).astype(np.float32),
            "discounts": np.full(rows, 0.99**3, np.float32),
        }
        out.append(MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(data)}, env_steps=rows))
    return out


def guard_cost_us(device: str, n: int = 20_000) -> float:
    """Microseconds of the guard itself, ``bool(torch.isfinite(loss))`` on a 0-d loss.

    On a GPU this is the sync with an idle stream; inside an update it also
    waits for the queued kernels (which the A/B above measures).
    """
    x = torch.ones(4, device=device, requires_grad=True)
    loss = (x * 2.0).sum()
    for _ in range(100):
        bool(torch.isfinite(loss))
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        bool(torch.isfinite(loss))
    return 1e6 * (time.perf_counter() - t0) / n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--K", type=int, default=16)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--obs-dim", type=int, default=60)  # SafetyPointGoal1
    p.add_argument("--act-dim", type=int, default=2)
    p.add_argument("--updates-per-call", type=int, default=8)
    p.add_argument("--calls", type=int, default=1, help="learner calls per timed block")
    p.add_argument("--rounds", type=int, default=30, help="A/B block pairs")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per learner first")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on 2 busy cores, 2 threads made OpenMP "
        "barriers dominate, 1.9 vs 27 updates/s; 0 keeps torch's default)",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    learners = {
        "guarded": build_learner(args),
        "unguarded": build_learner(args, _unguarded_class()),
    }
    batches = _batches(args, args.calls)
    timesteps = {"num_env_steps_sampled_lifetime": 10_000}
    B = args.batch

    def block(learner) -> float:
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for b in batches:
            learner.update(batch=b, minibatch_size=B, num_epochs=1, timesteps=timesteps)
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for learner in learners.values():
        for b in batches[: args.warmup]:
            learner.update(batch=b, minibatch_size=B, num_epochs=1, timesteps=timesteps)

    seconds = {k: 0.0 for k in learners}
    per_round = []
    for r in range(args.rounds):
        order = ["guarded", "unguarded"] if r % 2 == 0 else ["unguarded", "guarded"]
        t = {name: block(learners[name]) for name in order}
        for name in t:
            seconds[name] += t[name]
        per_round.append(t["unguarded"] / t["guarded"])

    # sanity: the guard really ran in A only, and no update was skipped in either
    for name, learner in learners.items():
        counters = learner.get_cvpo_state()["default_policy"]["counters"]
        assert counters["skipped"] == 0, (name, counters)
    updates = args.rounds * args.calls * args.updates_per_call
    ups = {k: updates / s for k, s in seconds.items()}
    guard_us = guard_cost_us(args.device)
    update_us = 1e6 / ups["unguarded"]
    out = {
        "benchmark": "nan_check_overhead",
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "batch": B,
        "K": args.K,
        "hidden": args.hidden,
        "updates_per_learner_call": args.updates_per_call,
        "updates_per_variant": updates,
        "rounds": args.rounds,
        "updates_per_s_guarded": round(ups["guarded"], 2),
        "updates_per_s_unguarded": round(ups["unguarded"], 2),
        "ratio_guarded_over_unguarded": round(ups["guarded"] / ups["unguarded"], 4),
        "overhead_pct": round(100 * (1 - ups["guarded"] / ups["unguarded"]), 2),
        "per_round_ratio": [round(x, 4) for x in per_round],
        "per_round_ratio_median": round(statistics.median(per_round), 4),
        "per_round_ratio_stdev": round(statistics.stdev(per_round), 4)
        if len(per_round) > 1
        else None,
        "guard_op_us": round(guard_us, 2),
        "guard_share_of_update_estimate": round(guard_us / update_us, 6),
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
