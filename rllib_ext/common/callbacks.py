"""EnvRunner-side episode cost metrics (work for CVPO, PPO, SAC, ...).

Per episode (on every EnvRunner): the episode cost (summed over the
constraints) and, with m >= 2 constraints, each constraint's cost; with limits,
whether the episode violates (:func:`cvpo.constraints.violated`: ANY constraint
over its own limit) and, with m >= 2, each constraint's violation. Training
episodes (not RLlib's evaluation EnvRunners) also add their cost to the
lifetime sum ``cumulative_cost``. On the driver, :meth:`on_train_result` turns
the iteration's violation counts into exact rates and sets
``cost_rate = cumulative_cost / num_env_steps_sampled_lifetime``.
"""

from __future__ import annotations

from ray.rllib.callbacks.callbacks import RLlibCallback
from ray.rllib.utils.metrics import ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME

from cvpo.constraints import constraint_names, cost_limits, violations
from rllib_ext.common import metrics as M


def _config_costs(config):
    """(cost keys, one limit per key or None) of an algorithm config.

    CVPO's config has ``cost_keys`` and ``cost_limit``; other algorithms (PPO,
    SAC, ...) may give ``env_config["cost_limit"]``.
    """
    keys = constraint_names(getattr(config, "cost_keys", None))
    limit = getattr(config, "cost_limit", None)
    if limit is None:
        env_config = getattr(config, "env_config", None)
        limit = env_config.get("cost_limit") if hasattr(env_config, "get") else None
    return keys, None if limit is None else cost_limits(limit, keys)


def _set_violation_rates(env_runner_results) -> None:
    """Exact violation rates of the iteration: violated / checked episodes (all EnvRunners).

    The per-episode 0/1 values that the EnvRunners also log as a windowed mean
    reach the driver as a mean of per-runner (per-chunk) means, which weights a
    runner that finished one episode like one that finished ten.
    """
    if not isinstance(env_runner_results, dict):
        return
    checked = env_runner_results.get(M.NUM_EPISODES_CHECKED)
    try:
        checked = float(checked)
    except (TypeError, ValueError):
        return
    if not checked > 0:
        return
    env_runner_results[M.COST_VIOLATION_RATE] = (
        float(env_runner_results.get(M.NUM_EPISODES_VIOLATED, 0.0)) / checked
    )
    prefix = M.NUM_EPISODES_VIOLATED_PREFIX
    for key in [k for k in env_runner_results if isinstance(k, str) and k.startswith(prefix)]:
        name = key[len(prefix) :]
        env_runner_results[M.COST_VIOLATION_RATE_PREFIX + name] = (
            float(env_runner_results[key]) / checked
        )


class CostMetricsCallback(RLlibCallback):
    """Logs per-episode cost, per-constraint costs, violations and the cumulative cost.

    The cost of each step is read from the step's ``info`` (``infos[1:]`` of
    every chunk of the episode: ``infos[0]`` is the reset info, or belongs to
    the previous chunk).
    """

    def on_episode_end(
        self, *, episode, prev_episode_chunks=None, env_runner=None, metrics_logger=None, **kwargs
    ) -> None:
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
            flags = violations(totals, limits)
            metrics_logger.log_value(
                M.COST_VIOLATION_RATE, float(any(flags)), reduce="mean", window=window
            )
            metrics_logger.log_value(M.NUM_EPISODES_CHECKED, 1, reduce="sum")
            metrics_logger.log_value(M.NUM_EPISODES_VIOLATED, int(any(flags)), reduce="sum")
            if len(keys) > 1:
                for k, flag in zip(keys, flags):
                    metrics_logger.log_value(
                        M.COST_VIOLATION_RATE_PREFIX + k, float(flag), reduce="mean", window=window
                    )
                    metrics_logger.log_value(
                        M.NUM_EPISODES_VIOLATED_PREFIX + k, int(flag), reduce="sum"
                    )
        if not getattr(env_runner.config, "in_evaluation", False):
            # lifetime sum: each EnvRunner sends what it added since its last report,
            # the driver's logger accumulates it (and keeps it in checkpoints)
            metrics_logger.log_value(M.CUMULATIVE_COST, sum(totals), reduce="lifetime_sum")
        metrics_logger.log_value(M.NUM_NONFINITE_DROPPED, dropped, reduce="sum")

    def on_train_result(
        self, *, algorithm=None, metrics_logger=None, result=None, **kwargs
    ) -> None:
        if not isinstance(result, dict):
            return
        training = result.get(ENV_RUNNER_RESULTS)
        _set_violation_rates(training)
        evaluation = result.get(M.EVALUATION_RESULTS)
        if isinstance(evaluation, dict):
            _set_violation_rates(evaluation.get(ENV_RUNNER_RESULTS))
        if not isinstance(training, dict):
            return
        cumulative = float(training.get(M.CUMULATIVE_COST, 0.0))  # 0 until an episode ends
        training[M.CUMULATIVE_COST] = cumulative
        steps = training.get(NUM_ENV_STEPS_SAMPLED_LIFETIME)
        if steps:
            training[M.COST_RATE] = cumulative / float(steps)
