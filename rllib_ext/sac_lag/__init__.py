"""SAC-Lagrangian for RLlib, on CVPO's stack: config, algorithm, learner and module."""

from rllib_ext.sac_lag.sac_lag import SACLag, SACLagConfig

__all__ = ["SACLag", "SACLagConfig"]
