"""``rllib report EXPERIMENT_DIR``: reward vs cost per group of trials, from Tune's
own result files.

Reads ``<experiment>/<trial>/params.json`` and ``result.json`` (written by
Tune for every trial, so finished and interrupted experiments both work) and
writes ``report.csv``, ``report.md`` and ``report.png``.

Trials are grouped by every parameter that differs between them (nested
config dicts flattened to ``a/b`` keys; ``seed`` and parameters equal in all
trials are ignored), so a sweep over cost limits, learning rates or envs gets
one row per combination and the seeds of a combination are aggregated: mean
with min..max in the table, mean curve with a min-max band in the PNG. Curves
are drawn against env steps (``env_runners/num_env_steps_sampled_lifetime``).
Episode metrics are NaN in iterations where no episode ended; only the finite
points are used, joined into one curve.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rllib_ext.common import metrics as M

RETURN_COL = f"env_runners/{M.EPISODE_RETURN_MEAN}"
COST_COL = f"env_runners/{M.EPISODE_COST_MEAN}"
VIOLATION_COL = f"env_runners/{M.COST_VIOLATION_RATE}"
STEPS_COL = "env_runners/num_env_steps_sampled_lifetime"
STEPS_FALLBACK_COLS = ("num_env_steps_sampled_lifetime",)
EVAL_RETURN_COL = f"evaluation/env_runners/{M.EPISODE_RETURN_MEAN}"
EVAL_COST_COL = f"evaluation/env_runners/{M.EPISODE_COST_MEAN}"
IGNORED_PARAMS = ("seed",)  # a flattened key whose last part is one of these

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


class ReportError(ValueError):
    """An experiment folder that cannot be reported on."""


def _float(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _hashable(value: Any) -> Any:
    """A param value usable as a dict key (lists -> tuples; object reprs without addresses)."""
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), _hashable(v)) for k, v in value.items()))
    if isinstance(value, str):
        return _ADDRESS.sub("", value)
    return value


def flatten_params(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts flattened to ``{"a/b": value}`` with hashable values."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten_params(value, name + "/"))
        else:
            out[name] = _hashable(value)
    return out


def _column(rows: list[dict[str, Any]], *names: str) -> np.ndarray:
    for name in names:
        if any(name in r for r in rows):
            return np.array([_float(r.get(name)) for r in rows])
    return np.full(len(rows), math.nan)


def _flatten_result(result: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in result.items():
        if isinstance(value, dict):
            out.update(_flatten_result(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def read_rows(trial_dir: Path) -> list[dict[str, Any]]:
    """Per-iteration results of a trial, flattened with "/" (``env_runners/episode_cost_mean``).

    Reads Tune's ``result.json`` (one JSON document per iteration, every key of every
    iteration); ``progress.csv`` only as a fallback: Tune fixes its columns at the first
    iteration, so episode metrics that first appear later (the first episode ends
    after a few iterations) are missing from it.
    """
    result_json = trial_dir / "result.json"
    if result_json.exists() and result_json.stat().st_size > 0:
        rows = []
        for line in result_json.read_text().splitlines():
            try:
                rows.append(_flatten_result(json.loads(line)))
            except json.JSONDecodeError:
                continue  # a line cut off by a killed trial
        if rows:
            return rows
    progress = trial_dir / "progress.csv"
    if progress.exists() and progress.stat().st_size > 0:
        with open(progress, newline="") as f:
            return list(csv.DictReader(f))
    return []


def read_trials(experiment_dir: str | Path) -> list[dict[str, Any]]:
    """One record per trial with its flattened params and per-iteration curves."""
    root = Path(experiment_dir).expanduser()
    if not root.is_dir():
        raise ReportError(f"experiment folder {root} does not exist")
    trials = []
    for params_file in sorted(root.glob("*/params.json")):
        trial_dir = params_file.parent
        rows = read_rows(trial_dir)
        try:
            params = json.loads(params_file.read_text())
        except json.JSONDecodeError:
            continue  # a trial killed while writing its params
        if not isinstance(params, dict):
            continue
        limit = params.get("cost_limit", math.inf)
        if isinstance(limit, list):
            limit = limit[0] if len(limit) == 1 else sum(limit)
        iterations = _column(rows, "training_iteration")
        steps = _column(rows, STEPS_COL, *STEPS_FALLBACK_COLS)
        has_steps = bool(np.isfinite(steps).any())
        trials.append(
            {
                "trial": trial_dir.name,
                "params": flatten_params(params),
                "cost_limit": _float(limit),
                "seed": params.get("seed"),
                "iterations": iterations,
                "steps": steps,
                # the x-axis: env steps, or iterations for results without a step count
                "x": steps if has_steps else iterations,
                "x_label": "env steps" if has_steps else "iteration",
                "return": _column(rows, RETURN_COL),
                "cost": _column(rows, COST_COL),
                "violation": _column(rows, VIOLATION_COL),
                "eval_return": _column(rows, EVAL_RETURN_COL),
                "eval_cost": _column(rows, EVAL_COST_COL),
            }
        )
    if not trials:
        raise ReportError(f"{root} holds no Tune trials (no */params.json)")
    return trials


def _ignored(key: str) -> bool:
    return key.rsplit("/", 1)[-1] in IGNORED_PARAMS


def varying_params(trials: Sequence[dict[str, Any]]) -> list[str]:
    """Flattened param keys whose value differs between trials (seeds excluded), sorted."""
    keys = sorted({k for t in trials for k in t["params"]})
    out = []
    for k in keys:
        if _ignored(k):
            continue
        values = {repr(t["params"].get(k)) for t in trials}
        if len(values) > 1:
            out.append(k)
    return out


def _sort_key(value: Any) -> tuple:
    if isinstance(value, bool) or value is None:
        return (2, str(value))
    if isinstance(value, (int, float)):
        return (0, float(value), "")
    return (1, str(value))


def group_trials(
    trials: Sequence[dict[str, Any]],
) -> tuple[list[str], list[tuple[tuple, list[dict[str, Any]]]]]:
    """(varying param keys, [(their values, trials of that group)]) over trials with results."""
    reported = [t for t in trials if len(t["iterations"])]
    params = varying_params(reported)
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for t in reported:
        groups[tuple(t["params"].get(k) for k in params)].append(t)
    order = sorted(groups, key=lambda values: tuple(_sort_key(v) for v in values))
    return params, [(values, groups[values]) for values in order]


def _tail_mean(x: np.ndarray, n: int) -> float:
    x = x[np.isfinite(x)]
    return float(np.mean(x[-n:])) if len(x) else math.nan


def _last(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(x[-1]) if len(x) else math.nan


def _stats(prefix: str, values: Sequence[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if not len(v):
        return {f"{prefix}_{s}": math.nan for s in ("mean", "min", "max", "std")}
    return {
        f"{prefix}_mean": float(np.mean(v)),
        f"{prefix}_min": float(np.min(v)),
        f"{prefix}_max": float(np.max(v)),
        f"{prefix}_std": float(np.std(v)),
    }


def _has_eval(trials: Sequence[dict[str, Any]]) -> bool:
    return any(
        np.isfinite(t["eval_return"]).any() or np.isfinite(t["eval_cost"]).any() for t in trials
    )


def summarize(trials: list[dict[str, Any]], last_n: int = 5) -> list[dict[str, Any]]:
    """One row per group: its param values, then final reward / cost / violation rate.

    Per trial, "final" is the mean over its last ``last_n`` iterations with a
    value (evaluation: the last evaluation); per group, the mean, min, max and
    std over its trials (seeds).
    """
    params, groups = group_trials(trials)
    with_eval = _has_eval(trials)
    rows = []
    for values, g in groups:
        row: dict[str, Any] = dict(zip(params, values))
        row["trials"] = len(g)
        row["iterations"] = int(min(len(t["iterations"]) for t in g))
        row["env_steps"] = (
            float(np.nanmin([_last(t["steps"]) for t in g]))
            if any(np.isfinite(t["steps"]).any() for t in g)
            else math.nan
        )
        row.update(_stats("reward", [_tail_mean(t["return"], last_n) for t in g]))
        row.update(_stats("cost", [_tail_mean(t["cost"], last_n) for t in g]))
        row.update(_stats("violation_rate", [_tail_mean(t["violation"], last_n) for t in g]))
        if with_eval:
            row.update(_stats("eval_return", [_last(t["eval_return"]) for t in g]))
            row.update(_stats("eval_cost", [_last(t["eval_cost"]) for t in g]))
        rows.append(row)
    return rows


def format_value(value: Any) -> str:
    """A param value as shown in the table."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    return str(value)


