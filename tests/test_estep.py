"""E-step dual (docs/algorithm.md, "E-step"): the Newton solver against cvxpy and the math."""

import math

import numpy as np
import pytest
import torch

from cvpo import estep, estep_cvxpy, estep_data, estep_fast
from cvpo.estep import (
    STATUS_CONVERGED,
    STATUS_INFEASIBLE,
    EStepResult,
    build_cvxpy_problem,
    dual_g,
    dual_objective,
    solve_dual,
)

cp = pytest.importorskip("cvxpy")

LAMBDA_MAX = estep.DEFAULT_LAMBDA_MAX
ETA_MIN = estep.DEFAULT_ETA_MIN


def gradient_at(q, qc, kl_bound, thresholds, eta, lambdas):
    x = torch.tensor([eta, *lambdas], dtype=torch.float64, requires_grad=True)
    g = dual_g(q, qc, kl_bound, torch.as_tensor(thresholds, dtype=torch.float64), x[0], x[1:])
    (grad,) = torch.autograd.grad(g, x)
    return grad.numpy()


def cost_range(qc_k, kl_bound):
    """(cheapest mean cost any q within the KL bound reaches, mean cost under uniform q)."""
    cheapest = solve_dual(-qc_k, None, kl_bound, []).weights
    return (cheapest * qc_k).sum(1).mean().item(), qc_k.mean().item()


def random_problem(rng, B, K, m, regime):
    """Q with per-state offsets and a scale in [0.1, 30]; costs >= 0. Thresholds
    per regime: "active" between the cheapest reachable cost and the cost of the
    reward-only solution (lambda > 0, feasible), "inactive" above every cost
    (inf or a large number), "infeasible" below the cheapest reachable cost,
    "mixed" the first constraint active, the others inactive."""
    scale = float(10 ** rng.uniform(-1, math.log10(30)))
    q = rng.normal(size=(B, K)) * scale + rng.normal(size=(B, 1)) * scale + 2 * scale
    qc = rng.gamma(2.0, 1.0, size=(m, B, K)) * rng.uniform(0.3, 3.0, size=(m, 1, 1))
    kl_bound = float(rng.choice([0.01, 0.05, 0.1, 0.5]))
    q, qc = torch.tensor(q), torch.tensor(qc).reshape(m, B, K)
    reward_only = solve_dual(q, None, kl_bound, []).weights
    thresholds = []
    for k in range(m):
        cheapest, _ = cost_range(qc[k], kl_bound)
        unconstrained = (reward_only * qc[k]).sum(1).mean().item()
        kind = regime if regime != "mixed" else ("active" if k == 0 else "inactive")
        if kind == "active":
            thresholds.append(cheapest + rng.uniform(0.3, 0.9) * (unconstrained - cheapest))
        elif kind == "inactive":
            thresholds.append(math.inf if rng.random() < 0.5 else qc[k].max().item() + 1.0)
        else:
            thresholds.append(cheapest - 0.2 * (unconstrained - cheapest))
    # Rounded, so that the problems do not depend on the Newton solver's round-off
    # (whether Clarabel reaches 'optimal' on a hard infeasible case can flip with
    # a 1-ulp change of its threshold).
    thresholds = [float(f"{t:.10g}") for t in thresholds]
    return q, qc, kl_bound, thresholds


