"""The SACLag torch learner: critics, actor, temperature and targets in one update.

One gradient update on a minibatch of B n-step transitions (the same replay
columns as CVPO's: ``obs, actions, rewards, costs (B, m), next_obs, discounts``):

1. critics: every member regresses onto its n-step TD target with a' ~ pi(.|s')
   from the CURRENT actor and the target critics,
   ``y_r = R + discount * (reduce_r Q_r'(s', a') - alpha log pi(a'|s'))`` for the
   reward members and ``y_c,k = C_k + discount * reduce_t Q_c,k'(s', a')`` (reduce_t:
   ``cost_target_reduction`` over constraint k's cost critics, as in CVPO) for its
   cost members (no entropy bonus in the cost); with ``cost_target_actions`` "replay"
   the cost side bootstraps on the behaviour's action at s', with "mean" on the
   actor's deterministic action ``tanh(mu(s'))`` in env units;
2. actor: a ~ pi(.|s) reparameterised,
   ``L_pi = mean_s [alpha log pi(a|s) - reduce_r Q_r(s, a) + sum_k lambda_k reduce_c Q_c,k(s, a)]``,
   divided by ``1 + sum_k lambda_k`` when ``lagrangian_normalize_actor_loss``;
   the critics enter with their parameters detached, so this loss moves the actor only;
3. temperature: ``L_alpha = -mean_s log_alpha (log pi(a|s) + target_entropy)``;
4. after the optimizer steps, polyak-average the target critics (``tau``).

The three losses touch disjoint parameters, so one backward pass serves the
three optimizers. The multipliers lambda_k come from the Algorithm
(:meth:`SACLagTorchLearner.set_lagrange_multipliers`, :mod:`cvpo.lagrange`).
A non-finite loss skips the whole update (counted in the metrics).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from ray.rllib.core.learner.learner import Learner
from ray.rllib.utils.annotations import override
from ray.rllib.utils.typing import ModuleID, TensorType

from cvpo.networks import reduce_members
from rllib_ext.common import metrics as M
from rllib_ext.common.torch_learner import (
    ConstrainedTorchLearner,
    cost_values_at,
    cost_values_at_replay_actions,
)
from rllib_ext.sac_lag.torch.default_sac_lag_torch_rl_module import ACTOR_MEAN, ACTOR_STD

LEARNER_STATE_KEY = "saclag_learner_state"


class SACLagTorchLearner(ConstrainedTorchLearner):
    """TorchLearner for SACLag (see the module docstring)."""

    LEARNER_STATE_KEY = LEARNER_STATE_KEY

    def _init_module_state(self, module_id: ModuleID, config) -> None:
        if not hasattr(self, "_multipliers"):
            self._multipliers: dict[ModuleID, np.ndarray] = {}
            self._multiplier_tensors: dict[ModuleID, torch.Tensor] = {}
        self._multipliers[module_id] = np.asarray(config.initial_multipliers(), np.float64)

    @override(ConstrainedTorchLearner)
    def configure_optimizers_for_module(self, module_id: ModuleID, config=None) -> None:
        module = self._module[module_id]
        self.register_adam(
            module_id, "critic", self.get_parameters(module.critics), config.critic_lr
        )
        self.register_adam(module_id, "actor", self.get_parameters(module.actor), config.actor_lr)
        self.register_adam(module_id, "alpha", [module.log_alpha], config.alpha_lr)

    # -- the multipliers ------------------------------------------------------------------
    def set_lagrange_multipliers(self, module_id: ModuleID, values) -> None:
        """Sets lambda_k of the actor loss (the Algorithm updates them; cvpo.lagrange)."""
        self._multipliers[module_id] = np.asarray(values, np.float64).reshape(-1)
        self._multiplier_tensors.pop(module_id, None)

    def _lambda(self, module_id: ModuleID) -> torch.Tensor:
        if module_id not in self._multiplier_tensors:
            self._multiplier_tensors[module_id] = torch.as_tensor(
                self._multipliers[module_id], dtype=torch.float32, device=self._device
            )
        return self._multiplier_tensors[module_id]

    @staticmethod
    def _target_entropy(config, act_dim: int) -> float:
        t = config.target_entropy
        return -float(act_dim) if t == "auto" else float(t)

    # -- the update -------------------------------------------------------------------
    @override(Learner)
    def compute_loss_for_module(
        self,
        *,
        module_id: ModuleID,
        config,
        batch: dict[str, Any],
        fwd_out: dict[str, TensorType],
    ) -> TensorType:
        module = self.module[module_id].unwrapped()
        B = batch["obs"].shape[0]
        obs = batch["obs"].reshape(B, -1).float()  # (B, o)
        actions = batch["actions"].float().reshape(B, -1)  # (B, d)
        next_obs = batch["next_obs"].reshape(B, -1).float()  # (B, o)
        rewards = batch["rewards"].float()  # (B,)
        costs = batch["costs"].float().reshape(B, -1)  # (B, m)
        discounts = batch["discounts"].float()  # (B,)
        E, m, Ec = module.num_reward_critics, module.num_constraints, module.num_cost_critics
        alpha = module.log_alpha.exp().detach()

        # ---- critics: n-step TD with a' ~ pi(.|s') and the target critics
        with torch.no_grad():
            mu_next, std_next = module.actor(next_obs)
            squashed_next, logp_next = module.squashed_sample(mu_next, std_next, self._generator)
            q_next = module.target_critics(next_obs, module.to_env_units(squashed_next))  # (M, B)
            v_r = reduce_members(q_next[:E], config.reward_critic_reduction, 0) - alpha * logp_next
            # the cost target reduces each constraint's critics by cost_target_reduction
            # (default the mean: a max compounds over the horizon, docs/constraint.md);
            # cost_critic_reduction acts in the actor loss
            v_c = reduce_members(q_next[E:].reshape(m, Ec, B), config.cost_target_reduction, 1)
            if config.cost_target_actions == "replay":  # the behaviour's action at s'
                v_c = cost_values_at_replay_actions(
                    module.target_critics,
                    next_obs,
                    batch,
                    v_c,
                    num_reward_critics=E,
                    num_constraints=m,
                    num_cost_critics=Ec,
                    reduction=config.cost_target_reduction,
                )
            elif config.cost_target_actions == "mean":  # the deterministic action at s'
                a_mean = module.to_env_units(torch.tanh(mu_next))
                v_c = cost_values_at(
                    module.target_critics,
                    next_obs,
                    a_mean,
                    num_reward_critics=E,
                    num_constraints=m,
                    num_cost_critics=Ec,
                    reduction=config.cost_target_reduction,
                )
            y_r = rewards + discounts * v_r  # (B,)
            y_c = costs.T + discounts * v_c  # (m, B)
        q_pred = module.critics(obs, actions)  # (M, B)
        mse_r = ((q_pred[:E] - y_r) ** 2).mean(-1)  # (E,)
        mse_c = ((q_pred[E:].reshape(m, Ec, B) - y_c.unsqueeze(1)) ** 2).mean(-1)  # (m, Ec)
        critic_loss = mse_r.sum() + mse_c.sum()

        # ---- actor: reparameterised sample, critics with detached parameters
        squashed, logp = module.squashed_sample(
            fwd_out[ACTOR_MEAN], fwd_out[ACTOR_STD], self._generator
        )
        frozen = {name: p.detach() for name, p in module.critics.named_parameters()}
        q_pi = torch.func.functional_call(
            module.critics, frozen, (obs, module.to_env_units(squashed))
        )
        qr_pi = reduce_members(q_pi[:E], config.reward_critic_reduction, 0)  # (B,)
        qc_pi = reduce_members(q_pi[E:].reshape(m, Ec, B), config.cost_critic_reduction, 1)
        lam = self._lambda(module_id)  # (m,)
        actor_loss = (alpha * logp - qr_pi + (lam.unsqueeze(1) * qc_pi).sum(0)).mean()
        if config.lagrangian_normalize_actor_loss:
            actor_loss = actor_loss / (1.0 + lam.sum())

        # ---- temperature
        target_entropy = self._target_entropy(config, module.act_dim)
        alpha_loss = -(module.log_alpha * (logp.detach() + target_entropy)).mean()

        total = critic_loss + actor_loss + alpha_loss
        self.finish_update(module_id, total)
        self.record_metrics(
            module_id,
            {
                M.REWARD_CRITIC_LOSS: mse_r.mean(),
                M.Q_MEAN: q_pred[:E].mean(),
                M.ACTOR_LOSS: actor_loss,
                M.ENTROPY_ALPHA_LOSS: alpha_loss,
                M.POLICY_ENTROPY: -logp.mean(),
                M.ENTROPY_ALPHA: alpha,
                M.QC_MEAN_PREFIX: q_pred[E:].reshape(m, Ec, B).mean(dim=(1, 2)),
                M.COST_CRITIC_LOSS: mse_c.mean(),
            },
        )
        return total

    def _log_learner_call(self, module_id: ModuleID) -> None:
        names = self.config.get_config_for_module(module_id).constraint_names
        for name, value in zip(names, self._multipliers[module_id]):
            self.metrics.log_value(
                (module_id, M.LAGRANGE_MULTIPLIER_PREFIX + name), float(value), window=1
            )

    # -- state: the multipliers in use (numpy) ------------------------------------------
    def _module_state(self, module_id: ModuleID) -> dict[str, Any]:
        return {"multipliers": self._multipliers[module_id].tolist()}

    def _set_module_state(self, module_id: ModuleID, state: dict[str, Any]) -> None:
        self.set_lagrange_multipliers(module_id, state["multipliers"])

    def get_saclag_state(self) -> dict[str, Any]:
        """Multipliers in use, counters and the sampling generator (tests, diagnostics)."""
        return self.learner_state()
