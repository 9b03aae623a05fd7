"""The CVPO M-step: weighted maximum likelihood inside a decoupled trust region.

Notation follows docs/algorithm.md#m-step. For states s_i (B of them),
sampled actions a_ij (K per state) and E-step weights q_ij (rows sum to 1):

    pi_mu    = N(mu_theta(s), Sigma_old(s))     # new mean, old covariance
    pi_Sigma = N(mu_old(s), Sigma_theta(s))     # old mean, new covariance
    L_mle    = - (1/B) sum_i sum_j q_ij * ( log pi_mu(a_ij | s_i) + log pi_Sigma(a_ij | s_i) )
    KL_mu    = (1/B) sum_i KL( pi_old(. | s_i) || pi_mu(. | s_i) )
    KL_Sigma = (1/B) sum_i KL( pi_old(. | s_i) || pi_Sigma(. | s_i) )
    loss     = L_mle + alpha_mu * (KL_mu - eps_mu) + alpha_Sigma * (KL_Sigma - eps_Sigma)

with the multipliers alpha held constant in the loss and updated separately
(``TrustRegion.update``) by a projected gradient step on their own loss
alpha * (eps - KL): alpha <- clip(alpha + alpha_lr * (KL - eps), 0, alpha_max).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

__all__ = [
    "TrustRegion",
    "decoupled_kl_chol",
    "decoupled_kl_diag",
    "diag_gaussian_log_prob",
    "mstep_loss",
    "mstep_loss_chol",
    "tril_gaussian_log_prob",
    "weighted_mle_loss",
]

_LOG_2PI = math.log(2.0 * math.pi)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"shapes must match, got {shapes}")


def _reduce(per_state: torch.Tensor, reduce: bool) -> torch.Tensor:
    return per_state.mean() if reduce else per_state


def decoupled_kl_diag(
    mu_old: torch.Tensor,
    std_old: torch.Tensor,
    mu: torch.Tensor,
    std: torch.Tensor,
    reduce: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoupled KLs for diagonal Gaussians.

        KL_mu    = KL( N(mu_old, std_old) || N(mu, std_old) )
                 = 1/2 sum_d (mu - mu_old)^2 / std_old^2
        KL_Sigma = KL( N(mu_old, std_old) || N(mu_old, std) )
                 = sum_d [ log(std / std_old) + std_old^2 / (2 std^2) - 1/2 ]

    Args:
        mu_old, std_old: (..., d) the anchor pi_old (no gradient needed).
        mu, std: (..., d) the new policy's mean and standard deviation (action units).
        reduce: if True return the mean over all leading (state) dims, else the
            per-state values (...,).

    Returns:
        (kl_mu, kl_sigma) in nats: 0-d tensors, or (...,) if ``reduce`` is False.
    """
    _check_same_shape(mu_old=mu_old, std_old=std_old, mu=mu, std=std)
    kl_mu = 0.5 * ((mu - mu_old) / std_old).pow(2).sum(dim=-1)  # (...,)
    ratio = std_old / std  # (..., d)
    kl_sigma = (0.5 * ratio.pow(2) - torch.log(ratio) - 0.5).sum(dim=-1)  # (...,)
    return _reduce(kl_mu, reduce), _reduce(kl_sigma, reduce)


def _check_tril(name: str, L: torch.Tensor, mu: torch.Tensor) -> None:
    d = mu.shape[-1]
    if L.shape != (*mu.shape, d):
        raise ValueError(
            f"{name} must have shape (..., d, d) = {(*mu.shape, d)} to match the mean, "
            f"got {tuple(L.shape)}"
        )


