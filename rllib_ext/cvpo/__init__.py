"""CVPO for RLlib: config, algorithm, learner and module (layout of rllib/algorithms/sac)."""

from rllib_ext.cvpo.cvpo import CVPO, CVPOConfig

__all__ = ["CVPO", "CVPOConfig"]
