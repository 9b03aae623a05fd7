"""Plain-torch networks for CVPO: a Gaussian actor, a batched critic ensemble,
and polyak averaging.

The critic ensemble is the E-step's hot path: for B states and K sampled
actions it evaluates every reward and cost critic on all B*K pairs in one
batched pass, computing the observation part of the first layer once per state
instead of once per (state, action) pair.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch
from torch import nn

from cvpo.defaults import HIDDENS, STD_MAX, STD_MIN

__all__ = ["CriticEnsemble", "GaussianActor", "mlp", "polyak_update", "reduce_members"]

ActivationFactory = Callable[[], nn.Module]

# act_dim up to which the first layer's action part is computed by broadcast
# multiply-adds instead of a matmul (see CriticEnsemble.forward).
_ELEMENTWISE_MAX_ACT_DIM = 8


def _check_dims(**dims: int) -> None:
    for name, value in dims.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_hidden(hidden: Sequence[int]) -> tuple[int, ...]:
    hidden = tuple(hidden)
    for size in hidden:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"hidden sizes must be integers >= 1, got {hidden!r}")
    return hidden


def mlp(
    in_dim: int,
    out_dim: int,
    hidden: Sequence[int] = (128, 128),
    activation: ActivationFactory = nn.ReLU,
    output_activation: ActivationFactory | None = None,
) -> nn.Sequential:
    """Linear -> activation -> ... -> Linear (-> output_activation).

    Args:
        in_dim: input features.
        out_dim: output features.
        hidden: sizes of the hidden layers (may be empty: a single Linear).
        activation: factory of the hidden activation module (e.g. ``nn.ReLU``).
        output_activation: optional factory applied after the last layer.
    """
    _check_dims(in_dim=in_dim, out_dim=out_dim)
    sizes = (in_dim, *_check_hidden(hidden), out_dim)
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(activation())
    if output_activation is not None:
        layers.append(output_activation())
    return nn.Sequential(*layers)


class GaussianActor(nn.Module):
    """State-conditioned Gaussian policy pi(a | s) = N(mean(s), Sigma(s)).

    A shared trunk feeds a mean head (unbounded: actions are clipped to the
    action bounds only when sent to the env; log-probs are of this unclipped
    Gaussian) and a scale head. The scale is bounded by a sigmoid,

        scale = std_min + (std_max - std_min) * sigmoid(raw)      (action units)

    so it stays in (std_min, std_max) with a non-zero gradient everywhere (a
    clamp would stop learning at the bounds); at initialisation it is near the
    midpoint. With ``cholesky=False`` the scale is the per-dimension standard
    deviation. With ``cholesky=True`` it is the diagonal of a lower-triangular
    Cholesky factor L (Sigma = L L^T) whose strictly-lower entries are
    unbounded linear outputs (the full covariance of the original CVPO code).

    Args:
        obs_dim: observation size.
        act_dim: action size d.
        hidden: trunk hidden sizes (may be empty).
        activation: factory of the trunk activation module.
        std_min, std_max: bounds of the scale, 0 < std_min < std_max (action units).
        cholesky: full covariance via L instead of a diagonal.
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden: Sequence[int] = HIDDENS,
        activation: ActivationFactory = nn.ReLU,
        std_min: float = STD_MIN,
        std_max: float = STD_MAX,
        cholesky: bool = False,
    ) -> None:
        super().__init__()
        _check_dims(obs_dim=obs_dim, act_dim=act_dim)
        hidden = _check_hidden(hidden)
        if not (0 < std_min < std_max < math.inf):
            raise ValueError(
                f"need 0 < std_min < std_max < inf, got std_min={std_min!r}, std_max={std_max!r}"
            )
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.std_min, self.std_max = float(std_min), float(std_max)
        self.cholesky = bool(cholesky)
        if hidden:
            self.trunk = mlp(obs_dim, hidden[-1], hidden[:-1], activation, activation)
        else:
            self.trunk = nn.Identity()
        features = hidden[-1] if hidden else obs_dim
        self.mean_head = nn.Linear(features, act_dim)
        self.scale_head = nn.Linear(features, act_dim)
        if self.cholesky:
            rows, cols = torch.tril_indices(act_dim, act_dim, offset=-1)
            self.register_buffer("_tril_rows", rows, persistent=False)
            self.register_buffer("_tril_cols", cols, persistent=False)
            self.tril_head = nn.Linear(features, len(rows))

    def _bounded_scale(self, raw: torch.Tensor) -> torch.Tensor:
        return self.std_min + (self.std_max - self.std_min) * torch.sigmoid(raw)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (mean (..., d), std (..., d)), or (mean, L (..., d, d)) if cholesky."""
        if obs.shape[-1] != self.obs_dim:
            raise ValueError(f"obs must have shape (..., {self.obs_dim}), got {tuple(obs.shape)}")
        features = self.trunk(obs)  # (..., hidden)
        mean = self.mean_head(features)  # (..., d)
        scale = self._bounded_scale(self.scale_head(features))  # (..., d)
        if not self.cholesky:
            return mean, scale
        L = torch.diag_embed(scale)  # (..., d, d)
        L[..., self._tril_rows, self._tril_cols] = self.tril_head(features)
        return mean, L

    def dist(self, obs: torch.Tensor) -> torch.distributions.Distribution:
        """The policy as a torch distribution over (..., d) actions."""
        mean, scale = self(obs)
        if self.cholesky:
            return torch.distributions.MultivariateNormal(mean, scale_tril=scale)
        return torch.distributions.Independent(torch.distributions.Normal(mean, scale), 1)

    def deterministic(self, obs: torch.Tensor) -> torch.Tensor:
        """The mean action (..., d), for evaluation."""
        return self(obs)[0]


class CriticEnsemble(nn.Module):
    """``num_members`` independent MLP critics Q(s, a) evaluated in one batched pass.

    Layer l of all members is one stacked weight (M, in_l, out_l) and bias
    (M, out_l), each member initialised like ``nn.Linear`` (independently:
    U(-1/sqrt(in_l), 1/sqrt(in_l)) for weights and biases), and applied with
    ``torch.baddbmm``. The first layer is split into its observation and
    action parts so that with obs (B, obs_dim) and actions (B, K, act_dim) the
    observation part is computed once per state and broadcast over K.

    Args:
        obs_dim: observation size.
        act_dim: action size.
        num_members: number M of critics (e.g. E reward critics followed by
            the cost critics, all in one ensemble).
        hidden: hidden sizes, shared by all members (at least one layer).
        activation: factory of the hidden activation module.
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        num_members: int,
        hidden: Sequence[int] = HIDDENS,
        activation: ActivationFactory = nn.ReLU,
    ) -> None:
        super().__init__()
        _check_dims(obs_dim=obs_dim, act_dim=act_dim, num_members=num_members)
        hidden = _check_hidden(hidden)
        if not hidden:
            raise ValueError("hidden must have at least one layer")
        self.obs_dim, self.act_dim, self.num_members = obs_dim, act_dim, num_members
        sizes = (obs_dim + act_dim, *hidden, 1)
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(num_members, n_in, n_out))
            for n_in, n_out in zip(sizes[:-1], sizes[1:])
        )
        self.biases = nn.ParameterList(
            nn.Parameter(torch.empty(num_members, n_out)) for n_out in sizes[1:]
        )
        self.activation = activation()
        # The pre-activations are fresh outputs of (b)addbmm that no backward
        # needs, so ReLU-type activations may overwrite them (saves a pass over
        # the (M, B*K, hidden) tensor and its allocation).
        if type(self.activation) in (nn.ReLU, nn.LeakyReLU):
            self.activation.inplace = True
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """nn.Linear's default initialisation, drawn independently for every member."""
        for weight, bias in zip(self.weights, self.biases):
            bound = 1.0 / math.sqrt(weight.shape[1])
            weight.uniform_(-bound, bound)
            bias.uniform_(-bound, bound)

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """Q-values of every member.

        Args:
            obs: (..., obs_dim) observations.
            act: (..., act_dim) actions with the same leading dims, or
                (B, K, act_dim) with obs (B, obs_dim): each state's observation
                is paired with its K actions (the E-step layout).

        Returns:
            (M, ...) values with act's leading dims, e.g. (M, B, K).
        """
        if obs.shape[-1] != self.obs_dim or act.shape[-1] != self.act_dim:
            raise ValueError(
                f"expected obs (..., {self.obs_dim}) and act (..., {self.act_dim}), "
                f"got {tuple(obs.shape)} and {tuple(act.shape)}"
            )
        lead = act.shape[:-1]
        if obs.shape[:-1] == lead:
            per_state = 1
        elif act.dim() == obs.dim() + 1 and obs.shape[:-1] == lead[:-1]:
            per_state = lead[-1]  # K actions per observation
        else:
            raise ValueError(
                "act must have obs's leading dims, or one more (K actions per state); "
                f"got obs {tuple(obs.shape)} and act {tuple(act.shape)}"
            )
        M, S = self.num_members, math.prod(obs.shape[:-1])  # S states, N = S*K pairs

        w0, b0 = self.weights[0], self.biases[0]
        hidden0 = w0.shape[-1]
        if per_state == 1:
            # one (state, action) pair per state (the critic loss, the TD target):
            # a single matmul on [obs, act]
            pairs = torch.cat([obs.reshape(S, -1), act.reshape(S, -1)], dim=-1)
            pairs = pairs.unsqueeze(0).expand(M, -1, -1)  # (M, S, obs_dim + act_dim)
            h = torch.baddbmm(b0.unsqueeze(1), pairs, w0)  # (M, N, h)
        else:
            # K actions per state (the E-step): [obs, act] @ W0 + b0 =
            # (obs @ W0_obs + b0) + act @ W0_act, the observation part once per state
            obs_flat = obs.reshape(1, S, self.obs_dim).expand(M, -1, -1)  # (M, S, obs_dim)
            obs_part = torch.baddbmm(b0.unsqueeze(1), obs_flat, w0[:, : self.obs_dim])  # (M, S, h)
            if self.act_dim <= _ELEMENTWISE_MAX_ACT_DIM:
                # A matmul with inner dimension act_dim (~2) runs far below peak;
                # act_dim broadcast multiply-adds over (M, S, K, h) are ~3x faster.
                act_k = act.reshape(1, S, per_state, self.act_dim)
                w_act = w0[:, self.obs_dim :].reshape(M, 1, 1, self.act_dim, hidden0)
                h = torch.addcmul(obs_part.unsqueeze(2), act_k[..., 0:1], w_act[..., 0, :])
                for j in range(1, self.act_dim):
                    h = h.addcmul_(act_k[..., j : j + 1], w_act[..., j, :])
                h = h.view(M, S * per_state, hidden0)  # (M, N, h)
            else:
                act_flat = act.reshape(1, S * per_state, self.act_dim).expand(M, -1, -1)
                h = torch.bmm(act_flat, w0[:, self.obs_dim :])  # (M, N, h)
                h.view(M, S, per_state, -1).add_(obs_part.unsqueeze(2))  # broadcast over K
        h = self.activation(h)
        last = len(self.weights) - 1
        for i in range(1, last):
            h = self.activation(torch.baddbmm(self.biases[i].unsqueeze(1), h, self.weights[i]))
        w_out, b_out = self.weights[last], self.biases[last]
        if w_out.shape[-1] == 1:
            # A batched matrix-vector product through bmm is ~5x slower than one
            # mv per member (measured: 2.0 vs 0.25-0.4 ms at M=3, N=4096, h=128).
            h = torch.stack([torch.mv(h[i], w_out[i, :, 0]) for i in range(M)])  # (M, N)
            h = (h + b_out).unsqueeze(-1)  # (M, N, 1)
        else:
            h = torch.baddbmm(b_out.unsqueeze(1), h, w_out)
        return h.view(M, *lead)  # (M, ...)


