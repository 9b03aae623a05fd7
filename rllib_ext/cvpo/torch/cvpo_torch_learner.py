"""The CVPO torch learner: one update = TD targets, critic loss, E-step, M-step.

All math comes from ``cvpo`` (docs/algorithm.md); the forward passes from the
module (:mod:`rllib_ext.cvpo.torch.default_cvpo_torch_rl_module`); the per-module state
(trust regions, dual warm starts, thresholds) from :mod:`rllib_ext.cvpo.cvpo_learner`;
the update plumbing (skip on a non-finite loss, polyak targets, metrics, checkpoint
state) from :mod:`rllib_ext.common.torch_learner`.

The critic loss and the M-step loss touch disjoint parameters (the E-step is
computed without gradients), so one backward pass serves both optimizers.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from ray.rllib.core.learner.learner import Learner
from ray.rllib.utils.annotations import override
from ray.rllib.utils.typing import ModuleID, TensorType

from cvpo import estep
from cvpo.mstep import mstep_loss, mstep_loss_chol
from rllib_ext.common import metrics as M
from rllib_ext.common.torch_learner import (  # noqa: F401  (re-exported: old import paths)
    GENERATOR_KEY,
    ConstrainedTorchLearner,
    cost_values_at_replay_actions,
    learner_threads,
)
from rllib_ext.cvpo.cvpo_learner import LEARNER_STATE_KEY, CVPOLearner  # noqa: F401
from rllib_ext.cvpo.torch.default_cvpo_torch_rl_module import (
    ACTOR_MEAN,
    ACTOR_SCALE,
    OLD_MEAN,
    OLD_MEAN_NEXT,
    OLD_SCALE,
    Q_COST,
    Q_REWARD,
    Q_SAMPLED,
    QC_SAMPLED,
    SAMPLED_ACTIONS,
    V_NEXT,
    VC_NEXT,
)


class CVPOTorchLearner(CVPOLearner, ConstrainedTorchLearner):
    """TorchLearner for CVPO (see the module docstring)."""

    @override(ConstrainedTorchLearner)
    def configure_optimizers_for_module(self, module_id: ModuleID, config=None) -> None:
        module = self._module[module_id]
        self.register_adam(
            module_id, "critic", self.get_parameters(module.critics), config.critic_lr
        )
        self.register_adam(module_id, "actor", self.get_parameters(module.actor), config.actor_lr)

    @staticmethod
    def cost_bootstrap(module, config, batch: dict[str, Any], old: dict[str, Any]):
        """(m, B) the cost critics' value at s' in the TD target, by
        ``cost_target_actions``: "policy" (the paper's) pi_old's samples, "replay" the
        behaviour's action at s', "mean" pi_old's mean action (docs/constraint.md)."""
        vc_next = old[VC_NEXT]  # (m, B): pi_old's samples at s'
        how = config.cost_target_actions
        if how == "policy":
            return vc_next
        B = vc_next.shape[1]
        next_obs = batch["next_obs"].reshape(B, -1).float()
        with torch.no_grad():
            if how == "replay":  # the behaviour's action at s'
                return cost_values_at_replay_actions(
                    module.target_critics,
                    next_obs,
                    batch,
                    vc_next,
                    num_reward_critics=module.num_reward_critics,
                    num_constraints=module.num_constraints,
                    num_cost_critics=module.num_cost_critics,
                    reduction=module.cost_target_reduction,
                )
            # "mean": one action per state, clamped to the bounds by q_values
            _, qc = module.q_values(
                module.target_critics,
                next_obs,
                old[OLD_MEAN_NEXT].unsqueeze(1),
                cost_reduction=module.cost_target_reduction,
            )  # (m, B, 1)
            return qc[..., 0]

    @staticmethod
    def mstep_targets(module, config, sampled: torch.Tensor) -> torch.Tensor:
        """(B, K, d) the actions the M-step fits: pi_old's samples, or with
        ``mstep_clip_targets`` the samples clamped to the action bounds, the actions the
        env executes and the critics scored (docs/constraint.md, item 6)."""
        if not config.mstep_clip_targets:
            return sampled
        return torch.maximum(torch.minimum(sampled, module.action_high), module.action_low)

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
        t0 = time.perf_counter()
        old = module.forward_target(batch, generator=self._generator)  # pi_old, no gradients
        target_pass_s = time.perf_counter() - t0
        rewards, discounts = batch["rewards"].float(), batch["discounts"].float()  # (B,)
        costs = batch["costs"].float().reshape(rewards.shape[0], -1)  # (B, m)

        # 1. n-step TD targets: y = R + gamma^n V_old(s'), per constraint for the costs
        vc_next = self.cost_bootstrap(module, config, batch, old)  # (m, B)
        y_r = rewards + discounts * old[V_NEXT]  # (B,)
        y_c = costs.T + discounts * vc_next  # (m, B)
        # 2. critic loss: every ensemble member regresses onto its target
        mse_r = ((fwd_out[Q_REWARD] - y_r) ** 2).mean(-1)  # (E,)
        mse_c = ((fwd_out[Q_COST] - y_c.unsqueeze(1)) ** 2).mean(-1)  # (m, Ec)
        critic_loss = mse_r.sum() + mse_c.sum()
        # 3. E-step: the non-parametric q over K actions from pi_old (exact convex dual)
        dual = estep.solve_dual(
            old[Q_SAMPLED],
            old[QC_SAMPLED],
            config.estep_kl,
            self.step_thresholds(module_id),
            solver=config.estep_solver,
            init=self._dual[module_id],
            lambda_max=config.estep_lambda_max,
        )
        # 4. M-step: weighted maximum likelihood inside the decoupled KL trust region
        mstep = mstep_loss_chol if module.full_covariance else mstep_loss
        actor_loss, stats = mstep(
            fwd_out[ACTOR_MEAN],
            fwd_out[ACTOR_SCALE],
            old[OLD_MEAN],
            old[OLD_SCALE],
            self.mstep_targets(module, config, old[SAMPLED_ACTIONS]),
            dual.weights,
            self._trust[module_id],
        )
        total = critic_loss + actor_loss

        if self.finish_update(module_id, total):
            self.accept_update(module_id, dual, stats["kl_mu"], stats["kl_sigma"])
        self.record_dual(module_id, dual)
        self.record_metrics(
            module_id,
            {
                M.QC_MEAN_PREFIX: old[QC_SAMPLED].mean(dim=(1, 2)),
                M.Q_MEAN: old[Q_SAMPLED].mean(),
                M.KL_MU: stats["kl_mu"],
                M.KL_SIGMA: stats["kl_sigma"],
                M.MLE_LOSS: stats["mle"],
                M.REWARD_CRITIC_LOSS: mse_r.mean(),
                M.COST_CRITIC_LOSS: mse_c.mean(),
            },
            host={
                M.ESTEP_SOLVE_TIME_S: dual.solve_time,
                M.ESTEP_CRITIC_EVAL_TIME_S: target_pass_s,
                M.ESTEP_ITERATIONS: float(dual.iterations),
            },
        )
        return total