def check_kkt(result, q, qc, kl_bound, thresholds, lambda_max=LAMBDA_MAX):
    """Optimality conditions of cvpo.md at a Newton solution."""
    eta = float(result.eta)
    lambdas = result.lambdas.double().numpy()
    weights = result.weights.double()
    B, K = q.shape
    kl = (weights * torch.log(weights * K).nan_to_num(0.0)).sum(1).mean().item()
    costs = torch.einsum("bk,mbk->m", weights, qc).numpy() / B
    assert kl == pytest.approx(result.kl, abs=1e-9)
    np.testing.assert_allclose(costs, result.expected_costs.numpy(), rtol=1e-9, atol=1e-12)
    active = np.isfinite(thresholds)
    grad = gradient_at(
        q,
        qc[torch.as_tensor(active)],
        kl_bound,
        np.asarray(thresholds)[active],
        eta,
        lambdas[active],
    )
    # d g / d eta = epsilon - mean KL: zero where eta is interior, >= 0 at eta_min
    if eta > ETA_MIN * 1.01:
        assert abs(grad[0]) < 1e-6, grad
        assert kl == pytest.approx(kl_bound, abs=1e-6)
    else:
        assert grad[0] > -1e-6
    cost_scale = qc.abs().mean().item() if qc.numel() else 1.0
    for k, (lam, threshold) in enumerate(zip(lambdas, thresholds)):
        if not math.isfinite(threshold):
            assert lam == 0.0
            continue
        slack = threshold - costs[k]
        if 0 < lam < lambda_max:  # complementary slackness: the constraint is tight
            assert abs(slack) < 1e-6 * cost_scale, (k, lam, slack)
        elif lam == 0:
            assert slack > -1e-6 * cost_scale
        else:
            assert lam == lambda_max and slack < 1e-6 * cost_scale
    # the analytic gradient (kl, expected costs) matches autograd
    assert grad[0] == pytest.approx(kl_bound - result.kl, abs=1e-9)


# 60 seeded problems; sizes limited so every (B, K, m) compiles once and the
# whole file stays within a few tens of seconds of cvxpy time.
SIZES = [(8, 4), (32, 16), (64, 64), (256, 16)]
REGIMES = ["active", "mixed", "inactive", "active", "infeasible"]


