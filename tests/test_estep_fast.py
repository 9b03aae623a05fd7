"""The CPU fast path (cvpo.estep_fast) against the paper's g (cvpo.estep.dual_g)."""

import math

import numpy as np
import pytest
import torch

from cvpo import estep_fast
from cvpo.estep import dual_g, solve_dual, variational_weights

LAMBDA_MAX = 100.0


def make_problem(seed, B, K, m, regime):
    """Q with per-state offsets, costs >= 0, thresholds the constraints can meet
    ("feasible": 0.97 of the mean cost under the uniform q, a small tilt) or cannot
    ("infeasible": below the mean of each state's cheapest action, which only a one-hot
    q reaches)."""
    rng = np.random.default_rng(seed)
    scale = float(10 ** rng.uniform(-1, 1.5))
    q = rng.normal(size=(B, K)) * scale + rng.normal(size=(B, 1)) * scale
    qc = rng.gamma(2.0, 1.0, size=(m, B, K)) * rng.uniform(0.3, 3.0, size=(m, 1, 1))
    if regime == "feasible":
        thresholds = 0.97 * qc.mean(axis=(1, 2))
    else:
        thresholds = 0.9 * qc.min(axis=2).mean(axis=1)
    return torch.tensor(q), torch.tensor(qc), float(rng.choice([0.05, 0.1, 0.5])), thresholds


def literal(q, qc, kl_bound, thresholds, x):
    """The literal g at x = (eta, lambdas) with its autograd gradient and Hessian."""
    th = torch.as_tensor(thresholds, dtype=torch.float64)
    x = torch.as_tensor(x, dtype=torch.float64)

    def g(v):
        return dual_g(q, qc, kl_bound, th, v[0], v[1:])

    return (
        g(x).item(),
        torch.autograd.functional.jacobian(g, x).numpy(),
        torch.autograd.functional.hessian(g, x).numpy(),
    )


SIZES = [(8, 4, 1), (64, 16, 1), (32, 64, 2), (256, 32, 2), (512, 16, 2)]


@pytest.mark.parametrize("B, K, m", SIZES)
@pytest.mark.parametrize("regime", ["feasible", "infeasible"])
def test_host_evaluation_is_the_literal_g(B, K, m, regime):
    q, qc, kl_bound, thresholds = make_problem(B * K + m, B, K, m, regime)
    problem = estep_fast.HostDualProblem(q.numpy(), qc.numpy(), kl_bound, thresholds)
    rng = np.random.default_rng(B + K)
    points = [
        (0.05, rng.uniform(0, 1, m)),
        (1.3, rng.uniform(0, 5, m)),
        (40.0, np.zeros(m)),
        (3.0, np.full(m, LAMBDA_MAX)),
    ]
    for eta, lambdas in points:
        value, gradient, hessian = literal(q, qc, kl_bound, thresholds, [eta, *lambdas])
        evaluation = problem.evaluate(eta, lambdas)
        scale = 1.0 + abs(value) + float(np.abs(lambdas) @ np.abs(thresholds))
        assert evaluation.objective == pytest.approx(value, rel=1e-12, abs=1e-12 * scale)
        np.testing.assert_allclose(evaluation.gradient, gradient, rtol=1e-9, atol=1e-11 * scale)
        # a difference of second moments: round-off relative to the features' size
        moments = (math.log(K) ** 2 + qc.abs().max().item() ** 2) / eta
        np.testing.assert_allclose(evaluation.hessian, hessian, rtol=1e-7, atol=1e-12 * moments)
        weights = variational_weights(q, qc, eta, torch.as_tensor(lambdas))
        np.testing.assert_allclose(evaluation.weights.T, weights.numpy(), rtol=1e-10, atol=1e-14)
        kl = (weights * torch.log(weights * K).nan_to_num(0.0)).sum(1).mean().item()
        assert evaluation.kl == pytest.approx(kl, rel=1e-9, abs=1e-12)
        costs = torch.einsum("bk,mbk->m", weights, qc).numpy() / B
        np.testing.assert_allclose(evaluation.expected_costs, costs, rtol=1e-10, atol=1e-12)


def assert_optimal_for_literal_g(result, q, qc, kl_bound, thresholds):
    """KKT conditions of the box-constrained minimum, with the literal g's gradient."""
    eta, lambdas = float(result.eta), result.lambdas.double().numpy()
    value, gradient, _ = literal(q, qc, kl_bound, thresholds, [eta, *lambdas])
    assert result.objective == pytest.approx(value, rel=1e-12, abs=1e-12)
    cost_scale = qc.abs().mean().item()
    assert abs(gradient[0]) < 1e-6  # eta is interior in these problems (nats)
    for lam, grad in zip(lambdas, gradient[1:]):
        if lam == 0.0:
            assert grad > -1e-6 * cost_scale
        elif lam == LAMBDA_MAX:
            assert grad < 1e-6 * cost_scale
        else:
            assert abs(grad) < 1e-6 * cost_scale


@pytest.mark.parametrize("B, K, m", SIZES)
@pytest.mark.parametrize("regime", ["feasible", "infeasible"])
def test_fast_path_solution_is_the_literal_optimum(monkeypatch, B, K, m, regime):
    q, qc, kl_bound, thresholds = make_problem(B * K + m, B, K, m, regime)
    assert estep_fast.use_host(q)
    result = solve_dual(q, qc, kl_bound, thresholds, lambda_max=LAMBDA_MAX)
    assert result.status == ("converged" if regime == "feasible" else "infeasible")
    assert_optimal_for_literal_g(result, q, qc, kl_bound, thresholds)
    torch.testing.assert_close(
        result.weights, variational_weights(q, qc, result.eta, result.lambdas)
    )
    # the torch evaluator reaches the same optimum
    monkeypatch.setattr(estep_fast, "HOST_MAX_PAIRS", 0)
    reference = solve_dual(q, qc, kl_bound, thresholds, lambda_max=LAMBDA_MAX)
    assert result.objective == pytest.approx(reference.objective, rel=1e-12)
    torch.testing.assert_close(result.eta, reference.eta, rtol=1e-9, atol=0)
    torch.testing.assert_close(result.lambdas, reference.lambdas, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(result.weights, reference.weights, rtol=1e-9, atol=1e-12)