def reduce_members(q: torch.Tensor, how: str, dim: int) -> torch.Tensor:
    """Combines critic ensemble members along ``dim``: "min", "max" or "mean"."""
    if how == "min":
        return q.min(dim=dim).values
    if how == "max":
        return q.max(dim=dim).values
    return q.mean(dim=dim)


@torch.no_grad()
def polyak_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """target <- (1 - tau) * target + tau * source, in place, for parameters and
    floating-point buffers (other buffers are copied).

    Args:
        target: the averaged module (e.g. target critics), updated in place.
        source: the online module with the same architecture.
        tau: averaging rate in [0, 1] (1 copies the source).
    """
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must be a number in [0, 1], got {tau!r}")
    target_params, source_params = list(target.parameters()), list(source.parameters())
    target_buffers, source_buffers = list(target.buffers()), list(source.buffers())
    if len(target_params) != len(source_params) or len(target_buffers) != len(source_buffers):
        raise ValueError("target and source must have the same architecture")
    for t, s in zip(target_params + target_buffers, source_params + source_buffers):
        if t.shape != s.shape:
            raise ValueError(
                f"target and source must have the same architecture: shape {tuple(t.shape)} "
                f"vs {tuple(s.shape)}"
            )
    if target_params:
        torch._foreach_lerp_(target_params, source_params, float(tau))
    floating = [(t, s) for t, s in zip(target_buffers, source_buffers) if t.is_floating_point()]
    if floating:
        torch._foreach_lerp_([t for t, _ in floating], [s for _, s in floating], float(tau))
    for t, s in zip(target_buffers, source_buffers):
        if not t.is_floating_point():
            t.copy_(s)