def problem_cases():
    cases = []
    for seed in range(60):
        B, K = SIZES[seed % len(SIZES)]
        m = (seed // len(SIZES)) % 3
        regime = REGIMES[seed % len(REGIMES)] if m else "none"
        cases.append((seed, B, K, m, regime))
    return cases


def test_problem_cases_cover_the_requested_grid():
    cases = problem_cases()
    assert len(cases) >= 50
    assert {m for *_, m, _ in cases} == {0, 1, 2}
    assert max(c[1] for c in cases) == 256 and max(c[2] for c in cases) == 64
    assert {"active", "inactive", "mixed", "infeasible"} <= {c[4] for c in cases}


@pytest.mark.parametrize("seed, B, K, m, regime", problem_cases())
def test_newton_matches_cvxpy(seed, B, K, m, regime):
    rng = np.random.default_rng(seed)
    q, qc, kl_bound, thresholds = random_problem(rng, B, K, m, regime)
    # At lambda_max = 1e3 an infeasible problem's eta reaches ~1e4 and Clarabel
    # may fail (the fallback covers that in use); a lower cap keeps it accurate.
    caps = {"lambda_max": 100.0 if regime == "infeasible" else LAMBDA_MAX}
    newton = solve_dual(q, qc, kl_bound, thresholds, solver="newton", **caps)
    # cvxpy warm-starts Clarabel from the previous solve of the same cached (B, K, m)
    # model by default, which makes its accuracy depend on the test order (a 1-ulp
    # change in an earlier problem's thresholds turned one solve 'optimal_inaccurate');
    # a cold solve is a function of this problem alone.
    cvx = solve_dual(
        q, qc, kl_bound, thresholds, solver="cvxpy", cvxpy_options={"warm_start": False}, **caps
    )
    assert not cvx.fallback and cvx.solver == "cvxpy", cvx.message
    assert newton.status in (STATUS_CONVERGED, STATUS_INFEASIBLE)
    assert newton.status == cvx.status
    if regime == "infeasible":
        assert newton.status == STATUS_INFEASIBLE

    scale = max(abs(cvx.objective), q.std().item())
    # Newton is never worse than cvxpy (minimisation) and both agree.
    assert newton.objective <= cvx.objective + 1e-6 * scale
    assert abs(newton.objective - cvx.objective) <= 1e-4 * scale
    assert torch.allclose(newton.weights, cvx.weights, atol=1e-3, rtol=0)
    # The reported objective is g at the returned point.
    g = dual_g(
        q,
        qc,
        kl_bound,
        torch.tensor(thresholds, dtype=q.dtype).nan_to_num(posinf=0.0),
        newton.eta,
        newton.lambdas,
    ).item()
    assert newton.objective == pytest.approx(g, rel=1e-10, abs=1e-12)
    # Each row of q is a softmax of A / eta.
    advantage = q - torch.einsum("m,mbk->bk", newton.lambdas, qc)
    torch.testing.assert_close(newton.weights, torch.softmax(advantage / newton.eta, 1))
    check_kkt(newton, q, qc, kl_bound, thresholds, caps["lambda_max"])
    assert newton.iterations <= 20


def make_dual_problem(kind, q, qc, kl_bound, thresholds):
    """The torch or the numpy (host) evaluation of the dual (all constraints active)."""
    if kind == "torch":
        return estep.DualProblem(q, qc, kl_bound, np.asarray(thresholds, dtype=np.float64))
    return estep_fast.HostDualProblem(
        q.numpy(), qc.numpy(), kl_bound, np.asarray(thresholds, dtype=np.float64)
    )


@pytest.mark.parametrize("kind", ["torch", "host"])
def test_analytic_hessian_matches_autograd(kind):
    rng = np.random.default_rng(123)
    q, qc, kl_bound, thresholds = random_problem(rng, 16, 8, 2, "active")
    problem = make_dual_problem(kind, q, qc, kl_bound, thresholds)
    eta, lambdas = 1.7, np.array([0.3, 1.1])
    evaluation = problem.evaluate(eta, lambdas)
    x = torch.tensor([eta, *lambdas], dtype=torch.float64)
    th = torch.tensor(thresholds, dtype=torch.float64)

    def g(v):
        return dual_g(q, qc, kl_bound, th, v[0], v[1:])

    np.testing.assert_allclose(evaluation.objective, g(x).item(), rtol=1e-12)
    np.testing.assert_allclose(
        evaluation.gradient, torch.autograd.functional.jacobian(g, x).numpy(), atol=1e-10
    )
    np.testing.assert_allclose(
        evaluation.hessian, torch.autograd.functional.hessian(g, x).numpy(), rtol=1e-8, atol=1e-10
    )


# --- the CPU (numpy) evaluation against the torch one ------------------------


@pytest.mark.parametrize("B, K, m", [(16, 8, 2), (256, 16, 1), (32, 4, 0)])
def test_host_evaluation_matches_torch(B, K, m):
    rng = np.random.default_rng(B + K + m)
    q, qc, kl_bound, thresholds = random_problem(rng, B, K, m, "active" if m else "none")
    host = make_dual_problem("host", q, qc, kl_bound, thresholds)
    torch_problem = make_dual_problem("torch", q, qc, kl_bound, thresholds)
    for eta, lambdas in [(0.7, rng.uniform(0, 2, m)), (40.0, np.zeros(m)), (1e-3, np.full(m, 5.0))]:
        a, b = host.evaluate(eta, lambdas), torch_problem.evaluate(eta, lambdas)
        scale = abs(b.objective) + abs(b.centred) + 1.0
        assert a.objective == pytest.approx(b.objective, abs=1e-12 * scale)
        assert a.centred == pytest.approx(b.centred, abs=1e-12 * scale)
        assert a.kl == pytest.approx(b.kl, rel=1e-10, abs=1e-13)
        np.testing.assert_allclose(a.gradient, b.gradient, rtol=1e-10, atol=1e-12)
        # the Hessian is a difference of second moments (of features up to ~log K and
        # max |Qc|): near a one-hot q it cancels to round-off in either evaluation
        moments = math.log(K) ** 2 + (qc.abs().max().item() if m else 0.0) ** 2 + 1.0
        np.testing.assert_allclose(a.hessian, b.hessian, rtol=1e-9, atol=1e-13 * moments / eta)
        np.testing.assert_allclose(a.weights, b.weights.numpy(), rtol=1e-10, atol=1e-15)
    assert host.mean_row_variance() == pytest.approx(torch_problem.mean_row_variance(), rel=1e-12)
    q_host, qc_host = host.host_data()
    np.testing.assert_array_equal(q_host, q.numpy())
    np.testing.assert_array_equal(qc_host, qc.numpy())


def solve_both_paths(monkeypatch, *args, **kwargs):
    """solve_dual through the numpy (host) path and through the torch path."""
    assert estep_fast.use_host(args[0])
    host = solve_dual(*args, **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(estep_fast, "HOST_MAX_PAIRS", 0)
        assert not estep_fast.use_host(args[0])
        reference = solve_dual(*args, **kwargs)
    return host, reference


def assert_same_result(a, b, rtol=1e-10):
    assert (a.status, a.iterations, a.solver, a.fallback, a.infeasible_constraints) == (
        b.status,
        b.iterations,
        b.solver,
        b.fallback,
        b.infeasible_constraints,
    )
    for name in ("eta", "lambdas", "weights", "expected_costs"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape and x.is_contiguous(), name
        scale = max([1.0, *y.abs().flatten().tolist()])
        torch.testing.assert_close(x, y, rtol=rtol, atol=rtol * scale, msg=name)
    assert a.objective == pytest.approx(b.objective, rel=rtol, abs=rtol)
    assert a.kl == pytest.approx(b.kl, rel=rtol, abs=1e-12)


HOST_CASES = [
    (0, 32, 16, 0, "none"),
    (1, 256, 16, 1, "active"),
    (2, 256, 32, 1, "active"),
    (3, 64, 16, 2, "active"),
    (4, 64, 16, 2, "mixed"),
    (5, 32, 8, 2, "infeasible"),
    (6, 16, 64, 1, "inactive"),
    (7, 8, 4, 1, "active"),
    (8, 256, 48, 2, "active"),
]


@pytest.mark.parametrize("seed, B, K, m, regime", HOST_CASES)
def test_cpu_fast_path_matches_torch_path(monkeypatch, seed, B, K, m, regime):
    rng = np.random.default_rng(seed)
    q, qc, kl_bound, thresholds = random_problem(rng, B, K, m, regime)
    if regime == "mixed":
        thresholds[1] = math.inf  # an inactive constraint next to an active one
    caps = {"lambda_max": 100.0 if regime == "infeasible" else LAMBDA_MAX}
    cold, cold_ref = solve_both_paths(monkeypatch, q, qc, kl_bound, thresholds, **caps)
    assert_same_result(cold, cold_ref)
    if regime == "infeasible":
        assert cold.status == STATUS_INFEASIBLE
    # the learner's call: the next (perturbed) batch warm-started from this solution
    noise = torch.tensor(rng.normal(size=q.shape)) * 0.05 * q.std()
    warm, warm_ref = solve_both_paths(
        monkeypatch, q + noise, qc, kl_bound, thresholds, init=(cold.eta, cold.lambdas), **caps
    )
    assert_same_result(warm, warm_ref)
    # float32 inputs: the same solve; the outputs agree to float32 rounding
    warm32, warm32_ref = solve_both_paths(
        monkeypatch, (q + noise).float(), qc.float(), kl_bound, thresholds, init=cold, **caps
    )
    assert warm32.weights.dtype == torch.float32
    assert_same_result(warm32, warm32_ref, rtol=1e-6)
    # dual_objective takes the same path
    assert dual_objective(q, qc, kl_bound, thresholds, float(cold.eta), cold.lambdas) == (
        pytest.approx(cold.objective, rel=1e-13)
    )


def test_cpu_fast_path_other_dtypes_and_layouts(monkeypatch):
    rng = np.random.default_rng(17)
    q, qc, kl_bound, thresholds = random_problem(rng, 32, 8, 1, "active")
    for dtype in (torch.float16, torch.bfloat16):
        host, reference = solve_both_paths(
            monkeypatch, q.to(dtype), qc.to(dtype), kl_bound, thresholds
        )
        assert host.weights.dtype == host.eta.dtype == dtype
        assert_same_result(host, reference, rtol=1e-2)
        assert host.objective == pytest.approx(reference.objective, rel=1e-10)
    # non-contiguous inputs and inputs that require grad
    q_t = q.T.contiguous().T.requires_grad_()
    qc_t = qc.transpose(1, 2).contiguous().transpose(1, 2)
    host, reference = solve_both_paths(monkeypatch, q_t, qc_t, kl_bound, thresholds)
    assert_same_result(host, reference)
    assert not host.weights.requires_grad
    # the result owns its memory: changing the inputs afterwards changes nothing
    weights = host.weights.clone()
    with torch.no_grad():
        q_t.add_(1.0)
    torch.testing.assert_close(host.weights, weights, rtol=0, atol=0)


def test_cpu_fast_path_leaves_torch_threads_alone():
    threads = torch.get_num_threads()
    q = torch.randn(64, 16)
    solve_dual(q, None, 0.1, [], cpu_threads=max(1, threads - 1) if threads > 1 else 2)
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6])
def test_small_solve_matches_lapack(n):
    rng = np.random.default_rng(n)
    for trial in range(20):
        a = rng.normal(size=(n, n))
        if trial % 2:  # symmetric positive definite with unit diagonal, as in the solver
            a = a @ a.T + 1e-3 * np.eye(n)
            d = 1.0 / np.sqrt(a.diagonal())
            a = a * np.outer(d, d)
        b = rng.normal(size=n)
        x = estep_data.solve_small(a.tolist(), b.tolist())
        np.testing.assert_allclose(
            x, np.linalg.solve(a, b), rtol=1e-9, atol=1e-12 * np.abs(np.linalg.solve(a, b)).max()
        )
    with pytest.raises(np.linalg.LinAlgError):
        estep_data.solve_small([[1.0, 2.0], [2.0, 4.0]], [1.0, 1.0])


def test_result_fields_and_dtypes():
    torch.manual_seed(0)
    q = torch.randn(32, 16)
    qc = torch.rand(2, 32, 16)
    result = solve_dual(q, qc, 0.1, [0.45, math.inf])
    assert isinstance(result, EStepResult)
    assert result.eta.shape == () and result.eta.dtype == torch.float32
    assert result.lambdas.shape == (2,) and result.lambdas[1] == 0
    assert result.weights.shape == (32, 16) and result.weights.dtype == torch.float32
    torch.testing.assert_close(result.weights.sum(1), torch.ones(32))
    assert result.expected_costs.shape == (2,)
    assert isinstance(result.objective, float) and isinstance(result.iterations, int)
    assert result.solve_time > 0 and result.solver == "newton" and not result.fallback


def test_inactive_constraint_equals_dropping_it():
    rng = np.random.default_rng(5)
    q, qc, kl_bound, thresholds = random_problem(rng, 32, 16, 2, "active")
    both = solve_dual(q, qc, kl_bound, [thresholds[0], math.inf])
    single = solve_dual(q, qc[:1], kl_bound, [thresholds[0]])
    assert both.lambdas[1] == 0.0
    assert both.objective == pytest.approx(single.objective, rel=1e-12)
    torch.testing.assert_close(both.weights, single.weights)


def test_m_zero_accepts_empty_and_none():
    torch.manual_seed(1)
    q = torch.randn(16, 8, dtype=torch.float64)
    a = solve_dual(q, q.new_empty((0, 16, 8)), 0.1, [])
    b = solve_dual(q, None, 0.1, [])
    assert a.lambdas.shape == (0,) and a.objective == b.objective
    assert a.kl == pytest.approx(0.1, abs=1e-7)


def test_warm_start_converges_immediately():
    rng = np.random.default_rng(7)
    q, qc, kl_bound, thresholds = random_problem(rng, 64, 16, 2, "active")
    cold = solve_dual(q, qc, kl_bound, thresholds)
    warm = solve_dual(q, qc, kl_bound, thresholds, init=cold)
    pair = solve_dual(q, qc, kl_bound, thresholds, init=(cold.eta, cold.lambdas))
    assert warm.iterations <= 1 and pair.iterations <= 1
    assert warm.objective == pytest.approx(cold.objective, rel=1e-12)
    # A perturbed batch (the next update) starts close: few steps.
    q2 = q + 0.05 * q.std() * torch.randn(
        q.shape, generator=torch.Generator().manual_seed(0), dtype=q.dtype
    )
    assert solve_dual(q2, qc, kl_bound, thresholds, init=cold).iterations <= 4


def test_identical_q_in_a_row():
    rng = np.random.default_rng(11)
    q, qc, kl_bound, thresholds = random_problem(rng, 32, 16, 1, "active")
    q[3] = 7.0  # every sampled action of state 3 has the same value
    qc[0, 3] = 1.5
    newton = solve_dual(q, qc, kl_bound, thresholds)
    cvx = solve_dual(q, qc, kl_bound, thresholds, solver="cvxpy")
    assert newton.status == STATUS_CONVERGED
    torch.testing.assert_close(newton.weights[3], torch.full((16,), 1 / 16, dtype=q.dtype))
    assert newton.objective <= cvx.objective + 1e-6 * abs(cvx.objective)
    assert torch.allclose(newton.weights, cvx.weights, atol=1e-3, rtol=0)


def test_all_rows_constant_sends_eta_to_its_bound():
    q = torch.arange(8, dtype=torch.float64)[:, None].repeat(1, 4)  # (8, 4), constant rows
    result = solve_dual(q, None, 0.1, [])
    assert result.status == STATUS_CONVERGED
    assert float(result.eta) == pytest.approx(ETA_MIN)
    torch.testing.assert_close(result.weights, torch.full((8, 4), 0.25, dtype=q.dtype))
    assert result.objective == pytest.approx(q.mean().item() + ETA_MIN * 0.1, rel=1e-12)


@pytest.mark.parametrize("m", [0, 1])
def test_huge_q_scale_is_scale_invariant(m):
    """g(s Q, s Qc) = s g(Q, Qc) with eta and the thresholds scaled by s."""
    rng = np.random.default_rng(3)
    q, qc, kl_bound, thresholds = random_problem(rng, 64, 32, m, "active")
    base = solve_dual(q, qc, kl_bound, thresholds)
    s = 1e4 / q.abs().max().item()
    huge = solve_dual(q * s, qc * s, kl_bound, [t * s for t in thresholds])
    assert huge.status == STATUS_CONVERGED and q.abs().max() * s == pytest.approx(1e4)
    assert float(huge.eta) == pytest.approx(float(base.eta) * s, rel=1e-6)
    assert huge.objective == pytest.approx(base.objective * s, rel=1e-9)
    torch.testing.assert_close(huge.weights, base.weights, atol=1e-8, rtol=0)
    torch.testing.assert_close(huge.lambdas, base.lambdas, atol=1e-6, rtol=1e-6)


def test_huge_q_scale_against_cvxpy():
    rng = np.random.default_rng(4)
    q, qc, kl_bound, thresholds = random_problem(rng, 32, 16, 1, "active")
    s = 1e4 / q.abs().max().item()
    newton = solve_dual(q * s, qc, kl_bound, thresholds)
    cvx = solve_dual(q * s, qc, kl_bound, thresholds, solver="cvxpy")
    assert newton.status == STATUS_CONVERGED
    assert newton.objective <= cvx.objective + 1e-6 * abs(cvx.objective)
    assert torch.allclose(newton.weights, cvx.weights, atol=1e-3, rtol=0)


def test_float32_inputs_match_float64():
    rng = np.random.default_rng(9)
    q, qc, kl_bound, thresholds = random_problem(rng, 64, 16, 2, "active")
    q32, qc32 = q.float(), qc.float()
    r32 = solve_dual(q32, qc32, kl_bound, thresholds)
    r64 = solve_dual(q32.double(), qc32.double(), kl_bound, thresholds)
    assert r32.weights.dtype == r32.eta.dtype == r32.lambdas.dtype == torch.float32
    assert r32.objective == r64.objective  # computed in float64 either way
    torch.testing.assert_close(r32.weights, r64.weights.float())
    assert r32.kl == pytest.approx(kl_bound, abs=1e-6)


def test_infeasible_constraint_caps_lambda_and_keeps_weights_finite():
    torch.manual_seed(2)
    q = torch.randn(64, 16, dtype=torch.float64) * 5
    qc = 3.0 + torch.rand(1, 64, 16, dtype=torch.float64)  # every action costs > 3
    for solver in ("newton", "cvxpy"):
        result = solve_dual(q, qc, 0.1, [2.5], solver=solver, lambda_max=100.0)
        assert result.status == STATUS_INFEASIBLE, solver
        assert result.infeasible_constraints == (0,)
        assert float(result.lambdas[0]) == 100.0
        assert torch.isfinite(result.weights).all()
        torch.testing.assert_close(result.weights.sum(1), torch.ones(64, dtype=q.dtype))
        # the weights still favour the cheaper actions as much as the KL bound allows
        assert result.expected_costs[0] < qc.mean()
        assert result.kl == pytest.approx(0.1, abs=1e-4)


@pytest.mark.parametrize("which", ["q", "qc"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_inputs_raise(which, bad, dtype):
    q = torch.randn(8, 4).to(dtype)
    qc = torch.rand(1, 8, 4).to(dtype)
    target = q if which == "q" else qc
    target.view(-1)[[0, 5, 7]] = bad
    with pytest.raises(ValueError, match=rf"^{which} has 3 non-finite entries"):
        solve_dual(q, qc, 0.1, [0.5])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kl_bound": 0.0}, "kl_bound"),
        ({"kl_bound": math.nan}, "kl_bound"),
        ({"thresholds": [0.5, 0.5]}, "thresholds"),
        ({"thresholds": [math.nan]}, "thresholds"),
        ({"solver": "slsqp"}, "solver"),
        ({"lambda_max": -1.0}, "lambda_max"),
        ({"eta_min": 0.0}, "eta_min"),
        ({"max_iter": 0}, "max_iter"),
        ({"qc": torch.rand(1, 8, 5)}, "qc"),
        ({"q": torch.rand(8)}, "q"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    args = {"q": torch.randn(8, 4), "qc": torch.rand(1, 8, 4), "kl_bound": 0.1, "thresholds": [0.5]}
    args.update(kwargs)
    solver_kwargs = {
        k: args.pop(k) for k in ("solver", "lambda_max", "eta_min", "max_iter") if k in args
    }
    with pytest.raises(ValueError, match=match):
        solve_dual(**args, **solver_kwargs)


def test_dual_objective_helper():
    rng = np.random.default_rng(2)
    q, qc, kl_bound, thresholds = random_problem(rng, 16, 8, 1, "active")
    result = solve_dual(q, qc, kl_bound, thresholds)
    value = dual_objective(q, qc, kl_bound, thresholds, float(result.eta), result.lambdas)
    assert value == pytest.approx(result.objective, rel=1e-14)


# --- the cvxpy model -------------------------------------------------------


def test_cvxpy_model_is_dpp_and_cached():
    model = build_cvxpy_problem(8, 4, 2)
    assert model.problem.is_dcp(dpp=True)
    assert build_cvxpy_problem(8, 4, 2) is model
    assert {p.name() for p in model.problem.parameters()} == {
        "Q",
        "Qc0",
        "Qc1",
        "epsilon",
        "eps",
        "eta_min",
        "lambda_max",
    }


def test_second_cvxpy_solve_does_not_recompile():
    rng = np.random.default_rng(0)
    q, qc, kl_bound, thresholds = random_problem(rng, 16, 8, 1, "active")
    estep.clear_cvxpy_cache()
    first = solve_dual(q, qc, kl_bound, thresholds, solver="cvxpy")
    model = build_cvxpy_problem(16, 8, 1)
    param_prog, chain = model.problem._cache.param_prog, model.problem._cache.solving_chain
    assert param_prog is not None

    q2, qc2, _, _ = random_problem(np.random.default_rng(1), 16, 8, 1, "active")
    second = solve_dual(q2, qc2, kl_bound, thresholds, solver="cvxpy")
    # cvxpy reuses the compiled parameter -> problem-data map: no new reduction chain
    # and no new parametrized program (a recompile replaces both objects).
    assert model.problem._cache.param_prog is param_prog
    assert model.problem._cache.solving_chain is chain
    assert model.solves == 2  # (no timing assertion: the object identities above decide)
    assert first.status == second.status == STATUS_CONVERGED
    assert second.objective == pytest.approx(
        solve_dual(q2, qc2, kl_bound, thresholds).objective, rel=1e-6
    )


@pytest.mark.filterwarnings("ignore:Solution may be inaccurate")
def test_cvxpy_failure_falls_back_to_newton(caplog):
    rng = np.random.default_rng(8)
    q, qc, kl_bound, thresholds = random_problem(rng, 8, 4, 1, "active")
    with caplog.at_level("WARNING", logger="cvpo.estep"):
        result = solve_dual(
            q,
            qc,
            kl_bound,
            thresholds,
            solver="cvxpy",
            cvxpy_solver="SCS",
            cvxpy_options={"max_iters": 2},
        )
    assert result.fallback and result.solver == "newton"
    assert result.status == "fallback_newton:converged"
    assert result.backend_status != "optimal" and "SCS" in result.message
    assert "falling back" in caplog.text
    reference = solve_dual(q, qc, kl_bound, thresholds)
    assert result.objective == pytest.approx(reference.objective, rel=1e-12)


def test_cvxpy_exception_falls_back(monkeypatch):
    rng = np.random.default_rng(8)
    q, qc, kl_bound, thresholds = random_problem(rng, 8, 4, 1, "active")
    model = build_cvxpy_problem(8, 4, 1)

    def broken(*args, **kwargs):
        raise cp.error.SolverError("numerical trouble")

    monkeypatch.setattr(model.problem, "solve", broken)
    result = solve_dual(q, qc, kl_bound, thresholds, solver="cvxpy")
    assert result.status == "fallback_newton:converged" and result.backend_status == "SolverError"


def test_unknown_cvxpy_solver_is_a_value_error():
    with pytest.raises(ValueError, match="not installed"):
        solve_dual(torch.randn(4, 3), None, 0.1, [], solver="cvxpy", cvxpy_solver="NOPE")


def test_cvxpy_without_dpp_solves_the_same_program(monkeypatch):
    rng = np.random.default_rng(12)
    q, qc, kl_bound, thresholds = random_problem(rng, 16, 8, 1, "active")
    reference = solve_dual(q, qc, kl_bound, thresholds)
    plain = solve_dual(q, qc, kl_bound, thresholds, solver="cvxpy", cvxpy_dpp=False)
    assert not plain.fallback and "without DPP" in plain.message
    assert abs(plain.objective - reference.objective) <= 1e-6 * abs(reference.objective)
    # by default only problems up to CVXPY_DPP_MAX_PAIRS pairs go through DPP
    monkeypatch.setattr(estep_cvxpy, "CVXPY_DPP_MAX_PAIRS", 16 * 8 - 1)
    auto = solve_dual(q, qc, kl_bound, thresholds, solver="cvxpy")
    assert "without DPP (B*K = 128)" in auto.message
    monkeypatch.setattr(estep_cvxpy, "CVXPY_DPP_MAX_PAIRS", 16 * 8)
    assert solve_dual(q, qc, kl_bound, thresholds, solver="cvxpy").message == ""


@pytest.mark.parametrize("seed", [0, 1, 4, 9, 10])
def test_warm_start_from_collapsed_eta_reaches_the_optimum(seed):
    """At eta = 1e-3 every state's q is one-hot, so g has no curvature in eta and
    the Newton direction used to be zero: the solver reported 'converged' at the
    warm start (objective 11.6 instead of 7.55 for seed 0). It must grow eta and
    reach the same optimum as a cold start."""
    rng = np.random.default_rng(seed)
    q, qc, kl_bound, thresholds = random_problem(rng, 32, 8, 1, "active")
    cold = solve_dual(q, qc, kl_bound, thresholds)
    warm = solve_dual(q, qc, kl_bound, thresholds, init=(1e-3, np.zeros(1)))
    assert cold.status == warm.status == "converged"
    assert warm.objective == pytest.approx(cold.objective, rel=1e-9, abs=1e-9)
    assert float(warm.eta) == pytest.approx(float(cold.eta), rel=1e-5)
    assert warm.kl == pytest.approx(kl_bound, rel=1e-5)