def _cell(row: dict[str, Any], prefix: str) -> str:
    mean, lo, hi = row[f"{prefix}_mean"], row[f"{prefix}_min"], row[f"{prefix}_max"]
    if not math.isfinite(mean):
        return "n/a"
    if row["trials"] == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ({lo:.2f}..{hi:.2f})"


def _param_label(key: str) -> str:
    return key.replace("_", " ")


def _markdown(
    rows: list[dict[str, Any]], params: list[str], last_n: int, constant_limit: float | None
) -> str:
    with_eval = bool(rows) and "eval_return_mean" in rows[0]
    lines = [
        f"Final values: per trial the mean over its last {last_n} iterations with a value"
        + (" (evaluation: its last evaluation)" if with_eval else "")
        + "; per group the mean over its trials (seeds), with (min..max) for several.",
    ]
    if not params:
        lines.append("All trials share every parameter but the seed.")
    if constant_limit is not None:
        lines.append(f"Cost limit {constant_limit:g} in all trials.")
    metrics = ["reward", "cost", "violation rate"]
    metrics += ["eval return", "eval cost"] if with_eval else []
    header = [_param_label(p) for p in params] + ["trials", "iterations", "env steps"] + metrics
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for r in rows:
        cells = [format_value(r[p]) for p in params]
        cells += [
            str(r["trials"]),
            str(r["iterations"]),
            f"{r['env_steps']:,.0f}" if math.isfinite(r["env_steps"]) else "n/a",
        ]
        cells += [_cell(r, m.replace(" ", "_")) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _finite_xy(t: dict[str, Any], key: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = t["x"], t[key]
    keep = np.isfinite(x) & np.isfinite(y)
    order = np.argsort(x[keep], kind="stable")
    return x[keep][order], y[keep][order]


def group_curve(group: Sequence[dict[str, Any]], key: str):
    """(x, mean, min, max) over a group's trials, finite points only.

    The seeds' curves are interpolated onto the union of their x values within
    the range all of them cover. Returns None when no trial has a finite point;
    a list of per-trial (x, y) when the seeds' ranges do not overlap.
    """
    curves = [c for c in (_finite_xy(t, key) for t in group) if len(c[0])]
    if not curves:
        return None
    if len(curves) == 1:
        x, y = curves[0]
        return x, y, y, y
    lo, hi = max(c[0][0] for c in curves), min(c[0][-1] for c in curves)
    grid = np.unique(np.concatenate([c[0] for c in curves]))
    grid = grid[(grid >= lo) & (grid <= hi)]
    if not len(grid):
        return curves
    ys = np.stack([np.interp(grid, x, y) for x, y in curves])
    return grid, ys.mean(axis=0), ys.min(axis=0), ys.max(axis=0)


def _group_label(params: list[str], values: tuple) -> str:
    if not params:
        return "all trials"
    return ", ".join(f"{_param_label(p)}={format_value(v)}" for p, v in zip(params, values))


def plot_report(trials: list[dict[str, Any]], last_n: int = 5):
    """The report's matplotlib Figure: final reward vs cost per trial, and return
    and cost against env steps per group (mean over seeds, min-max band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params, groups = group_trials(trials)
    colors = [plt.cm.viridis(i / max(len(groups) - 1, 1)) for i in range(len(groups))]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    drawn_limits = set()
    for color, (values, g) in zip(colors, groups):
        label = _group_label(params, values)
        xs = [_tail_mean(t["cost"], last_n) for t in g]
        ys = [_tail_mean(t["return"], last_n) for t in g]
        ax.scatter(xs, ys, color=color, s=40, label=label)
        lim = g[0]["cost_limit"]
        if math.isfinite(lim) and lim not in drawn_limits:
            drawn_limits.add(lim)
            ax.axvline(lim, color=color, ls="--", lw=1)
    ax.set_xlabel("final mean episode cost")
    ax.set_ylabel("final mean episode return")
    ax.set_title("reward vs cost per trial (dashed: cost limit)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    all_steps = all(t["x_label"] == "env steps" for _, g in groups for t in g)
    x_label = "env steps" if all_steps else "iteration"
    panels = ((axes[1], "return", "mean episode return"), (axes[2], "cost", "mean episode cost"))
    for ax, key, ylabel in panels:
        for color, (values, g) in zip(colors, groups):
            label = _group_label(params, values)
            curve = group_curve(g, key)
            if curve is None:
                continue
            if isinstance(curve, list):  # seeds without a common x range: one line each
                for i, (x, y) in enumerate(curve):
                    ax.plot(
                        x,
                        y,
                        color=color,
                        marker="." if len(x) < 2 else None,
                        label=label if i == 0 else None,
                    )
            else:
                x, mean, lo, hi = curve
                ax.plot(x, mean, color=color, marker="." if len(x) < 2 else None, label=label)
                if len(g) > 1:
                    ax.fill_between(x, lo, hi, color=color, alpha=0.2, lw=0)
            lim = g[0]["cost_limit"]
            if key == "cost" and math.isfinite(lim):
                ax.axhline(lim, color=color, ls="--", lw=1)
        ax.set_xlabel(x_label)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{key} (mean over seeds, min-max band)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _csv_value(value: Any) -> Any:
    return format_value(value) if isinstance(value, tuple) else value


def write_report(
    experiment_dir: str | Path, out_dir: str | Path | None = None, last_n: int = 5
) -> dict[str, str]:
    """Writes report.csv, report.md and report.png; returns their paths."""
    import matplotlib.pyplot as plt

    trials = read_trials(experiment_dir)
    rows = summarize(trials, last_n)
    if not rows:
        raise ReportError(f"{experiment_dir}: no trial has reported an iteration yet")
    params, groups = group_trials(trials)
    limits = {t["cost_limit"] for _, g in groups for t in g}
    constant_limit = limits.pop() if "cost_limit" not in params and len(limits) == 1 else None
    if constant_limit is not None and not math.isfinite(constant_limit):
        constant_limit = None
    out = Path(out_dir or experiment_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path, png_path = out / "report.csv", out / "report.md", out / "report.png"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({k: _csv_value(v) for k, v in r.items()} for r in rows)
    md_path.write_text(_markdown(rows, params, last_n, constant_limit))
    fig = plot_report(trials, last_n)
    try:
        fig.savefig(png_path, dpi=110)
    finally:
        plt.close(fig)
    return {"csv": str(csv_path), "markdown": str(md_path), "png": str(png_path)}


def add_parser(sub) -> None:
    """``rllib report`` on the subcommands of the main parser."""
    rep = sub.add_parser(
        "report",
        help="table (CSV, markdown) and PNG of a finished or interrupted sweep",
        description="Reads Tune's result files of an experiment directory and writes a table of "
        "final reward, final cost and violation rate (and final evaluation return and cost, when "
        "the trials evaluated) per group of trials that share every parameter but the seed, plus "
        "a PNG of the learning curves against env steps (mean over seeds, min-max band).",
    )
    rep.add_argument("experiment_dir", help="the experiment folder (contains one folder per trial)")
    rep.add_argument("--out", default=None, help="output folder (default: the experiment folder)")
    rep.add_argument(
        "--last", type=int, default=5, help="average the last N iterations (default 5)"
    )


def cmd_report(args) -> int:
    out = write_report(args.experiment_dir, out_dir=args.out, last_n=args.last)
    for k, v in out.items():
        print(f"{k}: {v}")
    return 0
