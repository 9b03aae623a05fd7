"""``make reproduce``: train a tuned example for a fixed env-step budget, evaluate it,
and record the result in ``tuned_examples/cvpo/RESULTS.md``.

One call trains one (algorithm, task, seed) on this machine (local Ray, all cores):

1. the tuned example's hyper-parameters (``tuned_examples/<algo>/<file>.yaml``),
   with the placement keys replaced by local ones (EnvRunners on all cores but one,
   the learner in the driver, no GPU) and evaluation turned on (deterministic
   actions, a few episodes every ~4 % of the budget);
2. training until the env-step budget is spent, one progress line per iteration;
   the best feasible checkpoint (highest evaluation return whose evaluation cost
   meets the limit) is kept as training goes;
3. the final and the best feasible checkpoints are evaluated on 20 deterministic
   episodes (seeds disjoint from training);
4. the row (task, seed, env steps, minutes, returns and costs, training cost
   rate, commit) and the evaluation curve go to
   ``tuned_examples/cvpo/results/<task>/<algo>-seed<k>.json``; ``RESULTS.md`` and
   one curve PNG per task (evaluation return and cost against env steps, mean
   over seeds with a min-max band, the limit drawn) are rewritten from all
   those records. Nothing in RESULTS.md is typed by hand.

    python -m rllib_ext.reproduce --task SafetyPointGoal1-v0 --seed 0 [--algo CVPO] [--steps N]
    python -m rllib_ext.reproduce --write-only      # rebuild RESULTS.md and the PNGs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "tuned_examples" / "cvpo" / "results"
RESULTS_MD = REPO / "tuned_examples" / "cvpo" / "RESULTS.md"
README = REPO / "README.md"
DEFAULT_RESULTS_MD = RESULTS_MD.resolve()
README_START, README_END = "<!-- results:start", "<!-- results:end -->"
#: the README's one table: per task and algorithm, mean over seeds
SUMMARY_COLUMNS = [
    ("final_return", "final return"),
    ("final_cost", "final cost"),
    ("training_cost_rate", "training cost rate"),
]
NOTES_MD = RESULTS_DIR / "NOTES.md"  # what was tried where a target is missed (prose)
RUNS_DIR = Path("results") / "reproduce"

#: task -> tuned example file (per algorithm folder) and env-step budget
TASKS: dict[str, dict[str, Any]] = {
    "SafetyPointGoal1-v0": {"example": "safety_point_goal1.yaml", "steps": 500_000},
    "SafetyPointButton1-v0": {"example": "safety_point_button1.yaml", "steps": 500_000},
    "SafetyCarGoal1-v0": {"example": "safety_car_goal1.yaml", "steps": 500_000},
    "SafetyHalfCheetahVelocity-v1": {
        "example": "safety_half_cheetah_velocity.yaml",
        "steps": 300_000,
    },
    "cvpo/PointHazard-v0": {"example": "point_hazard.yaml", "steps": 30_000},
}
#: targets of issue 11: every final deterministic evaluation at cost <= limit, and a return floor
RETURN_TARGETS = {"SafetyPointGoal1-v0": 20.0, "SafetyPointButton1-v0": 8.0}
#: placement keys of the tuned examples that reproduce replaces by local ones
PLACEMENT_KEYS = (
    "num_env_runners",
    "num_learners",
    "num_gpus_per_learner",
    "num_cpus_per_env_runner",
    "num_cpus_for_main_process",
    "num_cpus_per_learner",
)
EVAL_POINTS = 25  # evaluations over the budget (the curve's points)
EVAL_EPISODES = 5  # per evaluation during training
FINAL_EPISODES = 20  # deterministic episodes for the final and best-feasible checkpoints
FINAL_SEED = 100_000  # env seeds of the final evaluation: disjoint from training's

COLUMNS = [
    ("task", "task"),
    ("algo", "algorithm"),
    ("seed", "seed"),
    ("env_steps", "env steps"),
    ("minutes", "minutes"),
    ("final_return", "final return"),
    ("final_cost", "final cost"),
    ("best_feasible_return", "best feasible return"),
    ("best_feasible_cost", "best feasible cost"),
    ("training_cost_rate", "training cost rate"),
    ("commit", "commit"),
]


def _algo_dir(algo: str) -> Path:
    return REPO / "tuned_examples" / algo.lower().replace("-", "_")


def tuned_example(algo: str, task: str) -> dict[str, Any]:
    """(experiment spec) of the tuned example for ``task``."""
    import yaml

    if task not in TASKS:
        raise SystemExit(f"unknown task {task!r}; reproducible tasks: {', '.join(TASKS)}")
    path = _algo_dir(algo) / TASKS[task]["example"]
    if not path.is_file():
        raise SystemExit(f"no tuned example {path} for {algo} on {task}")
    ((name, spec),) = yaml.safe_load(path.read_text()).items()
    return {"name": name, "file": str(path.relative_to(REPO)), **spec}


def local_config(algo: str, task: str, seed: int, steps: int, runners: int | None = None):
    """The algorithm config: tuned hyper-parameters, local placement, evaluation on."""
    from ray.tune.registry import get_trainable_cls

    import rllib_ext  # noqa: F401  (registers the algorithms and envs)

    spec = tuned_example(algo, task)
    params = {k: v for k, v in (spec.get("config") or {}).items() if k not in PLACEMENT_KEYS}
    params["seed"] = seed
    config = get_trainable_cls(algo).get_default_config().update_from_dict(params)
    if runners is None:
        runners = max(1, (os.cpu_count() or 2) - 1)
    config.environment(spec["env"])
    config.env_runners(num_env_runners=runners)
    config.learners(num_learners=0, num_gpus_per_learner=0)
    per_iter = max(1, int(config.min_sample_timesteps_per_iteration or 1000))
    config.evaluation(
        evaluation_interval=max(1, steps // (EVAL_POINTS * per_iter)),
        evaluation_duration=EVAL_EPISODES,
        evaluation_duration_unit="episodes",
        evaluation_num_env_runners=0,
    )
    return config


def git_commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            text=True,
            capture_output=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            text=True,
            capture_output=True,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _log_row(result: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one iteration worth keeping in the run folder's progress.jsonl."""
    from rllib_ext.common import metrics as M

    row: dict[str, Any] = {
        "iteration": result.get("training_iteration"),
        "time_s": result.get("time_total_s"),
    }
    sections = {
        "train": result.get("env_runners") or {},
        "eval": (result.get(M.EVALUATION_RESULTS) or {}).get("env_runners") or {},
        "learner": (result.get("learners") or {}).get("default_policy") or {},
        "driver": result.get(M.CVPO_RESULTS) or {},
    }
    for name, section in sections.items():
        for key, value in section.items():
            try:
                row[f"{name}/{key}"] = float(value)
            except (TypeError, ValueError):
                continue
    return row


