"""WKB coefficients by characteristics: closed forms in any d, the paper's finite-difference
baseline, and the Fokker–Planck brute force for non-Gaussian data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hbar
from _cases import gaussian_case
from hbar import wkb
from hbar.derivatives import divergence
from hbar.likelihood import nll
from hbar.ode import ODEOptions
from hbar.references import gaussian_oracle
from hbar.series import polynomial_coefficients
from hbar.wkb import poly_grad, poly_laplacian

TIGHT = ODEOptions(rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("d", [1, pytest.param(3, marks=pytest.mark.slow), 16, pytest.param(64, marks=pytest.mark.slow)])
def test_c1_matches_closed_form(d):
    """C1 per point against the oracle (NLL0 on the same cases: test_likelihood)."""
    s, score, m0, S0, x = gaussian_case(d, eps=0.15)
    x = x[:2] if d == 64 else x
    res = nll(score, s, x, order=1, options=TIGHT)
    ref = gaussian_oracle(score, s, m0, S0, 0.0, x=x)
    np.testing.assert_allclose(res.c1, ref.c1_points[0], rtol=1e-6)
    assert abs(ref.c1[0]) > 1e-2  # the wrong score makes NLL depend on h


@pytest.mark.parametrize("d,schedule", [(1, hbar.OUSchedule(beta=1.0, t_min=1e-2, T=8.0)),
                                        (1, hbar.SimpleSchedule()),
                                        pytest.param(2, hbar.CosineSchedule(), marks=pytest.mark.slow)],
                         ids=["ou-1d", "simple-1d", "cosine-2d"])
def test_c2_matches_closed_form(d, schedule):
    s, score, m0, S0, x = gaussian_case(d, eps=-0.1, schedule=schedule)
    res = nll(score, s, x, order=2, options=TIGHT)
    ref = gaussian_oracle(score, s, m0, S0, 0.0, x=x)
    np.testing.assert_allclose(res.c1, ref.c1_points[0], rtol=1e-6)
    np.testing.assert_allclose(res.c2, ref.c2_points[0], rtol=1e-6)
    # expansion method of the result reproduces the oracle curve to O(h^3)
    h = 1e-3
    assert res.nll(h, per_point=True) == pytest.approx(
        gaussian_oracle(score, s, m0, S0, h, x=x).nll_points[0], rel=1e-6)


@pytest.mark.slow
def test_exact_score_has_zero_corrections():
    s = hbar.OUSchedule(beta=1.0, t_min=1e-2, T=30.0)
    score = hbar.gaussian_score([0.3, -0.2], [[0.5, 0.1], [0.1, 0.4]], s)
    x = np.array([[0.1, 0.2], [1.0, -1.0]])
    res = nll(score, s, x, order=2, options=TIGHT)
    # the integrands are O(1/sigma^2) and cancel; what is left is solver error
    assert np.abs(res.c1).max() < 1e-5 and np.abs(res.c2).max() < 1e-4


@pytest.mark.slow
def test_finite_difference_baseline_agrees_within_its_error():
    """The paper's algorithm (central differences with step 0.01 of nested solves) against the
    exact C1 on a 2-D mixture with a perturbed score; the baseline's own error is estimated by
    halving its step (central differences: error ~ step^2)."""
    s = hbar.SimpleSchedule()
    base = hbar.GaussianMixtureScore([0.5, 0.5], [[-0.6, 0.0], [0.6, 0.2]], [0.25, 0.3], s)
    score = hbar.PerturbedScore(base, eps=0.05)
    x = np.asarray(base.sample_data(jax.random.PRNGKey(0), 6))
    opts = ODEOptions(rtol=1e-8, atol=1e-8)
    exact = nll(score, s, x, order=1, options=opts).c1
    fd = nll(score, s, x, order=1, method="finite-difference", options=opts).c1
    fd_half = nll(score, s, x, order=1, method="finite-difference", options=opts, fd_step=0.005).c1
    own_error = np.abs(fd - fd_half) * 4 / 3  # Richardson estimate of the step-0.01 error
    assert np.all(np.abs(fd - exact) <= 3 * own_error + 1e-4), (fd, exact, own_error)
    assert np.all(np.abs(fd_half - exact) < np.abs(fd - exact) + 1e-5)


def test_backward_solve_returns_to_the_data_and_reproduces_ell0():
    s, score, m0, S0, x = gaussian_case(2, eps=0.2)
    res = nll(score, s, x, order=1, options=TIGHT)
    assert res.extras["return_error_max"] < 1e-7
    assert res.extras["ell0_backward_diff_max"] < 1e-7


def test_order2_local_score_uses_jets_in_2d_and_matches_the_score(monkeypatch):
    """The production order-2 path in 2-D replaces the score by its degree-5 Taylor polynomial
    from jets with polarization (wkb.local_score), and its divergence by a degree-4 one. Against
    the network itself (nonlinear, not affine) the errors must then shrink like |Y|^6 and |Y|^5:
    halving Y divides them by 64 and 32 (a wrong tensor of any order k <= 5 would give 2^k)."""
    net = hbar.networks.PaperMLP(2, width=8, depth=2, key=3, dtype="float64")
    X = jax.random.normal(jax.random.PRNGKey(5), (3, 2), dtype=jnp.float64)
    U = jax.random.normal(jax.random.PRNGKey(6), (3, 2), dtype=jnp.float64)
    t = jnp.asarray(0.4)
    calls = []
    real = wkb.jet_tensors
    monkeypatch.setattr(wkb, "jet_tensors", lambda *a: calls.append(a[2]) or real(*a))
    S = wkb.local_score(net, X, t, m=2 * 2 + 1)
    assert calls == [5]  # the jet path was taken, not the nested-jvp fallback

    def errors(eps):
        val, div = S(eps * U)
        ref_val, ref_div = divergence(lambda z: net(z, t), X + eps * U)
        return float(jnp.max(jnp.abs(val - ref_val))), float(jnp.max(jnp.abs(div - ref_div)))

    (v1, d1), (v2, d2) = errors(0.4), errors(0.2)
    assert 1e-12 < v2 < 1e-3 and 1e-12 < d2 < 1e-2
    assert 40 < v1 / v2 < 100, (v1, v2)
    assert 20 < d1 / d2 < 50, (d1, d2)


def test_polynomial_helpers():
    rng = np.random.default_rng(0)
    n, d = 3, 2
    c = [jnp.asarray(rng.normal(size=(n,) + (d,) * k)) for k in range(4)]
    c[2] = (c[2] + jnp.swapaxes(c[2], 1, 2)) / 2
    c3 = c[3]
    c[3] = sum(jnp.transpose(c3, (0,) + p) for p in [(1, 2, 3), (1, 3, 2), (2, 1, 3), (2, 3, 1), (3, 1, 2), (3, 2, 1)]) / 6
    y = jnp.asarray(rng.normal(size=(n, d)))

    def P(yy, cc):
        return (cc[0] + jnp.einsum("ni,ni->n", cc[1], yy) + 0.5 * jnp.einsum("nij,ni,nj->n", cc[2], yy, yy)
                + jnp.einsum("nijk,ni,nj,nk->n", cc[3], yy, yy, yy) / 6)

    g = jax.grad(lambda yy: jnp.sum(P(yy, c)))(y)
    lap = jnp.stack([jnp.trace(jax.hessian(lambda v: P(v[None], [ck[i:i + 1] for ck in c])[0])(y[i]))
                     for i in range(n)])
    np.testing.assert_allclose(poly_grad(c, y), g, rtol=1e-12)
    np.testing.assert_allclose(poly_laplacian(c, y), lap, rtol=1e-12)


def _fp_polynomial(score, schedule, x, nll0, hs, deg, **fp_kwargs):
    """Coefficients [slope, curvature, ...] of the polynomial through the exact NLL0 at h = 0 and
    the Fokker–Planck NLL(h) at ``hs`` (docs/theory.md section 8)."""
    from hbar.references import fokker_planck_nll

    fp = fokker_planck_nll(score, schedule, x, hs, warn=False, **fp_kwargs)
    return polynomial_coefficients(hs, fp.nll, nll0, deg), fp


@pytest.mark.slow  # a long check (CI default suite budget); run with pytest -m slow
def test_c1_c2_match_fokker_planck_slope_and_curvature_1d():
    """1-D two-component mixture, score 5 % too large, OU schedule. Measured: C1 = -0.27334
    vs Fokker–Planck slope -0.27328; C2 = 1.5119 vs curvature 1.5040 (FP error ~1e-7)."""
    s = hbar.OUSchedule(beta=1.0, t_min=0.01, T=8.0)
    base = hbar.GaussianMixtureScore([0.4, 0.6], [[-1.0], [1.0]], [0.6, 0.7], s)
    score = hbar.PerturbedScore(base, eps=0.05)
    x = np.asarray(base.sample_data(jax.random.PRNGKey(0), 30))
    w = nll(score, s, x, order=2, options=ODEOptions(rtol=1e-9, atol=1e-9))
    hs = [0.0125 * k for k in range(1, 9)]
    coef, fp = _fp_polynomial(score, s, x, w.nll0_mean[0], hs, deg=5, tol=1e-7, max_levels=7)
    assert np.max(fp.error) < 1e-6
    assert coef[0] == pytest.approx(w.c1_mean[0], rel=0.01)
    assert coef[1] == pytest.approx(w.c2_mean[0], rel=0.03)
    # and the expansion really is the small-h behaviour: at h = 0.0125 WKB-2 is within 2e-5
    assert abs(w.nll(hs[0]) - fp.nll[0]) < 2e-5


@pytest.mark.slow
def test_c1_c2_match_fokker_planck_slope_and_curvature_2d():
    """2-D two-component mixture, score 5 % too large. Measured (FP error <= 1e-4 at h = 0.05,
    < 1e-6 from h = 0.15): C1 = -0.5683 vs FP slope -0.5630 (0.9 %); C2 = 3.23 vs FP
    curvature 2.99 (7.5 %: the degree-5 fit over h <= 0.3 resolves the curvature less well).
    About 6 minutes on a loaded 2-core machine."""
    s = hbar.OUSchedule(beta=1.0, t_min=0.01, T=8.0)
    base = hbar.GaussianMixtureScore([0.4, 0.6], [[-1.0, 0.3], [1.0, -0.3]], [0.8, 0.9], s)
    score = hbar.PerturbedScore(base, eps=0.05)
    x = np.asarray(base.sample_data(jax.random.PRNGKey(0), 30))
    w = nll(score, s, x, order=2, options=ODEOptions(rtol=1e-9, atol=1e-9))
    hs = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3]
    coef, fp = _fp_polynomial(score, s, x, w.nll0_mean[0], hs, deg=5, tol=1e-5, max_levels=5)
    assert np.max(fp.error) < 2e-4
    assert coef[0] == pytest.approx(w.c1_mean[0], rel=0.015)
    assert coef[1] == pytest.approx(w.c2_mean[0], rel=0.12)


@pytest.mark.slow
def test_exact_score_fokker_planck_is_flat_in_h_2d():
    """With the exact score the brute-force NLL(h) does not depend on h (to its accuracy) and
    the exact C1, C2 vanish."""
    from hbar.references import fokker_planck_nll

    s = hbar.OUSchedule(beta=1.0, t_min=0.01, T=20.0)
    base = hbar.GaussianMixtureScore([0.4, 0.6], [[-1.0, 0.3], [1.0, -0.3]], [0.8, 0.9], s)
    x = np.asarray(base.sample_data(jax.random.PRNGKey(1), 10))
    fp = fokker_planck_nll(base, s, x, [0.25, 1.0], tol=1e-3, box=6.0, warn=False)
    assert abs(fp.nll[0] - fp.nll[1]) < 2 * max(fp.error) + 1e-4
    w = nll(base, s, x, order=1, options=ODEOptions(rtol=1e-8, atol=1e-8))
    assert abs(w.c1_mean[0]) < 1e-5
    assert w.nll0_mean[0] == pytest.approx(fp.nll[0], abs=2 * max(fp.error) + 1e-4)



# --- error control, batching and counters (the exact method's performance options) ---------

def _mixture_case(n=6):
    s = hbar.SimpleSchedule()
    base = hbar.GaussianMixtureScore([0.5, 0.5], [[-0.6, 0.0], [0.6, 0.2]], [0.25, 0.3], s)
    score = hbar.PerturbedScore(base, eps=0.05)
    return s, score, np.asarray(base.sample_data(jax.random.PRNGKey(0), n))


@pytest.mark.slow  # a long check (CI default suite budget); run with pytest -m slow
def test_error_control_on_returned_components_meets_the_tolerance():
    """Controlling the step size on X, psi0, psi1, psi2 only (default) instead of every Taylor
    tensor: C1 and C2 per point stay within the tolerance's error of a tight run (as close as
    with error_on='all'), with fewer backward evaluations."""
    s, score, x = _mixture_case()
    tight = nll(score, s, x, order=2, options=ODEOptions(rtol=1e-10, atol=1e-10, error_on="all"))
    tol = 1e-6
    ret = nll(score, s, x, order=2, options=ODEOptions(rtol=tol, atol=tol))
    full = nll(score, s, x, order=2, options=ODEOptions(rtol=tol, atol=tol, error_on="all"))
    assert ret.evals_backward < full.evals_backward
    for got, ref in ((ret.c1, tight.c1), (ret.c2, tight.c2), (ret.nll0, tight.nll0)):
        err = np.max(np.abs(got - ref) / (1 + np.abs(ref)))
        assert err < 50 * tol, err
    err_ret = np.max(np.abs(ret.c2 - tight.c2))
    err_full = np.max(np.abs(full.c2 - tight.c2))
    assert err_ret < 10 * err_full + 10 * tol


@pytest.mark.slow
def test_per_point_and_batched_step_control_agree():
    s, score, x = _mixture_case()
    opts = ODEOptions(rtol=1e-7, atol=1e-7)
    a = nll(score, s, x, order=1, options=opts, batching="per-point")
    b = nll(score, s, x, order=1, options=opts, batching="batch")
    np.testing.assert_allclose(a.c1, b.c1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.nll0, b.nll0, rtol=1e-6, atol=1e-6)
    per = a.extras["evals_backward_per_point"]
    assert per.shape == (len(x),) and a.evals_backward == per.max()  # one vmapped chunk: its slowest point
    assert np.all(b.extras["evals_backward_per_point"] == b.evals_backward)
    assert per.max() <= b.evals_backward  # each point's own control never needs more than the batch's


@pytest.mark.parametrize("batching", ["batch", pytest.param("per-point", marks=pytest.mark.slow)])  # budget
def test_evaluation_counters_are_totals(batching):
    """Two identical batches execute twice the evaluations of one (totals, not maxima)."""
    s, score, x = _mixture_case(4)
    opts = ODEOptions(rtol=1e-6, atol=1e-6)
    one = nll(score, s, x, order=1, options=opts, batching=batching, batch_size=4)
    two = nll(score, s, np.concatenate([x, x]), order=1, options=opts, batching=batching, batch_size=4)
    assert two.evals_forward == 2 * one.evals_forward > 0
    assert two.evals_backward == 2 * one.evals_backward > 0
    np.testing.assert_array_equal(two.extras["evals_backward_per_point"],
                                  np.tile(one.extras["evals_backward_per_point"], 2))


def test_bad_batching_is_rejected():
    s, score, x = _mixture_case(2)
    with pytest.raises(hbar.HbarInputError):
        nll(score, s, x, order=1, batching="sorted")
