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
projected Newton method in float64 on the tensors' device (``_solve_newton``:
Newton steps on the coordinates not held at a bound, projection onto the box,
Armijo backtracking, eta changing by at most 10x per step), and ``"cvxpy"``,
the DPP-parametrized exponential-cone model, cached per (B, K, m).

A constraint with threshold ``inf`` is inactive: its lambda is fixed at 0 and it
does not enter either program.
"""

from __future__ import annotations

import contextlib
import logging
import math
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
        self.objective_offset = offsets[0]  # mean_ij Q
        self.cost_offsets = offsets[1:]  # (m,) mean_ij Qc^k
        self.thresholds_centred = thresholds - self.cost_offsets  # (m,)
        # F = (log(K q), Q~, Qc~^1, ..., Qc~^m); F[0] is rewritten at every evaluation.
        self.features = torch.empty((2 + self.m, self.B, self.K), dtype=q.dtype, device=q.device)
        torch.sub(q, q_row_mean, out=self.features[1])  # (B, K)
        torch.sub(qc, qc_row_mean, out=self.features[2:])  # (m, B, K)
        self.z = torch.empty_like(q)  # (B, K) buffer for A~ / eta

    def evaluate(self, eta: float, lambdas: np.ndarray) -> _Evaluation:
        """g, grad g, Hessian of g and q at (eta, lambdas), with one device-to-host copy.

        Since z_ij - log(K q_ij) = log((1/K) sum_j' exp z_ij') for every j and
        z = A~/eta is linear in (Q~, Qc~),
            eta * (1/B) sum_i log((1/K) sum_j exp z_ij)
                = (1/B) sum_ij q_ij (Q~_ij - lambda . Qc~_ij - eta * log(K q_ij)),
        so every statistic comes from q-weighted sums of F: per-state means (for
        the covariances) and their totals.
        """
        m, F = self.m, self.features
        z = torch.mul(F[1], 1.0 / eta, out=self.z)  # (B, K)  A~ / eta
        for k, lam in enumerate(lambdas.tolist()):
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
        kl = mean_f[0]  # (1/B) sum_i KL(q_i || uniform)
        expected_costs = mean_f[2:] + self.cost_offsets  # (m,) (1/B) sum_i E_q[Qc^k]
        eta_log_partition = mean_f[1] - float(lambdas @ mean_f[2:]) - eta * kl
        centred = eta * self.kl_bound + float(lambdas @ self.thresholds_centred) + eta_log_partition
        objective = self.objective_offset + centred
        gradient = np.concatenate([[self.kl_bound - kl], self.thresholds - expected_costs])
        return _Evaluation(
            eta=eta, lambdas=lambdas, objective=objective, centred=centred, gradient=gradient,
            hessian=hessian, kl=kl, weights=weights,
        )


@dataclass
class _Evaluation:
    eta: float
    lambdas: np.ndarray  # (m,)
    objective: float  # g
    centred: float  # g - mean(Q): g~, free of the (shift-dependent) offset
    gradient: np.ndarray  # (1+m,)
    hessian: np.ndarray  # (1+m, 1+m)
    kl: float
    weights: torch.Tensor  # (B, K) float64


def _newton_direction(gradient: np.ndarray, hessian: np.ndarray, free: np.ndarray,
                      x: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Newton direction d (step x - d) on the free coordinates, 0 on the bound-active ones.

    The reduced Hessian is scaled to unit diagonal (eta and lambda have different
    units) and a tiny ridge keeps it invertible. A free coordinate without
    curvature (its feature has zero variance under q in every state) makes g
    linear along it, so its step goes straight to the bound the gradient points at.
    """
    direction = np.zeros_like(gradient)
    diag = hessian.diagonal()
    curved = free & (diag > 0)
    if not curved.all():
        flat = free & ~curved
        direction[flat] = np.where(gradient[flat] > 0, x[flat] - lower[flat],
                                   x[flat] - upper[flat])
        direction[~np.isfinite(direction)] = 0.0  # no finite bound in the descent direction
    idx = np.flatnonzero(curved)
    if idx.size:
        scale = 1.0 / np.sqrt(diag[idx])
        scaled = hessian[idx[:, None], idx] * np.outer(scale, scale)
        scaled.flat[:: idx.size + 1] += 1e-12
        direction[idx] = scale * np.linalg.solve(scaled, scale * gradient[idx])
    return direction