def _eval_costs(er: dict[str, Any]) -> float | None:
    from rllib_ext.common import metrics as M

    value = er.get(M.EPISODE_COST_MEAN)
    return None if value is None else float(value)


def train(
    algo: str,
    task: str,
    seed: int,
    steps: int | None = None,
    runners: int | None = None,
    out_dir: Path | None = None,
) -> dict[str, Any]:
    """Trains, evaluates and returns the record of one run (also written to RESULTS_DIR)."""
    import ray

    from rllib_ext.cli.evaluate import evaluate_checkpoint
    from rllib_ext.common import metrics as M
    from rllib_ext.progress import ProgressLine, env_steps

    steps = int(steps or TASKS[task]["steps"])
    config = local_config(algo, task, seed, steps, runners)
    run_dir = Path(out_dir or RUNS_DIR / task.replace("/", "_") / f"{algo}-seed{seed}").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    commit = git_commit()
    print(
        f"== reproduce {algo} on {task}, seed {seed}: {steps:,} env steps -> {run_dir}", flush=True
    )
    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    algorithm = config.build_algo()
    algorithm.best_feasible_path = str(run_dir / "best_feasible")
    line = ProgressLine()
    curve: list[dict[str, float]] = []
    interval = config.evaluation_interval
    t0 = time.time()
    log = open(run_dir / "progress.jsonl", "w")
    try:
        while True:
            result = algorithm.train()
            print(line(result), flush=True)
            log.write(json.dumps(_log_row(result)) + "\n")
            log.flush()
            n = env_steps(result) or 0.0
            er = result.get("env_runners", {})
            point = {
                "env_steps": n,
                "train_return": er.get(M.EPISODE_RETURN_MEAN),
                "train_cost": er.get(M.EPISODE_COST_MEAN),
            }
            if result["training_iteration"] % interval == 0:
                ev = (result.get(M.EVALUATION_RESULTS) or {}).get("env_runners", {})
                point["eval_return"] = ev.get(M.EPISODE_RETURN_MEAN)
                point["eval_cost"] = _eval_costs(ev)
            curve.append(
                {
                    k: (None if v is None or not np.isfinite(v) else float(v))
                    for k, v in point.items()
                }
            )
            if n >= steps:
                break
        minutes = (time.time() - t0) / 60.0
        cumulative = (result.get("env_runners") or {}).get(M.CUMULATIVE_COST)
        final_dir = run_dir / "final"
        algorithm.save_to_path(str(final_dir))
        best_dir = Path(algorithm.best_feasible_checkpoint_dir())
    finally:
        log.close()
        algorithm.stop()

    final = evaluate_checkpoint(final_dir, episodes=FINAL_EPISODES, seed=FINAL_SEED)
    best = (
        evaluate_checkpoint(best_dir, episodes=FINAL_EPISODES, seed=FINAL_SEED)
        if best_dir.exists()
        else None
    )
    limits = config.cost_limits
    record = {
        "task": task,
        "algo": algo,
        "seed": seed,
        "env_steps": int(n),
        "budget": steps,
        "minutes": round(minutes, 1),
        "cost_limit": float(sum(limits)),
        "final_return": final["reward_mean"],
        "final_cost": final["cost_mean"],
        "final_cost_se": final["cost_std"] / math.sqrt(final["episodes"]),
        "best_feasible_return": best["reward_mean"] if best else None,
        "best_feasible_cost": best["cost_mean"] if best else None,
        "training_cumulative_cost": cumulative,
        "training_cost_rate": None if cumulative is None or not n else float(cumulative) / n,
        "commit": commit,
        "tuned_example": tuned_example(algo, task)["file"],
        "env_runners": config.num_env_runners,
        "cores": os.cpu_count(),
        "eval_interval_iterations": interval,
        "curve": curve,
    }
    path = RESULTS_DIR / task.replace("/", "_") / f"{algo}-seed{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(
        f"final: return {record['final_return']:.2f} cost {record['final_cost']:.2f}; "
        f"best feasible: {record['best_feasible_return']} cost {record['best_feasible_cost']}; "
        f"record {path}",
        flush=True,
    )
    return record