def decoupled_kl_chol(
    mu_old: torch.Tensor,
    L_old: torch.Tensor,
    mu: torch.Tensor,
    L: torch.Tensor,
    reduce: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoupled KLs for full-covariance Gaussians given by Cholesky factors.

    With Sigma = L L^T (L lower-triangular, positive diagonal):

        KL_mu    = KL( N(mu_old, S_old) || N(mu, S_old) ) = 1/2 |L_old^-1 (mu - mu_old)|^2
        KL_Sigma = KL( N(mu_old, S_old) || N(mu_old, S) )
                 = 1/2 [ |L^-1 L_old|_F^2 - d + 2 sum log diag L - 2 sum log diag L_old ]

    Args:
        mu_old: (..., d), L_old: (..., d, d) the anchor pi_old.
        mu: (..., d), L: (..., d, d) the new policy.
        reduce: mean over the leading (state) dims if True, else per state.

    Returns:
        (kl_mu, kl_sigma) in nats: 0-d tensors, or (...,) if ``reduce`` is False.
    """
    _check_same_shape(mu_old=mu_old, mu=mu)
    _check_tril("L_old", L_old, mu_old)
    _check_tril("L", L, mu)
    d = mu.shape[-1]
    diff = (mu - mu_old).unsqueeze(-1)  # (..., d, 1)
    whitened = torch.linalg.solve_triangular(L_old, diff, upper=False)  # (..., d, 1)
    kl_mu = 0.5 * whitened.pow(2).sum(dim=(-2, -1))  # (...,)
    transformed = torch.linalg.solve_triangular(L, L_old, upper=False)  # (..., d, d)
    log_det_ratio = torch.diagonal(L, dim1=-2, dim2=-1).log().sum(-1) - torch.diagonal(
        L_old, dim1=-2, dim2=-1
    ).log().sum(-1)  # (...,)  1/2 log(det S / det S_old)
    kl_sigma = 0.5 * (transformed.pow(2).sum(dim=(-2, -1)) - d) + log_det_ratio  # (...,)
    return _reduce(kl_mu, reduce), _reduce(kl_sigma, reduce)


def diag_gaussian_log_prob(
    actions: torch.Tensor, mu: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """log N(a | mu, diag(std^2)) of unclipped actions.

    Args:
        actions: (B, K, d) sampled actions.
        mu, std: (B, d) per-state mean and standard deviation.

    Returns:
        (B, K) log densities (nats).
    """
    z = (actions - mu.unsqueeze(-2)) / std.unsqueeze(-2)  # (B, K, d)
    d = actions.shape[-1]
    return -0.5 * z.pow(2).sum(-1) - torch.log(std).sum(-1).unsqueeze(-1) - 0.5 * d * _LOG_2PI


def tril_gaussian_log_prob(
    actions: torch.Tensor, mu: torch.Tensor, L: torch.Tensor
) -> torch.Tensor:
    """log N(a | mu, L L^T) of unclipped actions.

    Args:
        actions: (B, K, d) sampled actions.
        mu: (B, d) per-state mean; L: (B, d, d) lower-triangular Cholesky factor.

    Returns:
        (B, K) log densities (nats).
    """
    diff = (actions - mu.unsqueeze(-2)).transpose(-2, -1)  # (B, d, K)
    z = torch.linalg.solve_triangular(L, diff, upper=False)  # (B, d, K)
    d = actions.shape[-1]
    half_log_det = torch.diagonal(L, dim1=-2, dim2=-1).log().sum(-1)  # (B,)
    return -0.5 * z.pow(2).sum(-2) - half_log_det.unsqueeze(-1) - 0.5 * d * _LOG_2PI


def weighted_mle_loss(
    log_prob_mu: torch.Tensor,
    log_prob_sigma: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """L_mle = - (1/B) sum_i sum_j q_ij * ( log pi_mu(a_ij|s_i) + log pi_Sigma(a_ij|s_i) ).

    Args:
        log_prob_mu: (B, K) log pi_mu of the sampled actions (new mean, old covariance).
        log_prob_sigma: (B, K) log pi_Sigma (old mean, new covariance).
        weights: (B, K) E-step weights q, rows summing to 1; treated as constants.

    Returns:
        0-d loss (nats).
    """
    if log_prob_mu.dim() != 2:
        raise ValueError(f"log_prob_mu must have shape (B, K), got {tuple(log_prob_mu.shape)}")
    _check_same_shape(log_prob_mu=log_prob_mu, log_prob_sigma=log_prob_sigma, weights=weights)
    q = weights.detach()  # (B, K)
    return -(q * (log_prob_mu + log_prob_sigma)).sum(dim=1).mean()


class TrustRegion:
    """Lagrange multipliers alpha_mu, alpha_Sigma of the decoupled KL bounds.

    ``penalty`` adds alpha_mu * (KL_mu - eps_mu) + alpha_Sigma * (KL_Sigma - eps_Sigma)
    to the actor loss with the alphas held constant; ``update`` then takes a
    projected gradient step on the alphas' own loss alpha * (eps - KL):

        alpha <- clip(alpha + alpha_lr * (KL - eps), 0, alpha_max)

    so alpha grows while the KL exceeds its bound. The alphas are 0-d float32
    tensors that follow the device of the KLs they are updated with, so an
    update on GPU tensors never synchronizes with the host.

    Args:
        eps_mu: bound on KL_mu (nats), > 0.
        eps_sigma: bound on KL_Sigma (nats), > 0.
        alpha_lr: step size of the multiplier update (per nat of KL violation), > 0.
        alpha_mu_max, alpha_sigma_max: upper clip of each multiplier, >= 0.
        alpha_init: initial value of both multipliers, in [0, min(alpha_max)].
    """

    def __init__(
        self,
        eps_mu: float,
        eps_sigma: float,
        alpha_lr: float,
        alpha_mu_max: float,
        alpha_sigma_max: float,
        alpha_init: float = 0.0,
    ) -> None:
        for name, value in (("eps_mu", eps_mu), ("eps_sigma", eps_sigma), ("alpha_lr", alpha_lr)):
            if not (_is_real(value) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        for name, value in (("alpha_mu_max", alpha_mu_max), ("alpha_sigma_max", alpha_sigma_max)):
            if not (_is_real(value) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not (_is_real(alpha_init) and 0 <= alpha_init <= min(alpha_mu_max, alpha_sigma_max)):
            raise ValueError(
                f"alpha_init must be in [0, min(alpha_mu_max, alpha_sigma_max)] = "
                f"[0, {min(alpha_mu_max, alpha_sigma_max)}], got {alpha_init!r}"
            )
        self.eps_mu = float(eps_mu)
        self.eps_sigma = float(eps_sigma)
        self.alpha_lr = float(alpha_lr)
        self.alpha_mu_max = float(alpha_mu_max)
        self.alpha_sigma_max = float(alpha_sigma_max)
        self._alpha_mu = torch.tensor(float(alpha_init))
        self._alpha_sigma = torch.tensor(float(alpha_init))

    @property
    def alpha_mu(self) -> torch.Tensor:
        """0-d tensor, the multiplier of the mean KL bound."""
        return self._alpha_mu

    @property
    def alpha_sigma(self) -> torch.Tensor:
        """0-d tensor, the multiplier of the covariance KL bound."""
        return self._alpha_sigma

    def to(self, device: torch.device | str) -> TrustRegion:
        """Move the multipliers to ``device`` (in place); returns self."""
        self._alpha_mu = self._alpha_mu.to(device)
        self._alpha_sigma = self._alpha_sigma.to(device)
        return self

    def penalty(self, kl_mu: torch.Tensor, kl_sigma: torch.Tensor) -> torch.Tensor:
        """alpha_mu * (KL_mu - eps_mu) + alpha_Sigma * (KL_Sigma - eps_Sigma), alphas constant.

        Args:
            kl_mu, kl_sigma: 0-d KLs (nats) carrying the actor's gradient.
        """
        alpha_mu = self._alpha_mu.to(kl_mu.device)
        alpha_sigma = self._alpha_sigma.to(kl_sigma.device)
        return alpha_mu * (kl_mu - self.eps_mu) + alpha_sigma * (kl_sigma - self.eps_sigma)

    @torch.no_grad()
    def update(self, kl_mu: torch.Tensor | float, kl_sigma: torch.Tensor | float) -> None:
        """One projected gradient step: alpha <- clip(alpha + alpha_lr * (KL - eps), 0, alpha_max).

        Args:
            kl_mu, kl_sigma: the current KLs (nats), floats or 0-d tensors
                (detached here; tensors keep the update on their device).
        """
        self._alpha_mu = self._step(self._alpha_mu, kl_mu, self.eps_mu, self.alpha_mu_max)
        self._alpha_sigma = self._step(
            self._alpha_sigma, kl_sigma, self.eps_sigma, self.alpha_sigma_max
        )

    def _step(
        self, alpha: torch.Tensor, kl: torch.Tensor | float, eps: float, alpha_max: float
    ) -> torch.Tensor:
        if isinstance(kl, torch.Tensor):
            if kl.numel() != 1:
                raise ValueError(f"KLs must be scalars, got a tensor of shape {tuple(kl.shape)}")
            alpha = alpha.to(kl.device)
            violation = kl.detach().reshape(()).to(alpha.dtype) - eps
        else:
            violation = float(kl) - eps
        return torch.clamp(alpha + self.alpha_lr * violation, 0.0, alpha_max)

    def state_dict(self) -> dict[str, Any]:
        """The multipliers (tensor copies) and the hyperparameters they belong to."""
        return {
            "alpha_mu": self._alpha_mu.detach().clone(),
            "alpha_sigma": self._alpha_sigma.detach().clone(),
            "eps_mu": self.eps_mu,
            "eps_sigma": self.eps_sigma,
            "alpha_lr": self.alpha_lr,
            "alpha_mu_max": self.alpha_mu_max,
            "alpha_sigma_max": self.alpha_sigma_max,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from ``state_dict()``; missing hyperparameters keep their current value."""
        missing = {"alpha_mu", "alpha_sigma"} - set(state)
        if missing:
            raise ValueError(f"TrustRegion state is missing {sorted(missing)}")
        for name in ("eps_mu", "eps_sigma", "alpha_lr", "alpha_mu_max", "alpha_sigma_max"):
            if name in state:
                setattr(self, name, float(state[name]))
        device = self._alpha_mu.device
        self._alpha_mu = torch.as_tensor(state["alpha_mu"]).detach().clone().to(device)
        self._alpha_sigma = torch.as_tensor(state["alpha_sigma"]).detach().clone().to(device)

    def __repr__(self) -> str:
        return (
            f"TrustRegion(eps_mu={self.eps_mu}, eps_sigma={self.eps_sigma}, "
            f"alpha_lr={self.alpha_lr}, alpha_mu_max={self.alpha_mu_max}, "
            f"alpha_sigma_max={self.alpha_sigma_max})"
        )


def _check_batch(actions: torch.Tensor, weights: torch.Tensor, mu: torch.Tensor) -> None:
    if actions.dim() != 3 or actions.shape[0] != mu.shape[0] or actions.shape[2] != mu.shape[1]:
        raise ValueError(
            f"actions must have shape (B, K, d) = ({mu.shape[0]}, K, {mu.shape[1]}), "
            f"got {tuple(actions.shape)}"
        )
    if tuple(weights.shape) != tuple(actions.shape[:2]):
        raise ValueError(
            f"weights must have shape (B, K) = {tuple(actions.shape[:2])}, "
            f"got {tuple(weights.shape)}"
        )


def _stats(
    loss: torch.Tensor,
    mle: torch.Tensor,
    kl_mu: torch.Tensor,
    kl_sigma: torch.Tensor,
    trust_region: TrustRegion,
) -> dict[str, torch.Tensor]:
    return {
        "loss": loss.detach(),
        "mle": mle.detach(),
        "kl_mu": kl_mu.detach(),
        "kl_sigma": kl_sigma.detach(),
        "alpha_mu": trust_region.alpha_mu.detach().clone(),
        "alpha_sigma": trust_region.alpha_sigma.detach().clone(),
    }


def mstep_loss(
    mu: torch.Tensor,
    std: torch.Tensor,
    mu_old: torch.Tensor,
    std_old: torch.Tensor,
    actions: torch.Tensor,
    weights: torch.Tensor,
    trust_region: TrustRegion,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """M-step loss for a diagonal Gaussian actor.

    loss = L_mle + alpha_mu (KL_mu - eps_mu) + alpha_Sigma (KL_Sigma - eps_Sigma), where
    log pi_mu uses N(mu, std_old) and log pi_Sigma uses N(mu_old, std).
    The trust region is not updated here: call
    ``trust_region.update(stats["kl_mu"], stats["kl_sigma"])`` after the step.

    Args:
        mu, std: (B, d) actor outputs for the B states (with gradient).
        mu_old, std_old: (B, d) the anchor pi_old (detached here).
        actions: (B, K, d) the actions sampled from pi_old in the E-step.
        weights: (B, K) E-step weights q (rows sum to 1).
        trust_region: the multipliers.

    Returns:
        (loss, stats) with stats "loss", "mle", "kl_mu", "kl_sigma", "alpha_mu",
        "alpha_sigma" as detached 0-d tensors.
    """
    _check_same_shape(mu=mu, std=std, mu_old=mu_old, std_old=std_old)
    _check_batch(actions, weights, mu)
    mu_old, std_old = mu_old.detach(), std_old.detach()
    log_prob_mu = diag_gaussian_log_prob(actions, mu, std_old)  # (B, K)
    log_prob_sigma = diag_gaussian_log_prob(actions, mu_old, std)  # (B, K)
    mle = weighted_mle_loss(log_prob_mu, log_prob_sigma, weights)
    kl_mu, kl_sigma = decoupled_kl_diag(mu_old, std_old, mu, std)
    loss = mle + trust_region.penalty(kl_mu, kl_sigma)
    return loss, _stats(loss, mle, kl_mu, kl_sigma, trust_region)


def mstep_loss_chol(
    mu: torch.Tensor,
    L: torch.Tensor,
    mu_old: torch.Tensor,
    L_old: torch.Tensor,
    actions: torch.Tensor,
    weights: torch.Tensor,
    trust_region: TrustRegion,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``mstep_loss`` for a full-covariance actor given by Cholesky factors L (B, d, d)."""
    _check_same_shape(mu=mu, mu_old=mu_old)
    _check_same_shape(L=L, L_old=L_old)
    _check_batch(actions, weights, mu)
    mu_old, L_old = mu_old.detach(), L_old.detach()
    log_prob_mu = tril_gaussian_log_prob(actions, mu, L_old)  # (B, K)
    log_prob_sigma = tril_gaussian_log_prob(actions, mu_old, L)  # (B, K)
    mle = weighted_mle_loss(log_prob_mu, log_prob_sigma, weights)
    kl_mu, kl_sigma = decoupled_kl_chol(mu_old, L_old, mu, L)
    loss = mle + trust_region.penalty(kl_mu, kl_sigma)
    return loss, _stats(loss, mle, kl_mu, kl_sigma, trust_region)
