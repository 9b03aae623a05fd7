"""The CVPO E-step: the convex dual of the non-parametric policy improvement.

The math is in docs/algorithm.md, section "E-step". For B states with K actions each
sampled from pi_old, reward-critic values Q (B, K) and cost-critic values Qc (m, B, K):

    A_ij        = Q_ij - sum_k lambda_k Qc^k_ij                                   # (B, K)
    g(eta, lam) = eta epsilon + sum_k lambda_k eps_k
                  + eta (1/B) sum_i log((1/K) sum_j exp(A_ij / eta))             # dual_g
    q_ij        = softmax_j(A_ij / eta)                                # variational_weights
    minimize g over eta >= eta_min, 0 <= lambda_k <= lambda_max                # solve_dual

``DualProblem`` evaluates g, its gradient and Hessian in float64 on the data's device,
``_solve_newton`` minimizes g by projected Newton, and ``solve_dual`` checks the
arguments, solves and returns an ``EStepResult``. CPU problems of up to
``estep_fast.HOST_MAX_PAIRS`` pairs (the learner's) are evaluated with numpy instead
(``cvpo.estep_fast``); ``solver="cvxpy"`` solves the exponential-cone model of
``cvpo.estep_cvxpy``. A constraint with threshold ``inf`` is inactive: its lambda is 0
and it enters neither program.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cvpo import estep_fast
from cvpo.defaults import ESTEP_LAMBDA_MAX, ESTEP_SOLVERS
from cvpo.estep_cvxpy import (
    CVXPY_DPP_MAX_PAIRS,
    DEFAULT_CVXPY_SOLVER,
    CvxpyDualProblem,
    build_cvxpy_problem,
    clear_cvxpy_cache,
    solve_cvxpy,
)
from cvpo.estep_data import (
    CentredDual,
    DualEvaluation,
    as_host_vector,
    check_data,
    check_options,
    dot,
    host_array,
    intra_op_threads,
    raise_if_non_finite,
    solve_small,
    warm_start,
)

__all__ = [
    "CVXPY_DPP_MAX_PAIRS",
    "DEFAULT_CVXPY_SOLVER",
    "DEFAULT_ETA_MIN",
    "DEFAULT_LAMBDA_MAX",
    "DEFAULT_MAX_ITER",
    "DEFAULT_TOL",
    "FALLBACK_PREFIX",
    "SOLVERS",
    "STATUS_CONVERGED",
    "STATUS_INFEASIBLE",
    "STATUS_MAX_ITER",
    "CvxpyDualProblem",
    "DualProblem",
    "EStepResult",
    "build_cvxpy_problem",
    "clear_cvxpy_cache",
    "dual_g",
    "dual_objective",
    "solve_dual",
    "variational_weights",
]

logger = logging.getLogger(__name__)

STATUS_CONVERGED = "converged"
STATUS_MAX_ITER = "max_iter"
STATUS_INFEASIBLE = "infeasible"
FALLBACK_PREFIX = "fallback_newton:"
SOLVERS = ESTEP_SOLVERS
# lambda is in reward units per cost unit; 1e3 lets one unit of cost outweigh 1000 units
# of reward before the step is declared infeasible.
DEFAULT_LAMBDA_MAX = ESTEP_LAMBDA_MAX
# eta is a temperature in reward units; it only reaches this bound when the sampled
# actions' values are (nearly) identical in every state.
DEFAULT_ETA_MIN = 1e-6
DEFAULT_MAX_ITER = 50
# Newton stops when its predicted decrease of g is below DEFAULT_TOL relative to the
# objective's scale (well above float64 round-off, well below any use).
DEFAULT_TOL = 1e-14
# Line search: sufficient-decrease constant, and the largest factor by which eta may
# shrink or grow in one step (where the perspective's quadratic model is trustworthy).
_ARMIJO = 1e-4
_ETA_STEP_RATIO = 10.0
_MIN_STEP = 1e-12


@dataclass
class EStepResult:
    """Solution of the E-step dual.

    Attributes:
        eta: () temperature of the KL constraint (reward units), q's device and dtype.
        lambdas: (m,) cost multipliers (reward units per cost unit); 0 for inactive
            constraints (threshold ``inf``).
        weights: (B, K) the variational distribution q, each row a softmax of A / eta.
        objective: the dual value g(eta, lambdas), evaluated in float64 (reward units).
        iterations: Newton steps taken, or the cvxpy backend's iteration count.
        solve_time: wall-clock seconds for the whole call (validation included).
        status: ``STATUS_CONVERGED``, ``STATUS_MAX_ITER``, ``STATUS_INFEASIBLE`` (some
            lambda at ``lambda_max``), or ``"fallback_newton:<status>"`` when a failed
            cvxpy solve was replaced by Newton.
        solver: the solver that produced the result ("newton" or "cvxpy").
        fallback: True when cvxpy was asked for and failed.
        kl: (1/B) sum_i KL(q_i || uniform over the K samples) (nats).
        expected_costs: (m,) (1/B) sum_i E_{q_i}[Qc^k] (cost units), q's dtype.
        infeasible_constraints: indices k whose lambda is at ``lambda_max``.
        backend_status: the backend's raw status (cvxpy's ``problem.status`` or an
            exception name; for Newton the same as ``status``).
        message: details (why a fallback happened, that cvxpy compiled without DPP), or "".
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


