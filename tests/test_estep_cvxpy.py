"""The cvxpy reference model (cvpo.estep_cvxpy) against the paper's g (cvpo.estep.dual_g)."""

import numpy as np
import pytest
import torch
from test_estep_fast import LAMBDA_MAX, assert_optimal_for_literal_g, literal, make_problem

from cvpo import estep_cvxpy
from cvpo.estep import solve_dual

cp = pytest.importorskip("cvxpy")

SIZES = [(8, 4, 1), (32, 16, 1), (16, 8, 2), (64, 16, 2)]
# Clarabel's defaults (1e-8) leave the model's value ~1e-6 relative from g; tighter
# tolerances make it a reference to compare with at ~1e-9
TIGHT = {"tol_gap_abs": 1e-12, "tol_gap_rel": 1e-12, "tol_feas": 1e-12, "tol_ktratio": 1e-10}
# (with eta and lambda fixed Clarabel often ends 'optimal_inaccurate' at these, with
# g to ~1e-8 relative and its gradient to ~1e-5)
FIXED = {"tol_gap_abs": 1e-10, "tol_gap_rel": 1e-10, "tol_feas": 1e-10, "tol_ktratio": 1e-8}


@pytest.mark.filterwarnings("ignore:Solution may be inaccurate")
@pytest.mark.parametrize("B, K, m", SIZES)
def test_cvxpy_model_value_and_gradient_are_the_literal_g(B, K, m):
    """With eta and lambda fixed, the model's optimum over (t, u) is g(eta, lambda), and
    the multipliers of the fixing constraints are -grad g."""
    q, qc, kl_bound, thresholds = make_problem(B + K + m, B, K, m, "feasible")
    model = estep_cvxpy.build_cvxpy_problem(B, K, m)
    estep_cvxpy.set_data(model, q.numpy(), qc.numpy(), kl_bound, thresholds, 1e-6, LAMBDA_MAX)
    rng = np.random.default_rng(B * K)
    for eta, lambdas in [(0.3, rng.uniform(0.1, 1, m)), (2.5, rng.uniform(1, 10, m))]:
        fix_eta, fix_lambdas = model.eta == eta, model.lambdas == lambdas
        fixed = cp.Problem(
            model.problem.objective, [*model.problem.constraints, fix_eta, fix_lambdas]
        )
        fixed.solve(solver="CLARABEL", **FIXED)
        assert fixed.status in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE)
        value, gradient, _ = literal(q, qc, kl_bound, thresholds, [eta, *lambdas])
        assert fixed.value == pytest.approx(value, rel=1e-7, abs=1e-7)
        multipliers = np.array([fix_eta.dual_value, *fix_lambdas.dual_value])
        np.testing.assert_allclose(-multipliers, gradient, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("B, K, m", SIZES)
@pytest.mark.parametrize("regime", ["feasible", "infeasible"])
def test_cvxpy_optimum_is_the_literal_optimum(B, K, m, regime):
    q, qc, kl_bound, thresholds = make_problem(B * K + m, B, K, m, regime)
    x, _, status, message = estep_cvxpy.solve_cvxpy(
        q.numpy(),
        qc.numpy(),
        kl_bound,
        thresholds,
        1e-6,
        LAMBDA_MAX,
        solver_options={"warm_start": False, **TIGHT},
    )
    assert x is not None and status == "optimal", message
    model = estep_cvxpy.build_cvxpy_problem(B, K, m)
    value, _, _ = literal(q, qc, kl_bound, thresholds, x)
    # the model's optimal value is g at its solution ...
    assert model.problem.value == pytest.approx(value, rel=1e-7, abs=1e-7)
    # ... and the minimum of the literal g (Newton's solution, checked by its KKT conditions)
    newton = solve_dual(q, qc, kl_bound, thresholds, lambda_max=LAMBDA_MAX)
    assert newton.status == ("converged" if regime == "feasible" else "infeasible")
    assert_optimal_for_literal_g(newton, q, qc, kl_bound, thresholds)
    assert newton.objective <= value + 1e-9 * abs(value)
    assert value == pytest.approx(newton.objective, rel=1e-9, abs=1e-9)
    assert x[0] == pytest.approx(float(newton.eta), rel=1e-5)
    np.testing.assert_allclose(x[1:], newton.lambdas.numpy(), rtol=1e-5, atol=1e-6)
    if regime == "infeasible":
        assert (x[1:] == LAMBDA_MAX).any()
    cvx = solve_dual(
        q,
        qc,
        kl_bound,
        thresholds,
        solver="cvxpy",
        lambda_max=LAMBDA_MAX,
        cvxpy_options={"warm_start": False},
    )
    assert not cvx.fallback and cvx.status == newton.status
    torch.testing.assert_close(cvx.weights, newton.weights, atol=1e-4, rtol=0)
