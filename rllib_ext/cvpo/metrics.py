"""Every metric key CVPO writes, in one place.

EnvRunner metrics appear under ``result["env_runners"]``; learner metrics
under ``result["learners"]["default_policy"]``; driver metrics under
``result["cvpo"]``.
"""

# -- EnvRunner (per episode, averaged over the smoothing window) -------------------------
EPISODE_RETURN_MEAN = "episode_return_mean"  # RLlib's own key
EPISODE_COST_MEAN = "episode_cost_mean"  # sum over constraints of the episodic cost
EPISODE_COST_MEAN_PREFIX = "episode_cost_mean_"  # + constraint name, when m > 1
COST_VIOLATION_RATE = "cost_violation_rate"  # fraction of episodes over a limit
NUM_NONFINITE_DROPPED = "num_nonfinite_signals_dropped"

# -- Learner (per update, averaged over the iteration) ------------------------------------
ETA = "eta"
LAMBDA_PREFIX = "lambda_"  # + constraint name
ESTEP_SOLVE_TIME_S = "estep_solve_time_s"
ESTEP_CRITIC_EVAL_TIME_S = "estep_critic_eval_time_s"
ESTEP_ITERATIONS = "estep_iterations"
ESTEP_STATUS_PREFIX = "estep_status_"  # + status name; summed counts per iteration
ESTEP_FALLBACKS = "estep_fallbacks"
KL_MU = "kl_mu"
KL_SIGMA = "kl_sigma"
ALPHA_MU = "alpha_mu"
ALPHA_SIGMA = "alpha_sigma"
MLE_LOSS = "mle_loss"
REWARD_CRITIC_LOSS = "reward_critic_loss"
COST_CRITIC_LOSS = "cost_critic_loss"
Q_MEAN = "q_mean"
QC_MEAN_PREFIX = "qc_mean_"  # + constraint name
STEP_THRESHOLD_PREFIX = "step_threshold_"  # + constraint name
NUM_SKIPPED_UPDATES = "num_updates_skipped_nonfinite"
NUM_UPDATES = "num_gradient_updates"

# -- Driver --------------------------------------------------------------------------------
CVPO_RESULTS = "cvpo"
REPLAY_SIZE = "replay_size"
UPDATES_LIFETIME = "num_gradient_updates_lifetime"
