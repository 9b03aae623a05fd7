"""CVPO on RLlib's new API stack: the config and the off-policy Algorithm.

Sampling, the n-step reward-and-cost replay, the update schedule, evaluation
with a best feasible checkpoint and the driver's checkpoint state are shared
with SACLag (:mod:`rllib_ext.common.off_policy`, whose docstring walks
through one ``training_step``). CVPO adds its E-step threshold: the measured
cost timing and the episodic-cost feedback of the training episodes
(:mod:`cvpo.threshold`), pushed to the learner after every finished episode.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig, NotProvided
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.utils.annotations import override

from cvpo.defaults import ESTEP_LAMBDA_MAX
from cvpo.replay import EpisodeChunk
from cvpo.threshold import ThresholdFeedback, TimingCorrection
from rllib_ext.common import metrics as M
from rllib_ext.common.off_policy import ConstrainedOffPolicy, ConstrainedOffPolicyConfig

FEEDBACK_STATE_KEY = "cvpo_threshold_feedback"
TIMING_STATE_KEY = "cvpo_threshold_timing"


class CVPOConfig(ConstrainedOffPolicyConfig):
    """Configuration of CVPO (builder style).

    Example::

        config = (
            CVPOConfig()
            .environment("SafetyPointGoal1-v0")
            .env_runners(num_env_runners=2)
            .training(cost_limit=25.0, estep_kl=0.1, num_sampled_actions=32)
        )
        algo = config.build_algo()

    All CVPO hyper-parameters are set with :meth:`training`; the keys CVPO
    shares with SACLag (constraint, networks, replay, sampling) and their
    defaults live in :class:`rllib_ext.common.off_policy.ConstrainedOffPolicyConfig`,
    CVPO's own here.
    """

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or CVPO)
        # --- E-step ---
        self.estep_kl = 0.1  # epsilon: mean KL(q || pi_old) over states
        self.num_sampled_actions = 16  # K actions per state (FSRL's default)
        self.estep_solver = "newton"
        self.estep_lambda_max = ESTEP_LAMBDA_MAX  # cap on lambda (infeasible steps hit it)
        # The per-step threshold (cvpo.threshold, docs/constraint.md): "even" is the paper's
        # C (1 - gamma^T) / ((1 - gamma) T), exact for cost spread evenly over the episode;
        # "measured" replaces the even spread by the cost timing of the last
        # `threshold_timing_window` finished training episodes.
        self.step_threshold_timing = "measured"
        self.threshold_timing_window = 100
        # Episodic-cost feedback: kappa scales the threshold, log kappa moves by this rate per
        # finished training episode toward meeting the limit; 0 switches it off. On
        # PointGoal1 without it the cost critic said "at the threshold" while training
        # episodes paid 2-3x the limit (docs/constraint.md).
        self.threshold_feedback_rate = 0.03
        self.threshold_kappa_range = (0.05, 1.0)
        # --- M-step trust region ---
        self.mstep_kl_mu = 0.01
        self.mstep_kl_sigma = 0.0005
        self.mstep_alpha_lr = 10.0  # step size of the KL multipliers' own updates
        self.alpha_mu_max = 10.0
        self.alpha_sigma_max = 100.0
        # Fit the actor to the sampled actions clamped to the action bounds (what the env
        # executes and the critics score) instead of the raw samples: beyond a bound the
        # critics are flat, and fitting the raw samples there lets the std run to std_max
        # (docs/constraint.md, item 6). Off: the paper's fit.
        self.mstep_clip_targets = False
        # --- the actor's covariance: "diagonal", or "full" (Cholesky, the original CVPO's) ---
        self.actor_covariance = "diagonal"
        # --- critics (tau, the polyak rate, also moves the target actor pi_old) ---
        self.num_target_actions = 1  # actions from pi_old averaged for the TD target V(s')

    @override(AlgorithmConfig)
    def training(
        self,
        *,
        estep_kl=NotProvided,
        num_sampled_actions=NotProvided,
        estep_solver=NotProvided,
        estep_lambda_max=NotProvided,
        step_threshold_timing=NotProvided,
        threshold_timing_window=NotProvided,
        threshold_feedback_rate=NotProvided,
        threshold_kappa_range=NotProvided,
        mstep_kl_mu=NotProvided,
        mstep_kl_sigma=NotProvided,
        mstep_alpha_lr=NotProvided,
        alpha_mu_max=NotProvided,
        alpha_sigma_max=NotProvided,
        mstep_clip_targets=NotProvided,
        actor_covariance=NotProvided,
        num_target_actions=NotProvided,
        kl_bound=NotProvided,
        alpha_lr=NotProvided,
        **kwargs,
    ) -> CVPOConfig:
        """Sets CVPO's hyper-parameters (any left out keep their value).

        The shared keys (cost_limit, cost_keys, episode_horizon, actor_hiddens,
        critic_hiddens, std_min, std_max, actor_lr, critic_lr, tau, n_step,
        num_reward_critics, reward_critic_reduction, num_cost_critics,
        cost_critic_reduction, training_intensity, updates_per_learner_call,
        replay_capacity, num_steps_sampled_before_learning_starts,
        store_buffer_in_checkpoints, async_sampling, learner_torch_threads,
        keep_best_feasible_checkpoint) are described in
        :meth:`ConstrainedOffPolicyConfig.training`; in CVPO ``tau`` also moves
        the target actor pi_old, and ``episode_horizon`` is the T of the
        threshold formula.

        Args:
            estep_kl: E-step bound epsilon on the mean KL(q || pi_old).
            num_sampled_actions: K actions sampled per state in the E-step.
            estep_solver: "newton" (exact, fast) or "cvxpy" (the reference model).
            estep_lambda_max: cap on each lambda; reaching it marks an infeasible step.
            step_threshold_timing: "measured" (the threshold from the cost timing of
                recent training episodes) or "even" (the paper's formula).
            threshold_timing_window: finished episodes the timing is measured over.
            threshold_feedback_rate: step of log kappa per finished training episode,
                where kappa scales the per-step cost threshold so that the measured
                episodic cost meets the limit (cvpo.threshold); 0 switches it off.
            threshold_kappa_range: (min, max) of kappa.
            mstep_kl_mu, mstep_kl_sigma: trust-region bounds of the M-step.
            mstep_alpha_lr, alpha_mu_max, alpha_sigma_max: the KL multipliers' step size
                and caps.
            mstep_clip_targets: fit the actor to the E-step's sampled actions clamped
                to the action bounds (True) or to the raw samples (False, the paper's;
                docs/constraint.md, item 6).
            actor_covariance: "diagonal" (a std per action dimension) or "full" (a
                Cholesky factor per state, the original CVPO's actor).
            num_target_actions: actions from pi_old averaged in the TD target.
            kl_bound, alpha_lr: accepted aliases of ``estep_kl`` and ``mstep_alpha_lr``.
        """
        super().training(**kwargs)
        for name, value in list(locals().items()):
            if name in ("self", "kwargs", "__class__") or value is NotProvided:
                continue
            setattr(self, name, value)
        return self

    # -- the accepted aliases of renamed keys (YAML files and --config of older runs) --------
    @property
    def kl_bound(self) -> float:
        """Alias of ``estep_kl``."""
        return self.estep_kl

    @kl_bound.setter
    def kl_bound(self, value: float) -> None:
        self.estep_kl = value

    @property
    def alpha_lr(self) -> float:
        """Alias of ``mstep_alpha_lr``."""
        return self.mstep_alpha_lr

    @alpha_lr.setter
    def alpha_lr(self, value: float) -> None:
        self.mstep_alpha_lr = value

    # -- derived values -----------------------------------------------------------------
    def step_thresholds(self) -> np.ndarray:
        """Per-step Q_c thresholds eps_k = C_k (1 - gamma^T) / ((1 - gamma) T)."""
        from cvpo.constraints import episodic_to_step_threshold

        if self.episode_horizon is None:
            raise ValueError("episode_horizon is unknown: call validate() with an env set")
        return np.asarray(
            episodic_to_step_threshold(self.cost_limits, self.gamma, int(self.episode_horizon)),
            dtype=np.float64,
        ).reshape(-1)

    # -- validation ---------------------------------------------------------------------
    @override(AlgorithmConfig)
    def validate(self) -> None:
        super().validate()
        from rllib_ext.cvpo.validation import validate_cvpo_config

        validate_cvpo_config(self)

    @property
    @override(AlgorithmConfig)
    def _model_config_auto_includes(self) -> dict[str, Any]:
        # the module owns the forward passes: the covariance form, the ensemble
        # reductions and the numbers of sampled actions reach it through model_config
        return super()._model_config_auto_includes | {
            "actor_covariance": self.actor_covariance,
            "reward_critic_reduction": self.reward_critic_reduction,
            "cost_critic_reduction": self.cost_critic_reduction,
            "cost_target_reduction": self.cost_target_reduction,
            "num_sampled_actions": self.num_sampled_actions,
            "num_target_actions": self.num_target_actions,
        }

    @override(AlgorithmConfig)
    def get_default_rl_module_spec(self) -> RLModuleSpec:
        from rllib_ext.cvpo.torch.default_cvpo_torch_rl_module import DefaultCVPOTorchRLModule

        return RLModuleSpec(module_class=DefaultCVPOTorchRLModule)

    @override(AlgorithmConfig)
    def get_default_learner_class(self):
        from rllib_ext.cvpo.torch.cvpo_torch_learner import CVPOTorchLearner

        return CVPOTorchLearner


class CVPO(ConstrainedOffPolicy):
    """Constrained Variational Policy Optimization (Liu et al., ICML 2022)."""

    @classmethod
    @override(Algorithm)
    def get_default_config(cls) -> CVPOConfig:
        return CVPOConfig()

    def _setup_constraint_state(self, config) -> None:
        self._feedback = ThresholdFeedback(
            config.cost_limits, config.threshold_feedback_rate, config.threshold_kappa_range
        )
        self._timing = (
            TimingCorrection(len(config.cost_limits), config.gamma, config.threshold_timing_window)
            if config.step_threshold_timing == "measured"
            else None
        )
        # the per-step costs of open episodes are kept only when something uses them
        self._tracks_episode_costs = self._feedback.enabled or self._timing is not None

    # -- episodic-cost feedback on the threshold ------------------------------------------
    def _on_chunks(self, chunks: Sequence[EpisodeChunk]) -> None:
        self._feed_threshold(chunks)

    def _feed_threshold(self, chunks: Sequence[EpisodeChunk]) -> None:
        """Finished training episodes update the timing correction and the feedback
        (cvpo.threshold), and the learners get the resulting step thresholds."""
        cfg = self.config
        finished = self._finished_episode_costs(chunks)
        if finished:
            self._feedback.update(np.stack([costs.sum(axis=0) for costs, _ in finished]))
            if self._timing is not None:
                for costs, truncated in finished:
                    self._timing.update(costs, truncated)
            self._push_thresholds()
        names = cfg.constraint_names
        for name, kappa, timing in zip(names, self._feedback.kappa, self._timing_factor()):
            self.metrics.log_value(
                (M.CVPO_RESULTS, M.THRESHOLD_SCALE_PREFIX + name), float(kappa), window=1
            )
            self.metrics.log_value(
                (M.CVPO_RESULTS, M.THRESHOLD_TIMING_PREFIX + name), float(timing), window=1
            )

    def _timing_factor(self) -> np.ndarray:
        """rho / rho_even per constraint: 1 for cost spread evenly, < 1 for early cost."""
        limits = np.asarray(self.config.cost_limits, dtype=np.float64)
        active = np.isfinite(limits) & (limits > 0)  # 0 and inf: the threshold is 0 / inf anyway
        even = np.where(active, self.config.step_thresholds() / np.where(active, limits, 1.0), 1.0)
        if self._timing is None:
            return np.ones_like(even)
        return np.where(active, self._timing.rho(even) / even, 1.0)

    def step_thresholds(self) -> np.ndarray:
        """The per-step thresholds the E-step uses now: C * rho * kappa (docs/constraint.md)."""
        return self.config.step_thresholds() * self._timing_factor() * self._feedback.kappa

    def _push_thresholds(self) -> None:
        eps = self.step_thresholds()
        self.learner_group.foreach_learner(
            lambda learner: learner.set_step_thresholds(DEFAULT_MODULE_ID, eps)
        )

    # -- checkpoints ---------------------------------------------------------------------
    @override(Algorithm)
    def get_state(self, components=None, *, not_components=None, **kwargs):
        state = super().get_state(components, not_components=not_components, **kwargs)
        state[FEEDBACK_STATE_KEY] = self._feedback.get_state()
        if self._timing is not None:
            state[TIMING_STATE_KEY] = self._timing.get_state()
        return state

    @override(Algorithm)
    def set_state(self, state) -> None:
        super().set_state(state)
        if FEEDBACK_STATE_KEY in state:
            self._feedback.set_state(state[FEEDBACK_STATE_KEY])
            if self._timing is not None and TIMING_STATE_KEY in state:
                self._timing.set_state(state[TIMING_STATE_KEY])
            self._push_thresholds()
