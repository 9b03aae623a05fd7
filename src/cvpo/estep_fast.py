"""The E-step dual evaluated with numpy: the CPU fast path of ``cvpo.estep``.

The math is in docs/algorithm.md, section "E-step". ``HostDualProblem`` computes what
``cvpo.estep.DualProblem`` computes (g, its gradient and Hessian, and q, from the same
features in the same (K, B) layout), for CPU data of up to ``HOST_MAX_PAIRS``
state-action pairs: the learner's case. There B*K is a few thousand and an evaluation
is ~20 elementwise ops and reductions, so per-call overhead dominates, and a numpy call
costs about a third of a torch op. It uses numpy ufuncs (no BLAS) and torch's exp below
its parallel grain size: single-threaded whatever the BLAS or torch thread settings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from cvpo.estep_data import HOST_DTYPES, CentredDual, DualEvaluation

# Largest B*K solved by HostDualProblem on CPU: up to here the few torch ops it uses
# (exp, dtype conversions) run single-threaded whatever torch's thread setting
# (at::internal::GRAIN_SIZE = 32768 elements). It is the faster evaluation at every
# size measured (1.5-1.8x over the torch DualProblem from B*K = 4096 to 65536, 1 or 2
# torch threads); larger CPU problems, and every problem on another device, use torch.
HOST_MAX_PAIRS = 32768

# ndarray.sum / .max without their Python-level wrappers (numpy._core._methods)
_sum, _max = np.add.reduce, np.maximum.reduce


def use_host(q: torch.Tensor) -> bool:
    """Whether (B, K) q is solved with ``HostDualProblem`` (numpy) rather than torch."""
    return q.is_cpu and q.shape[0] * q.shape[1] <= HOST_MAX_PAIRS


class HostDualProblem(CentredDual):
    """g, its gradient and Hessian, and q, computed with numpy on the host.

    The same centring and features as ``cvpo.estep.DualProblem`` (see ``CentredDual``),
    except that each state's covariance E[F_a F_b] - E[F_a] E[F_b] is formed before the
    sum over states (so that states with a one-hot q add exactly 0).

    Args:
        q: (B, K) reward-critic values, a host array of any float dtype (kept for
            ``host_data``, not modified).
        qc: (m, B, K) cost-critic values of the active constraints, likewise.
        kl_bound: epsilon.
        thresholds: (m,) float64 eps_k of the active constraints.
    """

    def __init__(
        self, q: np.ndarray, qc: np.ndarray, kl_bound: float, thresholds: np.ndarray
    ) -> None:
        B, K = q.shape
        m = qc.shape[0]
        self.q, self.qc = q, qc  # uncentred (for cvxpy)
        h = m + 1  # features entering the Hessian: log(K q), Qc~^1..m
        # F = (log(K q), Qc~^1, ..., Qc~^m, Q~), each (K, B) float64; F[0] is rewritten
        # at every evaluation.
        F = self.features = np.empty((h + 1, K, B))
        F[1:h] = qc.swapaxes(1, 2)  # one pass: transpose and convert to float64
        F[h] = q.T
        row_means = _sum(F[1:], axis=1, keepdims=True) / K  # (h, 1, B)  mean_j
        offsets = (_sum(row_means, axis=(1, 2)) / B).tolist()
        # A NaN or inf entry makes its row's sum, and so its offset, NaN or inf: such
        # data is rejected (see cvpo.estep) and left uncentred.
        self.finite = all(map(math.isfinite, offsets))
        if self.finite:
            F[1:] -= row_means
        super().__init__(B, K, kl_bound, thresholds, offsets)
        self.z = np.empty((K, B))  # buffer for A~ / eta
        self.z_torch = torch.from_numpy(self.z)  # the same memory, for torch.exp
        self.weighted = np.empty((h + 1, K, B))  # buffers for q * F ...
        self.products = np.empty((h, h, K, B))  # ... and q * F[:h] F[:h]
        self.q_shifted = None  # (K, B) Q~ - max_j Q~, once needed

    def host_data(self) -> tuple[np.ndarray, np.ndarray]:
        """(Q (B, K), Qc (m, B, K)) as float64 host arrays (for cvxpy)."""
        return (
            np.ascontiguousarray(self.q, dtype=np.float64),
            np.ascontiguousarray(self.qc, dtype=np.float64),
        )

    def mean_row_variance(self) -> float:
        """(1/B) sum_i Var_uniform(Q_i) (for the cold-start eta)."""
        q_centred = self.features[self.m + 1]
        return float(np.einsum("kb,kb->", q_centred, q_centred)) / (self.K * self.B)

    def weights_as(self, weights: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        """An evaluation's (K, B) weights as a new contiguous (B, K) CPU tensor of ``dtype``."""
        host_dtype = HOST_DTYPES.get(dtype)
        if host_dtype is None:
            return torch.from_numpy(np.ascontiguousarray(weights.T)).to(dtype)
        return torch.from_numpy(np.ascontiguousarray(weights.T, dtype=host_dtype))

    def expected_costs(self, weights: np.ndarray, qc_all: np.ndarray) -> np.ndarray:
        """(m,) (1/B) sum_i E_{q_i}[Qc^k] for all m constraints (qc_all (m, B, K), any float
        dtype; the products are summed in float64)."""
        return np.einsum("mbk,kb->m", qc_all, weights, dtype=np.float64) / self.B

    def to_tensor(self, value: object, dtype: torch.dtype) -> torch.Tensor:
        """A host scalar or vector as a new CPU tensor of ``dtype``."""
        host_dtype = HOST_DTYPES.get(dtype)
        if host_dtype is None:
            return torch.from_numpy(np.array(value, dtype=np.float64)).to(dtype)
        return torch.from_numpy(np.array(value, dtype=host_dtype))

    def evaluate(
        self, eta: float, lambdas: Sequence[float] | np.ndarray, reuse: DualEvaluation | None = None
    ) -> DualEvaluation:
        """g, grad g, Hessian of g and q (K, B) at (eta, lambdas).

        ``reuse``: an earlier evaluation of this problem that is no longer needed; its
        weights' memory is overwritten with the new ones (saves an allocation).
        """
        lams = [float(v) for v in lambdas]
        h, F = self.m + 1, self.features
        # (K, B)  z = A~ / eta shifted so that each state's largest z is 0
        if any(lams):
            z = np.multiply(F[h], 1.0 / eta, out=self.z)
            for k, lam in enumerate(lams):
                if lam != 0.0:
                    z -= F[1 + k] * (lam / eta)
            z -= _max(z, axis=0)
        else:  # A~ = Q~: shift Q~ once instead of z at every evaluation
            if self.q_shifted is None:
                self.q_shifted = F[h] - _max(F[h], axis=0)
            z = np.multiply(self.q_shifted, 1.0 / eta, out=self.z)
        # (K, B)  K q up to a per-state factor (torch's vectorised exp is 2-3x numpy's)
        if reuse is None:
            weights = torch.exp(self.z_torch).numpy()
        else:
            weights = reuse.weights
            torch.exp(self.z_torch, out=torch.from_numpy(weights))
        total = _sum(weights, axis=0)  # (B,)
        np.subtract(z, np.log(total) - self.log_k, out=F[0])  # (K, B)  log(K q)
        weights /= total  # (K, B)  q
        weighted = np.multiply(F, weights, out=self.weighted)  # (h+1, K, B)
        means = _sum(weighted, axis=1)  # (h+1, B)  E_{q_i}[F]
        # Cov_{q_i}(F_a, F_b) = E_{q_i}[F_a F_b] - E_{q_i}[F_a] E_{q_i}[F_b] per state
        # over the Hessian's features, then summed over states
        products = np.multiply(weighted[:h, None], F[None, :h], out=self.products)
        covariance = _sum(products, axis=2)  # (h, h, B)
        covariance -= means[:h, None] * means[None, :h]
        return self.evaluation(
            eta, lams, _sum(means, axis=1).tolist(), _sum(covariance, axis=2).tolist(), weights
        )