def _solve_newton(
    problem: _DualProblem,
    x0: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
    max_iter: int,
    tol: float,
) -> tuple[_Evaluation, int, str]:
    """Projected Newton (after Bertsekas 1982) with an Armijo search along the projection arc.

    Returns the final evaluation, the number of Newton steps and
    STATUS_CONVERGED or STATUS_MAX_ITER.
    """
    x = np.clip(x0, lower, upper)
    current = problem.evaluate(x[0], x[1:])
    for iteration in range(max_iter):
        gradient = current.gradient
        # Coordinates held at a bound that the gradient pushes outward stay fixed.
        blocked = ((x <= lower) & (gradient > 0)) | ((x >= upper) & (gradient < 0))
        free = ~blocked
        direction = _newton_direction(gradient, current.hessian, free, x, lower, upper)
        decrement = float(gradient @ direction)  # Newton decrement^2 = 2 * predicted decrease
        # the scale of g~ = g - mean(Q), what a step can change (shift-invariant)
        scale = (abs(current.centred) + x[0] * problem.kl_bound
                 + abs(x[1:] @ problem.thresholds_centred))
        if decrement <= 2.0 * tol * scale or not direction.any():
            return current, iteration, STATUS_CONVERGED

        step = 1.0
        if current.hessian[0, 0] > 0 and direction[0] != 0.0:
            eta_next = x[0] - direction[0]
            if eta_next < x[0] / _ETA_STEP_RATIO and x[0] / _ETA_STEP_RATIO > lower[0]:
                step = (x[0] - x[0] / _ETA_STEP_RATIO) / direction[0]
            elif eta_next > x[0] * _ETA_STEP_RATIO:
                step = (x[0] - x[0] * _ETA_STEP_RATIO) / direction[0]

        roundoff = 1e-15 * scale
        while True:
            x_next = np.clip(x - step * direction, lower, upper)
            trial = problem.evaluate(x_next[0], x_next[1:])
            if trial.centred <= current.centred + _ARMIJO * gradient @ (x_next - x) + roundoff:
                break
            step *= 0.5
            if step < _MIN_STEP:
                # No decrease is representable: the iterate is optimal to round-off.
                return current, iteration, (
                    STATUS_CONVERGED if decrement <= 1e-8 * scale else STATUS_MAX_ITER
                )
        x, current = x_next, trial
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
        value = value.detach().cpu().double().numpy()
    try:
        return np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a sequence of real numbers, got {value!r}") from err


def _count_non_finite(tensor: torch.Tensor) -> int:
    return int((~torch.isfinite(tensor)).sum().item())


