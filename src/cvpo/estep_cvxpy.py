"""The E-step dual as a cvxpy exponential-cone program: the reference model.

The math is in docs/algorithm.md, section "E-step". ``build_cvxpy_problem`` writes the
dual g(eta, lambda) of ``cvpo.estep`` as a disciplined convex program with the data as
``cp.Parameter``s (DPP), cached per (B, K, m); ``solve_cvxpy`` solves it for one
problem (``solve_dual(..., solver="cvxpy")`` calls it and falls back to Newton when it
fails). cvxpy is imported only when a model is built or solved.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_CVXPY_SOLVER = "CLARABEL"
# Largest B*K solved through cvxpy's DPP parameter map by default (see solve_cvxpy).
CVXPY_DPP_MAX_PAIRS = 8192
# A cvxpy lambda this close to lambda_max (relative) counts as at the cap.
_CAP_RTOL = 1e-5


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
        B=key[0],
        K=key[1],
        m=key[2],
        problem=problem,
        q=q,
        qc=qc,
        kl_bound=kl_bound,
        thresholds=thresholds,
        eta_min=eta_min,
        lambda_max=lambda_max,
        eta=eta,
        lambdas=lambdas,
        build_time=time.perf_counter() - start,
    )
    _CVXPY_CACHE[key] = entry
    return entry


def clear_cvxpy_cache() -> None:
    """Drop every cached cvxpy model (they hold B*K exponential cones each)."""
    _CVXPY_CACHE.clear()


def set_data(
    model: CvxpyDualProblem,
    q: np.ndarray,
    qc: np.ndarray,
    kl_bound: float,
    thresholds: np.ndarray,
    eta_min: float,
    lambda_max: float,
) -> None:
    """Put one problem's data (q (B, K), qc (m, B, K) float64 arrays) into the model."""
    model.q.value = q
    for k in range(model.m):
        model.qc[k].value = qc[k]
    if model.m:
        model.thresholds.value = thresholds
    model.kl_bound.value = kl_bound
    model.eta_min.value = eta_min
    model.lambda_max.value = lambda_max


def solve_cvxpy(
    q: np.ndarray,
    qc: np.ndarray,
    kl_bound: float,
    thresholds: np.ndarray,
    eta_min: float,
    lambda_max: float,
    cvxpy_solver: str = DEFAULT_CVXPY_SOLVER,
    solver_options: dict[str, Any] | None = None,
    dpp: bool | None = None,
) -> tuple[np.ndarray | None, int, str, str]:
    """Minimize g with cvxpy over the active constraints' data (float64 host arrays).

    Args:
        q: (B, K) reward-critic values; qc: (m, B, K) cost-critic values.
        kl_bound, thresholds: epsilon and the (m,) eps_k (all finite).
        eta_min, lambda_max: the bounds of the box.
        cvxpy_solver: cvxpy solver name; solver_options: extra ``cp.Problem.solve``
            arguments.
        dpp: solve through the cached model's DPP parameter map (True) or compile it
            afresh (False, ``ignore_dpp``); None: DPP up to ``CVXPY_DPP_MAX_PAIRS`` pairs
            (cvxpy's DPP map for this model grows quadratically in B*K: 0.9 GB at
            B*K = 4096, 2.5 GB at 8192, and is no faster than recompiling beyond ~16k).

    Returns:
        (x = (eta, lambda_1, ..., lambda_m), or None on failure; the backend's
        iterations; its status or the exception's name; a message, else "").

    Raises:
        ValueError: ``cvxpy_solver`` is not installed.
    """
    import cvxpy as cp

    if cvxpy_solver.upper() not in cp.installed_solvers():
        raise ValueError(
            f"cvxpy_solver {cvxpy_solver!r} is not installed; installed: {cp.installed_solvers()}"
        )
    B, K = q.shape
    model = build_cvxpy_problem(B, K, qc.shape[0])
    set_data(model, q, qc, kl_bound, thresholds, eta_min, lambda_max)
    model.solves += 1
    if dpp is None:
        dpp = B * K <= CVXPY_DPP_MAX_PAIRS
    note = "" if dpp else f"compiled without DPP (B*K = {B * K}); "
    try:
        model.problem.solve(
            **{"solver": cvxpy_solver, "ignore_dpp": not dpp, **(solver_options or {})}
        )
    except (cp.error.SolverError, ArithmeticError, ValueError) as err:
        return None, 0, type(err).__name__, f"{note}cvxpy/{cvxpy_solver} raised {err!r}"
    status = str(model.problem.status)
    stats = model.problem.solver_stats
    iterations = int(stats.num_iters) if stats is not None and stats.num_iters is not None else 0
    if status != cp.OPTIMAL or model.eta.value is None:
        return None, iterations, status, f"{note}cvxpy/{cvxpy_solver} returned status {status!r}"
    lambdas = np.zeros(0) if model.m == 0 else np.asarray(model.lambdas.value, dtype=np.float64)
    # The interior-point solution may sit a hair outside the box; within
    # _CAP_RTOL of lambda_max it counts as at the cap.
    lambdas = np.where(lambdas >= lambda_max * (1.0 - _CAP_RTOL), lambda_max, lambdas)
    x = np.concatenate([[float(model.eta.value)], lambdas])
    return x, iterations, status, note.rstrip("; ")
