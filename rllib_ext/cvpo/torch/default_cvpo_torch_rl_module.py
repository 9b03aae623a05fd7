"""The CVPO RLModule: a Gaussian actor, one critic ensemble, their targets, and the
forward passes of the update (docs/algorithm.md#critics, #e-step, #m-step).

One :class:`cvpo.networks.CriticEnsemble` holds all critics, the E reward critics first,
then ``num_cost_critics`` members per constraint, so every critic is evaluated on the
B*K sampled pairs in a single batched pass. This module is the only place that knows
that layout: the learner sees reward values (E, B) / (B, K) and cost values
(m, Ec, B) / (m, B, K).

- ``forward_train``: the actor at s (with gradient) and every critic at (s, a);
- ``forward_target``: pi_old (the polyak-averaged actor) and the target critics, without
  gradients: K actions per state from pi_old(.|s) with their reduced reward and cost
  values (the E-step's input), and the bootstrap values V(s') of the TD targets;
- EnvRunners build it with ``inference_only=True``: only the actor exists there, it
  returns actions itself (a sample, or the mean when not exploring), and only the
  actor's weights travel on weight syncs.

The actor's covariance is ``actor_covariance``: "diagonal" (a std per dimension) or
"full" (a lower-triangular Cholesky factor L per state, Sigma = L L^T, the original
CVPO's actor).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.utils import make_target_network
from ray.rllib.core.rl_module.apis import InferenceOnlyAPI, TargetNetworkAPI
from ray.rllib.core.rl_module.rl_module import RLModule
from ray.rllib.core.rl_module.torch.torch_rl_module import TorchRLModule
from ray.rllib.utils.annotations import override

from cvpo.networks import CriticEnsemble, GaussianActor, reduce_members
from rllib_ext.common.model_config import model_setting

# forward_train output keys
ACTOR_MEAN = "actor_mean"  # (B, d)
ACTOR_SCALE = "actor_scale"  # (B, d) std, or (B, d, d) Cholesky factor L
Q_REWARD = "q_reward"  # (E, B) every reward critic at (s, a)
Q_COST = "q_cost"  # (m, Ec, B) every cost critic at (s, a)
# forward_target output keys
OLD_MEAN = "old_mean"  # (B, d) pi_old at s
OLD_SCALE = "old_scale"  # (B, d) or (B, d, d)
SAMPLED_ACTIONS = "sampled_actions"  # (B, K, d) from pi_old(.|s)
Q_SAMPLED = "q_sampled"  # (B, K) reduced reward value of each sampled action
QC_SAMPLED = "qc_sampled"  # (m, B, K) reduced cost value per constraint
V_NEXT = "v_next"  # (B,) reward bootstrap at s'
VC_NEXT = "vc_next"  # (m, B) cost bootstrap at s'
OLD_MEAN_NEXT = "old_mean_next"  # (B, d) pi_old's mean action at s'


def sample_gaussian(
    mean: torch.Tensor, scale: torch.Tensor, k: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """k samples per state from N(mean, Sigma): (B, d) -> (B, k, d).

    ``scale`` is the std (B, d) (Sigma diagonal) or a Cholesky factor L (B, d, d)."""
    eps = torch.randn(
        (mean.shape[0], k, mean.shape[-1]),
        generator=generator,
        device=mean.device,
        dtype=mean.dtype,
    )
    if scale.dim() == mean.dim():
        return mean.unsqueeze(1) + scale.unsqueeze(1) * eps
    return mean.unsqueeze(1) + eps @ scale.transpose(-1, -2)  # (B, k, d) @ L^T


class DefaultCVPOTorchRLModule(TorchRLModule, InferenceOnlyAPI, TargetNetworkAPI):
    """Actor N(mu(s), Sigma(s)), critics Q_r^1..E and Q_c^{k,1..Ec}, their targets."""

    @override(RLModule)
    def setup(self):
        if not isinstance(self.action_space, gym.spaces.Box):
            raise ValueError(
                f"CVPO needs a continuous (Box) action space, got {self.action_space}; "
                "discrete actions are not supported by its Gaussian policy."
            )
        get = lambda key: model_setting(self.model_config, key, "CVPO")  # noqa: E731
        self.obs_dim = int(np.prod(self.observation_space.shape))
        self.act_dim = int(np.prod(self.action_space.shape))
        self.full_covariance = get("actor_covariance") == "full"
        self.actor = GaussianActor(
            self.obs_dim,
            self.act_dim,
            hidden=tuple(get("actor_hiddens")),
            std_min=float(get("std_min")),
            std_max=float(get("std_max")),
            cholesky=self.full_covariance,
        )
        if self.inference_only:
            return
        self.num_reward_critics = int(get("num_reward_critics"))
        self.num_constraints = int(get("num_constraints"))
        self.num_cost_critics = int(get("num_cost_critics"))
        self.reward_reduction = get("reward_critic_reduction")
        self.cost_reduction = get("cost_critic_reduction")
        self.cost_target_reduction = get("cost_target_reduction")
        self.num_sampled_actions = int(get("num_sampled_actions"))
        self.num_target_actions = int(get("num_target_actions"))
        members = self.num_reward_critics + self.num_constraints * self.num_cost_critics
        self.critics = CriticEnsemble(
            self.obs_dim, self.act_dim, members, hidden=tuple(get("critic_hiddens"))
        )
        # the action bounds the critics see (sampled actions are clamped to them); buffers
        # (not saved) so they follow .to(device)
        for name, bound in (
            ("action_low", self.action_space.low),
            ("action_high", self.action_space.high),
        ):
            flat = np.array(bound, dtype=np.float32).reshape(-1)
            self.register_buffer(name, torch.from_numpy(flat), persistent=False)

    # -- TargetNetworkAPI ------------------------------------------------------------
    @override(TargetNetworkAPI)
    def make_target_networks(self) -> None:
        # The polyak-averaged actor is pi_old: it draws the E-step samples and
        # anchors the M-step trust region (the original CVPO's choice).
        self.target_actor = make_target_network(self.actor)
        self.target_critics = make_target_network(self.critics)

    @override(TargetNetworkAPI)
    def get_target_network_pairs(self) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
        return [(self.actor, self.target_actor), (self.critics, self.target_critics)]

    @override(TargetNetworkAPI)
    def forward_target(
        self, batch: dict[str, Any], *, generator: torch.Generator | None = None, **kwargs
    ) -> dict[str, Any]:
        """pi_old and the target critics, without gradients (see the module docstring).

        ``batch`` needs ``obs`` and ``next_obs``; ``generator`` draws the actions."""
        with torch.no_grad():
            obs, next_obs = self._flat(batch[Columns.OBS]), self._flat(batch["next_obs"])
            # bootstrap at s': actions from pi_old, values from the target critics; the
            # cost side reduces with cost_target_reduction (a max compounds over the
            # horizon: docs/constraint.md)
            mean_next, scale_next = self.target_actor(next_obs)
            a_next = sample_gaussian(mean_next, scale_next, self.num_target_actions, generator)
            v_next, vc_next = self.q_values(
                self.target_critics, next_obs, a_next, cost_reduction=self.cost_target_reduction
            )
            # the E-step's input: K actions per state from pi_old and their values
            mean, scale = self.target_actor(obs)
            sampled = sample_gaussian(mean, scale, self.num_sampled_actions, generator)
            q, qc = self.q_values(self.target_critics, obs, sampled)
            # A NaN/inf observation or diverged target critics would make the E-step
            # raise; neutralise them here (no host sync): the critic loss of the same
            # rows is non-finite too, so the learner skips the whole update.
            return {
                OLD_MEAN: mean,
                OLD_SCALE: scale,
                SAMPLED_ACTIONS: sampled,
                Q_SAMPLED: torch.nan_to_num(q, nan=0.0, posinf=0.0, neginf=0.0),
                QC_SAMPLED: torch.nan_to_num(qc, nan=0.0, posinf=0.0, neginf=0.0),
                V_NEXT: v_next.mean(-1),
                VC_NEXT: vc_next.mean(-1),
                OLD_MEAN_NEXT: mean_next,
            }

    def q_values(
        self,
        critics: CriticEnsemble,
        obs: torch.Tensor,
        actions: torch.Tensor,
        cost_reduction: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reward and cost values of action sets from one batched critic pass.

        obs (B, o), actions (B, K, d) -> q (B, K) (the reward critics reduced by
        ``reward_critic_reduction``), qc (m, B, K) (each constraint's cost critics
        reduced by ``cost_reduction``, default ``cost_critic_reduction``). Actions are
        clamped to the action bounds first (the env clips them the same way)."""
        q_all = critics(obs, torch.clamp(actions, self.action_low, self.action_high))
        E, m, Ec = self.num_reward_critics, self.num_constraints, self.num_cost_critics
        q = reduce_members(q_all[:E], self.reward_reduction, 0)  # (B, K)
        qc = q_all[E:].reshape(m, Ec, *q_all.shape[1:])  # (m, Ec, B, K)
        return q, reduce_members(qc, cost_reduction or self.cost_reduction, 1)

    @override(InferenceOnlyAPI)
    def get_non_inference_attributes(self) -> list[str]:
        return ["critics", "target_critics", "target_actor"]

    # -- forward passes ----------------------------------------------------------------
    def _flat(self, obs: torch.Tensor) -> torch.Tensor:
        return obs.reshape(obs.shape[0], -1).float()

    def _actions(self, obs: torch.Tensor, explore: bool) -> torch.Tensor:
        mean, scale = self.actor(self._flat(obs))
        action = sample_gaussian(mean, scale, 1).squeeze(1) if explore else mean
        return action.reshape(obs.shape[0], *self.action_space.shape)

    @override(TorchRLModule)
    def _forward_inference(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        with torch.no_grad():
            return {Columns.ACTIONS: self._actions(batch[Columns.OBS], explore=False)}

    @override(TorchRLModule)
    def _forward_exploration(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        with torch.no_grad():
            return {Columns.ACTIONS: self._actions(batch[Columns.OBS], explore=True)}

    @override(RLModule)
    def _forward_train(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        obs = self._flat(batch[Columns.OBS])
        mean, scale = self.actor(obs)
        q_all = self.critics(obs, batch[Columns.ACTIONS].reshape(obs.shape[0], -1).float())
        E, m, Ec = self.num_reward_critics, self.num_constraints, self.num_cost_critics
        return {
            ACTOR_MEAN: mean,
            ACTOR_SCALE: scale,
            Q_REWARD: q_all[:E],
            Q_COST: q_all[E:].reshape(m, Ec, -1),
        }

    # The module returns actions itself (a full covariance has no RLlib distribution).
    @override(RLModule)
    def get_inference_action_dist_cls(self):
        return None

    @override(RLModule)
    def get_exploration_action_dist_cls(self):
        return None

    @override(RLModule)
    def get_train_action_dist_cls(self):
        return None

    @override(RLModule)
    def get_initial_state(self) -> dict:
        return {}
