"""Tests of the closed-form Gaussian oracle (hbar.references.gaussian, docs/theory.md section 7).

Checked against exact solutions (stationary 1-D OU), forward marginals of the exact score,
finite differences in h and Euler-Maruyama sampling of the backward HProcess (which fixes
the sign conventions).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hbar.metrics import gaussian_w2, sample_moments
from hbar.process import HProcess
from hbar.references import gaussian_backward_moments, gaussian_oracle
from hbar.schedules import OUSchedule, SimpleSchedule
from hbar.scores import AffineScore
from hbar.validation import HbarInputError


def _random_spd(rng, d, lo=0.3, hi=1.5):
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return q @ np.diag(rng.uniform(lo, hi, size=d)) @ q.T


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
    """Euler-Maruyama for the backward HProcess dx = u_h dt + sqrt(h) g dw_bar from T down to
    t_min (test only): x <- x - u_h(x, t) dt + sqrt(h g^2 dt) z."""
    proc = HProcess(sch, score)
    ts = jnp.linspace(sch.T, sch.t_min, n_steps + 1)
    k0, k1 = jax.random.split(key)
    x0 = proc.prior_sample(k0, n, d)

    def step(x, inp):
        t, t_next, k = inp
        dt = t - t_next
        z = jax.random.normal(k, x.shape)
        return x - proc.drift(x, t, h) * dt + jnp.sqrt(proc.diffusion2(t, h) * dt) * z, None

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


def test_chain_nll_is_the_euler_chain_and_converges_to_the_oracle():
    """gaussian_chain_nll against an independent numpy recursion of the Euler chain (tests/path),
    then its difference from the continuous-time oracle halves with the step (order 1) on every grid."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "path"))
    from _path_cases import OU, _discrete_moments, _gauss_case
    from scipy.stats import multivariate_normal

    from hbar.grids import make_grid
    from hbar.references import gaussian_chain_nll

    m0, S0, rng = _gauss_case(3, 7)
    shift = 0.05 * np.ones(3)
    sc = AffineScore(m0, S0, OU, scale_eps=0.1, shift=shift)
    x = rng.multivariate_normal(m0, S0, size=4)
    for h in (0.0, 0.3, 1.0):
        m, C = _discrete_moments(OU, m0, S0, 0.1, shift, h, 40)
        np.testing.assert_allclose(gaussian_chain_nll(sc, OU, h, x, steps=40, grid="uniform"),
                                   -multivariate_normal(m, C).logpdf(x), rtol=1e-11)
    exact = gaussian_oracle(sc, OU, m0, S0, 0.5, x=x).nll_points[0]
    for grid in ("uniform", "log-snr", "edm"):
        errs = [np.abs(gaussian_chain_nll(sc, OU, 0.5, x, steps=n, grid=grid) - exact).max() for n in (100, 200)]
        assert 1.7 < errs[0] / errs[1] < 2.3, (grid, errs)
    ts = make_grid(OU, 30, "edm")
    np.testing.assert_allclose(gaussian_chain_nll(sc, OU, 0.5, x, times=ts), gaussian_chain_nll(sc, OU, 0.5, x, steps=30,
                                                                                                grid="edm"), rtol=1e-13)
    with pytest.raises(HbarInputError, match="strictly decreasing"):
        gaussian_chain_nll(sc, OU, 0.5, x, times=ts[::-1])
    with pytest.raises(HbarInputError, match="single number"):
        gaussian_chain_nll(sc, OU, [0.1, 0.5], x)
    with pytest.raises(HbarInputError, match="affine"):
        gaussian_chain_nll(lambda y, t: -y, OU, 0.5, x)