# -- RESULTS.md and the curves -------------------------------------------------------------
def load_records(results_dir: Path = RESULTS_DIR) -> list[dict[str, Any]]:
    records = [json.loads(p.read_text()) for p in sorted(results_dir.glob("*/*.json"))]
    return sorted(records, key=lambda r: (r["task"], r["algo"], r["seed"]))


def _cell(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 0.1 and value != 0 else f"{value:.2f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def target_lines(records: list[dict[str, Any]]) -> list[str]:
    """One line per target: met or missed, with the measured numbers."""
    lines = []
    for r in records:
        ok = r["final_cost"] <= r["cost_limit"]
        lines.append(
            f"- {r['algo']} {r['task']} seed {r['seed']}: final cost {r['final_cost']:.2f} "
            f"(standard error {r['final_cost_se']:.2f}) vs limit {r['cost_limit']:g}: "
            f"**{'met' if ok else 'MISSED'}**"
        )
        floor = RETURN_TARGETS.get(r["task"])
        if floor is not None:
            met = r["final_return"] >= floor
            lines.append(
                f"- {r['algo']} {r['task']} seed {r['seed']}: final return "
                f"{r['final_return']:.2f} vs target {floor:g}: **{'met' if met else 'MISSED'}**"
            )
    return lines


def curve_png(task: str, records: list[dict[str, Any]], out: Path) -> Path:
    """Evaluation return and cost against env steps: mean over seeds, min-max band, the limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    colors = {"CVPO": "tab:blue", "SACLag": "tab:orange"}
    for algo in sorted({r["algo"] for r in records}):
        runs = [r for r in records if r["algo"] == algo]
        for ax, key in zip(axes, ("eval_return", "eval_cost")):
            grid, ys = _common_grid(runs, key)
            if grid is None:
                continue
            mean, lo, hi = ys.mean(0), ys.min(0), ys.max(0)
            c = colors.get(algo)
            ax.plot(grid, mean, color=c, label=f"{algo} ({len(runs)} seed{'s' * (len(runs) > 1)})")
            if len(runs) > 1:
                ax.fill_between(grid, lo, hi, color=c, alpha=0.2)
    limit = records[0]["cost_limit"]
    axes[1].axhline(limit, color="k", ls="--", label=f"cost limit {limit:g}")
    for ax, what in zip(axes, ("return", "cost")):
        ax.set_xlabel("env steps")
        ax.set_ylabel(f"evaluation episode {what} (deterministic)")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(f"{task}: mean over seeds, band = min..max")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _common_grid(runs: list[dict[str, Any]], key: str):
    """Each run's finite evaluation points, interpolated onto the steps all runs cover."""
    series = []
    for r in runs:
        pts = [(p["env_steps"], p[key]) for p in r["curve"] if p.get(key) is not None]
        if len(pts) < 1:
            return None, None
        series.append(np.array(pts, dtype=float))
    start = max(s[0, 0] for s in series)
    end = min(s[-1, 0] for s in series)
    if end < start:
        return None, None
    grid = np.linspace(start, end, 50) if end > start else np.array([start])
    return grid, np.stack([np.interp(grid, s[:, 0], s[:, 1]) for s in series])


def write_results(results_dir: Path = RESULTS_DIR, out: Path = RESULTS_MD) -> Path:
    records = load_records(results_dir)
    lines = [
        "# Results: CVPO (and baselines) on Safety-Gymnasium",
        "",
        "Written by `make reproduce` (`python -m rllib_ext.reproduce`) from the records in",
        "[`results/`](results/); do not edit by hand. Each row is one run on one machine: the",
        "tuned example's hyper-parameters, local placement (EnvRunners on all cores but one,",
        "learner in the driver), a fixed env-step budget. *final* and *best feasible* are",
        f"{FINAL_EPISODES} deterministic evaluation episodes of the last checkpoint and of the",
        "checkpoint with the best evaluation return whose evaluation cost met the limit during",
        "training (`none`: no evaluation was feasible). *training cost rate* is the summed cost",
        "of all training episodes divided by the env steps. Reproduce a row with",
        "",
        '    make reproduce TASK=SafetyPointGoal1-v0 SEEDS="0 1 2"',
        "",
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for r in records:
        lines.append("| " + " | ".join(_cell(r.get(k)) for k, _ in COLUMNS) + " |")
    if not records:
        lines.append("| (no runs recorded yet) |" + " |" * (len(COLUMNS) - 1))
    lines += ["", "## Targets", ""] + (target_lines(records) or ["(no runs recorded yet)"])
    comparison = comparison_lines(records)
    if comparison:
        lines += ["", "## CVPO against SACLag", ""] + comparison
    tasks = sorted({r["task"] for r in records})
    if tasks:
        lines += ["", "## Curves", ""]
    for task in tasks:
        png = curve_png(
            task,
            [r for r in records if r["task"] == task],
            results_dir / f"{task.replace('/', '_')}.png",
        )
        lines += [f"### {task}", "", f"![{task}]({os.path.relpath(png, out.parent)})", ""]
    notes = results_dir / NOTES_MD.name
    if notes.exists():
        link = os.path.relpath(notes, out.parent)
        lines += [
            "",
            "## Notes",
            "",
            f"See [{notes.name}]({link}) for what was tried where a target is missed.",
        ]
    out.write_text("\n".join(lines).rstrip() + "\n")
    if out.resolve() == DEFAULT_RESULTS_MD:  # the project's own file: also the README's table
        update_readme(records)
    return out


def comparison_lines(records: list[dict[str, Any]], reference: str = "CVPO") -> list[str]:
    """Per task that has ``reference`` and another algorithm at the same env-step budget: the
    mean final numbers side by side and what they show (limit met or not, which returns more).
    """
    lines = []
    by_task: dict[tuple, dict[str, list[dict[str, Any]]]] = {}
    for r in records:
        by_task.setdefault((r["task"], r["env_steps"]), {}).setdefault(r["algo"], []).append(r)
    for (task, steps), algos in sorted(by_task.items()):
        if reference not in algos or len(algos) < 2:
            continue
        limit = algos[reference][0].get("cost_limit")

        def mean(rs, key):
            return float(np.mean([r[key] for r in rs]))

        parts, feasible = [], []
        for algo in [reference] + sorted(a for a in algos if a != reference):
            rs = algos[algo]
            ret, cost = mean(rs, "final_return"), mean(rs, "final_cost")
            n = len(rs)
            parts.append(f"{algo} ({n} seed{'s' if n > 1 else ''}) {ret:.2f} at cost {cost:.2f}")
            if limit is not None and cost <= limit:
                feasible.append(algo)
        limit_text = f"limit {limit:g}" if limit is not None else "no limit recorded"
        verdict = (
            f"within the limit: {', '.join(feasible)}" if feasible else "neither meets the limit"
        )
        for other in sorted(a for a in algos if a != reference):
            d_ret = mean(algos[reference], "final_return") - mean(algos[other], "final_return")
            d_cost = mean(algos[reference], "final_cost") - mean(algos[other], "final_cost")
            verdict += f"; {reference} vs {other}: return {d_ret:+.2f}, cost {d_cost:+.2f}"
            if len(algos[reference]) != len(algos[other]):
                # Unequal seed counts: the same comparison on the seeds both algorithms ran.
                shared = {r["seed"] for r in algos[reference]} & {r["seed"] for r in algos[other]}
                if shared:
                    ref_s = [r for r in algos[reference] if r["seed"] in shared]
                    oth_s = [r for r in algos[other] if r["seed"] in shared]
                    seeds = ", ".join(str(s) for s in sorted(shared))
                    verdict += (
                        f" (on the seed(s) both ran, {seeds}: {reference} "
                        f"{mean(ref_s, 'final_return'):.2f} at cost {mean(ref_s, 'final_cost'):.2f}"
                        f", {other} {mean(oth_s, 'final_return'):.2f} at cost "
                        f"{mean(oth_s, 'final_cost'):.2f})"
                    )
        lines.append(
            f"- {task}, {_cell(steps)} env steps, final return and cost (mean over seeds): "
            f"{'; '.join(parts)} ({limit_text}); {verdict}."
        )
    return lines


def summary_table(records: list[dict[str, Any]]) -> list[str]:
    """Per (task, algorithm): seeds, env steps, and the mean (min..max) of the final numbers."""
    lines = [
        "| task | algorithm | seeds | env steps | "
        + " | ".join(t for _, t in SUMMARY_COLUMNS)
        + " |",
        "|" + "---|" * (4 + len(SUMMARY_COLUMNS)),
    ]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["task"], r["algo"]), []).append(r)
    for (task, algo), rs in groups.items():
        cells = []
        for key, _ in SUMMARY_COLUMNS:
            vals = [r[key] for r in rs if r.get(key) is not None]
            if not vals:
                cells.append("none")
            elif len(vals) == 1:
                cells.append(_cell(float(vals[0])))
            else:
                cells.append(
                    f"{_cell(float(np.mean(vals)))} "
                    f"({_cell(float(min(vals)))}..{_cell(float(max(vals)))})"
                )
        steps = sorted({r["env_steps"] for r in rs})
        lines.append(
            f"| {task} | {algo} | {len(rs)} | {_cell(steps[0])} | " + " | ".join(cells) + " |"
        )
    return lines


