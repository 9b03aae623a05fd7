"""The CVPO E-step: the convex dual of the non-parametric policy improvement.

Notation follows shared/design/cvpo.md, "E-step". For B states with K sampled
actions each, reward-critic values Q (B, K) and cost-critic values Qc (m, B, K):

    A_ij        = Q_ij - sum_k lambda_k * Qc^k_ij                         # (B, K)
    g(eta, lam) = eta * epsilon + sum_k lambda_k * eps_k
                  + eta * (1/B) * sum_i log( (1/K) * sum_j exp(A_ij / eta) )
    minimize g over eta >= eta_min, 0 <= lambda_k <= lambda_max

and the optimal variational distribution is, per state,

    q_ij = softmax_j(A_ij / eta)                                           # (B, K)

Derivatives used by the Newton solver (derived in ``_DualProblem``): with
F_ij = (A_ij / eta, Qc^1_ij, ..., Qc^m_ij),

    dg/deta      = epsilon - (1/B) sum_i KL(q_i || uniform)
    dg/dlambda_k = eps_k   - (1/B) sum_i E_{q_i}[Qc^k]
    Hessian      = (1/eta) * (1/B) sum_i Cov_{q_i}(F)                      # (1+m, 1+m)

so the optimality conditions are the ones in cvpo.md: mean KL = epsilon where
eta is interior, mean E_q[Qc^k] = eps_k where 0 < lambda_k < lambda_max.

Two solvers minimize the same program (same bounds): ``"newton"``, an exact
projected Newton method in float64 (``_solve_newton``: Newton steps on the
coordinates not held at a bound, projection onto the box, Armijo backtracking,
eta changing by at most 10x per step), and ``"cvxpy"``, the DPP-parametrized
exponential-cone model, cached per (B, K, m). g and its derivatives are
evaluated with torch on the tensors' device (``_DualProblem``), or, for CPU
tensors of up to ``_HOST_MAX_PAIRS`` state-action pairs (the learner's case),
with numpy (``_HostDualProblem``: the same sums with a fraction of torch's
per-op overhead); the (1+m)-dimensional Newton steps are Python floats.

A constraint with threshold ``inf`` is inactive: its lambda is fixed at 0 and it
does not enter either program.
"""

from __future__ import annotations

import contextlib
import logging
import math
import operator
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "DEFAULT_ETA_MIN",
    "DEFAULT_LAMBDA_MAX",
    "DEFAULT_MAX_ITER",
    "CVXPY_DPP_MAX_PAIRS",
    "DEFAULT_TOL",
    "FALLBACK_PREFIX",
    "SOLVERS",
    "STATUS_CONVERGED",
    "STATUS_INFEASIBLE",
    "STATUS_MAX_ITER",
    "CvxpyDualProblem",
    "EStepResult",
    "build_cvxpy_problem",
    "clear_cvxpy_cache",
    "dual_objective",
    "solve_dual",
]

logger = logging.getLogger(__name__)

STATUS_CONVERGED = "converged"
STATUS_MAX_ITER = "max_iter"
STATUS_INFEASIBLE = "infeasible"
FALLBACK_PREFIX = "fallback_newton:"
SOLVERS = ("newton", "cvxpy")

# lambda is in reward units per cost unit; 1e3 lets one unit of cost outweigh
# 1000 units of reward before the step is declared infeasible.
DEFAULT_LAMBDA_MAX = 1e3
# eta is a temperature in reward units; it only reaches this bound when the
# sampled actions' advantages are (nearly) identical in every state.
DEFAULT_ETA_MIN = 1e-6
DEFAULT_MAX_ITER = 50
# Stop when Newton's predicted decrease of g is below DEFAULT_TOL relative to
# the objective's scale (well above float64 round-off, well below any use).
DEFAULT_TOL = 1e-14
DEFAULT_CVXPY_SOLVER = "CLARABEL"

# Newton line search: sufficient-decrease constant and the largest factor by
# which eta may shrink or grow in one step (keeps the iterate in the region
# where the quadratic model of the perspective function is trustworthy).
_ARMIJO = 1e-4
_ETA_STEP_RATIO = 10.0
_MIN_STEP = 1e-12
# Largest B*K solved through cvxpy's DPP parameter map by default (see solve_dual).
CVXPY_DPP_MAX_PAIRS = 8192
# A cvxpy lambda this close to lambda_max (relative) counts as at the cap.
_CAP_RTOL = 1e-5


@dataclass
class EStepResult:
    """Solution of the E-step dual.

    Attributes:
        eta: () temperature of the KL constraint (reward units), q's device and dtype.
        lambdas: (m,) cost multipliers (reward units per cost unit); 0 for
            inactive constraints (threshold ``inf``).
        weights: (B, K) the variational distribution q, each row a softmax of
            A / eta; q's dtype.
        objective: the dual value g(eta, lambdas), evaluated in float64 (reward units).
        iterations: Newton steps taken, or the cvxpy backend's iteration count.
        solve_time: wall-clock seconds for the whole call (validation included).
        status: ``STATUS_CONVERGED``, ``STATUS_MAX_ITER``, ``STATUS_INFEASIBLE``
            (some lambda at ``lambda_max``), or ``"fallback_newton:<status>"``
            when a failed cvxpy solve was replaced by Newton.
        solver: the solver that produced the result ("newton" or "cvxpy").
        fallback: True when cvxpy was asked for and failed.
        kl: (1/B) sum_i KL(q_i || uniform over the K samples) (nats).
        expected_costs: (m,) (1/B) sum_i E_{q_i}[Qc^k] (cost units), q's dtype.
        infeasible_constraints: indices k whose lambda is at ``lambda_max``.
        backend_status: the raw status of the backend (cvxpy's ``problem.status``
            or an exception name; for Newton the same as ``status``).
        message: human-readable details (why a fallback happened, or that
            cvxpy compiled without DPP), else "".
    """

    eta: torch.Tensor
    lambdas: torch.Tensor
    weights: torch.Tensor
    objective: float
    iterations: int
    solve_time: float
    status: str
    solver: str
    fallback: bool = False
    kl: float = math.nan
    expected_costs: torch.Tensor | None = None
    infeasible_constraints: tuple[int, ...] = ()
    backend_status: str = ""
    message: str = ""


