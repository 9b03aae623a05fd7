"""Every metric key CVPO and SACLag write, in one place.

EnvRunner metrics appear under ``result["env_runners"]``; learner metrics
under ``result["learners"]["default_policy"]``; driver metrics under
``result["cvpo"]`` (for SACLag too: the driver's results of this project's
algorithms).
"""

# -- EnvRunner (per episode, averaged over the smoothing window) -------------------------
EPISODE_RETURN_MEAN = "episode_return_mean"  # RLlib's own key
EPISODE_COST_MEAN = "episode_cost_mean"  # sum over constraints of the episodic cost
EPISODE_COST_MEAN_PREFIX = "episode_cost_mean_"  # + constraint name, when m > 1
COST_VIOLATION_RATE = "cost_violation_rate"  # fraction of episodes over a limit
NUM_NONFINITE_DROPPED = "num_nonfinite_signals_dropped"
# Lifetime sums over every training episode that ended (safe-RL papers report them).
CUMULATIVE_COST = "cumulative_cost"  # sum of all training episodes' costs (all constraints)
COST_RATE = "cost_rate"  # CUMULATIVE_COST / env steps sampled (set on the driver)
# An episode violates when ANY constraint's episodic cost exceeds its own limit
# (cvpo.constraints.violated). The rates are exact shares of the iteration's episodes:
# the driver divides these per-iteration counts (summed over all EnvRunners).
COST_VIOLATION_RATE_PREFIX = "cost_violation_rate_"  # + constraint name, when m > 1
NUM_EPISODES_CHECKED = "num_episodes_cost_checked"  # episodes compared with the limits
NUM_EPISODES_VIOLATED = "num_episodes_violated"  # of which over a limit
NUM_EPISODES_VIOLATED_PREFIX = "num_episodes_violated_"  # + constraint name, when m > 1

# -- Evaluation (RLlib's .evaluation(): deterministic actions) ---------------------------
# RLlib puts the evaluation EnvRunners' metrics under result["evaluation"]["env_runners"];
# the same EnvRunner keys as above appear there.
EVALUATION_RESULTS = "evaluation"
BEST_FEASIBLE_DIR = "best_feasible"  # checkpoint folder name, inside the trial folder
BEST_FEASIBLE_RETURN = "best_feasible_return"  # under result["cvpo"]

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
# SACLag's learner (reward/cost critic losses, Q_MEAN and QC_MEAN_PREFIX as above)
ACTOR_LOSS = "actor_loss"  # alpha log pi - Q_r + sum_k lambda_k Q_c,k (normalised if set)
ENTROPY_ALPHA = "entropy_alpha"  # the entropy temperature alpha
ENTROPY_ALPHA_LOSS = "entropy_alpha_loss"
POLICY_ENTROPY = "policy_entropy"  # -mean log pi of the sampled actions ([-1, 1] units)
LAGRANGE_MULTIPLIER_PREFIX = "lagrange_multiplier_"  # + constraint name (also on the driver)

# -- Driver --------------------------------------------------------------------------------
CVPO_RESULTS = "cvpo"
REPLAY_SIZE = "replay_size"
UPDATES_LIFETIME = "num_gradient_updates_lifetime"
THRESHOLD_SCALE_PREFIX = "threshold_scale_"  # + constraint name: feedback kappa (cvpo.threshold)
THRESHOLD_TIMING_PREFIX = "threshold_timing_"  # + constraint name: rho / rho_even (cvpo.threshold)
# SACLag (cvpo.lagrange): under result["cvpo"], per constraint
LAGRANGE_EPISODE_COST_PREFIX = "lagrange_episode_cost_"  # + name: J of the latest update
LAGRANGE_PID_INTEGRAL_PREFIX = "lagrange_pid_integral_"  # + name: the PID's I (PID only)
LAGRANGE_UPDATES = "lagrange_updates"  # multiplier updates so far