def update_readme(records: list[dict[str, Any]], readme: Path = README) -> bool:
    """Rewrites the README's results block from the records; False if it has none."""
    if not readme.exists():
        return False
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        return False
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    body = summary_table(records) if records else ["(no runs recorded yet)"]
    comparison = comparison_lines(records)
    if comparison:
        body += ["", "CVPO against the primal-dual baseline at the same budget:", ""] + comparison
    block = (
        README_START
        + " (written by make results; do not edit) -->\n"
        + "\n".join(body)
        + "\n"
        + README_END
    )
    readme.write_text(head + block + tail)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m rllib_ext.reproduce", description=__doc__.splitlines()[0]
    )
    p.add_argument("--task", help=f"one of: {', '.join(TASKS)}")
    p.add_argument("--seed", type=int, nargs="+", default=[0])
    p.add_argument("--algo", default="CVPO")
    p.add_argument("--steps", type=int, default=None, help="env-step budget (default: the task's)")
    p.add_argument("--runners", type=int, default=None, help="EnvRunners (default: cores - 1)")
    p.add_argument("--write-only", action="store_true", help="only rebuild RESULTS.md and the PNGs")
    args = p.parse_args(argv)
    if not args.write_only:
        if not args.task:
            p.error("--task is required (or --write-only)")
        for seed in args.seed:
            train(args.algo, args.task, seed, args.steps, args.runners)
    print(f"wrote {write_results()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
