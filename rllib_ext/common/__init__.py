"""What this project's constrained off-policy algorithms (CVPO, SACLag) share.

:mod:`rllib_ext.common.off_policy`: the config keys and the Algorithm of an
actor-critic with critic ensembles learning from n-step reward-and-cost replay
(sampling, replay, episode-cost bookkeeping, evaluation and the best feasible
checkpoint, checkpoint state).
"""

from rllib_ext.common.off_policy import ConstrainedOffPolicy, ConstrainedOffPolicyConfig

__all__ = ["ConstrainedOffPolicy", "ConstrainedOffPolicyConfig"]
