"""Progress output of training runs: one line per iteration and a PNG of the curves.

Episode metrics only exist on iterations in which an episode ended (with 1000-step
episodes and 4 envs per runner, one iteration in four). Both outputs therefore
carry the last completed episodes' smoothed values forward: the progress line
never reads ``n/a`` once an episode has ended, and the plot draws the finite
points as one connected curve against env steps.

Used by ``rllib train``, ``make reproduce`` and the sweep scripts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rllib_ext.common import metrics as M

STEPS_COL = "env_runners/num_env_steps_sampled_lifetime"
RETURN_COL = f"env_runners/{M.EPISODE_RETURN_MEAN}"
COST_COL = f"env_runners/{M.EPISODE_COST_MEAN}"
EVAL_RETURN_COL = f"{M.EVALUATION_RESULTS}/env_runners/{M.EPISODE_RETURN_MEAN}"
EVAL_COST_COL = f"{M.EVALUATION_RESULTS}/env_runners/{M.EPISODE_COST_MEAN}"


def _fmt(x: Any, spec: str = ".2f") -> str:
    try:
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)
    except (TypeError, ValueError):
        return str(x)


def _finite(x: Any) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _get(result: dict[str, Any], path: str) -> Any:
    node: Any = result
    for part in path.split("/"):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _limits_text(cfg: dict[str, Any]) -> str | None:
    """The configured limits as text ("25", or "cost_hazards 20, cost_vases_contact 5")."""
    from cvpo.constraints import cost_limits, format_limits

    if cfg.get("cost_limit") is None:
        return None
    try:
        return format_limits(
            cost_limits(cfg["cost_limit"], cfg.get("cost_keys")), cfg.get("cost_keys")
        )
    except (TypeError, ValueError):
        return str(cfg["cost_limit"])


def env_steps(result: dict[str, Any]) -> float | None:
    """Env steps sampled so far (training EnvRunners only)."""
    steps = _get(result, STEPS_COL)
    return _finite(steps if steps is not None else result.get("num_env_steps_sampled_lifetime"))


class ProgressLine:
    """Formats one line per iteration, remembering the last finite episode values.

    One instance per trial: values of iterations in which no episode ended are
    taken from the last iteration in which one did.
    """

    KEYS = {
        "return": RETURN_COL,
        "cost": COST_COL,
        "violation": f"env_runners/{M.COST_VIOLATION_RATE}",
        "eval_return": EVAL_RETURN_COL,
        "eval_cost": EVAL_COST_COL,
        "cost_rate": f"env_runners/{M.COST_RATE}",
    }

    def __init__(self) -> None:
        self.last: dict[str, float] = {}

    def __call__(self, result: dict[str, Any]) -> str:
        for name, path in self.KEYS.items():
            value = _finite(_get(result, path))
            if value is not None:
                self.last[name] = value
        last = self.last.get
        cfg = result.get("config", {}) or {}
        limit = _limits_text(cfg)
        parts = [
            f"iter {result.get('training_iteration', '?'):>4}",
            f"steps {_fmt(env_steps(result), ',.0f')}",
            f"return {_fmt(last('return'))}",
            f"cost {_fmt(last('cost'))}" + (f" (limit {limit})" if limit is not None else ""),
        ]
        if last("violation") is not None:
            parts.append(f"over limit {_fmt(100 * last('violation'), '.0f')}%")
        if last("eval_return") is not None:
            parts.append(f"eval return {_fmt(last('eval_return'))} cost {_fmt(last('eval_cost'))}")
        if last("cost_rate") is not None:
            parts.append(f"cost rate {_fmt(last('cost_rate'), '.4f')}")
        cv = result.get(M.CVPO_RESULTS, {}) or {}
        if M.UPDATES_LIFETIME in cv:
            parts.append(f"updates {_fmt(cv[M.UPDATES_LIFETIME], ',.0f')}")
        parts.append(f"time {_fmt(result.get('time_total_s'), '.1f')}s")
        return " | ".join(parts)


def progress_line(result: dict[str, Any]) -> str:
    """One line for a single result (no memory of earlier iterations)."""
    return ProgressLine()(result)


def progress_callback():
    """A Tune callback printing one progress line per trial result."""
    from ray.tune import Callback

    class _Progress(Callback):
        def __init__(self) -> None:
            self.lines: dict[str, ProgressLine] = {}

        def on_trial_result(self, iteration, trials, trial, result, **info):
            line = self.lines.setdefault(trial.trial_id, ProgressLine())
            prefix = f"[{trial.trial_id}] " if len(trials) > 1 else ""
            print(prefix + line(result), flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"[{trial.trial_id}] trial failed; see {trial.local_path}/error.txt", flush=True)

    return _Progress()


def finite_series(xs: Iterable[Any], ys: Iterable[Any]) -> tuple[list[float], list[float]]:
    """The (x, y) pairs whose both values are finite, in order."""
    pairs = [(_finite(x), _finite(y)) for x, y in zip(xs, ys)]
    kept = [(x, y) for x, y in pairs if x is not None and y is not None]
    return [x for x, _ in kept], [y for _, y in kept]


def progress_figure(df, title: str, cost_limit: float | None):
    """Figure of return and cost against env steps (training and evaluation curves)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_col = STEPS_COL if STEPS_COL in df else "num_env_steps_sampled_lifetime"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, train_col, eval_col, color, what in (
        (ax1, RETURN_COL, EVAL_RETURN_COL, "tab:blue", "return"),
        (ax2, COST_COL, EVAL_COST_COL, "tab:red", "cost"),
    ):
        if train_col in df:
            x, y = finite_series(df[x_col], df[train_col])
            ax.plot(x, y, color=color, label=f"training episodes ({what})")
        if eval_col in df:
            x, y = finite_series(df[x_col], df[eval_col])
            if x:
                ax.plot(
                    x,
                    y,
                    color="k" if ax is ax1 else "tab:purple",
                    marker="o",
                    ms=3,
                    label=f"evaluation, deterministic ({what})",
                )
        ax.set_xlabel("env steps")
        ax.set_ylabel(f"mean episode {what}")
        ax.grid(alpha=0.3)
    if cost_limit is not None and math.isfinite(cost_limit):
        ax2.axhline(cost_limit, color="k", ls="--", label=f"cost limit {cost_limit:g}")
    for ax in (ax1, ax2):
        if ax.lines:
            ax.legend(loc="best", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_progress(df, out: Path, title: str, cost_limit: float | None) -> Path | None:
    """PNG of return and cost against env steps, with the cost limit drawn."""
    import matplotlib.pyplot as plt

    if df is None or RETURN_COL not in df:
        return None
    fig = progress_figure(df, title, cost_limit)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