def dual_g(
    q: torch.Tensor,
    qc: torch.Tensor,
    kl_bound: float,
    thresholds: torch.Tensor,
    eta: torch.Tensor | float,
    lambdas: torch.Tensor,
) -> torch.Tensor:
    """g(eta, lambdas) as written above, for tensors (autograd-able; no checks).

    Shapes: q (B, K), qc (m, B, K), thresholds and lambdas (m,) of active constraints.
    """
    advantage = q - torch.einsum("m,mbk->bk", lambdas, qc)  # A (B, K)
    log_mean_exp = torch.logsumexp(advantage / eta, dim=1) - math.log(q.shape[1])  # (B,)
    return eta * kl_bound + lambdas @ thresholds + eta * log_mean_exp.mean()


def variational_weights(
    q: torch.Tensor, qc: torch.Tensor, eta: torch.Tensor | float, lambdas: torch.Tensor
) -> torch.Tensor:
    """q_ij = softmax_j(A_ij / eta), (B, K): the E-step's non-parametric policy."""
    return torch.softmax((q - torch.einsum("m,mbk->bk", lambdas, qc)) / eta, dim=1)


def dual_objective(
    q: torch.Tensor,
    qc: torch.Tensor | None,
    kl_bound: float,
    thresholds: Any,
    eta: float,
    lambdas: Any,
) -> float:
    """``dual_g`` in float64 with ``solve_dual``'s argument checks; thresholds (m,) may be
    ``inf`` (inactive) where lambdas (m,) is 0."""
    q, qc, kl_bound, thresholds = check_data(q, qc, kl_bound, thresholds, check_finite=True)
    lambdas = as_host_vector(lambdas, "lambdas")
    active = np.isfinite(thresholds)
    if (lambdas[~active] != 0).any():
        raise ValueError("lambdas of inactive constraints (threshold inf) must be 0")
    index = torch.as_tensor(np.flatnonzero(active), device=q.device)
    as64 = dict(dtype=torch.float64, device=q.device)
    with torch.no_grad():
        return float(
            dual_g(
                q.to(torch.float64),
                qc[index].to(torch.float64),
                kl_bound,
                torch.as_tensor(thresholds[active], **as64),
                float(eta),
                torch.as_tensor(lambdas[active], **as64),
            )
        )


