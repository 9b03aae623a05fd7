"""Plumbing of the E-step (``cvpo.estep``): argument checks, torch <-> numpy, moments -> g.

The math is in docs/algorithm.md, section "E-step". This module holds what the two
evaluators of the dual (torch in ``cvpo.estep``, numpy in ``cvpo.estep_fast``) share:
the constants of a centred problem and the step from their q-weighted moments to g, its
gradient and Hessian (``CentredDual``), the record an evaluation returns
(``DualEvaluation``), the Newton step's small linear solve (``solve_small``), and the
validation and conversion of ``solve_dual``'s arguments.
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# torch dtypes that numpy holds exactly (bfloat16 is converted through torch).
HOST_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}


def dot(a: Sequence[float], b: Sequence[float]) -> float:
    """sum_k a_k b_k in Python floats (for the (m,) vectors: cheaper than a numpy call)."""
    return sum(map(operator.mul, a, b))


@dataclass
class DualEvaluation:
    """g and its derivatives at one point (eta, lambdas) of the active constraints."""

    eta: float
    lambdas: list[float]  # (m,)
    objective: float  # g
    centred: float  # g - mean(Q): free of the (shift-dependent) offset
    gradient: list[float]  # (1+m,)
    hessian: list[list[float]]  # (1+m, 1+m)
    kl: float  # (1/B) sum_i KL(q_i || uniform)
    expected_costs: list[float]  # (m,) (1/B) sum_i E_{q_i}[Qc^k]
    weights: torch.Tensor | np.ndarray  # q, stored (K, B)


class CentredDual:
    """The dual's constants after centring the data per state.

    Shifting a row of Q or Qc^k by a constant leaves q unchanged and moves g by a known
    amount, so the evaluators work with Q~ = Q - mean_j Q and Qc~^k = Qc^k - mean_j Qc^k:
        g(eta, lambda) = mean_ij Q + g~(eta, lambda),  eps~_k = eps_k - mean_ij Qc^k.
    Both evaluators form the features F = (log(K q), Qc~^1, ..., Qc~^m, Q~), each (K, B)
    (the K samples along the leading axis), and hand ``evaluation`` their q-weighted moments.
    """

    def __init__(
        self, B: int, K: int, kl_bound: float, thresholds: np.ndarray, offsets: list[float]
    ) -> None:
        self.B, self.K, self.m = B, K, len(offsets) - 1
        self.kl_bound = kl_bound
        self.thresholds = thresholds  # (m,) float64 eps_k of the active constraints
        self.log_k = math.log(K)
        *self.cost_offsets, self.objective_offset = offsets  # (m,) mean_ij Qc^k; mean_ij Q
        self.thresholds_centred = [t - c for t, c in zip(thresholds.tolist(), self.cost_offsets)]

    def evaluation(
        self,
        eta: float,
        lams: list[float],
        means: list[float],
        covariance: list[list[float]],
        weights: Any,
    ) -> DualEvaluation:
        """g, gradient and Hessian from sum_i E_{q_i}[F] (1+m+1,) and sum_i Cov_{q_i}(F[:1+m]).

        Since z_ij - log(K q_ij) = log((1/K) sum_j' exp z_ij') for every j, with z = A~/eta,
            eta (1/B) sum_i log((1/K) sum_j exp z_ij) = E[Q~] - lambda . E[Qc~] - eta KL
        where E is (1/B) sum_i E_{q_i}; the rest is O(m^2) scalar work in Python floats.
        """
        B = self.B
        kl, *mean_costs, mean_reward = [v / B for v in means]
        hessian = [[v / B / eta for v in row] for row in covariance]
        eta_log_partition = mean_reward - dot(lams, mean_costs) - eta * kl
        centred = eta * self.kl_bound + dot(lams, self.thresholds_centred) + eta_log_partition
        return DualEvaluation(
            eta=eta,
            lambdas=lams,
            objective=self.objective_offset + centred,
            centred=centred,
            gradient=[
                self.kl_bound - kl,
                *(t - c for t, c in zip(self.thresholds_centred, mean_costs)),
            ],
            hessian=hessian,
            kl=kl,
            expected_costs=[c + o for c, o in zip(mean_costs, self.cost_offsets)],
            weights=weights,
        )


def solve_small(a: list[list[float]], b: list[float]) -> list[float]:
    """x with a x = b for a small dense a: Gaussian elimination with partial pivoting
    (LAPACK's dgesv) in Python floats. For the Newton systems (1 + m <= a few unknowns)
    it costs less than one ``numpy.linalg.solve`` call (measured: whole E-step solves
    8-13 % faster than with numpy on the learner's sizes). ``a`` and ``b`` are overwritten."""
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


def host_array(tensor: torch.Tensor) -> np.ndarray:
    """A CPU tensor's data as a numpy array (a view, unless its dtype has no numpy twin)."""
    if tensor.requires_grad:
        tensor = tensor.detach()
    if tensor.dtype not in HOST_DTYPES:
        tensor = tensor.to(torch.float64)
    try:
        return tensor.numpy()
    except RuntimeError:  # a lazily negated view (torch._neg_view)
        return tensor.resolve_neg().numpy()


def as_float(value: Any, name: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return float(value.item())
    try:
        return float(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a real number, got {value!r}") from err


def as_host_vector(value: Any, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        if value.device.type == "cpu":
            return host_array(value).astype(np.float64).reshape(-1)
        value = value.detach().cpu().double().numpy()
    try:
        return np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a sequence of real numbers, got {value!r}") from err


def count_non_finite(*tensors: torch.Tensor) -> list[int]:
    """The number of NaN / inf entries of each tensor, with at most one host sync."""
    if all(t.device.type == "cpu" and t.dtype in HOST_DTYPES for t in tensors):
        counts = []
        for tensor in tensors:
            data = host_array(tensor)
            finite = np.isfinite(data)
            counts.append(0 if finite.all() else int(data.size - np.count_nonzero(finite)))
        return counts
    return torch.stack([(~torch.isfinite(t)).sum() for t in tensors]).tolist()


def raise_if_non_finite(q: torch.Tensor, qc: torch.Tensor) -> None:
    for name, tensor, bad in zip(("q", "qc"), (q, qc), count_non_finite(q, qc)):
        if bad:
            raise ValueError(
                f"{name} has {bad} non-finite entries (NaN or inf) out of {tensor.numel()}; "
                "check the critics' outputs"
            )


def check_data(
    q: Any, qc: Any, kl_bound: Any, thresholds: Any, check_finite: bool
) -> tuple[torch.Tensor, torch.Tensor, float, np.ndarray]:
    """Validated (q, qc (m, B, K), kl_bound, thresholds as a float64 array); q and qc are
    checked for NaN / inf only if ``check_finite`` (else the caller does it)."""
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
        raise ValueError(
            f"qc must be a torch tensor of shape (m, B, K) = (m, {B}, {K}), got {shape}"
        )
    if qc.device != q.device:
        raise ValueError(f"q and qc must be on the same device, got {q.device} and {qc.device}")
    if check_finite:
        raise_if_non_finite(q, qc)
    kl_bound = as_float(kl_bound, "kl_bound")
    if not (kl_bound > 0 and math.isfinite(kl_bound)):
        raise ValueError(f"kl_bound must be a finite number > 0 (nats), got {kl_bound!r}")
    thresholds = as_host_vector(thresholds, "thresholds")
    if thresholds.shape[0] != qc.shape[0]:
        raise ValueError(
            f"thresholds must have one entry per cost critic (m = {qc.shape[0]}), "
            f"got {thresholds.shape[0]}"
        )
    if not all(t > -math.inf for t in thresholds.tolist()):  # NaN or -inf
        raise ValueError(
            f"thresholds must be real numbers or +inf (inactive constraint), got {thresholds}"
        )
    return q, qc, kl_bound, thresholds


def check_options(
    solver: str,
    solvers: Sequence[str],
    lambda_max: Any,
    eta_min: Any,
    max_iter: Any,
    tol: Any,
    cpu_threads: Any,
) -> tuple[float, float]:
    """Validate ``solve_dual``'s options; returns (lambda_max, eta_min) as floats."""
    if solver not in solvers:
        raise ValueError(f"solver must be one of {tuple(solvers)}, got {solver!r}")
    lambda_max = as_float(lambda_max, "lambda_max")
    eta_min = as_float(eta_min, "eta_min")
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
    return lambda_max, eta_min


def warm_start(init: Any, m: int) -> tuple[float, list[float]]:
    """(eta, lambdas) of a warm start: a previous result (with .eta, .lambdas) or a pair."""
    if hasattr(init, "eta") and hasattr(init, "lambdas"):
        eta, lambdas = init.eta, init.lambdas
    else:
        try:
            eta, lambdas = init
        except (TypeError, ValueError) as err:
            raise TypeError("init must be an EStepResult or a pair (eta, lambdas)") from err
    eta = as_float(eta, "init eta")
    if isinstance(lambdas, torch.Tensor):
        lambdas = [float(v) for v in lambdas.reshape(-1).tolist()]
    else:
        lambdas = as_host_vector(lambdas, "init lambdas").tolist()
    if len(lambdas) != m:
        raise ValueError(f"init lambdas must have m = {m} entries, got {len(lambdas)}")
    if not (math.isfinite(eta) and all(map(math.isfinite, lambdas))):
        raise ValueError(f"init must be finite, got eta={eta}, lambdas={lambdas}")
    return eta, lambdas


def intra_op_threads(threads: int | None) -> contextlib.AbstractContextManager[None]:
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
