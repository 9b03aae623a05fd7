"""EnvRunner-side episode cost metrics (work for CVPO, PPO, SAC, ...)."""

from __future__ import annotations

import math

from ray.rllib.callbacks.callbacks import RLlibCallback

from rllib_ext.cvpo import metrics as M


def _config_costs(config):
    """(cost keys, limits or None) of an algorithm config."""
    keys = list(getattr(config, "cost_keys", None) or ["cost"])
    limits = getattr(config, "cost_limits", None)
    if limits is None and getattr(config, "env_config", None):
        limit = config.env_config.get("cost_limit") if hasattr(config.env_config, "get") else None
        limits = None if limit is None else [float(limit)] * len(keys)
    return keys, limits


class CostMetricsCallback(RLlibCallback):
    """Logs per-episode cost, per-constraint costs and the violation rate.

    The cost of each step is read from the step's ``info`` (``infos[1:]`` of
    every chunk of the episode: ``infos[0]`` is the reset info, or belongs to
    the previous chunk).
    """

    def on_episode_end(self, *, episode, prev_episode_chunks=None, env_runner=None,
                       metrics_logger=None, **kwargs) -> None:
        if metrics_logger is None or env_runner is None:
            return
        keys, limits = _config_costs(env_runner.config)
        totals = [0.0] * len(keys)
        dropped = 0
        for chunk in list(prev_episode_chunks or []) + [episode]:
            for info in chunk.get_infos()[1:]:
                for i, k in enumerate(keys):
                    totals[i] += float(info.get(k, 0.0))
                dropped += int(bool(info.get("nonfinite", False)))
        window = env_runner.config.metrics_num_episodes_for_smoothing
        metrics_logger.log_value(M.EPISODE_COST_MEAN, sum(totals), reduce="mean", window=window)
        if len(keys) > 1:
            for k, total in zip(keys, totals):
                metrics_logger.log_value(
                    M.EPISODE_COST_MEAN_PREFIX + k, total, reduce="mean", window=window
                )
        if limits is not None:
            violated = any(t > c for t, c in zip(totals, limits) if not math.isinf(c))
            metrics_logger.log_value(
                M.COST_VIOLATION_RATE, float(violated), reduce="mean", window=window
            )
        metrics_logger.log_value(M.NUM_NONFINITE_DROPPED, dropped, reduce="sum")
