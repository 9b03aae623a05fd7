"""The CVPO RLModule: a Gaussian actor, one critic ensemble, and their targets.

One :class:`cvpo.networks.CriticEnsemble` holds all critics, the E reward
critics first, then ``num_cost_critics`` members per constraint, so the E-step
evaluates every critic on the B*K sampled pairs in a single batched pass.

EnvRunners build this module with ``inference_only=True``: only the actor
exists there and only the actor's weights travel on weight syncs.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.distribution.torch.torch_distribution import TorchDiagGaussian
from ray.rllib.core.learner.utils import make_target_network
from ray.rllib.core.rl_module.apis import InferenceOnlyAPI, TargetNetworkAPI
from ray.rllib.core.rl_module.rl_module import RLModule
from ray.rllib.core.rl_module.torch.torch_rl_module import TorchRLModule
from ray.rllib.utils.annotations import override

from cvpo.networks import CriticEnsemble, GaussianActor

#: forward_train output keys
ACTOR_MEAN = "actor_mean"
ACTOR_STD = "actor_std"


class DefaultCVPOTorchRLModule(TorchRLModule, InferenceOnlyAPI, TargetNetworkAPI):
    """Actor N(mu(s), diag(std(s))^2), critics Q_r^1..E and Q_c^{k,1..Ec}, targets.

    ``model_config`` keys (filled from CVPOConfig): ``actor_hiddens``,
    ``critic_hiddens``, ``num_reward_critics`` (E), ``num_constraints`` (m),
    ``num_cost_critics`` (Ec per constraint), ``std_min``, ``std_max``.
    """

    @override(RLModule)
    def setup(self):
        if not isinstance(self.action_space, gym.spaces.Box):
            raise ValueError(
                f"CVPO needs a continuous (Box) action space, got {self.action_space}; "
                "discrete actions are not supported by its Gaussian policy."
            )
        cfg = self.model_config
        self.obs_dim = int(np.prod(self.observation_space.shape))
        self.act_dim = int(np.prod(self.action_space.shape))
        self.num_reward_critics = int(cfg.get("num_reward_critics", 2))
        self.num_constraints = int(cfg.get("num_constraints", 1))
        self.num_cost_critics = int(cfg.get("num_cost_critics", 1))
        self.actor = GaussianActor(
            self.obs_dim,
            self.act_dim,
            hidden=tuple(cfg.get("actor_hiddens", (128, 128))),
            std_min=float(cfg.get("std_min", 1e-3)),
            std_max=float(cfg.get("std_max", 2.0)),
        )
        if not self.inference_only:
            members = self.num_reward_critics + self.num_constraints * self.num_cost_critics
            self.critics = CriticEnsemble(
                self.obs_dim,
                self.act_dim,
                members,
                hidden=tuple(cfg.get("critic_hiddens", (128, 128))),
            )
        self.action_dist_cls = TorchDiagGaussian

    # -- TargetNetworkAPI ------------------------------------------------------------
    @override(TargetNetworkAPI)
    def make_target_networks(self) -> None:
        # The polyak-averaged actor is pi_old: it draws the E-step samples and
        # anchors the M-step trust region (the original CVPO's choice).
        self.target_actor = make_target_network(self.actor)
        self.target_critics = make_target_network(self.critics)

    @override(TargetNetworkAPI)
    def get_target_network_pairs(self) -> List[Tuple[torch.nn.Module, torch.nn.Module]]:
        return [(self.actor, self.target_actor), (self.critics, self.target_critics)]

    @override(TargetNetworkAPI)
    def forward_target(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        mean, std = self.target_actor(self._flat(batch[Columns.OBS]))
        return {ACTOR_MEAN: mean, ACTOR_STD: std}

    @override(InferenceOnlyAPI)
    def get_non_inference_attributes(self) -> List[str]:
        return ["critics", "target_critics", "target_actor"]

    # -- forward passes ----------------------------------------------------------------
    def _flat(self, obs: torch.Tensor) -> torch.Tensor:
        return obs.reshape(obs.shape[0], -1).float()

    def _dist_inputs(self, obs: torch.Tensor) -> torch.Tensor:
        mean, std = self.actor(self._flat(obs))
        return torch.cat([mean, torch.log(std)], dim=-1)

    @override(TorchRLModule)
    def _forward_inference(self, batch: Dict[str, Any], **kwargs) -> Dict[str, Any]:
        with torch.no_grad():
            return {Columns.ACTION_DIST_INPUTS: self._dist_inputs(batch[Columns.OBS])}

    @override(TorchRLModule)
    def _forward_exploration(self, batch: Dict[str, Any], **kwargs) -> Dict[str, Any]:
        return self._forward_inference(batch)

    @override(RLModule)
    def _forward_train(self, batch: Dict[str, Any], **kwargs) -> Dict[str, Any]:
        mean, std = self.actor(self._flat(batch[Columns.OBS]))
        return {ACTOR_MEAN: mean, ACTOR_STD: std}

    @override(RLModule)
    def get_initial_state(self) -> dict:
        return {}
