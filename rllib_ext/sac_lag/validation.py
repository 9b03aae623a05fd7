"""SACLagConfig checks: every bad value gets a message naming the key and range
(the shared keys are checked by :func:`rllib_ext.cvpo.validation.validate_off_policy_config`)."""

from __future__ import annotations

import math

from rllib_ext.cvpo.validation import (
    ConfigError,
    _bad,
    _check_bool,
    _check_num_learners,
    _is_real,
    _positive,
    check_constraint_keys,
    validate_off_policy_config,
)

_LEARNER_WHY = (
    "the driver feeds one learner one stream of minibatches and pushes the multipliers "
    "to it; data-parallel SACLag learners are not tested."
)


class SACLagConfigError(ConfigError):
    """A SACLagConfig value outside its allowed range."""


def validate_sac_lag_config(cfg) -> None:
    """Checks SACLag's keys, then the shared ones, then probes the env."""
    check_constraint_keys(cfg)
    _check_num_learners(cfg, _LEARNER_WHY)
    _positive(cfg, "initial_alpha")
    t = cfg.target_entropy
    if not (t == "auto" or (_is_real(t) and math.isfinite(t))):
        raise _bad("target_entropy", t, "'auto' (-act_dim) or a finite number", cfg)
    _positive(cfg, "alpha_lr")
    _positive(cfg, "lagrangian_lr")
    pid = cfg.lagrangian_pid
    if pid is not None and not (
        isinstance(pid, (list, tuple))
        and len(pid) == 3
        and all(_is_real(g) and math.isfinite(g) and g >= 0 for g in pid)
    ):
        raise _bad("lagrangian_pid", pid, "None or three gains (kp, ki, kd), each >= 0", cfg)
    if pid is None:
        _positive(cfg, "lagrangian_init")  # softplus never reaches 0
    else:
        _positive(cfg, "lagrangian_init", allow_zero=True)
    _positive(cfg, "lagrangian_update_episodes", integer=True)
    _check_bool(cfg, "lagrangian_normalize_actor_loss")
    validate_off_policy_config(cfg)
