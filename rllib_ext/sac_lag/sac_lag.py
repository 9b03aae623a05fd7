"""SAC-Lagrangian: the primal-dual baseline on exactly CVPO's stack.

Sampling (sync/async), the n-step reward-and-cost replay, the update schedule,
the episode-cost bookkeeping, evaluation with a best feasible checkpoint and
the driver's checkpoint state are CVPO's (:mod:`rllib_ext.common.off_policy`).
SACLag adds one Lagrange multiplier per constraint, updated on the driver from
the measured episodic cost of finished training episodes
(:class:`cvpo.lagrange.LagrangeMultipliers`: gradient ascent on a softplus
parameter, or Stooke et al.'s PID) and pushed to the learner after each
update. The learner (:mod:`rllib_ext.sac_lag.torch.sac_lag_torch_learner`)
runs SAC with twin reward critics, a tanh-squashed Gaussian actor and a
learned temperature, and adds ``sum_k lambda_k Q_c,k`` to the actor's loss.
See docs/algorithm_saclag.md.
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

from cvpo.lagrange import LagrangeMultipliers
from cvpo.replay import EpisodeChunk
from rllib_ext.common import metrics as M
from rllib_ext.common.off_policy import ConstrainedOffPolicy, ConstrainedOffPolicyConfig
from rllib_ext.sac_lag.validation import SACLagConfigError

LAGRANGE_STATE_KEY = "saclag_lagrange"


class SACLagConfig(ConstrainedOffPolicyConfig):
    """Configuration of SACLag (builder style).

    Example::

        config = (
            SACLagConfig()
            .environment("SafetyPointGoal1-v0")
            .env_runners(num_env_runners=2)
            .training(cost_limit=25.0, lagrangian_lr=0.005)
        )
        algo = config.build_algo()

    The keys shared with CVPO (constraint, networks, critics, replay,
    sampling, evaluation) are described in
    :meth:`ConstrainedOffPolicyConfig.training`; SAC's and the multiplier's
    in :meth:`training`. ``episode_horizon`` is not used by SACLag.
    """

    config_error = SACLagConfigError
    needs_episode_horizon = False

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or SACLag)
        # --- SAC (the shared keys' SAC values; the rest as CVPO's) ---
        self.actor_lr = 3e-4
        self.critic_lr = 1e-3
        self.tau = 0.005
        self.initial_alpha = 0.1  # entropy temperature at the start
        self.target_entropy = "auto"  # -act_dim (log-probs of actions in [-1, 1])
        self.alpha_lr = 3e-4
        # --- Lagrange multipliers (cvpo.lagrange) ---
        self.lagrangian_lr = 0.01  # gradient ascent on nu, lambda = softplus(nu)
        self.lagrangian_init = 0.1  # lambda before the first update
        self.lagrangian_pid = None  # (kp, ki, kd): Stooke et al. 2020's PID instead
        self.lagrangian_update_episodes = 1  # finished episodes per multiplier update
        # divide the actor loss by (1 + sum lambda): its scale stays put as lambda grows
        self.lagrangian_normalize_actor_loss = True

    @override(AlgorithmConfig)
    def training(
        self,
        *,
        initial_alpha=NotProvided,
        target_entropy=NotProvided,
        alpha_lr=NotProvided,
        lagrangian_lr=NotProvided,
        lagrangian_init=NotProvided,
        lagrangian_pid=NotProvided,
        lagrangian_update_episodes=NotProvided,
        lagrangian_normalize_actor_loss=NotProvided,
        **kwargs,
    ) -> SACLagConfig:
        """Sets SACLag's hyper-parameters (any left out keep their value).

        Args:
            initial_alpha: the entropy temperature alpha at the start (> 0).
            target_entropy: "auto" (-act_dim) or a number: the temperature loss
                drives the policy's entropy (of actions in [-1, 1]) toward it.
            alpha_lr: Adam learning rate of log alpha.
            lagrangian_lr: step size of the gradient ascent on the multipliers'
                softplus parameter nu: ``nu += lr * sigmoid(nu) * (J - C)``.
            lagrangian_init: the multipliers before the first update (> 0; >= 0
                with a PID).
            lagrangian_pid: None, or (kp, ki, kd) >= 0 for the PID multiplier of
                Stooke et al. 2020 (replaces the gradient ascent).
            lagrangian_update_episodes: finished training episodes whose mean
                episodic cost J makes one multiplier update.
            lagrangian_normalize_actor_loss: divide the actor loss by
                ``1 + sum_k lambda_k``.
            **kwargs: the shared keys (:meth:`ConstrainedOffPolicyConfig.training`)
                and RLlib's.
        """
        super().training(**kwargs)
        for name, value in list(locals().items()):
            if name in ("self", "kwargs", "__class__") or value is NotProvided:
                continue
            setattr(self, name, value)
        return self

    def initial_multipliers(self) -> np.ndarray:
        """lambda_k before any update: ``lagrangian_init``, 0 for an inf limit."""
        limits = np.asarray(self.cost_limits, np.float64)
        return np.where(np.isfinite(limits), float(self.lagrangian_init), 0.0)

    def make_multipliers(self) -> LagrangeMultipliers:
        pid = None if self.lagrangian_pid is None else tuple(self.lagrangian_pid)
        return LagrangeMultipliers(
            self.cost_limits,
            lr=self.lagrangian_lr,
            init=self.lagrangian_init,
            pid=pid,
            episodes_per_update=self.lagrangian_update_episodes,
        )

    @override(AlgorithmConfig)
    def validate(self) -> None:
        super().validate()
        from rllib_ext.sac_lag.validation import validate_sac_lag_config

        validate_sac_lag_config(self)

    @override(AlgorithmConfig)
    def get_default_rl_module_spec(self) -> RLModuleSpec:
        from rllib_ext.sac_lag.torch.default_sac_lag_torch_rl_module import (
            DefaultSACLagTorchRLModule,
        )

        return RLModuleSpec(module_class=DefaultSACLagTorchRLModule)

    @override(AlgorithmConfig)
    def get_default_learner_class(self):
        from rllib_ext.sac_lag.torch.sac_lag_torch_learner import SACLagTorchLearner

        return SACLagTorchLearner

    @property
    @override(AlgorithmConfig)
    def _model_config_auto_includes(self) -> dict[str, Any]:
        return super()._model_config_auto_includes | {"initial_alpha": self.initial_alpha}


class SACLag(ConstrainedOffPolicy):
    """Soft Actor-Critic with Lagrange multipliers on the episodic cost (primal-dual)."""

    @classmethod
    @override(Algorithm)
    def get_default_config(cls) -> SACLagConfig:
        return SACLagConfig()

    def _setup_constraint_state(self, config) -> None:
        self._lagrange = config.make_multipliers()

    def _on_chunks(self, chunks: Sequence[EpisodeChunk]) -> None:
        """Finished training episodes update the multipliers; the learners get them."""
        finished = self._finished_episode_costs(chunks)
        if finished and self._lagrange.add_episodes(
            np.stack([costs.sum(axis=0) for costs, _ in finished])
        ):
            self._push_multipliers()
        lam = self._lagrange
        log = self.metrics.log_value
        for k, name in enumerate(self.config.constraint_names):
            log(
                (M.CVPO_RESULTS, M.LAGRANGE_MULTIPLIER_PREFIX + name),
                float(lam.values[k]),
                window=1,
            )
            if np.isfinite(lam.last_cost[k]):
                log(
                    (M.CVPO_RESULTS, M.LAGRANGE_EPISODE_COST_PREFIX + name),
                    float(lam.last_cost[k]),
                    window=1,
                )
            if lam.pid is not None:
                log(
                    (M.CVPO_RESULTS, M.LAGRANGE_PID_INTEGRAL_PREFIX + name),
                    float(lam.integral[k]),
                    window=1,
                )
        log((M.CVPO_RESULTS, M.LAGRANGE_UPDATES), lam.num_updates, window=1)

    def lagrange_multipliers(self) -> np.ndarray:
        """lambda_k now (m,)."""
        return self._lagrange.values

    def _push_multipliers(self) -> None:
        values = self._lagrange.values
        self.learner_group.foreach_learner(
            lambda learner: learner.set_lagrange_multipliers(DEFAULT_MODULE_ID, values)
        )

    # -- checkpoints ---------------------------------------------------------------------
    @override(Algorithm)
    def get_state(self, components=None, *, not_components=None, **kwargs):
        state = super().get_state(components, not_components=not_components, **kwargs)
        state[LAGRANGE_STATE_KEY] = self._lagrange.get_state()
        return state

    @override(Algorithm)
    def set_state(self, state) -> None:
        super().set_state(state)
        if LAGRANGE_STATE_KEY in state:
            self._lagrange.set_state(state[LAGRANGE_STATE_KEY])
            self._push_multipliers()
