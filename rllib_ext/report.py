"""Sweep report: reward vs cost per cost limit, from Tune's own result files.

Reads ``<experiment>/<trial>/params.json`` and ``progress.csv`` (written by
Tune for every trial, so finished and interrupted experiments both work) and
writes ``report.csv``, ``report.md`` and ``report.png``.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from rllib_ext.cvpo import metrics as M

RETURN_COL = f"env_runners/{M.EPISODE_RETURN_MEAN}"
COST_COL = f"env_runners/{M.EPISODE_COST_MEAN}"
VIOLATION_COL = f"env_runners/{M.COST_VIOLATION_RATE}"


class ReportError(ValueError):
    """An experiment folder that cannot be reported on."""


def _float(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def read_trials(experiment_dir: str | Path) -> List[Dict[str, Any]]:
    """One record per trial with its params and per-iteration curves."""
    root = Path(experiment_dir).expanduser()
    if not root.is_dir():
        raise ReportError(f"experiment folder {root} does not exist")
    trials = []
    for params_file in sorted(root.glob("*/params.json")):
        trial_dir = params_file.parent
        progress = trial_dir / "progress.csv"
        rows: List[Dict[str, str]] = []
        if progress.exists() and progress.stat().st_size > 0:
            with open(progress, newline="") as f:
                rows = list(csv.DictReader(f))
        try:
            params = json.loads(params_file.read_text())
        except json.JSONDecodeError:
            continue  # a trial killed while writing its params
        limit = params.get("cost_limit", math.inf)
        if isinstance(limit, list):
            limit = limit[0] if len(limit) == 1 else sum(limit)
        trials.append(
            {
                "trial": trial_dir.name,
                "cost_limit": _float(limit),
                "seed": params.get("seed"),
                "iterations": np.array([_float(r.get("training_iteration")) for r in rows]),
                "steps": np.array(
                    [_float(r.get("env_runners/num_env_steps_sampled_lifetime")) for r in rows]
                ),
                "return": np.array([_float(r.get(RETURN_COL)) for r in rows]),
                "cost": np.array([_float(r.get(COST_COL)) for r in rows]),
                "violation": np.array([_float(r.get(VIOLATION_COL)) for r in rows]),
            }
        )
    if not trials:
        raise ReportError(f"{root} holds no Tune trials (no */params.json)")
    return trials


def _tail_mean(x: np.ndarray, n: int) -> float:
    x = x[~np.isnan(x)]
    return float(np.mean(x[-n:])) if len(x) else math.nan


def summarize(trials: List[Dict[str, Any]], last_n: int = 5) -> List[Dict[str, Any]]:
    """Per cost limit: final reward / cost / violation rate, mean and std over trials."""
    groups: Dict[float, List[Dict[str, Any]]] = defaultdict(list)
    for t in trials:
        if len(t["iterations"]):
            groups[t["cost_limit"]].append(t)
    rows = []
    for limit in sorted(groups):
        g = groups[limit]
        r = np.array([_tail_mean(t["return"], last_n) for t in g])
        c = np.array([_tail_mean(t["cost"], last_n) for t in g])
        v = np.array([_tail_mean(t["violation"], last_n) for t in g])
        rows.append(
            {
                "cost_limit": limit,
                "trials": len(g),
                "iterations": int(min(len(t["iterations"]) for t in g)),
                "reward_mean": float(np.nanmean(r)),
                "reward_std": float(np.nanstd(r)),
                "cost_mean": float(np.nanmean(c)),
                "cost_std": float(np.nanstd(c)),
                "violation_rate_mean": float(np.nanmean(v)) if not np.all(np.isnan(v)) else math.nan,
                "violation_rate_std": float(np.nanstd(v)) if not np.all(np.isnan(v)) else math.nan,
            }
        )
    return rows


def _markdown(rows: List[Dict[str, Any]], last_n: int) -> str:
    lines = [
        f"Final values: mean over the last {last_n} iterations of each trial, then mean ± std over trials.",
        "",
        "| cost limit | trials | iterations | reward | cost | violation rate |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['cost_limit']:g} | {r['trials']} | {r['iterations']} | "
            f"{r['reward_mean']:.2f} ± {r['reward_std']:.2f} | {r['cost_mean']:.2f} ± {r['cost_std']:.2f} | "
            f"{r['violation_rate_mean']:.2f} ± {r['violation_rate_std']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _plot(trials, rows, out: Path, last_n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    limits = [r["cost_limit"] for r in rows]
    colors = {lim: plt.cm.viridis(i / max(len(limits) - 1, 1)) for i, lim in enumerate(limits)}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for t in trials:
        if not len(t["iterations"]):
            continue
        ax.scatter(_tail_mean(t["cost"], last_n), _tail_mean(t["return"], last_n),
                   color=colors[t["cost_limit"]], s=40)
    for lim in limits:
        if math.isfinite(lim):
            ax.axvline(lim, color=colors[lim], ls="--", lw=1, label=f"limit {lim:g}")
    ax.set_xlabel("final mean episode cost")
    ax.set_ylabel("final mean episode return")
    ax.set_title("reward vs cost per trial")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    for ax, key, label in ((axes[1], "return", "mean episode return"), (axes[2], "cost", "mean episode cost")):
        for lim in limits:
            for i, t in enumerate(t for t in trials if t["cost_limit"] == lim and len(t["iterations"])):
                ax.plot(t["iterations"], t[key], color=colors[lim], alpha=0.8,
                        label=f"limit {lim:g}" if i == 0 else None)
            if key == "cost" and math.isfinite(lim):
                ax.axhline(lim, color=colors[lim], ls="--", lw=1)
        ax.set_xlabel("iteration")
        ax.set_ylabel(label)
        ax.set_title(f"learning curves: {key}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def write_report(experiment_dir: str | Path, out_dir: Optional[str | Path] = None,
                 last_n: int = 5) -> Dict[str, str]:
    """Writes report.csv, report.md and report.png; returns their paths."""
    trials = read_trials(experiment_dir)
    rows = summarize(trials, last_n)
    if not rows:
        raise ReportError(f"{experiment_dir}: no trial has reported an iteration yet")
    out = Path(out_dir or experiment_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path, png_path = out / "report.csv", out / "report.md", out / "report.png"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    md_path.write_text(_markdown(rows, last_n))
    _plot(trials, rows, png_path, last_n)
    return {"csv": str(csv_path), "markdown": str(md_path), "png": str(png_path)}