@contextlib.contextmanager
def _intra_op_threads(threads: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (process-wide)."""
    if threads is None or threads == torch.get_num_threads():
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _check_inputs(
    q: Any, qc: Any, kl_bound: Any, thresholds: Any
) -> tuple[torch.Tensor, torch.Tensor, float, np.ndarray]:
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
    for name, tensor in (("q", q), ("qc", qc)):
        bad = _count_non_finite(tensor)
        if bad:
            raise ValueError(
                f"{name} has {bad} non-finite entries (NaN or inf) out of {tensor.numel()}; "
                "check the critics' outputs"
            )
    kl_bound = _as_float(kl_bound, "kl_bound")
    if not (kl_bound > 0 and math.isfinite(kl_bound)):
        raise ValueError(f"kl_bound must be a finite number > 0 (nats), got {kl_bound!r}")
    thresholds = _as_host_vector(thresholds, "thresholds")
    if thresholds.shape[0] != qc.shape[0]:
        raise ValueError(
            f"thresholds must have one entry per cost critic (m = {qc.shape[0]}), "
            f"got {thresholds.shape[0]}"
        )
    if np.isnan(thresholds).any() or (thresholds == -np.inf).any():
        raise ValueError(
            f"thresholds must be real numbers or +inf (inactive constraint), got {thresholds}"
        )
    return q, qc, kl_bound, thresholds


def _initial_point(
    q: torch.Tensor,
    m: int,
    kl_bound: float,
    init: EStepResult | tuple[Any, Any] | None,
) -> tuple[float, np.ndarray | None]:
    """eta0, lambda0 (None: zeros). Without a warm start, eta0 matches the KL bound
    to second order at lambda = 0: KL ~= Var_uniform(Q) / (2 eta^2)."""
    if init is None:
        variance = float(q.var(dim=1, unbiased=False).mean().item())
        return math.sqrt(variance / (2.0 * kl_bound)), None
    if isinstance(init, EStepResult):
        eta, lambdas = init.eta, init.lambdas
    else:
        try:
            eta, lambdas = init
        except (TypeError, ValueError) as err:
            raise TypeError("init must be an EStepResult or a pair (eta, lambdas)") from err
    eta = _as_float(eta, "init eta")
    lambdas = _as_host_vector(lambdas, "init lambdas")
    if lambdas.shape[0] != m:
        raise ValueError(f"init lambdas must have m = {m} entries, got {lambdas.shape[0]}")
    if not (math.isfinite(eta) and np.isfinite(lambdas).all()):
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
    q, qc, kl_bound, thresholds = _check_inputs(q, qc, kl_bound, thresholds)
    lambdas = _as_host_vector(lambdas, "lambdas")
    active = np.isfinite(thresholds)
    if (lambdas[~active] != 0).any():
        raise ValueError("lambdas of inactive constraints (threshold inf) must be 0")
    with torch.no_grad():
        qc_active = qc[torch.as_tensor(np.flatnonzero(active), device=qc.device, dtype=torch.long)]
        problem = _DualProblem(q.double(), qc_active.double(), kl_bound, thresholds[active])
        return problem.evaluate(float(eta), lambdas[active]).objective


def _solve_cvxpy(
    problem: _DualProblem,
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
    model.q.value = problem.q.cpu().numpy()
    for k in range(problem.m):
        model.qc[k].value = problem.qc[k].cpu().numpy()
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
    q, qc, kl_bound, thresholds = _check_inputs(q, qc, kl_bound, thresholds)
    m = qc.shape[0]

    with torch.no_grad(), _intra_op_threads(cpu_threads if q.device.type == "cpu" else None):
        active = np.flatnonzero(np.isfinite(thresholds))  # constraints that enter the program
        qc_active = qc if len(active) == m else qc[torch.as_tensor(active, device=qc.device)]
        problem = _DualProblem(
            q.detach().to(torch.float64), qc_active.detach().to(torch.float64),
            kl_bound, thresholds[active],
        )
        lower = np.concatenate([[eta_min], np.zeros(len(active))])
        upper = np.concatenate([[np.inf], np.full(len(active), lambda_max)])

        used, fallback, message, backend_status = solver, False, "", ""
        final = None
        if solver == "cvxpy":
            x, iterations, backend_status, message = _solve_cvxpy(
                problem, eta_min, lambda_max, cvxpy_solver, dict(cvxpy_options or {}), cvxpy_dpp
            )
            if x is not None:
                x = np.clip(x, lower, upper)
                final, status = problem.evaluate(x[0], x[1:]), STATUS_CONVERGED
            else:
                logger.warning("E-step: %s; falling back to the Newton solver", message)
                used, fallback = "newton", True
        if final is None:
            eta0, lambdas0 = _initial_point(problem.q, m, kl_bound, init)
            x0 = np.concatenate([[eta0], np.zeros(len(active)) if lambdas0 is None
                                 else lambdas0[active]])
            final, iterations, status = _solve_newton(problem, x0, lower, upper, max_iter, tol)
            if not fallback:
                backend_status = status

        infeasible = tuple(int(active[k]) for k in np.flatnonzero(final.lambdas >= lambda_max))
        if infeasible:
            status = STATUS_INFEASIBLE
        if fallback:
            status = FALLBACK_PREFIX + status

        lambdas = np.zeros(m)
        lambdas[active] = final.lambdas
        expected_costs = torch.einsum("bk,mbk->m", final.weights, qc.to(torch.float64)) / q.shape[0]
        result = EStepResult(
            eta=torch.tensor(final.eta, dtype=q.dtype, device=q.device),
            lambdas=torch.tensor(lambdas, dtype=q.dtype, device=q.device),
            weights=final.weights.to(q.dtype),
            objective=float(final.objective),
            iterations=int(iterations),
            solve_time=0.0,
            status=status,
            solver=used,
            fallback=fallback,
            kl=float(final.kl),
            expected_costs=expected_costs.to(q.dtype),
            infeasible_constraints=infeasible,
            backend_status=backend_status,
            message=message,
        )
    result.solve_time = time.perf_counter() - start
    return result

