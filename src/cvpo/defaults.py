"""One home for the names and defaults that more than one module uses.

The algorithm configs (``rllib_ext.cvpo.CVPOConfig``, ``rllib_ext.sac_lag.SACLagConfig``)
take their defaults from here, the networks and the E-step read the same values, and
the validators check choices against the tuples below. The glossary in
``docs/algorithm.md#glossary`` maps each config key to the paper's symbol.
"""

from __future__ import annotations

#: the ``info`` key of the cost signal when a config names none (``cost_keys=None``)
DEFAULT_COST_KEY = "cost"

# -- choices (validated against these tuples) ----------------------------------------------
#: E-step solvers: projected Newton on the dual (exact, fast) or the cvxpy reference model
ESTEP_SOLVERS = ("newton", "cvxpy")
#: how the reward critics of the ensemble are combined (min: clipped double-Q)
REWARD_REDUCTIONS = ("min", "mean")
#: how each constraint's cost critics are combined (max: pessimistic)
COST_REDUCTIONS = ("mean", "max")
#: which next actions the cost critics' TD target bootstraps on: the target policy's
#: samples (the paper's), the action the behaviour took there, or the target policy's
#: mean action (a cost critic of the deterministic policy; docs/constraint.md)
COST_TARGET_ACTIONS = ("policy", "replay", "mean")
#: where the per-step cost threshold's discounting comes from (docs/constraint.md)
THRESHOLD_TIMINGS = ("measured", "even")
#: the actor's covariance: diagonal, or full through a Cholesky factor (the original CVPO's)
ACTOR_COVARIANCES = ("diagonal", "full")

# -- numbers ------------------------------------------------------------------------------
#: cap on each E-step cost multiplier lambda (reward units per cost unit: 1e3 lets one unit of
#: cost outweigh 1000 units of reward); a step that needs more is infeasible
ESTEP_LAMBDA_MAX = 1e3
#: hidden sizes of the actor and of every critic (CVPO's defaults; SACLag uses 256)
HIDDENS = (128, 128)
#: bounds of the actor's standard deviation (action units)
STD_MIN = 1e-3
STD_MAX = 2.0