class DualProblem(CentredDual):
    """g, its gradient and Hessian, and q, for fixed data, in float64 on the data's device.

    Per state, g's log-partition term is the perspective eta f(A_i / eta) of
    f(z) = log((1/K) sum_j exp z_j), whose derivatives are moments under q_i:
        dg/deta      = epsilon - (1/B) sum_i KL(q_i || uniform)
        dg/dlambda_k = eps_k   - (1/B) sum_i E_{q_i}[Qc^k]
        Hessian      = (1/eta) (1/B) sum_i Cov_{q_i}(log(K q_i), Qc^1_i, ..., Qc^m_i)
    (log(K q_i) and A_i / eta differ by a per-state constant, so they have the same
    covariances, and KL(q_i || uniform) = E_{q_i}[log(K q_i)] with no cancellation).
    The data are centred per state (``CentredDual``), the features F = (log(K q), Qc~, Q~)
    laid out (K, B) as in ``estep_fast.HostDualProblem``, which computes the same in numpy.
    q (B, K) and qc (m, B, K): float64 tensors of the active constraints; thresholds (m,).
    """

    def __init__(
        self, q: torch.Tensor, qc: torch.Tensor, kl_bound: float, thresholds: np.ndarray
    ) -> None:
        (B, K), m = q.shape, qc.shape[0]
        self.q, self.qc = q, qc  # uncentred (for cvxpy)
        F = self.features = torch.empty((m + 2, K, B), dtype=q.dtype, device=q.device)
        F[1 : m + 1], F[m + 1] = qc.transpose(1, 2), q.T
        row_means = F[1:].mean(dim=1, keepdim=True)  # (1+m, 1, B)  mean_j
        super().__init__(B, K, kl_bound, thresholds, row_means.mean(dim=(1, 2)).tolist())
        F[1:] -= row_means

    def evaluate(
        self, eta: float, lambdas: Sequence[float], reuse: DualEvaluation | None = None
    ) -> DualEvaluation:
        """g, grad g, Hessian of g and q (K, B) at (eta, lambdas), with one host copy."""
        lams, h, F = [float(v) for v in lambdas], self.m + 1, self.features
        z = F[h] / eta  # (K, B)  A~ / eta
        for k, lam in enumerate(lams):
            if lam != 0.0:
                z.sub_(F[1 + k], alpha=lam / eta)
        torch.log_softmax(z, dim=0, out=F[0])  # log q
        weights = F[0].exp()  # q
        F[0] += self.log_k  # log(K q)
        weighted = F * weights  # (h+1, K, B)
        means = weighted.sum(dim=1)  # (h+1, B)  E_{q_i}[F]
        # sum_i Cov_{q_i}(F_a, F_b) = sum_i E_{q_i}[F_a F_b] - sum_i E_{q_i}[F_a] E_{q_i}[F_b]
        covariance = (
            weighted[:h].reshape(h, -1) @ F[:h].reshape(h, -1).T - means[:h] @ means[:h].T
        )  # (h, h)
        host = torch.cat([means.sum(dim=1), covariance.reshape(-1)]).tolist()
        rows = [host[h + 1 + a * h : h + 1 + (a + 1) * h] for a in range(h)]
        return self.evaluation(eta, lams, host[: h + 1], rows, weights)

    def host_data(self) -> tuple[np.ndarray, np.ndarray]:
        """(Q (B, K), Qc (m, B, K)) as float64 host arrays (for cvxpy)."""
        return self.q.cpu().numpy(), self.qc.cpu().numpy()

    def mean_row_variance(self) -> float:
        """(1/B) sum_i Var_uniform(Q_i) (for the cold-start eta)."""
        return float(self.features[self.m + 1].square().mean())

    def weights_as(self, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """An evaluation's (K, B) weights as a contiguous (B, K) tensor of ``dtype``."""
        return weights.T.to(dtype=dtype, memory_format=torch.contiguous_format)

    def expected_costs(self, weights: torch.Tensor, qc_all: torch.Tensor) -> torch.Tensor:
        """(m,) (1/B) sum_i E_{q_i}[Qc^k] for all m constraints (qc_all (m, B, K) float64)."""
        return torch.einsum("kb,mbk->m", weights, qc_all) / self.B

    def to_tensor(self, value: Any, dtype: torch.dtype) -> torch.Tensor:
        """A host scalar or vector (or a tensor) as a tensor of ``dtype`` on q's device."""
        if isinstance(value, torch.Tensor):
            return value.to(dtype)
        return torch.tensor(value, dtype=dtype, device=self.q.device)


def _newton_direction(
    gradient: list[float],
    hessian: list[list[float]],
    free: list[bool],
    x: list[float],
    lower: list[float],
    upper: list[float],
) -> list[float]:
    """Newton direction d (step x - d) on the free coordinates, 0 on the bound-active ones.

    The reduced Hessian is scaled to unit diagonal (eta and lambda have different units)
    plus a tiny ridge. A free coordinate without curvature (its feature has zero variance
    under q in every state) makes g linear along it: its step goes to the bound the
    gradient points at, or for eta (no upper bound; flat where q is one-hot everywhere,
    e.g. after a warm start from a collapsed eta) grows it by the step-ratio cap.
    """
    direction = [0.0] * len(gradient)
    curved = [i for i, is_free in enumerate(free) if is_free and hessian[i][i] > 0]
    for i in (i for i, is_free in enumerate(free) if is_free and not hessian[i][i] > 0):
        step = x[i] - lower[i] if gradient[i] > 0 else x[i] - upper[i]
        if not math.isfinite(step):
            step = x[i] * (1.0 - _ETA_STEP_RATIO) if x[i] > 0 else 0.0
        direction[i] = step
    if curved:
        scale = [1.0 / math.sqrt(hessian[i][i]) for i in curved]
        scaled = [
            [
                hessian[i][j] * s_i * s_j + (1e-12 if i == j else 0.0)
                for j, s_j in zip(curved, scale)
            ]
            for i, s_i in zip(curved, scale)
        ]
        rhs = [s * gradient[i] for i, s in zip(curved, scale)]
        for i, s, v in zip(curved, scale, solve_small(scaled, rhs)):
            direction[i] = s * v
    return direction


def _solve_newton(
    problem: DualProblem | estep_fast.HostDualProblem,
    x0: Sequence[float],
    lower: list[float],
    upper: list[float],
    max_iter: int,
    tol: float,
) -> tuple[DualEvaluation, int, str]:
    """Projected Newton (after Bertsekas 1982) with an Armijo search along the projection
    arc; returns the final evaluation, the Newton steps taken and the status."""
    bounds = list(zip(lower, upper))
    x = [min(max(float(v), lo), up) for v, (lo, up) in zip(x0, bounds)]
    current, spare = problem.evaluate(x[0], x[1:]), None  # spare: memory to reuse
    for iteration in range(max_iter):
        gradient = current.gradient
        # coordinates held at a bound that the gradient pushes outward stay fixed
        free = [
            not ((v <= lo and g > 0) or (v >= up and g < 0))
            for v, g, (lo, up) in zip(x, gradient, bounds)
        ]
        direction = _newton_direction(gradient, current.hessian, free, x, lower, upper)
        decrement = dot(gradient, direction)  # Newton decrement^2 = 2 * predicted decrease
        # the scale of g~ = g - mean(Q), what a step can change (shift-invariant)
        eta = x[0]
        scale = (
            abs(current.centred)
            + eta * problem.kl_bound
            + abs(dot(x[1:], problem.thresholds_centred))
        )
        if decrement <= 2.0 * tol * scale or not any(direction):
            return current, iteration, STATUS_CONVERGED
        step, eta_direction = 1.0, direction[0]  # eta changes by at most _ETA_STEP_RATIO
        if current.hessian[0][0] > 0 and eta_direction != 0.0:
            if eta - eta_direction < eta / _ETA_STEP_RATIO and eta / _ETA_STEP_RATIO > lower[0]:
                step = (eta - eta / _ETA_STEP_RATIO) / eta_direction
            elif eta - eta_direction > eta * _ETA_STEP_RATIO:
                step = (eta - eta * _ETA_STEP_RATIO) / eta_direction
        roundoff, sufficient = 1e-15 * scale, [_ARMIJO * g for g in gradient]
        while True:
            x_next = [
                min(max(v - step * d, lo), up) for v, d, (lo, up) in zip(x, direction, bounds)
            ]
            trial = problem.evaluate(x_next[0], x_next[1:], reuse=spare)
            predicted = dot(sufficient, [a - b for a, b in zip(x_next, x)])
            if trial.centred <= current.centred + predicted + roundoff:
                break
            spare, step = trial, step * 0.5
            if step < _MIN_STEP:  # no decrease is representable: optimal to round-off
                status = STATUS_CONVERGED if decrement <= 1e-8 * scale else STATUS_MAX_ITER
                return current, iteration, status
        x, current, spare = x_next, trial, current
    return current, max_iter, STATUS_MAX_ITER


def _build_problem(
    q: torch.Tensor, qc: torch.Tensor, kl_bound: float, thresholds: np.ndarray, active: list[int]
) -> tuple[DualProblem | estep_fast.HostDualProblem, Any]:
    """The dual over the ``active`` constraints (numpy for small CPU data, else torch), and
    all m of qc for its ``expected_costs`` (a host array, or a float64 tensor)."""
    m = qc.shape[0]
    if estep_fast.use_host(q):
        qc_all = host_array(qc)  # (m, B, K), a view of qc's data
        problem = estep_fast.HostDualProblem(
            host_array(q),
            qc_all if len(active) == m else qc_all[active],
            kl_bound,
            thresholds[active],
        )
        if not (
            problem.finite
            and (len(active) == m or np.isfinite(np.delete(qc_all, active, axis=0)).all())
        ):
            raise_if_non_finite(q, qc)
        return problem, qc_all
    qc_all = qc.detach().to(torch.float64)  # (m, B, K)
    qc_active = (
        qc_all
        if len(active) == m
        else qc_all[torch.as_tensor(active, dtype=torch.long, device=qc.device)]
    )
    return DualProblem(
        q.detach().to(torch.float64), qc_active, kl_bound, thresholds[active]
    ), qc_all


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
        q: (B, K) reward-critic values Q(s_i, a_ij) (reward units); any float dtype and
            device (computation in float64 on that device).
        qc: (m, B, K) cost-critic values (cost units); m may be 0 (or ``None``).
        kl_bound: epsilon, the bound on (1/B) sum_i KL(q_i || pi_old) (nats), > 0.
        thresholds: (m,) per-step thresholds eps_k on Q_c (cost units, see
            ``cvpo.constraints.episodic_to_step_threshold``); ``inf``: inactive.
        solver: "newton" (exact projected Newton) or "cvxpy" (the exponential-cone model
            of ``cvpo.estep_cvxpy``; falls back to Newton if the solve fails).
        init: warm start for Newton, a previous ``EStepResult`` or a pair (eta, lambdas).
        lambda_max: cap on each lambda; a lambda at the cap marks the step infeasible.
        eta_min: lower bound on eta (reward units).
        max_iter, tol: Newton's step limit, and its stop when the predicted decrease of g
            is below ``tol`` times the objective's scale.
        cvxpy_solver, cvxpy_options, cvxpy_dpp: see ``estep_cvxpy.solve_cvxpy``.
        cpu_threads: torch intra-op threads while the torch evaluator runs on CPU
            (restored afterwards; None keeps the process setting). Its ops are small and
            latency-bound, so threads only add OpenMP barriers, which on busy cores can
            each wait a scheduler slice (measured on 2 busy cores, B=256, K=32: 250 ms per
            solve with 2 threads, 3 ms with 1). The numpy path leaves the setting alone.

    Raises:
        ValueError: bad shapes, non-finite q / qc (with the count of bad entries),
            kl_bound <= 0, NaN thresholds, bad bounds or solver name.
    """
    start = time.perf_counter()
    lambda_max, eta_min = check_options(
        solver, SOLVERS, lambda_max, eta_min, max_iter, tol, cpu_threads
    )
    q, qc, kl_bound, thresholds = check_data(q, qc, kl_bound, thresholds, check_finite=False)
    m, host = qc.shape[0], estep_fast.use_host(q)
    if not host:  # host problems are checked while their data are converted
        raise_if_non_finite(q, qc)
    threads = cpu_threads if q.device.type == "cpu" and not host else None
    with contextlib.nullcontext() if host else torch.no_grad(), intra_op_threads(threads):
        active = [k for k, t in enumerate(thresholds.tolist()) if t < math.inf]
        problem, qc_all = _build_problem(q, qc, kl_bound, thresholds, active)
        lower, upper = [eta_min] + [0.0] * len(active), [math.inf] + [lambda_max] * len(active)
        used, fallback, message, backend_status, final = solver, False, "", "", None
        if solver == "cvxpy":
            x, iterations, backend_status, message = solve_cvxpy(
                *problem.host_data(),
                kl_bound,
                problem.thresholds,
                eta_min,
                lambda_max,
                cvxpy_solver,
                cvxpy_options,
                cvxpy_dpp,
            )
            if x is not None:
                x = np.clip(x, lower, upper)
                final, status = problem.evaluate(float(x[0]), x[1:]), STATUS_CONVERGED
            else:
                logger.warning("E-step: %s; falling back to the Newton solver", message)
                used, fallback = "newton", True
        if final is None:
            if init is None:  # eta0 meets the KL bound to second order: KL ~ Var(Q) / 2 eta^2
                eta0 = math.sqrt(problem.mean_row_variance() / (2.0 * kl_bound))
                x0 = [eta0] + [0.0] * len(active)
            else:
                eta0, lambdas0 = warm_start(init, m)
                x0 = [eta0, *(lambdas0[k] for k in active)]
            final, iterations, status = _solve_newton(problem, x0, lower, upper, max_iter, tol)
            backend_status = backend_status if fallback else status
        infeasible = tuple(k for k, lam in zip(active, final.lambdas) if lam >= lambda_max)
        status = STATUS_INFEASIBLE if infeasible else status
        lambdas = [0.0] * m
        for k, lam in zip(active, final.lambdas):
            lambdas[k] = lam
        expected_costs = (
            final.expected_costs
            if len(active) == m
            else problem.expected_costs(final.weights, qc_all)
        )
        result = EStepResult(
            eta=problem.to_tensor(final.eta, q.dtype),
            lambdas=problem.to_tensor(lambdas, q.dtype),
            weights=problem.weights_as(final.weights, q.dtype),
            objective=float(final.objective),
            iterations=int(iterations),
            solve_time=0.0,
            status=FALLBACK_PREFIX + status if fallback else status,
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
