"""The SACLag RLModule: a tanh-squashed Gaussian actor, one critic ensemble, its
target, and the entropy temperature.

The actor is the project's :class:`cvpo.networks.GaussianActor` (mean and a
sigmoid-bounded std in ``(std_min, std_max)``) for the PRE-squash Gaussian
``u ~ N(mu(s), std(s)^2)``; the action is ``a = low + (tanh(u) + 1) (high - low) / 2``.
A squashed actor, not CVPO's clipped one: SAC's actor follows the gradient of
Q(s, a) through the action, and a Gaussian clipped to the bounds gets no
gradient once its mean leaves them, while its entropy (which SAC maximises)
keeps growing without changing the actions sent to the env. The log-probability
is that of the action rescaled to [-1, 1] (tanh's Jacobian included, the
constant of the affine rescaling left out), so the usual target entropy
``-act_dim`` means what it means in SAC.

One :class:`cvpo.networks.CriticEnsemble` holds all critics, the E reward
critics first, then ``num_cost_critics`` members per constraint, as in CVPO's
module. ``log_alpha`` (the entropy temperature) is a parameter of this module,
so it is saved and restored with the weights.

The module computes the actions itself (``Columns.ACTIONS``): the mean's
squash for inference (deterministic evaluation), one squashed sample for
exploration. EnvRunners build it with ``inference_only=True``: only the actor
exists there and only the actor's weights travel on weight syncs.
"""

from __future__ import annotations

import math
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
from torch import nn

from cvpo.networks import CriticEnsemble, GaussianActor
from rllib_ext.common.model_config import model_setting

#: forward_train output keys
ACTOR_MEAN = "actor_mean"
ACTOR_STD = "actor_std"
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


class DefaultSACLagTorchRLModule(TorchRLModule, InferenceOnlyAPI, TargetNetworkAPI):
    """Actor tanh(N(mu(s), diag(std(s))^2)) scaled to the bounds, Q_r^1..E and
    Q_c^{k,1..Ec}, their targets, and log alpha.

    ``model_config`` keys (filled from SACLagConfig): ``actor_hiddens``,
    ``critic_hiddens``, ``num_reward_critics`` (E), ``num_constraints`` (m),
    ``num_cost_critics`` (Ec per constraint), ``std_min``, ``std_max``,
    ``initial_alpha``.
    """

    @override(RLModule)
    def setup(self):
        if not isinstance(self.action_space, gym.spaces.Box):
            raise ValueError(
                f"SACLag needs a continuous (Box) action space, got {self.action_space}; "
                "discrete actions are not supported by its squashed Gaussian policy."
            )
        low, high = self.action_space.low, self.action_space.high
        if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
            raise ValueError(
                f"SACLag squashes actions into the action space's bounds; {self.action_space} "
                "has infinite ones. Wrap the env with finite action bounds."
            )
        get = lambda key: model_setting(self.model_config, key, "SACLag")  # noqa: E731
        self.obs_dim = int(np.prod(self.observation_space.shape))
        self.act_dim = int(np.prod(self.action_space.shape))
        self.num_reward_critics = int(get("num_reward_critics"))
        self.num_constraints = int(get("num_constraints"))
        self.num_cost_critics = int(get("num_cost_critics"))
        self.actor = GaussianActor(
            self.obs_dim,
            self.act_dim,
            hidden=tuple(get("actor_hiddens")),
            std_min=float(get("std_min")),
            std_max=float(get("std_max")),
        )
        # affine map [-1, 1] -> [low, high]; buffers (not saved) so they follow .to(device)
        low_t = torch.as_tensor(low.reshape(-1), dtype=torch.float32)
        high_t = torch.as_tensor(high.reshape(-1), dtype=torch.float32)
        self.register_buffer("_action_center", (high_t + low_t) / 2.0, persistent=False)
        self.register_buffer("_action_half_range", (high_t - low_t) / 2.0, persistent=False)
        if not self.inference_only:
            members = self.num_reward_critics + self.num_constraints * self.num_cost_critics
            self.critics = CriticEnsemble(
                self.obs_dim,
                self.act_dim,
                members,
                hidden=tuple(get("critic_hiddens")),
            )
            alpha0 = float(get("initial_alpha"))
            self.log_alpha = nn.Parameter(torch.tensor(math.log(alpha0), dtype=torch.float32))

    # -- TargetNetworkAPI ------------------------------------------------------------
    @override(TargetNetworkAPI)
    def make_target_networks(self) -> None:
        self.target_critics = make_target_network(self.critics)

    @override(TargetNetworkAPI)
    def get_target_network_pairs(self) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
        return [(self.critics, self.target_critics)]

    @override(TargetNetworkAPI)
    def forward_target(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {}  # the learner calls the target critics directly

    @override(InferenceOnlyAPI)
    def get_non_inference_attributes(self) -> list[str]:
        return ["critics", "target_critics", "log_alpha"]

    # -- the squashed Gaussian ---------------------------------------------------------
    def squash(self, u: torch.Tensor) -> torch.Tensor:
        """Pre-squash sample u (..., d) -> action in [low, high]."""
        return self._action_center + self._action_half_range * torch.tanh(u)

    @staticmethod
    def squashed_sample(
        mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterised sample: (tanh(u) in [-1, 1]^d, its log-probability (...,)).

        ``u = mean + std * eps``; log pi = sum_i [log N(u_i; mean_i, std_i)
        - log(1 - tanh(u_i)^2)], the Jacobian term in the stable form
        ``2 (log 2 - u - softplus(-2u))``.
        """
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        u = mean + std * eps
        log_normal = -0.5 * eps.pow(2) - torch.log(std) - _HALF_LOG_2PI
        log_jacobian = 2.0 * (math.log(2.0) - u - nn.functional.softplus(-2.0 * u))
        return torch.tanh(u), (log_normal - log_jacobian).sum(-1)

    def to_env_units(self, squashed: torch.Tensor) -> torch.Tensor:
        """tanh(u) in [-1, 1] -> action in [low, high]."""
        return self._action_center + self._action_half_range * squashed

    # -- forward passes ----------------------------------------------------------------
    def _flat(self, obs: torch.Tensor) -> torch.Tensor:
        return obs.reshape(obs.shape[0], -1).float()

    def _actions(self, obs: torch.Tensor, explore: bool) -> torch.Tensor:
        mean, std = self.actor(self._flat(obs))
        u = mean + std * torch.randn_like(mean) if explore else mean
        return self.squash(u).reshape(obs.shape[0], *self.action_space.shape)

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
        mean, std = self.actor(self._flat(batch[Columns.OBS]))
        return {ACTOR_MEAN: mean, ACTOR_STD: std}

    # The module returns actions itself, so RLlib needs no distribution class.
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