@dataclass
class CvxpyDualProblem:
    """The cached DPP model of the dual for one (B, K, m) (see ``build_cvxpy_problem``).

    Attributes:
        problem: the ``cp.Problem``; ``problem.is_dcp(dpp=True)`` holds.
        q, qc, kl_bound, thresholds, eta_min, lambda_max: its ``cp.Parameter``s
            (``qc`` a list of m (B, K) parameters; ``thresholds`` None if m = 0).
        eta, lambdas: the dual variables (``lambdas`` None if m = 0).
        build_time: seconds spent building the expression tree (not compiling).
        solves: number of solves run through this object.
    """

    B: int
    K: int
    m: int
    problem: Any
    q: Any
    qc: list[Any]
    kl_bound: Any
    thresholds: Any
    eta_min: Any
    lambda_max: Any
    eta: Any
    lambdas: Any
    build_time: float
    solves: int = 0


_CVXPY_CACHE: dict[tuple[int, int, int], CvxpyDualProblem] = {}


def build_cvxpy_problem(B: int, K: int, m: int) -> CvxpyDualProblem:
    """Build (once per (B, K, m), then return from a module cache) the cvxpy dual.

    variables eta, lambda (m), t (B), u (B, K);
    minimize  eta * epsilon + lambda . eps + mean(t)
    s.t.      ExpCone(A_ij - t_i, eta, u_ij)   i.e. eta * exp((A_ij - t_i) / eta) <= u_ij
              sum_j u_ij <= K * eta            i.e. t_i >= eta * log((1/K) sum_j exp(A_ij / eta))
              eta >= eta_min,  0 <= lambda <= lambda_max
    with A = Q - sum_k lambda_k * Qc^k and Q, Qc^k, epsilon, eps, eta_min,
    lambda_max ``cp.Parameter``s, so re-solving with new data reuses cvxpy's
    compiled parameter-to-data map (``problem._cache.param_prog``).

    Args:
        B: number of states (>= 1).
        K: sampled actions per state (>= 1).
        m: number of active cost constraints (>= 0).
    """
    for name, value, low in (("B", B, 1), ("K", K, 1), ("m", m, 0)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    key = (int(B), int(K), int(m))
    cached = _CVXPY_CACHE.get(key)
    if cached is not None:
        return cached

    import cvxpy as cp

    start = time.perf_counter()
    q = cp.Parameter((B, K), name="Q")
    qc = [cp.Parameter((B, K), name=f"Qc{k}") for k in range(m)]
    kl_bound = cp.Parameter(nonneg=True, name="epsilon")
    eta_min = cp.Parameter(nonneg=True, name="eta_min")
    lambda_max = cp.Parameter(nonneg=True, name="lambda_max")
    eta = cp.Variable(name="eta")
    t = cp.Variable(B, name="t")
    u = cp.Variable((B, K), name="u")

    advantage = q  # (B, K)
    objective = eta * kl_bound + cp.sum(t) / B
    constraints = [eta >= eta_min]
    thresholds = lambdas = None
    if m > 0:
        thresholds = cp.Parameter(m, name="eps")
        lambdas = cp.Variable(m, name="lambda")
        advantage = q - sum(lambdas[k] * qc[k] for k in range(m))
        objective = objective + thresholds @ lambdas
        constraints += [lambdas >= 0, lambdas <= lambda_max]
    constraints += [
        cp.ExpCone(advantage - t[:, None], eta * np.ones((B, K)), u),
        cp.sum(u, axis=1) <= K * eta,
    ]
    problem = cp.Problem(cp.Minimize(objective), constraints)
    entry = CvxpyDualProblem(
        B=key[0], K=key[1], m=key[2], problem=problem, q=q, qc=qc, kl_bound=kl_bound,
        thresholds=thresholds, eta_min=eta_min, lambda_max=lambda_max, eta=eta,
        lambdas=lambdas, build_time=time.perf_counter() - start,
    )
    _CVXPY_CACHE[key] = entry
    return entry


def clear_cvxpy_cache() -> None:
    """Drop every cached cvxpy model (they hold B*K exponential cones each)."""
    _CVXPY_CACHE.clear()


class _DualProblem:
    """g, its gradient and Hessian for fixed data, evaluated in float64 on q's device.

    Derivation. Per state, h_i(eta, lam) = eta * f(A_i / eta) with
    f(z) = log((1/K) sum_j exp z_j) is the perspective of f. With q_i = softmax(A_i/eta):
        df/dz = q_i,  d2f/dz2 = diag(q_i) - q_i q_i^T   (Cov under q_i)
        dh_i/dlam_k = -E_{q_i}[Qc^k]
        dh_i/deta   = f - E_{q_i}[A_i]/eta = -KL(q_i || uniform)
        d2h_i       = (1/eta) Cov_{q_i}(v),   v = (A_i/eta, Qc^1_i, ..., Qc^m_i)
    (the perspective's Hessian is (1/eta) [I, -z]^T d2f(z) [I, -z] at z = A/eta).

    Conditioning. Shifting a row of Q or Qc^k by a constant leaves q unchanged
    and moves g by a known amount, so the data are centred per state once:
        Q~ = Q - mean_j Q,  Qc~^k = Qc^k - mean_j Qc^k,  eps~_k = eps_k - mean_ij Qc^k
        g(eta, lam) = mean_ij Q + g~(eta, lam)
    A/eta and log(K q) differ by a per-state constant too, so log(K q) is the
    first feature: same covariance, KL(q_i || uniform) = E_{q_i}[log(K q_i)]
    directly, and it stays small both near uniform q and where A/eta is huge
    (no cancellation in E[f^2] - E[f]^2).

    ``_HostDualProblem`` is the same computation in numpy, used for CPU data.
    """

    def __init__(
        self,
        q: torch.Tensor,
        qc: torch.Tensor,
        kl_bound: float,
        thresholds: np.ndarray,
    ) -> None:
        self.B, self.K = q.shape
        self.m = qc.shape[0]
        self.q, self.qc = q, qc  # (B, K), (m, B, K) float64, uncentred (for cvxpy)
        self.kl_bound = kl_bound
        self.thresholds = thresholds  # (m,) host float64
        self.log_k = math.log(self.K)
        self.hessian_index = np.array([0, *range(2, 2 + self.m)])

        q_row_mean = q.mean(dim=1, keepdim=True)  # (B, 1)
        qc_row_mean = qc.mean(dim=2, keepdim=True)  # (m, B, 1)
        offsets = torch.cat([q_row_mean.mean().reshape(1), qc_row_mean.mean(dim=(1, 2))])
        offsets = np.asarray(offsets.tolist())
        self.objective_offset = float(offsets[0])  # mean_ij Q
        self.cost_offsets = offsets[1:]  # (m,) mean_ij Qc^k
        self.thresholds_centred = (thresholds - self.cost_offsets).tolist()  # (m,)
        # F = (log(K q), Q~, Qc~^1, ..., Qc~^m); F[0] is rewritten at every evaluation.
        self.features = torch.empty((2 + self.m, self.B, self.K), dtype=q.dtype, device=q.device)
        torch.sub(q, q_row_mean, out=self.features[1])  # (B, K)
        torch.sub(qc, qc_row_mean, out=self.features[2:])  # (m, B, K)
        self.z = torch.empty_like(q)  # (B, K) buffer for A~ / eta

    def host_data(self) -> tuple[np.ndarray, np.ndarray]:
        """(Q (B, K), Qc (m, B, K)) as float64 host arrays (for cvxpy)."""
        return self.q.cpu().numpy(), self.qc.cpu().numpy()

    def mean_row_variance(self) -> float:
        """(1/B) sum_i Var_uniform(Q_i) (for the cold-start eta)."""
        return float(self.q.var(dim=1, unbiased=False).mean().item())

    def weights_as(self, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """An evaluation's (B, K) weights as a tensor of ``dtype`` on q's device."""
        return weights.to(dtype)

    def expected_costs(self, weights: torch.Tensor, qc_all: torch.Tensor) -> torch.Tensor:
        """(m,) (1/B) sum_i E_{q_i}[Qc^k] for all m constraints (qc_all (m, B, K) float64)."""
        return torch.einsum("bk,mbk->m", weights, qc_all) / self.B

    def to_tensor(self, value: Any, dtype: torch.dtype) -> torch.Tensor:
        """A host scalar or vector (or a tensor) as a tensor of ``dtype`` on q's device."""
        if isinstance(value, torch.Tensor):
            return value.to(dtype)
        return torch.tensor(value, dtype=dtype, device=self.q.device)

    def evaluate(self, eta: float, lambdas: Sequence[float] | np.ndarray,
                 reuse: _Evaluation | None = None) -> _Evaluation:
        """g, grad g, Hessian of g and q at (eta, lambdas), with one device-to-host copy.

        (``reuse`` is for ``_HostDualProblem.evaluate``'s signature; unused here.)

        Since z_ij - log(K q_ij) = log((1/K) sum_j' exp z_ij') for every j and
        z = A~/eta is linear in (Q~, Qc~),
            eta * (1/B) sum_i log((1/K) sum_j exp z_ij)
                = (1/B) sum_ij q_ij (Q~_ij - lambda . Qc~_ij - eta * log(K q_ij)),
        so every statistic comes from q-weighted sums of F: per-state means (for
        the covariances) and their totals.
        """
        lams = [float(v) for v in lambdas]
        m, F = self.m, self.features
        z = torch.mul(F[1], 1.0 / eta, out=self.z)  # (B, K)  A~ / eta
        for k, lam in enumerate(lams):
            if lam != 0.0:
                z.add_(F[2 + k], alpha=-lam / eta)
        torch.log_softmax(z, dim=1, out=F[0])  # (B, K)  log q
        weights = torch.exp(F[0])  # (B, K)  q
        F[0].add_(self.log_k)  # (B, K)  log(K q)
        weighted = F * weights  # (2+m, B, K)
        means = weighted.sum(dim=2)  # (2+m, B)  E_{q_i}[F]
        second = weighted.reshape(2 + m, -1) @ F.reshape(2 + m, -1).T  # (2+m, 2+m)
        outer = means @ means.T  # (2+m, 2+m)
        host = torch.cat([means.sum(dim=1), second.reshape(-1), outer.reshape(-1)]).tolist()
        host = np.asarray(host) / self.B
        mean_f = host[: 2 + m]  # (2+m,)  (1/B) sum_i E_{q_i}[F]
        n = 2 + m
        # (1/B) sum_i Cov_{q_i}(F), restricted to (log Kq, Qc~): Q~ only enters g
        cov = (host[n : n + n * n] - host[n + n * n :]).reshape(n, n)
        hessian = cov[self.hessian_index[:, None], self.hessian_index] / eta
        kl = float(mean_f[0])  # (1/B) sum_i KL(q_i || uniform)
        expected_costs = mean_f[2:] + self.cost_offsets  # (m,) (1/B) sum_i E_q[Qc^k]
        eta_log_partition = float(mean_f[1]) - _dot(lams, mean_f[2:].tolist()) - eta * kl
        centred = eta * self.kl_bound + _dot(lams, self.thresholds_centred) + eta_log_partition
        return _Evaluation(
            eta=eta, lambdas=lams, objective=self.objective_offset + centred, centred=centred,
            gradient=[self.kl_bound - kl, *(self.thresholds - expected_costs).tolist()],
            hessian=hessian.tolist(), kl=kl, expected_costs=expected_costs.tolist(),
            weights=weights,
        )


@dataclass
class _Evaluation:
    eta: float
    lambdas: list[float]  # (m,)
    objective: float  # g
    centred: float  # g - mean(Q): g~, free of the (shift-dependent) offset
    gradient: list[float]  # (1+m,)
    hessian: list[list[float]]  # (1+m, 1+m)
    kl: float
    expected_costs: list[float]  # (m,) (1/B) sum_i E_{q_i}[Qc^k]
    weights: torch.Tensor | np.ndarray  # q: (B, K) float64 tensor, or (K, B) host array


def _dot(a: Sequence[float], b: Sequence[float]) -> float:
    """sum_k a_k b_k in Python floats (for the (m,) vectors: cheaper than a numpy call)."""
    return sum(map(operator.mul, a, b))


# ndarray.sum / .max without their Python-level wrappers (numpy._core._methods)
_sum, _max = np.add.reduce, np.maximum.reduce

# torch dtypes that numpy holds exactly (bfloat16 is converted through torch).
_HOST_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}
# Largest B*K solved by _HostDualProblem on CPU: up to here the few torch ops it
# uses (exp, dtype conversions) run single-threaded whatever torch's thread setting
# (at::internal::GRAIN_SIZE = 32768 elements). It is the faster evaluation at every
# size measured (1.5-1.8x over _DualProblem from B*K = 4096 to 65536, 1 or 2 torch
# threads); larger CPU problems, and every problem on another device, go through
# _DualProblem.
_HOST_MAX_PAIRS = 32768


def _use_host(q: torch.Tensor) -> bool:
    """Whether (B, K) q is solved with _HostDualProblem (numpy) rather than _DualProblem."""
    return q.is_cpu and q.shape[0] * q.shape[1] <= _HOST_MAX_PAIRS


def _host_array(tensor: torch.Tensor) -> np.ndarray:
    """A CPU tensor's data as a numpy array (a view, unless its dtype has no numpy twin)."""
    if tensor.requires_grad:
        tensor = tensor.detach()
    if tensor.dtype not in _HOST_DTYPES:
        tensor = tensor.to(torch.float64)
    try:
        return tensor.numpy()
    except RuntimeError:  # a lazily negated view (torch._neg_view)
        return tensor.resolve_neg().numpy()


class _HostDualProblem:
    """``_DualProblem`` computed with numpy on the host, for CPU data.

    The same g, gradient, Hessian and q up to round-off: the same centring and
    the same q-weighted sums of the same features, F = (log(K q), Qc~^1, ...,
    Qc~^m, Q~) (ordered so that the ones entering the Hessian come first), except
    that each state's covariance E[F_a F_b] - E[F_a] E[F_b] is formed before the
    sum over states (so that states with a one-hot q add exactly 0). In
    the learner B*K is a few thousand and an evaluation is ~20 elementwise ops
    and reductions, so per-call overhead dominates, and a numpy call costs
    about a third of a torch op. Arrays are stored transposed, (K, B), so that
    the per-state reductions over the K samples run along the leading axis
    (contiguous and vectorised over states). It uses numpy ufuncs (no BLAS) and
    torch's exp below its parallel grain size: single-threaded whatever the BLAS
    or torch thread settings.

    Args:
        q: (B, K) reward-critic values, a host array of any float dtype (kept
            for ``host_data``, not modified).
        qc: (m, B, K) cost-critic values of the active constraints, likewise.
        kl_bound: epsilon.
        thresholds: (m,) float64 eps_k of the active constraints.
    """

    def __init__(
        self, q: np.ndarray, qc: np.ndarray, kl_bound: float, thresholds: np.ndarray
    ) -> None:
        self.B, self.K = q.shape
        self.m = m = qc.shape[0]
        self.q, self.qc = q, qc  # uncentred (for cvxpy)
        self.kl_bound = kl_bound
        self.thresholds = thresholds  # (m,)
        self.log_k = math.log(self.K)
        h = m + 1  # features entering the Hessian: log(K q), Qc~^1..m
        # F = (log(K q), Qc~^1, ..., Qc~^m, Q~), each (K, B) float64; F[0] is
        # rewritten at every evaluation.
        F = self.features = np.empty((h + 1, self.K, self.B))
        F[1:h] = qc.swapaxes(1, 2)  # one pass: transpose and convert to float64
        F[h] = q.T
        row_means = np.add.reduce(F[1:], axis=1, keepdims=True) / self.K  # (h, 1, B)  mean_j
        offsets = (np.add.reduce(row_means, axis=(1, 2)) / self.B).tolist()
        # A NaN or inf entry makes its row's sum, and so its offset, NaN or inf:
        # such data is rejected (see _build_problem) and left uncentred.
        self.finite = all(map(math.isfinite, offsets))
        if self.finite:
            F[1:] -= row_means
        *cost_offsets, self.objective_offset = offsets
        self.cost_offsets = cost_offsets  # (m,) mean_ij Qc^k; objective_offset: mean_ij Q
        self.thresholds_centred = [t - c for t, c in zip(thresholds.tolist(), cost_offsets)]
        self.z = np.empty((self.K, self.B))  # buffer for A~ / eta
        self.z_torch = torch.from_numpy(self.z)  # the same memory, for torch.exp
        self.weighted = np.empty((h + 1, self.K, self.B))  # buffers for q * F ...
        self.products = np.empty((h, h, self.K, self.B))  # ... and q * F[:h] F[:h]
        self.q_shifted = None  # (K, B) Q~ - max_j Q~, once needed

    def host_data(self) -> tuple[np.ndarray, np.ndarray]:
        """(Q (B, K), Qc (m, B, K)) as float64 host arrays (for cvxpy)."""
        return (np.ascontiguousarray(self.q, dtype=np.float64),
                np.ascontiguousarray(self.qc, dtype=np.float64))

    def mean_row_variance(self) -> float:
        """(1/B) sum_i Var_uniform(Q_i) (for the cold-start eta)."""
        q_centred = self.features[self.m + 1]
        return float(np.einsum("kb,kb->", q_centred, q_centred)) / (self.K * self.B)

    def weights_as(self, weights: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        """An evaluation's (K, B) weights as a new contiguous (B, K) CPU tensor of ``dtype``."""
        host_dtype = _HOST_DTYPES.get(dtype)
        if host_dtype is None:
            return torch.from_numpy(np.ascontiguousarray(weights.T)).to(dtype)
        return torch.from_numpy(np.ascontiguousarray(weights.T, dtype=host_dtype))

    def expected_costs(self, weights: np.ndarray, qc_all: np.ndarray) -> np.ndarray:
        """(m,) (1/B) sum_i E_{q_i}[Qc^k] for all m constraints (qc_all (m, B, K), any float
        dtype; the products are summed in float64)."""
        return np.einsum("mbk,kb->m", qc_all, weights, dtype=np.float64) / self.B

    def to_tensor(self, value: Any, dtype: torch.dtype) -> torch.Tensor:
        """A host scalar or vector as a new CPU tensor of ``dtype``."""
        host_dtype = _HOST_DTYPES.get(dtype)
        if host_dtype is None:
            return torch.from_numpy(np.array(value, dtype=np.float64)).to(dtype)
        return torch.from_numpy(np.array(value, dtype=host_dtype))

    def evaluate(self, eta: float, lambdas: Sequence[float] | np.ndarray,
                 reuse: _Evaluation | None = None) -> _Evaluation:
        """g, grad g, Hessian of g and q at (eta, lambdas); see ``_DualProblem.evaluate``.

        The returned weights are (K, B) (``weights_as`` turns them into q's layout).
        ``reuse``: an earlier evaluation of this problem that is no longer needed;
        its weights' memory is overwritten with the new ones (saves an allocation).
        """
        lams = [float(v) for v in lambdas]
        h, F, B = self.m + 1, self.features, self.B
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
        # over the Hessian's features, then summed: a state where q_i is one-hot
        # (to float64 resolution) adds exactly 0
        products = np.multiply(weighted[:h, None], F[None, :h], out=self.products)
        covariance = _sum(products, axis=2)  # (h, h, B)
        covariance -= means[:h, None] * means[None, :h]
        covariance = _sum(covariance, axis=2).tolist()  # (h, h)
        # the rest is O(m^2) scalar work, in Python floats
        # (1/B) sum_i E_{q_i}[F]: KL, the centred expected costs and rewards
        kl, *mean_costs, mean_reward = [v / B for v in _sum(means, axis=1).tolist()]
        # (1/B) sum_i Cov_{q_i}(log Kq, Qc~) / eta
        hessian = [[v / B / eta for v in row] for row in covariance]
        kl_bound, thresholds_centred = self.kl_bound, self.thresholds_centred
        eta_log_partition = mean_reward - _dot(lams, mean_costs) - eta * kl
        centred = eta * kl_bound + _dot(lams, thresholds_centred) + eta_log_partition
        return _Evaluation(
            eta=eta, lambdas=lams, objective=self.objective_offset + centred, centred=centred,
            gradient=[kl_bound - kl, *(t - c for t, c in zip(thresholds_centred, mean_costs))],
            hessian=hessian, kl=kl,
            expected_costs=[c + o for c, o in zip(mean_costs, self.cost_offsets)],
            weights=weights,
        )


def _solve_small(a: list[list[float]], b: list[float]) -> list[float]:
    """x with a x = b for a small dense a: Gaussian elimination with partial pivoting
    (LAPACK's dgesv) in Python floats, which for n <= 4 costs less than one numpy call.
    ``a`` and ``b`` are overwritten."""
    n = len(b)
    if n == 1:  # (what the elimination below reduces to)
        if a[0][0] == 0.0:
            raise np.linalg.LinAlgError("Singular matrix")
        return [b[0] / a[0][0]]
    for k in range(n):
        pivot_row = max(range(k, n), key=lambda i: abs(a[i][k]))
        if a[pivot_row][k] == 0.0:
            raise np.linalg.LinAlgError("Singular matrix")
        if pivot_row != k:
            a[k], a[pivot_row] = a[pivot_row], a[k]
            b[k], b[pivot_row] = b[pivot_row], b[k]
        row_k, pivot = a[k], a[k][k]
        for i in range(k + 1, n):
            row_i = a[i]
            factor = row_i[k] / pivot
            for j in range(k + 1, n):
                row_i[j] -= factor * row_k[j]
            b[i] -= factor * b[k]
    x = [0.0] * n
    for i in range(n - 1, -1, -1):
        row_i = a[i]
        x[i] = (b[i] - sum(row_i[j] * x[j] for j in range(i + 1, n))) / row_i[i]
    return x


def _newton_direction(gradient: Sequence[float], hessian: Sequence[Sequence[float]],
                      free: Sequence[bool], x: Sequence[float], lower: Sequence[float],
                      upper: Sequence[float]) -> list[float]:
    """Newton direction d (step x - d) on the free coordinates, 0 on the bound-active ones.

    The reduced Hessian is scaled to unit diagonal (eta and lambda have different
    units) and a tiny ridge keeps it invertible. A free coordinate without
    curvature (its feature has zero variance under q in every state) makes g
    linear along it, so its step goes straight to the bound the gradient points at.
    The vectors have 1 + m entries: Python floats and lists throughout.
    """
    direction = [0.0] * len(gradient)
    curved = []
    for i, is_free in enumerate(free):
        if not is_free:
            continue
        if hessian[i][i] > 0:
            curved.append(i)
        else:
            step = x[i] - lower[i] if gradient[i] > 0 else x[i] - upper[i]
            if not math.isfinite(step):
                # No finite bound in the descent direction: only eta (upper bound
                # inf), flat where q is one-hot in every state (eta far too small,
                # e.g. a warm start from a collapsed eta). Grow it by the step-ratio
                # cap; the Armijo search shortens the step if that overshoots.
                step = x[i] * (1.0 - _ETA_STEP_RATIO) if x[i] > 0 else 0.0
            direction[i] = step
    if curved:
        scale = [1.0 / math.sqrt(hessian[i][i]) for i in curved]
        scaled = [[hessian[i][j] * (s_i * s_j) for j, s_j in zip(curved, scale)]
                  for i, s_i in zip(curved, scale)]
        for r in range(len(curved)):
            scaled[r][r] += 1e-12
        solved = _solve_small(scaled, [s * gradient[i] for i, s in zip(curved, scale)])
        for i, s, v in zip(curved, scale, solved):
            direction[i] = s * v
    return direction


def _solve_newton(
    problem: _DualProblem | _HostDualProblem,
    x0: Sequence[float],
    lower: Sequence[float],
    upper: Sequence[float],
    max_iter: int,
    tol: float,
) -> tuple[_Evaluation, int, str]:
    """Projected Newton (after Bertsekas 1982) with an Armijo search along the projection arc.

    Returns the final evaluation, the number of Newton steps and
    STATUS_CONVERGED or STATUS_MAX_ITER. The (1+m,) iterates are Python floats.
    """
    lower, upper = [float(v) for v in lower], [float(v) for v in upper]
    bounds = list(zip(lower, upper))
    kl_bound, thresholds_centred, eta_min = problem.kl_bound, problem.thresholds_centred, lower[0]
    x = [min(max(float(v), lo), up) for v, (lo, up) in zip(x0, bounds)]
    current = problem.evaluate(x[0], x[1:])
    spare = None  # an evaluation no longer needed, whose memory the next one may reuse
    for iteration in range(max_iter):
        gradient = current.gradient
        # Coordinates held at a bound that the gradient pushes outward stay fixed.
        free = [not ((v <= lo and g > 0) or (v >= up and g < 0))
                for v, g, (lo, up) in zip(x, gradient, bounds)]
        direction = _newton_direction(gradient, current.hessian, free, x, lower, upper)
        decrement = _dot(gradient, direction)  # Newton decrement^2 = 2 * predicted decrease
        # the scale of g~ = g - mean(Q), what a step can change (shift-invariant)
        eta = x[0]
        scale = (abs(current.centred) + eta * kl_bound
                 + abs(_dot(x[1:], thresholds_centred)))
        if decrement <= 2.0 * tol * scale or not any(direction):
            return current, iteration, STATUS_CONVERGED

        step = 1.0
        eta_direction = direction[0]
        if current.hessian[0][0] > 0 and eta_direction != 0.0:
            eta_next = eta - eta_direction
            if eta_next < eta / _ETA_STEP_RATIO and eta / _ETA_STEP_RATIO > eta_min:
                step = (eta - eta / _ETA_STEP_RATIO) / eta_direction
            elif eta_next > eta * _ETA_STEP_RATIO:
                step = (eta - eta * _ETA_STEP_RATIO) / eta_direction

        roundoff = 1e-15 * scale
        sufficient = [_ARMIJO * g for g in gradient]
        while True:
            x_next = [min(max(v - step * d, lo), up)
                      for v, d, (lo, up) in zip(x, direction, bounds)]
            trial = problem.evaluate(x_next[0], x_next[1:], reuse=spare)
            predicted = _dot(sufficient, [a - b for a, b in zip(x_next, x)])
            if trial.centred <= current.centred + predicted + roundoff:
                break
            spare = trial
            step *= 0.5
            if step < _MIN_STEP:
                # No decrease is representable: the iterate is optimal to round-off.
                return current, iteration, (
                    STATUS_CONVERGED if decrement <= 1e-8 * scale else STATUS_MAX_ITER
                )
        x, current, spare = x_next, trial, current
    return current, max_iter, STATUS_MAX_ITER


def _as_float(value: Any, name: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return float(value.item())
    try:
        return float(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a real number, got {value!r}") from err


def _as_host_vector(value: Any, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        if value.device.type == "cpu":
            return _host_array(value).astype(np.float64).reshape(-1)
        value = value.detach().cpu().double().numpy()
    try:
        return np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a sequence of real numbers, got {value!r}") from err


def _count_non_finite(*tensors: torch.Tensor) -> list[int]:
    """The number of NaN / inf entries of each tensor, with at most one host sync."""
    if all(t.device.type == "cpu" and t.dtype in _HOST_DTYPES for t in tensors):
        counts = []
        for tensor in tensors:
            data = _host_array(tensor)
            finite = np.isfinite(data)
            counts.append(0 if finite.all() else int(data.size - np.count_nonzero(finite)))
        return counts
    return torch.stack([(~torch.isfinite(t)).sum() for t in tensors]).tolist()


def _raise_if_non_finite(q: torch.Tensor, qc: torch.Tensor) -> None:
    for name, tensor, bad in zip(("q", "qc"), (q, qc), _count_non_finite(q, qc)):
        if bad:
            raise ValueError(
                f"{name} has {bad} non-finite entries (NaN or inf) out of {tensor.numel()}; "
                "check the critics' outputs"
            )


def _intra_op_threads(threads: int | None) -> contextlib.AbstractContextManager[None]:
    """Temporarily set torch's intra-op thread count (process-wide); None: leave it."""
    if threads is None or threads == torch.get_num_threads():
        return contextlib.nullcontext()
    return _set_intra_op_threads(threads)


@contextlib.contextmanager
def _set_intra_op_threads(threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _check_inputs(
    q: Any, qc: Any, kl_bound: Any, thresholds: Any
) -> tuple[torch.Tensor, torch.Tensor, float, np.ndarray, bool]:
    """Validated (q, qc, kl_bound, thresholds as float64 array, whether to solve on the
    host with numpy); non-finite q / qc of host problems are caught by _build_problem."""
    if not isinstance(q, torch.Tensor) or q.dim() != 2 or q.shape[0] < 1 or q.shape[1] < 1:
        shape = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
        raise ValueError(f"q must be a torch tensor of shape (B, K) with B, K >= 1, got {shape}")
    if not q.is_floating_point():
        raise TypeError(f"q must be a floating point tensor, got dtype {q.dtype}")
    B, K = q.shape
    if qc is None:
        qc = q.new_empty((0, B, K))
    if not isinstance(qc, torch.Tensor) or qc.dim() != 3 or tuple(qc.shape[1:]) != (B, K):
        shape = tuple(qc.shape) if isinstance(qc, torch.Tensor) else type(qc).__name__
        raise ValueError(f"qc must be a torch tensor of shape (m, B, K) = (m, {B}, {K}), got {shape}")
    if qc.device != q.device:
        raise ValueError(f"q and qc must be on the same device, got {q.device} and {qc.device}")
    host = _use_host(q)
    if not host:  # else _build_problem checks while converting the data
        _raise_if_non_finite(q, qc)
    kl_bound = _as_float(kl_bound, "kl_bound")
    if not (kl_bound > 0 and math.isfinite(kl_bound)):
        raise ValueError(f"kl_bound must be a finite number > 0 (nats), got {kl_bound!r}")
    thresholds = _as_host_vector(thresholds, "thresholds")
    if thresholds.shape[0] != qc.shape[0]:
        raise ValueError(
            f"thresholds must have one entry per cost critic (m = {qc.shape[0]}), "
            f"got {thresholds.shape[0]}"
        )
    if not all(t > -math.inf for t in thresholds.tolist()):  # NaN or -inf
        raise ValueError(
            f"thresholds must be real numbers or +inf (inactive constraint), got {thresholds}"
        )
    return q, qc, kl_bound, thresholds, host


def _initial_point(
    problem: _DualProblem | _HostDualProblem,
    m: int,
    kl_bound: float,
    init: EStepResult | tuple[Any, Any] | None,
) -> tuple[float, list[float] | None]:
    """eta0, lambda0 (None: zeros). Without a warm start, eta0 matches the KL bound
    to second order at lambda = 0: KL ~= Var_uniform(Q) / (2 eta^2)."""
    if init is None:
        return math.sqrt(problem.mean_row_variance() / (2.0 * kl_bound)), None
    if isinstance(init, EStepResult):
        eta, lambdas = init.eta, init.lambdas
    else:
        try:
            eta, lambdas = init
        except (TypeError, ValueError) as err:
            raise TypeError("init must be an EStepResult or a pair (eta, lambdas)") from err
    eta = _as_float(eta, "init eta")
    if isinstance(lambdas, torch.Tensor):
        lambdas = [float(v) for v in (lambdas if lambdas.dim() == 1 else lambdas.reshape(-1)).tolist()]
    else:
        lambdas = _as_host_vector(lambdas, "init lambdas").tolist()
    if len(lambdas) != m:
        raise ValueError(f"init lambdas must have m = {m} entries, got {len(lambdas)}")
    if not (math.isfinite(eta) and all(map(math.isfinite, lambdas))):
        raise ValueError(f"init must be finite, got eta={eta}, lambdas={lambdas}")
    return eta, lambdas


def dual_objective(
    q: torch.Tensor,
    qc: torch.Tensor,
    kl_bound: float,
    thresholds: Sequence[float] | np.ndarray | torch.Tensor,
    eta: float,
    lambdas: Sequence[float] | np.ndarray | torch.Tensor,
) -> float:
    """g(eta, lambdas) in float64 (for checks; inactive constraints must have lambda 0).

    Args:
        q: (B, K) reward-critic values.
        qc: (m, B, K) cost-critic values.
        kl_bound: epsilon (nats).
        thresholds: (m,) eps_k (cost units); ``inf`` for inactive constraints.
        eta: temperature (> 0).
        lambdas: (m,) multipliers.
    """
    q, qc, kl_bound, thresholds, host = _check_inputs(q, qc, kl_bound, thresholds)
    lambdas = _as_host_vector(lambdas, "lambdas")
    active = np.isfinite(thresholds)
    if (lambdas[~active] != 0).any():
        raise ValueError("lambdas of inactive constraints (threshold inf) must be 0")
    with torch.no_grad():
        problem, _ = _build_problem(q, qc, kl_bound, thresholds, np.flatnonzero(active).tolist(),
                                    host)
        return float(problem.evaluate(float(eta), lambdas[active]).objective)


def _build_problem(
    q: torch.Tensor, qc: torch.Tensor, kl_bound: float, thresholds: np.ndarray, active: list[int],
    host: bool,
) -> tuple[_DualProblem | _HostDualProblem, torch.Tensor | np.ndarray]:
    """The dual over the ``active`` constraints, and all m of qc for the problem's
    ``expected_costs`` (an (m, B, K) host array, or a float64 tensor on q's device)."""
    m = qc.shape[0]
    if host:
        qc_all = _host_array(qc)  # (m, B, K), a view of qc's data
        qc_active = qc_all if len(active) == m else qc_all[active]
        problem = _HostDualProblem(_host_array(q), qc_active, kl_bound, thresholds[active])
        if not (problem.finite and (
                len(active) == m or np.isfinite(np.delete(qc_all, active, axis=0)).all())):
            _raise_if_non_finite(q, qc)
        return problem, qc_all
    qc_all = qc.detach().to(torch.float64)  # (m, B, K)
    qc_active = qc_all if len(active) == m else qc_all[
        torch.as_tensor(active, dtype=torch.long, device=qc.device)]
    problem = _DualProblem(q.detach().to(torch.float64), qc_active, kl_bound, thresholds[active])
    return problem, qc_all


def _solve_cvxpy(
    problem: _DualProblem | _HostDualProblem,
    eta_min: float,
    lambda_max: float,
    cvxpy_solver: str,
    solver_options: dict[str, Any],
    dpp: bool | None,
) -> tuple[np.ndarray | None, int, str, str]:
    """Solve with cvxpy; returns (x or None on failure, iterations, backend status, message)."""
    import cvxpy as cp

    if cvxpy_solver.upper() not in cp.installed_solvers():
        raise ValueError(
            f"cvxpy_solver {cvxpy_solver!r} is not installed; installed: {cp.installed_solvers()}"
        )
    model = build_cvxpy_problem(problem.B, problem.K, problem.m)
    q_host, qc_host = problem.host_data()
    model.q.value = q_host
    for k in range(problem.m):
        model.qc[k].value = qc_host[k]
    if problem.m:
        model.thresholds.value = problem.thresholds
    model.kl_bound.value = problem.kl_bound
    model.eta_min.value = eta_min
    model.lambda_max.value = lambda_max
    model.solves += 1
    pairs = problem.B * problem.K
    if dpp is None:
        dpp = pairs <= CVXPY_DPP_MAX_PAIRS
    note = "" if dpp else f"compiled without DPP (B*K = {pairs}); "
    try:
        model.problem.solve(**{"solver": cvxpy_solver, "ignore_dpp": not dpp, **solver_options})
    except (cp.error.SolverError, ArithmeticError, ValueError) as err:
        return None, 0, type(err).__name__, f"{note}cvxpy/{cvxpy_solver} raised {err!r}"
    status = str(model.problem.status)
    stats = model.problem.solver_stats
    iterations = int(stats.num_iters) if stats is not None and stats.num_iters is not None else 0
    if status != cp.OPTIMAL or model.eta.value is None:
        return None, iterations, status, f"{note}cvxpy/{cvxpy_solver} returned status {status!r}"
    lambdas = np.zeros(0) if problem.m == 0 else np.asarray(model.lambdas.value, dtype=np.float64)
    # The interior-point solution may sit a hair outside the box; within
    # _CAP_RTOL of lambda_max it counts as at the cap.
    lambdas = np.where(lambdas >= lambda_max * (1.0 - _CAP_RTOL), lambda_max, lambdas)
    x = np.concatenate([[float(model.eta.value)], lambdas])
    return x, iterations, status, note.rstrip("; ")


def solve_dual(
    q: torch.Tensor,
    qc: torch.Tensor | None,
    kl_bound: float,
    thresholds: Sequence[float] | np.ndarray | torch.Tensor,
    solver: str = "newton",
    *,
    init: EStepResult | tuple[Any, Any] | None = None,
    lambda_max: float = DEFAULT_LAMBDA_MAX,
    eta_min: float = DEFAULT_ETA_MIN,
    max_iter: int = DEFAULT_MAX_ITER,
    tol: float = DEFAULT_TOL,
    cvxpy_solver: str = DEFAULT_CVXPY_SOLVER,
    cvxpy_options: dict[str, Any] | None = None,
    cvxpy_dpp: bool | None = None,
    cpu_threads: int | None = 1,
) -> EStepResult:
    """Solve the E-step dual: minimize g(eta, lambda) and return q = softmax(A / eta).

    Args:
        q: (B, K) reward-critic values Q(s_i, a_ij) (reward units). Any float
            dtype and device; computation is in float64 on that device.
        qc: (m, B, K) cost-critic values (cost units); m may be 0 (or ``None``).
        kl_bound: epsilon, the bound on (1/B) sum_i KL(q_i || pi_old) (nats), > 0.
        thresholds: (m,) per-step thresholds eps_k on Q_c (cost units, see
            ``cvpo.constraints.episodic_to_step_threshold``); ``inf`` marks an
            inactive constraint (its lambda stays 0).
        solver: "newton" (exact projected Newton) or "cvxpy" (exponential-cone
            model; falls back to Newton if the solve fails).
        init: warm start, a previous ``EStepResult`` or a pair (eta, lambdas);
            used by Newton only (Clarabel has no warm start).
        lambda_max: cap on each lambda (reward units per cost unit); a lambda at
            the cap marks the step infeasible.
        eta_min: lower bound on eta (reward units).
        max_iter: maximum Newton steps.
        tol: Newton stops when its predicted decrease of g is below
            ``tol`` times the objective's scale.
        cvxpy_solver: cvxpy solver name (default Clarabel).
        cvxpy_options: extra keyword arguments for ``cp.Problem.solve``.
        cvxpy_dpp: solve the cached model through its DPP parameter map (True),
            or substitute the data and compile it afresh on every solve
            (False, ``ignore_dpp``). None: DPP up to ``CVXPY_DPP_MAX_PAIRS``
            state-action pairs. cvxpy's DPP map for this model grows
            quadratically in B*K (measured: 0.9 GB at B*K = 4096, 2.5 GB at
            8192, killed for lack of memory at 32768 with 23 GB) and is no
            faster than recompiling beyond ~16k pairs.
        cpu_threads: torch intra-op threads while solving on CPU (restored
            afterwards; None keeps the process setting). The solver's tensor
            ops are small and latency-bound, so threads only add OpenMP
            barriers; when other processes (e.g. env runners) load the cores,
            each barrier can wait a scheduler slice (measured on 2 busy cores,
            B=256, K=32: 250 ms per Newton solve with 2 threads, 3 ms with 1).
            CPU problems of up to ``_HOST_MAX_PAIRS`` pairs are solved with
            numpy, single-threaded, and leave the setting alone.

    Returns:
        An ``EStepResult``.

    Raises:
        ValueError: bad shapes, non-finite q / qc (with the count of bad
            entries), kl_bound <= 0, NaN thresholds, bad bounds or solver name.
    """
    start = time.perf_counter()
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    lambda_max = _as_float(lambda_max, "lambda_max")
    eta_min = _as_float(eta_min, "eta_min")
    if not (lambda_max > 0 and math.isfinite(lambda_max)):
        raise ValueError(f"lambda_max must be a finite number > 0, got {lambda_max!r}")
    if not (eta_min > 0 and math.isfinite(eta_min)):
        raise ValueError(f"eta_min must be a finite number > 0, got {eta_min!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}")
    if cpu_threads is not None and (
        isinstance(cpu_threads, bool) or not isinstance(cpu_threads, int) or cpu_threads < 1
    ):
        raise ValueError(f"cpu_threads must be None or an integer >= 1, got {cpu_threads!r}")
    q, qc, kl_bound, thresholds, host = _check_inputs(q, qc, kl_bound, thresholds)
    m = qc.shape[0]
    # The numpy path needs no autograd guard, and its few torch ops run single-threaded
    # whatever the thread setting (see _HOST_MAX_PAIRS).
    threads = cpu_threads if q.device.type == "cpu" and not host else None

    with contextlib.nullcontext() if host else torch.no_grad(), _intra_op_threads(threads):
        # the constraints that enter the program (thresholds are < inf or inf)
        active = [k for k, t in enumerate(thresholds.tolist()) if t < math.inf]
        problem, qc_all = _build_problem(q, qc, kl_bound, thresholds, active, host)
        lower = [eta_min] + [0.0] * len(active)
        upper = [math.inf] + [lambda_max] * len(active)

        used, fallback, message, backend_status = solver, False, "", ""
        final = None
        if solver == "cvxpy":
            x, iterations, backend_status, message = _solve_cvxpy(
                problem, eta_min, lambda_max, cvxpy_solver, dict(cvxpy_options or {}), cvxpy_dpp
            )
            if x is not None:
                x = np.clip(x, lower, upper)
                final, status = problem.evaluate(float(x[0]), x[1:]), STATUS_CONVERGED
            else:
                logger.warning("E-step: %s; falling back to the Newton solver", message)
                used, fallback = "newton", True
        if final is None:
            eta0, lambdas0 = _initial_point(problem, m, kl_bound, init)
            x0 = [eta0, *(0.0 if lambdas0 is None else lambdas0[k] for k in active)]
            final, iterations, status = _solve_newton(problem, x0, lower, upper, max_iter, tol)
            if not fallback:
                backend_status = status

        final_lambdas = list(zip(active, final.lambdas))
        infeasible = tuple(k for k, lam in final_lambdas if lam >= lambda_max)
        if infeasible:
            status = STATUS_INFEASIBLE
        if fallback:
            status = FALLBACK_PREFIX + status

        lambdas = [0.0] * m
        for k, lam in final_lambdas:
            lambdas[k] = lam
        if len(active) == m:  # the evaluation has them all
            expected_costs = final.expected_costs
        else:
            expected_costs = problem.expected_costs(final.weights, qc_all)
        result = EStepResult(
            eta=problem.to_tensor(final.eta, q.dtype),
            lambdas=problem.to_tensor(lambdas, q.dtype),
            weights=problem.weights_as(final.weights, q.dtype),
            objective=float(final.objective),
            iterations=int(iterations),
            solve_time=0.0,
            status=status,
            solver=used,
            fallback=fallback,
            kl=float(final.kl),
            expected_costs=problem.to_tensor(expected_costs, q.dtype),
            infeasible_constraints=infeasible,
            backend_status=backend_status,
            message=message,
        )
    result.solve_time = time.perf_counter() - start
    return result

