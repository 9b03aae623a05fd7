"""E-step dual solvers: projected Newton vs the cvxpy (Clarabel) model.

For B in {256, 1024}, K in {16, 32, 64}, m in {1, 2} this solves one seeded
problem with active cost constraints repeatedly with each solver and reports
the median wall time after warm-up (the first cvxpy solve compiles the model;
its time is reported separately), the relative objective gap
(g_newton - g_cvxpy) / |g_cvxpy| (negative: Newton found a lower dual value),
the max weight difference, and the speedup. Solves of the two solvers are
interleaved so that load from other processes affects both alike.

A human-readable table goes to stderr; the last line of stdout is one JSON
document. Above ``estep.CVXPY_DPP_MAX_PAIRS`` state-action pairs cvxpy solves
without its DPP map (which needs memory quadratic in B*K), so its time
includes compiling the problem ("mode" column).

    python benchmarks/estep.py            # 5 cvxpy / 30 Newton repetitions
    python benchmarks/estep.py --quick    # 2 cvxpy / 5 Newton repetitions
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

from cvpo import estep

KL_BOUND = 0.1


def make_problem(B: int, K: int, m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Rewards with per-state offsets, gamma-distributed costs, and thresholds
    halfway between the cheapest reachable and the reward-only expected cost
    (so every constraint is active and feasible)."""
    rng = np.random.default_rng(seed)
    q = torch.tensor(rng.normal(size=(B, K)) * 5.0 + rng.normal(size=(B, 1)) * 5.0)
    qc = torch.tensor(rng.gamma(2.0, 1.0, size=(m, B, K)))
    reward_only = estep.solve_dual(q, None, KL_BOUND, []).weights
    thresholds = []
    for k in range(m):
        cheapest = estep.solve_dual(-qc[k], None, KL_BOUND, []).weights
        low = (cheapest * qc[k]).sum(1).mean().item()
        high = (reward_only * qc[k]).sum(1).mean().item()
        thresholds.append(low + 0.5 * (high - low))
    return q, qc, thresholds


def bench_case(B: int, K: int, m: int, cvxpy_reps: int, newton_reps: int, seed: int) -> dict:
    q, qc, thresholds = make_problem(B, K, m, seed)
    estep.clear_cvxpy_cache()

    start = time.perf_counter()
    first = estep.solve_dual(q, qc, KL_BOUND, thresholds, solver="cvxpy")
    first_cvxpy = time.perf_counter() - start
    newton = estep.solve_dual(q, qc, KL_BOUND, thresholds)  # warm-up

    cvxpy_times, newton_times, warm_times = [], [], []
    # the next update's batch: a perturbed problem, warm-started from this solution
    noise = torch.tensor(np.random.default_rng(seed + 1).normal(size=q.shape)) * 0.25
    for rep in range(max(cvxpy_reps, newton_reps)):
        if rep < cvxpy_reps:
            cvx = estep.solve_dual(q, qc, KL_BOUND, thresholds, solver="cvxpy")
            cvxpy_times.append(cvx.solve_time)
        if rep < newton_reps:
            newton = estep.solve_dual(q, qc, KL_BOUND, thresholds)
            newton_times.append(newton.solve_time)
            warm = estep.solve_dual(q + noise, qc, KL_BOUND, thresholds, init=newton)
            warm_times.append(warm.solve_time)

    cvxpy_median = statistics.median(cvxpy_times)
    newton_median = statistics.median(newton_times)
    return {
        "B": B,
        "K": K,
        "m": m,
        "cvxpy_median_s": cvxpy_median,
        "cvxpy_first_solve_s": first_cvxpy,
        "cvxpy_status": cvx.backend_status,
        # above CVXPY_DPP_MAX_PAIRS the model is compiled afresh each solve (see solve_dual)
        "cvxpy_mode": "recompile" if "without DPP" in cvx.message else "dpp",
        "cvxpy_iterations": cvx.iterations,
        "newton_median_s": newton_median,
        "newton_iterations": newton.iterations,
        "newton_status": newton.status,
        "newton_warm_median_s": statistics.median(warm_times),
        "newton_warm_iterations": warm.iterations,
        "objective_newton": newton.objective,
        "objective_cvxpy": cvx.objective,
        "objective_gap_rel": (newton.objective - cvx.objective) / abs(cvx.objective),
        "max_weight_diff": (newton.weights - cvx.weights).abs().max().item(),
        "fallback": cvx.fallback or first.fallback,
        "speedup": cvxpy_median / newton_median,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--samples", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--constraints", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cvxpy_reps, newton_reps = (2, 5) if args.quick else (5, 30)

    import cvxpy

    rows = []
    header = (
        f"{'B':>5} {'K':>3} {'m':>2} {'cvxpy ms':>9} {'mode':>9} {'newton ms':>9} "
        f"{'warm ms':>8} {'speedup':>8} {'iters':>5} {'gap rel':>10} {'max dw':>8}"
    )
    print(header, file=sys.stderr)
    for B in args.batch_sizes:
        for K in args.samples:
            for m in args.constraints:
                row = bench_case(B, K, m, cvxpy_reps, newton_reps, args.seed)
                rows.append(row)
                print(
                    f"{B:>5} {K:>3} {m:>2} {row['cvxpy_median_s'] * 1e3:>9.1f} "
                    f"{row['cvxpy_mode']:>9} "
                    f"{row['newton_median_s'] * 1e3:>9.2f} "
                    f"{row['newton_warm_median_s'] * 1e3:>8.2f} {row['speedup']:>8.0f} "
                    f"{row['newton_iterations']:>5} {row['objective_gap_rel']:>10.1e} "
                    f"{row['max_weight_diff']:>8.1e}",
                    file=sys.stderr,
                    flush=True,
                )
    report = {
        "benchmark": "estep_dual",
        "kl_bound": KL_BOUND,
        "quick": args.quick,
        "repetitions": {"cvxpy": cvxpy_reps, "newton": newton_reps},
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average": os.getloadavg(),
        },
        "versions": {
            "torch": torch.__version__,
            "cvxpy": cvxpy.__version__,
            "numpy": np.__version__,
        },
        "results": rows,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
