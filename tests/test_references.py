"""Tests of hbar.references: the closed-form Gaussian oracle and the Fokker-Planck brute force.

The two references are checked against each other (FP vs oracle for affine scores), against
exact solutions (stationary 1-D OU, exact mixture density), against finite differences in h
and against Euler-Maruyama sampling of the backward SDE (which fixes the sign conventions).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hbar.metrics import gaussian_w2, sample_moments
from hbar.references import (
    _bernoulli,
    _Grid,
    _sg_coefficients,
    fokker_planck_density,
    fokker_planck_nll,
    gaussian_backward_moments,
    gaussian_oracle,
)
from hbar.schedules import CosineSchedule, OUSchedule, SimpleSchedule
from hbar.scores import AffineScore, GaussianMixtureScore
from hbar.validation import HbarInputError


def _random_spd(rng, d, lo=0.3, hi=1.5):
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return q @ np.diag(rng.uniform(lo, hi, size=d)) @ q.T


# ---------------------------------------------------------------------------------------
# Gaussian oracle
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 3, 16])
def test_oracle_exact_score_is_forward_marginal_for_all_h(d):
    rng = np.random.default_rng(d)
    sch = OUSchedule(beta=1.0, t_min=1e-3, T=40.0)  # p_T = prior up to alpha(T) = e^-20
    m0 = rng.normal(size=d) * 0.5
    S0 = _random_spd(rng, d)
    score = AffineScore(m0, S0, sch)
    hs = np.array([0.0, 0.5, 1.0, 2.0])
    res = gaussian_oracle(score, sch, m0, S0, hs)
    a = float(sch.alpha(sch.t_min))
    s2 = float(sch.sigma2(sch.t_min))
    for i in range(hs.size):
        np.testing.assert_allclose(res.mean[i], a * m0, atol=1e-8)
        np.testing.assert_allclose(res.cov[i], a**2 * S0 + s2 * np.eye(d), atol=1e-8)
    # NLL flat in h; Taylor coefficients vanish (up to the e^-20 prior mismatch)
    assert np.ptp(res.nll) < 1e-8 * d
    np.testing.assert_allclose(res.c1, 0.0, atol=1e-6)
    np.testing.assert_allclose(res.c2, 0.0, atol=1e-5)
    # W2 to the data is the tiny t_min effect, the same for all h
    w2_forward = gaussian_w2(a * m0, a**2 * S0 + s2 * np.eye(d), m0, S0)
    np.testing.assert_allclose(res.w2, w2_forward, atol=1e-6)


def _closed_form_stationary_ou(beta, T, t_min, eps, c, h):
    """Exact m, C, NLL for data N(0, 1) under OU: the exact score is -x for all t, so a score
    (1+eps)(-x) + c gives constant K = beta/2 [(1+h)(1+eps) - 1], k = (1+h)/2 beta c and
    m(t) = k/K (1 - e^{K (t - T)}), C(t) = C* + (1 - C*) e^{2K (t - T)}, C* = h beta / (2K)."""
    K = 0.5 * beta * ((1 + h) * (1 + eps) - 1)
    k = 0.5 * (1 + h) * beta * c
    dt = t_min - T
    m = k / K * (1 - jnp.exp(K * dt))
    Cs = h * beta / (2 * K)
    C = Cs + (1 - Cs) * jnp.exp(2 * K * dt)
    nll = 0.5 * (jnp.log(2 * jnp.pi * C) + (1.0 + m**2) / C)
    return m, C, nll


def test_oracle_matches_exact_1d_solution_and_derivatives():
    beta, T, t_min, eps, c = 1.5, 4.0, 0.01, 0.2, 0.3
    sch = OUSchedule(beta=beta, t_min=t_min, T=T)
    score = AffineScore([0.0], [[1.0]], sch, scale_eps=eps, shift=[c])
    hs = np.array([0.0, 0.3, 1.0, 2.0])
    x = np.array([[-1.0], [0.2], [1.7]])
    res = gaussian_oracle(score, sch, [0.0], [[1.0]], hs, x=x)
    f = lambda h: _closed_form_stationary_ou(beta, T, t_min, eps, c, h)  # noqa: E731

    def pts(hh):  # -log N(x; m, C) per point
        m, C, _ = f(hh)
        return 0.5 * (jnp.log(2 * jnp.pi * C) + (x[:, 0] - m) ** 2 / C)

    @jax.jit
    @jax.vmap
    def exact(h):
        d1 = jax.grad(lambda hh: f(hh)[2])
        return (f(h), d1(h), jax.grad(d1)(h), pts(h), jax.jacfwd(pts)(h), jax.jacfwd(jax.jacfwd(pts))(h))

    (m, C, nll), d1, d2, p0, p1, p2 = jax.tree_util.tree_map(np.asarray, exact(jnp.asarray(hs)))
    np.testing.assert_allclose(res.mean[:, 0], m, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(res.cov[:, 0, 0], C, rtol=1e-9)
    np.testing.assert_allclose(res.nll, nll, rtol=1e-9)
    np.testing.assert_allclose(res.c1, d1, rtol=1e-8, atol=1e-11)
    np.testing.assert_allclose(res.c2, 0.5 * d2, rtol=1e-8, atol=1e-11)
    np.testing.assert_allclose(res.nll_points, p0, rtol=1e-9)
    np.testing.assert_allclose(res.c1_points, p1, rtol=1e-8, atol=1e-11)
    np.testing.assert_allclose(res.c2_points, 0.5 * p2, rtol=1e-8, atol=1e-11)


def test_oracle_c1_c2_agree_with_finite_differences_3d():
    rng = np.random.default_rng(7)
    d = 3
    sch = SimpleSchedule()
    m0 = np.array([0.5, -0.3, 0.2])
    S0 = _random_spd(rng, d, 0.2, 1.0)
    score = AffineScore(m0, S0, sch, scale_eps=0.1, shift=[0.1, 0.0, -0.2])
    e = 1e-3
    # central 5-point stencils at h = 0.4, forward 5-point at h = 0 (h < 0 is not allowed)
    h0 = 0.4
    grid = h0 + e * np.array([-2, -1, 0, 1, 2])
    v = gaussian_oracle(score, sch, m0, S0, grid).nll
    res = gaussian_oracle(score, sch, m0, S0, [0.0, h0])
    fd1 = (v[0] - 8 * v[1] + 8 * v[3] - v[4]) / (12 * e)
    fd2 = (-v[0] + 16 * v[1] - 30 * v[2] + 16 * v[3] - v[4]) / (12 * e**2) / 2
    assert abs(res.c1[1]) > 1e-2  # the wrong score makes NLL depend on h
    assert res.c1[1] == pytest.approx(fd1, rel=1e-8)
    assert res.c2[1] == pytest.approx(fd2, rel=1e-5)  # second differences lose 3 more digits
    ef = 1e-4  # one-sided stencil: truncation e^4 f^(5) is larger near h = 0, use a smaller step
    w = gaussian_oracle(score, sch, m0, S0, ef * np.arange(5)).nll
    fwd1 = (-25 * w[0] + 48 * w[1] - 36 * w[2] + 16 * w[3] - 3 * w[4]) / (12 * ef)
    assert res.c1[0] == pytest.approx(fwd1, rel=1e-8)
    # NLL0 + C1 h + C2 h^2 is the Taylor polynomial at h = 0: its error falls like h^3
    hh = np.array([0.004, 0.002])
    actual = gaussian_oracle(score, sch, m0, S0, hh).nll
    err = actual - (res.nll[0] + res.c1[0] * hh + res.c2[0] * hh**2)
    assert err[0] / err[1] == pytest.approx(8.0, rel=0.15)


def _em_backward(score, sch, h, n, n_steps, key, d):
    """Euler-Maruyama for dx = u dt + sqrt(h) g dw_bar from T down to t_min (test only):
    x <- x - u(x, t) dt + sqrt(h g^2 dt) z,  u = f x - (1+h)/2 g^2 s(x, t)."""
    ts = jnp.linspace(sch.T, sch.t_min, n_steps + 1)
    k0, k1 = jax.random.split(key)
    x0 = sch.prior_std * jax.random.normal(k0, (n, d))

    def step(x, inp):
        t, t_next, k = inp
        dt = t - t_next
        u = sch.f(t) * x - 0.5 * (1 + h) * sch.g2(t) * score(x, t)
        z = jax.random.normal(k, x.shape)
        return x - u * dt + jnp.sqrt(h * sch.g2(t) * dt) * z, None

    keys = jax.random.split(k1, n_steps)
    x, _ = jax.lax.scan(step, x0, (ts[:-1], ts[1:], keys))
    return np.asarray(x)


@pytest.mark.parametrize("h", [0.5, 1.0])
def test_oracle_moments_match_euler_maruyama(h):
    d = 3
    rng = np.random.default_rng(11)
    sch = OUSchedule(beta=2.0, t_min=0.05, T=3.0)
    m0 = np.array([1.0, -0.5, 0.3])
    S0 = _random_spd(rng, d, 0.3, 1.2)
    shift = np.array([0.4, -0.3, 0.2])  # a nonzero b(t) pins the sign of k
    score = AffineScore(m0, S0, sch, scale_eps=0.15, shift=shift)
    mom = gaussian_backward_moments(score, sch, h, ts=[sch.t_min, 1.0])
    x = _em_backward(score, sch, h, 20_000, 1000, jax.random.PRNGKey(3), d)
    sm = sample_moments(x)
    m_or, C_or = mom["mean"][0, -1], mom["cov"][0, -1]  # ts sorted decreasingly: last is t_min
    assert mom["ts"][-1] == pytest.approx(sch.t_min)
    assert np.max(np.abs(sm.mean_z(m_or))) < 5.0, (sm.mean, m_or)
    assert np.max(np.abs(sm.cov_z(C_or))) < 5.0, (sm.cov, C_or)
    # the flipped sign of k would move the mean by far more than the Monte Carlo error
    score_flip = AffineScore(m0, S0, sch, scale_eps=0.15, shift=-shift)
    m_flip = gaussian_backward_moments(score_flip, sch, h)["mean"][0, 0]
    assert np.max(np.abs(sm.mean_z(m_flip))) > 20.0


def test_oracle_per_point_and_input_errors():
    rng = np.random.default_rng(2)
    sch = OUSchedule(beta=1.0, t_min=1e-3, T=5.0)
    m0, S0 = np.array([0.2, -0.1]), np.array([[0.7, 0.2], [0.2, 0.4]])
    score = AffineScore(m0, S0, sch, scale_eps=0.3)
    x = rng.multivariate_normal(m0, S0, size=5)
    res = gaussian_oracle(score, sch, m0, S0, [0.5, 1.0], x=x)
    from scipy.stats import multivariate_normal

    for i in range(2):
        expected = -multivariate_normal(res.mean[i], res.cov[i]).logpdf(x)
        np.testing.assert_allclose(res.nll_points[i], expected, rtol=1e-10)
    assert gaussian_oracle(score, sch, m0, S0, 1.0).nll_points is None
    with pytest.raises(HbarInputError):
        gaussian_oracle(score, sch, m0, S0, -0.1)
    with pytest.raises(HbarInputError):
        gaussian_oracle(score, sch, np.zeros(3), np.eye(3), 1.0)  # score is 2-D
    with pytest.raises(HbarInputError):
        gaussian_oracle(score, sch, m0, S0, 1.0, x=np.zeros((4, 3)))
    with pytest.raises(HbarInputError):
        gaussian_oracle(lambda x, t: x, sch, m0, S0, 1.0)  # no .affine


# ---------------------------------------------------------------------------------------
# Fokker-Planck brute force: building blocks
# ---------------------------------------------------------------------------------------


def test_scharfetter_gummel_flux_properties():
    v = np.array([-50.0, -3.0, -1e-9, 0.0, 1e-9, 0.7, 3.0, 800.0])
    a, b = _sg_coefficients(v, D=0.25, dx=0.1)
    assert np.all(a >= 0) and np.all(b >= 0)
    np.testing.assert_allclose(a - b, v, rtol=1e-12, atol=1e-12)  # consistency with advection
    # small Peclet: central flux D/dx + -v/2
    np.testing.assert_allclose(a[3], 0.25 / 0.1)
    # large Peclet: upwind
    assert a[-1] == pytest.approx(800.0) and b[-1] < 1e-100
    au, bu = _sg_coefficients(v, D=0.0, dx=0.1)
    np.testing.assert_allclose(au, np.maximum(v, 0))
    np.testing.assert_allclose(bu, np.maximum(-v, 0))
    z = np.array([-800.0, -1.0, 0.0, 1e-8, 1.0, 800.0])
    np.testing.assert_allclose(_bernoulli(z)[[1, 4]], [-1.0 / np.expm1(-1.0), 1.0 / np.expm1(1.0)], rtol=1e-14)
    assert np.all(np.isfinite(_bernoulli(z)))


@pytest.mark.parametrize("d", [1, 2])
def test_point_evaluation_of_log_density(d):
    # exact Gaussian cell averages: quadratic evaluation with the cell-average correction is
    # far more accurate than linear interpolation, and converges faster than O(dx^2)
    from scipy.special import ndtr

    s = 0.4
    rng = np.random.default_rng(0)
    x = rng.normal(scale=s, size=(50, d))
    errs = {"quadratic": [], "linear": []}
    for n in (40, 80):
        g = _Grid(np.full(d, -3.0), np.full(d, 3.0), (n,) * d)
        m1 = (ndtr(g.edges[0][1:] / s) - ndtr(g.edges[0][:-1] / s)) / g.dx[0]
        q = m1 if d == 1 else np.outer(m1, m1).ravel()
        exact = -0.5 * np.sum(x**2, 1) / s**2 - 0.5 * d * np.log(2 * np.pi * s**2)
        for method in errs:
            val, ok = g.eval_logq(q, x, method)
            assert ok.all()
            errs[method].append(np.max(np.abs(val - exact)))
    assert errs["quadratic"][1] < 0.1 * errs["linear"][1]
    assert errs["quadratic"][0] / errs["quadratic"][1] > 6.0
    assert errs["linear"][0] / errs["linear"][1] == pytest.approx(4.0, rel=0.3)


# ---------------------------------------------------------------------------------------
# Fokker-Planck brute force vs the oracle and exact densities
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "eps, sch",
    [(0.0, OUSchedule(beta=1.0, t_min=1e-3, T=10.0)), (0.2, OUSchedule(beta=1.0, t_min=1e-3, T=10.0)),
     (0.2, CosineSchedule())],
)
def test_fp_1d_gaussian_matches_oracle(eps, sch):
    m0, S0 = [0.3], [[0.5]]
    rng = np.random.default_rng(0)
    x = 0.3 + np.sqrt(0.5) * rng.normal(size=(300, 1))
    score = AffineScore(m0, S0, sch, scale_eps=eps)
    hs = [0.5, 1.0, 2.0]
    tol = 1e-4
    oracle = gaussian_oracle(score, sch, m0, S0, hs, x=x)
    ref = oracle.nll_points.mean(axis=1)
    fp = fokker_planck_nll(score, sch, x, hs, tol=tol)
    assert fp.converged.all() and not fp.flags, fp.report()
    assert np.all(np.abs(fp.nll - ref) <= tol), fp.report()
    assert np.all(np.abs(fp.nll - ref) <= 3 * fp.error + 1e-6), fp.report()  # honest error estimate
    assert np.max(np.abs(fp.nll_points - oracle.nll_points)) < 1e-3
    assert len(fp.levels) >= 3 and np.all(np.isfinite(fp.observed_order))
    assert "cells=" in fp.report()
    if eps:
        assert ref[0] - ref[2] > 100 * tol  # NLL depends on h for the wrong score ...
        np.testing.assert_allclose(fp.nll[0] - fp.nll[2], ref[0] - ref[2], atol=2 * tol)  # ... FP sees it


def test_fp_2d_gaussian_nondiagonal_matches_oracle():
    sch = OUSchedule(beta=1.0, t_min=1e-3, T=8.0)
    m0 = np.array([0.3, -0.2])
    S0 = np.array([[0.6, 0.3], [0.3, 0.5]])
    rng = np.random.default_rng(0)
    x = rng.multivariate_normal(m0, S0, size=200)
    score = AffineScore(m0, S0, sch, scale_eps=0.2)
    hs = [0.5, 1.0, 2.0]
    tol = 1e-3
    ref = gaussian_oracle(score, sch, m0, S0, hs, x=x).nll_points.mean(axis=1)
    fp = fokker_planck_nll(score, sch, x, hs, tol=tol, grid=36, n_steps=18, max_levels=3, box=4.5,
                           boundary_tol=1e-5)
    assert fp.converged.all() and not fp.flags, fp.report()
    assert np.all(np.abs(fp.nll - ref) <= tol), fp.report()
    assert np.all(np.abs(fp.nll - ref) <= 3 * fp.error + 1e-6), fp.report()
    assert ref[0] - ref[2] > 50 * tol
    assert all(lv.mass_error[i] < 1e-10 for lv in fp.levels for i in range(3) if np.isfinite(lv.nll[i]))


def test_fp_failed_coarse_level_is_skipped_and_reported():
    # 16 cells / 4 BDF2 steps: the tails undershoot below zero next to data points
    sch = OUSchedule(beta=1.0, t_min=1e-3, T=8.0)
    m0, S0 = np.array([0.3, -0.2]), np.array([[0.6, 0.3], [0.3, 0.5]])
    x = np.random.default_rng(0).multivariate_normal(m0, S0, size=200)
    score = AffineScore(m0, S0, sch, scale_eps=0.2)
    with pytest.warns(RuntimeWarning, match="failed"):
        fp = fokker_planck_nll(score, sch, x, 0.5, grid=16, n_steps=4, levels=2, box=4.5)
    assert fp.levels[0].failed[0] and np.isnan(fp.levels[0].nll[0])
    assert np.isfinite(fp.levels[1].nll[0]) and np.isnan(fp.levels[1].richardson[0])
    assert not fp.converged[0] and "FAILED" in fp.report()


def test_fp_1d_mixture_exact_score_flat_in_h():
    sch = OUSchedule(beta=1.0, t_min=1e-3, T=20.0)  # prior mismatch ~ e^-20
    score = GaussianMixtureScore([0.4, 0.6], [[-1.0], [1.2]], [0.3, 0.5], sch)
    x = np.asarray(score.sample_data(jax.random.PRNGKey(0), 300))
    exact = -np.asarray(score.log_density(jnp.asarray(x), sch.t_min))
    tol = 1e-4
    fp = fokker_planck_nll(score, sch, x, [0.25, 0.5, 1.0, 2.0], tol=tol)
    assert fp.converged.all() and not fp.flags, fp.report()
    np.testing.assert_allclose(fp.nll, exact.mean(), atol=tol)
    assert np.ptp(fp.nll) < tol
    assert np.max(np.abs(fp.nll_points - exact[None])) < 2e-3
    assert fp.stderr[0] == pytest.approx(exact.std(ddof=1) / np.sqrt(300), rel=1e-2)


def test_fp_h0_upwind_is_opt_in_and_flagged():
    sch = OUSchedule(beta=1.0, t_min=1e-3, T=20.0)
    score = GaussianMixtureScore([0.4, 0.6], [[-1.0], [1.2]], [0.3, 0.5], sch)
    x = np.asarray(score.sample_data(jax.random.PRNGKey(1), 100))
    with pytest.raises(HbarInputError, match="h = 0"):
        fokker_planck_nll(score, sch, x, [0.0, 1.0])
    exact = -np.asarray(score.log_density(jnp.asarray(x), sch.t_min)).mean()
    with pytest.warns(RuntimeWarning, match="upwind"):
        fp = fokker_planck_nll(score, sch, x, 0.0, tol=2e-3, allow_upwind_h0=True, grid=80)
    assert fp.nll[0] == pytest.approx(exact, abs=2e-3)
    assert np.isinf(fp.levels[0].max_peclet[0])


def test_fp_density_matches_oracle_gaussian():
    sch = OUSchedule(beta=1.0, t_min=1e-3, T=10.0)
    score = AffineScore([0.3], [[0.5]], sch, scale_eps=0.2)
    hs = [0.5, 2.0]
    dens = fokker_planck_density(score, sch, hs, d=1, grid=300, n_steps=300)
    orc = gaussian_oracle(score, sch, [0.3], [[0.5]], hs)
    xc = dens.centres[0]
    assert dens.density.shape == (2, 300)
    for i in range(2):
        m, v = orc.mean[i, 0], orc.cov[i, 0, 0]
        exact = np.exp(-0.5 * (xc - m) ** 2 / v) / np.sqrt(2 * np.pi * v)
        assert np.max(np.abs(dens.density[i] - exact)) < 2e-3 * exact.max()
        assert dens.mass[i] == pytest.approx(1.0, abs=1e-8)
    d2 = fokker_planck_density(AffineScore([0.0, 0.0], np.eye(2) * 0.5, sch), sch, 1.0, d=2, grid=24, n_steps=12)
    assert d2.density.shape == (1, 24, 24)


def test_fp_input_errors():
    sch = OUSchedule(beta=1.0, t_min=1e-3, T=5.0)
    s1 = AffineScore([0.0], [[0.5]], sch)
    x1 = np.array([[0.1], [-0.3]])
    with pytest.raises(HbarInputError, match=">= 0"):
        fokker_planck_nll(s1, sch, x1, [-0.5])
    with pytest.raises(HbarInputError, match="outside the box"):
        fokker_planck_nll(s1, sch, np.array([[0.0], [7.0]]), 1.0, box=6.0)
    with pytest.raises(HbarInputError, match="d = 1 and d = 2"):
        fokker_planck_nll(AffineScore(np.zeros(3), np.eye(3), sch), sch, np.zeros((2, 3)), 1.0)
    with pytest.raises(HbarInputError, match="d = 1 and d = 2"):
        fokker_planck_density(s1, sch, 1.0, d=3)
    with pytest.raises(HbarInputError, match="shape"):
        fokker_planck_nll(s1, sch, np.zeros((2, 2)), 1.0)  # 1-D score, 2-D points
    with pytest.raises(HbarInputError):
        fokker_planck_nll(s1, sch, np.array([[np.nan]]), 1.0)
    with pytest.raises(HbarInputError):
        fokker_planck_nll(s1, sch, x1, 1.0, tol=0.0)
    with pytest.raises(HbarInputError):
        fokker_planck_nll(s1, sch, x1, 1.0, box=[[1.0, -1.0]])


@pytest.mark.slow
def test_fp_2d_mixture_exact_score_auto_grid():
    # default (automatic) grid choice in 2-D; about a minute
    sch = SimpleSchedule()
    score = GaussianMixtureScore([0.5, 0.5], [[-1.0, 0.5], [1.0, -0.5]], [0.35, 0.5], sch)
    x = np.asarray(score.sample_data(jax.random.PRNGKey(0), 300))
    exact = -np.asarray(score.log_density(jnp.asarray(x), sch.t_min)).mean()
    fp = fokker_planck_nll(score, sch, x, [0.5, 1.0], tol=1e-3, warn=False)
    assert fp.converged.all(), fp.report()
    # SIMPLE has a prior mismatch alpha(1) = e^-5: allow 1e-4 on top of tol
    np.testing.assert_allclose(fp.nll, exact, atol=1e-3 + 1e-4)


@pytest.mark.slow
def test_fp_1d_small_h_against_exact_density():
    sch = OUSchedule(beta=1.0, t_min=1e-3, T=20.0)
    score = GaussianMixtureScore([0.4, 0.6], [[-1.0], [1.2]], [0.3, 0.5], sch)
    x = np.asarray(score.sample_data(jax.random.PRNGKey(0), 300))
    exact = -np.asarray(score.log_density(jnp.asarray(x), sch.t_min)).mean()
    fp = fokker_planck_nll(score, sch, x, [0.01, 0.05], tol=1e-4, max_levels=6)
    assert fp.converged.all(), fp.report()
    np.testing.assert_allclose(fp.nll, exact, atol=1e-4)
