"""Tests of hbar.path: path densities, path-space KL and the path-integral Monte Carlo likelihood.

References used here are computed independently in this file: Gaussian transition densities
with scipy.stats, the exact KL between two linear-Gaussian chains as a KL between two
(steps + 1)-dimensional Gaussians, the discrete-chain moments by an explicit recursion and the
continuous-time model moments by scipy's solve_ivp (theory.md section 7).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import quad, solve_ivp
from scipy.stats import multivariate_normal, norm

from hbar.path import (
    backward_path_action,
    backward_path_logp,
    forward_path_action,
    forward_path_logp,
    kl_prior,
    path_kl_bound,
    path_kl_closed_form,
    path_kl_monte_carlo,
    path_log_likelihood,
    path_nll,
    sample_backward_paths,
    sample_forward_paths,
    score_error_integral,
)
from hbar.schedules import OUSchedule, SimpleSchedule
from hbar.scores import AffineScore, GaussianMixtureScore
from hbar.validation import HbarInputError

OU = OUSchedule(beta=2.0, t_min=0.01, T=3.0)
SIMPLE = SimpleSchedule()


def _affine_np(sch, m0, S0, eps, shift, t):
    """A(t), b(t) of AffineScore written out in numpy (independent of hbar.scores)."""
    d = len(m0)
    a = math.exp(float(sch.log_alpha(t)))
    s2 = float(sch.sigma2(t))
    P = np.linalg.inv(a * a * S0 + s2 * np.eye(d))
    return -(1 + eps) * P, (1 + eps) * P @ (a * m0) + shift


def _discrete_moments(sch, m0, S0, eps, shift, h, steps):
    """Exact mean/cov at t_min of the Euler chain y_{k+1} = y_k - u(y_k, t_k) D + sqrt(h g^2 D) z."""
    d = len(m0)
    ts = np.linspace(sch.T, sch.t_min, steps + 1)
    m, C, c = np.zeros(d), sch.prior_std**2 * np.eye(d), 0.5 * (1 + h)
    for k in range(steps):
        t, D = ts[k], ts[k] - ts[k + 1]
        A, b = _affine_np(sch, m0, S0, eps, shift, t)
        f, g2 = float(sch.f(t)), float(sch.g2(t))
        B = np.eye(d) - (f * np.eye(d) - c * g2 * A) * D
        m = B @ m + c * g2 * b * D
        C = B @ C @ B.T + h * g2 * D * np.eye(d)
    return m, C


def _ode_moments(sch, m0, S0, eps, shift, h):
    """Continuous-time model: dm/dt = K m - c g^2 b, dC/dt = K C + C K^T - h g^2 I, T -> t_min."""
    d = len(m0)
    c = 0.5 * (1 + h)

    def rhs(t, y):
        m, C = y[:d], y[d:].reshape(d, d)
        A, b = _affine_np(sch, m0, S0, eps, shift, t)
        f, g2 = float(sch.f(t)), float(sch.g2(t))
        K = f * np.eye(d) - c * g2 * A
        return np.concatenate([K @ m - c * g2 * b, (K @ C + C @ K.T - h * g2 * np.eye(d)).ravel()])

    y0 = np.concatenate([np.zeros(d), (sch.prior_std**2 * np.eye(d)).ravel()])
    sol = solve_ivp(rhs, (sch.T, sch.t_min), y0, method="DOP853", rtol=1e-11, atol=1e-12)
    m, C = sol.y[:d, -1], sol.y[d:, -1].reshape(d, d)
    return m, 0.5 * (C + C.T)


def _gauss_case(d, seed=0):
    rng = np.random.default_rng(seed)
    m0 = 0.5 * rng.normal(size=d)
    Q = rng.normal(size=(d, d))
    S0 = Q @ Q.T / d + 0.3 * np.eye(d)
    return m0, S0, rng


# ---------------------------------------------------------------------------------------------
# path densities
# ---------------------------------------------------------------------------------------------
def test_forward_path_logp_is_sum_of_gaussian_transitions():
    d, n, steps = 2, 5, 12
    rng = np.random.default_rng(1)
    x0 = rng.normal(size=(n, d))
    ps = sample_forward_paths(SIMPLE, x0, jax.random.PRNGKey(0), steps)
    ts, path = ps.times, ps.path
    assert path.shape == (steps + 1, n, d) and np.all(np.diff(ts) > 0)
    ref = multivariate_normal(np.zeros(d), np.eye(d)).logpdf(x0)  # log p0 = standard normal
    for k in range(steps):
        D = ts[k + 1] - ts[k]
        f, g2 = -10 * ts[k], 20 * ts[k]
        ref += norm(path[k] + f * path[k] * D, math.sqrt(g2 * D)).logpdf(path[k + 1]).sum(-1)
    lp0 = lambda x: -0.5 * jnp.sum(x**2, -1) - d / 2 * jnp.log(2 * jnp.pi)  # noqa: E731
    got = np.asarray(forward_path_logp(SIMPLE, path, ts, log_p0=lp0))
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-10)
    # without log_p0 the sampler reports the density conditional on the initial point
    np.testing.assert_allclose(ps.logp, got - np.asarray(lp0(jnp.asarray(x0))), rtol=1e-12, atol=1e-10)
    # storage order does not matter
    np.testing.assert_allclose(np.asarray(forward_path_logp(SIMPLE, path[::-1], ts[::-1], log_p0=lp0)), got,
                               rtol=1e-13)
    # action = -(logp - log p0 + normalisation)
    normc = sum(d / 2 * math.log(2 * math.pi * 20 * ts[k] * (ts[k + 1] - ts[k])) for k in range(steps))
    act = np.asarray(forward_path_action(SIMPLE, path, ts))
    np.testing.assert_allclose(act, -(got - np.asarray(lp0(jnp.asarray(x0)))) - normc, rtol=1e-11)


def test_backward_path_logp_is_sum_of_gaussian_transitions():
    d, n, steps, h = 2, 4, 10, 0.7
    m0, S0, _ = _gauss_case(d)
    sc = AffineScore(m0, S0, OU, scale_eps=0.2, shift=[0.1, -0.2])
    ps = sample_backward_paths(sc, OU, jax.random.PRNGKey(3), n, h, steps)
    path, ts = ps.path, ps.times
    assert path.shape == (steps + 1, n, d) and np.all(np.diff(ts) < 0)
    ref = multivariate_normal(np.zeros(d), np.eye(d)).logpdf(path[0])
    for k in range(steps):
        D = ts[k] - ts[k + 1]
        A, b = _affine_np(OU, m0, S0, 0.2, np.array([0.1, -0.2]), ts[k])
        u = -1.0 * path[k] - 0.5 * (1 + h) * 2.0 * (path[k] @ A.T + b)
        ref += norm(path[k] - u * D, math.sqrt(h * 2.0 * D)).logpdf(path[k + 1]).sum(-1)
    np.testing.assert_allclose(ps.logp, ref, rtol=1e-11)
    got = np.asarray(backward_path_logp(sc, OU, h, path[::-1], ts[::-1]))  # either order
    np.testing.assert_allclose(got, ref, rtol=1e-11)
    act = np.asarray(backward_path_action(sc, OU, h, path, ts))
    normc = steps * d / 2 * math.log(2 * math.pi * h * 2.0 * (ts[0] - ts[1]))
    np.testing.assert_allclose(act, -(ref - multivariate_normal(np.zeros(d), np.eye(d)).logpdf(path[0])) - normc,
                               rtol=1e-10)


def test_midpoint_convention_jacobian_terms():
    """Midpoint: residual at the midpoint plus J = (dt/2) div F, checked in closed form for the
    linear forward drift (the exact implicit-midpoint log-Jacobian is d log(1 - f D/2)) and for
    the backward model with an affine score (div u = d f - (1+h)/2 g^2 tr A)."""
    d, n, steps, h = 3, 4, 20, 0.5
    m0, S0, rng = _gauss_case(d, 2)
    ps = sample_forward_paths(SIMPLE, rng.normal(size=(n, d)), jax.random.PRNGKey(5), steps)
    x, ts = ps.path, ps.times
    lp = np.asarray(forward_path_logp(SIMPLE, x, ts, convention="midpoint"))
    exact_implicit = np.zeros(n)
    om_minus_exact = leading = 0.0
    for k in range(steps):
        D, tm = ts[k + 1] - ts[k], 0.5 * (ts[k] + ts[k + 1])
        f, g2 = -10 * tm, 20 * tm
        r = (1 - f * D / 2) * x[k + 1] - (1 + f * D / 2) * x[k]
        exact_implicit += norm(0, math.sqrt(g2 * D)).logpdf(r).sum(-1) + d * math.log(1 - f * D / 2)
        om_minus_exact += -d * f * D / 2 - d * math.log(1 - f * D / 2)
        leading += d * (f * D) ** 2 / 8
    np.testing.assert_allclose(lp - exact_implicit, om_minus_exact, rtol=1e-9, atol=1e-11)
    # the OM Jacobian term differs from the exact log-Jacobian at O(D^2) per step
    assert om_minus_exact == pytest.approx(leading, rel=0.35)

    sc = AffineScore(m0, S0, SIMPLE, scale_eps=0.1)
    pb = sample_backward_paths(sc, SIMPLE, jax.random.PRNGKey(6), n, h, steps)
    y, tb = pb.path, pb.times
    ref = multivariate_normal(np.zeros(d), np.eye(d)).logpdf(y[0])
    for k in range(steps):
        D, tm = tb[k] - tb[k + 1], 0.5 * (tb[k] + tb[k + 1])
        f, g2 = -10 * tm, 20 * tm
        A, b = _affine_np(SIMPLE, m0, S0, 0.1, np.zeros(d), tm)
        ym = 0.5 * (y[k] + y[k + 1])
        u = f * ym - 0.5 * (1 + h) * g2 * (ym @ A.T + b)
        ref += norm(y[k] - u * D, math.sqrt(h * g2 * D)).logpdf(y[k + 1]).sum(-1)
        ref += 0.5 * D * (d * f - 0.5 * (1 + h) * g2 * np.trace(A))
    got = np.asarray(backward_path_logp(sc, SIMPLE, h, y, tb, convention="midpoint"))
    np.testing.assert_allclose(got, ref, rtol=1e-10)


def test_midpoint_and_ito_agree_on_fine_paths():
    """For a fine path the Jacobian term compensates the midpoint shift of the drift."""
    sch = OUSchedule(beta=4.0, t_min=0.01, T=1.0)
    ps = sample_forward_paths(sch, np.zeros((200, 1)), jax.random.PRNGKey(7), 2000)
    ito = np.asarray(forward_path_logp(sch, ps.path, ps.times))
    mid = np.asarray(forward_path_logp(sch, ps.path, ps.times, convention="midpoint"))
    jac = 0.5 * 0.99 * (-2.0)  # the Jacobian term (1/2) int div f dt for beta = 4, d = 1
    assert abs(np.mean(mid - ito)) < 0.05 * abs(jac)
    assert np.std(mid - ito) < 0.1


# ---------------------------------------------------------------------------------------------
# path-space KL
# ---------------------------------------------------------------------------------------------
def _gauss_chain(a, c, var, m_init, v_init):
    """Joint mean/cov of x_0 = m_init + e_0, x_{k+1} = a_k x_k + c_k + e_{k+1} (1-D)."""
    N = len(a)
    L = np.eye(N + 1)
    L[np.arange(1, N + 1), np.arange(N)] = -np.asarray(a)
    Li = np.linalg.inv(L)
    V = np.concatenate([[v_init], var])
    return Li @ np.concatenate([[m_init], c]), (Li * V) @ Li.T


def _exact_discrete_kl(sch, m0, S0, eps, shift, h, steps):
    """KL between the Euler chains of P^h (true score, from p_{t_min}) and Q^h as Gaussians."""
    ts = np.linspace(sch.t_min, sch.T, steps + 1)
    D = ts[1] - ts[0]
    a, c, v = [], [], []
    for t in ts[:-1]:
        A, b = _affine_np(sch, np.array([m0]), np.array([[S0]]), 0.0, 0.0, t)
        f, g2 = float(sch.f(t)), float(sch.g2(t))
        a.append(1 + (f - 0.5 * (1 - h) * g2 * A[0, 0]) * D)
        c.append(-0.5 * (1 - h) * g2 * b[0] * D)
        v.append(h * g2 * D)
    al = math.exp(float(sch.log_alpha(sch.t_min)))
    mP, CP = _gauss_chain(a, c, v, al * m0, al**2 * S0 + float(sch.sigma2(sch.t_min)))
    a, c, v = [], [], []
    for t in ts[::-1][:-1]:
        A, b = _affine_np(sch, np.array([m0]), np.array([[S0]]), eps, shift, t)
        f, g2 = float(sch.f(t)), float(sch.g2(t))
        a.append(1 - (f - 0.5 * (1 + h) * g2 * A[0, 0]) * D)
        c.append(0.5 * (1 + h) * g2 * b[0] * D)
        v.append(h * g2 * D)
    mQ, CQ = _gauss_chain(a, c, v, 0.0, 1.0)
    mQ, CQ = mQ[::-1], CQ[::-1, ::-1]
    iQ = np.linalg.inv(CQ)
    dm = mQ - mP
    return 0.5 * (np.trace(iQ @ CP) + dm @ iQ @ dm - len(mP) + np.linalg.slogdet(CQ)[1] - np.linalg.slogdet(CP)[1])


def _closed_form_kl_1d(sch, m0, S0, eps, shift, h):
    """Independent quadrature of KL(p_T||pi) + (1+h)^2/(8h) int g^2 E||grad log p - s||^2 dt (1-D)."""
    def integrand(t):
        a = math.exp(float(sch.log_alpha(t)))
        Ct = a * a * S0 + float(sch.sigma2(t))
        # s* = -(x - a m0)/Ct ; s = (1+eps) s* + shift  =>  s* - s = -eps s* - shift
        return float(sch.g2(t)) * (eps**2 / Ct + shift**2)
    integral = quad(integrand, sch.t_min, sch.T, epsabs=1e-13, epsrel=1e-12)[0]
    a = math.exp(float(sch.log_alpha(sch.T)))
    mT, CT = a * m0, a * a * S0 + float(sch.sigma2(sch.T))
    klp = 0.5 * (CT + mT**2 - 1 - math.log(CT))
    return klp + (1 + h) ** 2 / (8 * h) * integral, klp, integral


def test_path_kl_monte_carlo_matches_closed_form():
    m0, S0, eps, shift = 0.5, 0.5, 0.2, 0.1
    truth = AffineScore([m0], [[S0]], OU)
    wrong = AffineScore([m0], [[S0]], OU, scale_eps=eps, shift=[shift])
    hs = [0.25, 1.0, 2.0]
    cf = path_kl_closed_form(wrong, OU, hs, truth)
    steps = 200
    ratios, ratio_se = [], []
    for i, h in enumerate(hs):
        ref, klp, integral = _closed_form_kl_1d(OU, m0, S0, eps, shift, h)
        assert cf["kl"][i] == pytest.approx(ref, rel=1e-8)
        assert cf["kl_prior"]["value"] == pytest.approx(klp, rel=1e-10)
        disc = _exact_discrete_kl(OU, m0, S0, eps, shift, h, steps)
        mc = path_kl_monte_carlo(wrong, OU, h, truth, jax.random.PRNGKey(10 + i), n_paths=4000, steps=steps)
        # the MC estimates the discrete-chain KL without bias ...
        assert abs(mc["value"] - disc) < 4 * mc["se"], (h, mc, disc)
        # ... whose discretisation error at this step is below the standard error
        assert abs(disc - ref) < 0.5 * mc["se"], (h, disc, ref, mc["se"])
        assert abs(mc["value"] - ref) < 4 * mc["se"], (h, mc, ref)
        fac = (1 + h) ** 2 / (8 * h)
        ratios.append((mc["value"] - klp) / fac)
        ratio_se.append(mc["se"] / fac)
    # KL grows like (1+h)^2/(8h): the ratio (KL - KL(p_T||pi)) / factor is the h-independent integral
    for r, s in zip(ratios, ratio_se):
        assert abs(r - integral) < 4 * s
    # and the discrete KL itself converges to the closed form at rate O(dt)
    errs = [abs(_exact_discrete_kl(OU, m0, S0, eps, shift, 1.0, N) - _closed_form_kl_1d(OU, m0, S0, eps, shift, 1.0)[0])
            for N in (50, 100, 200)]
    assert 1.6 < errs[0] / errs[1] < 2.4 and 1.6 < errs[1] / errs[2] < 2.4


def test_path_kl_small_h_scaling():
    """As h -> 0 the KL diverges like 1/(8h): h * KL(h) -> integral / 8 (Monte Carlo)."""
    m0, S0 = 0.5, 0.5
    truth = AffineScore([m0], [[S0]], OU)
    wrong = AffineScore([m0], [[S0]], OU, scale_eps=0.2, shift=[0.1])
    _, klp, integral = _closed_form_kl_1d(OU, m0, S0, 0.2, 0.1, 1.0)
    for i, h in enumerate([0.05, 0.1]):
        mc = path_kl_monte_carlo(wrong, OU, h, truth, jax.random.PRNGKey(40 + i), n_paths=3000, steps=200)
        fac = (1 + h) ** 2 / (8 * h)
        assert abs((mc["value"] - klp) / fac - integral) < 4 * mc["se"] / fac + 0.02 * integral


def test_path_kl_bound_dsm_constant_and_exact():
    """DSM form = exact score error + the s-independent constant int g^2 [d/sigma^2 - tr S_t^{-1}] dt."""
    d = 2
    m0, S0, rng = _gauss_case(d, 3)
    truth = AffineScore(m0, S0, SIMPLE)
    model = AffineScore(m0, S0, SIMPLE, scale_eps=-0.1, shift=[0.05, 0.0])
    data = rng.multivariate_normal(m0, S0, size=4000)
    hs = [0.1, 0.5, 1.0]
    res = path_kl_bound(model, SIMPLE, data, hs, jax.random.PRNGKey(0), truth=truth, n_samples=4000,
                        quad_nodes=48)

    def const_integrand(t):
        a2 = math.exp(2 * float(SIMPLE.log_alpha(t)))
        s2 = float(SIMPLE.sigma2(t))
        return float(SIMPLE.g2(t)) * (d / s2 - np.trace(np.linalg.inv(a2 * S0 + s2 * np.eye(d))))

    const = quad(const_integrand, SIMPLE.t_min, SIMPLE.T, limit=200)[0]
    assert abs(res.dsm["value"] - res.score_error["value"] - const) < 4 * res.dsm["se"]
    assert res.score_error["method"] == "exact"
    cf = path_kl_closed_form(model, SIMPLE, hs, truth)
    np.testing.assert_allclose(res.kl, cf["kl"], rtol=1e-12)
    np.testing.assert_allclose(res.factor, (1 + np.array(hs)) ** 2 / (8 * np.array(hs)))
    # Monte Carlo score error (non-affine path) agrees with the closed form
    mc = score_error_integral(lambda x, t: model(x, t), SIMPLE, jax.random.PRNGKey(1), truth=truth, n_samples=2000)
    assert abs(mc["value"] - res.score_error["value"]) < 4 * mc["se"] + 1e-3
    # KL(p_T || pi) of the diffused empirical data is close to the exact Gaussian value
    emp = kl_prior(SIMPLE, data=data, key=jax.random.PRNGKey(2), n_samples=500)
    assert abs(emp["value"] - res.kl_prior["value"]) < 4 * emp["se"] + 2e-3
    rows = res.rows()
    assert len(rows) == 3 and rows[0]["kl"] > rows[2]["kl"]


# ---------------------------------------------------------------------------------------------
# path-integral Monte Carlo likelihood
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d,h", [(1, 0.1), (1, 1.0), (16, 0.5)])
def test_pimc_matches_exact_discrete_density(d, h):
    """The estimator targets the Euler chain's density at t_min, computed here exactly."""
    m0, S0, rng = _gauss_case(d, 4)
    shift = 0.05 * np.ones(d)
    sc = AffineScore(m0, S0, OU, scale_eps=0.1, shift=shift)
    x = rng.multivariate_normal(m0, S0, size=6)
    steps = 50
    m, C = _discrete_moments(OU, m0, S0, 0.1, shift, h, steps)
    ref = multivariate_normal(m, C).logpdf(x)
    r = path_log_likelihood(sc, OU, x, h, jax.random.PRNGKey(11), n_paths=512, steps=steps)
    assert r.log_q.shape == (6,) and r.n_paths == 512 and np.all(r.ess > 0.05 * 512)
    z = (r.log_q - ref) / r.se
    assert np.all(np.abs(z) < 4.5), z
    np.testing.assert_allclose(r.bias, -0.5 * r.se**2)


def test_discretisation_bias_halves_with_step():
    """Exact Euler-chain density vs the continuous-time model: first order in dt."""
    d, h = 2, 0.5
    m0, S0, rng = _gauss_case(d, 5)
    x = rng.multivariate_normal(m0, S0, size=5)
    mc, Cc = _ode_moments(SIMPLE, m0, S0, 0.1, np.zeros(d), h)
    ref = multivariate_normal(mc, Cc).logpdf(x)
    errs = []
    for steps in (25, 50, 100, 200):
        m, C = _discrete_moments(SIMPLE, m0, S0, 0.1, np.zeros(d), h, steps)
        errs.append(np.max(np.abs(multivariate_normal(m, C).logpdf(x) - ref)))
    ratios = np.array(errs[:-1]) / np.array(errs[1:])
    assert np.all((ratios > 1.6) & (ratios < 2.5)), (errs, ratios)
    # cross-check the continuous moments against the oracle of hbar.references
    from hbar.references import gaussian_backward_moments

    mom = gaussian_backward_moments(AffineScore(m0, S0, SIMPLE, scale_eps=0.1), SIMPLE, h)
    np.testing.assert_allclose(mom["mean"][0, 0], mc, atol=1e-8)
    np.testing.assert_allclose(mom["cov"][0, 0], Cc, atol=1e-8)


@pytest.mark.parametrize("d", [1, 16])
def test_pimc_matches_continuous_gaussian(d):
    """Richardson extrapolation of the estimates at steps N and 2N removes the O(dt) bias; the
    result agrees with the continuous-time closed form within its standard error."""
    h = 0.5
    m0, S0, rng = _gauss_case(d, 6)
    sc = AffineScore(m0, S0, SIMPLE, scale_eps=0.1)
    x = rng.multivariate_normal(m0, S0, size=4)
    mc, Cc = _ode_moments(SIMPLE, m0, S0, 0.1, np.zeros(d), h)
    ref = multivariate_normal(mc, Cc).logpdf(x)
    r1 = path_log_likelihood(sc, SIMPLE, x, h, jax.random.PRNGKey(20), n_paths=1024, steps=50)
    r2 = path_log_likelihood(sc, SIMPLE, x, h, jax.random.PRNGKey(21), n_paths=1024, steps=100)
    ext = 2 * (r2.log_q - r2.bias) - (r1.log_q - r1.bias)
    se = np.sqrt(4 * r2.se**2 + r1.se**2)
    assert np.all(np.abs(ext - ref) < 4 * se + 2e-3), (ext - ref, se)


def test_pimc_exact_mixture_score_recovers_marginal():
    """With the exact score, q^h_{t_min} = p_{t_min} for every h (up to the tiny p_T vs pi
    mismatch of SIMPLE); checked after Richardson extrapolation in the step."""
    mix = GaussianMixtureScore([0.3, 0.7], [[-1.0], [1.0]], [0.4, 0.4], SIMPLE)
    x = jnp.array([[-1.2], [0.0], [0.9], [2.0]])
    ref = np.asarray(mix.log_density(x, SIMPLE.t_min))
    for i, h in enumerate([0.2, 1.0]):
        r1 = path_log_likelihood(mix, SIMPLE, x, h, jax.random.PRNGKey(30 + i), n_paths=1024, steps=50)
        r2 = path_log_likelihood(mix, SIMPLE, x, h, jax.random.PRNGKey(40 + i), n_paths=1024, steps=100)
        ext = 2 * (r2.log_q - r2.bias) - (r1.log_q - r1.bias)
        se = np.sqrt(4 * r2.se**2 + r1.se**2)
        assert np.all(np.abs(ext - ref) < 4 * se + 5e-3), (h, ext - ref, se)
        assert np.all(r2.ess > 0.5 * 1024)


def test_reverse_proposal_beats_forward_and_chunking_is_consistent():
    d, h = 2, 0.2
    m0, S0, rng = _gauss_case(d, 7)
    sc = AffineScore(m0, S0, OU)
    x = rng.multivariate_normal(m0, S0, size=3)
    rev = path_log_likelihood(sc, OU, x, h, jax.random.PRNGKey(0), n_paths=128, steps=40)
    fwd = path_log_likelihood(sc, OU, x, h, jax.random.PRNGKey(0), n_paths=128, steps=40, proposal="forward")
    assert np.all(rev.ess > 10 * fwd.ess)
    # chunking over paths (and points) does not change the estimator's distribution; with
    # one chunk per point-path block the weights are identical to a single call on that block
    a = path_log_likelihood(sc, OU, x, h, jax.random.PRNGKey(1), n_paths=64, steps=40, chunk_rows=16,
                            keep_weights=True)
    assert a.log_weights.shape == (3, 64) and np.all(np.isfinite(a.log_weights))
    m, C = _discrete_moments(OU, m0, S0, 0.0, np.zeros(d), h, 40)
    assert np.all(np.abs(a.log_q - multivariate_normal(m, C).logpdf(x)) < 5 * a.se)


def test_path_nll_summary():
    d = 2
    m0, S0, rng = _gauss_case(d, 8)
    sc = AffineScore(m0, S0, OU, scale_eps=0.1)
    x = rng.multivariate_normal(m0, S0, size=6)
    res = path_nll(sc, OU, x, [0.5, 1.0], jax.random.PRNGKey(2), n_paths=128, steps=40)
    assert res.nll.shape == (2,) and np.all(res.se > 0) and np.all(res.bias >= 0)
    assert np.all((res.ess_min > 0) & (res.ess_min <= res.ess_median) & (res.ess_mean <= 1))
    for i, h in enumerate([0.5, 1.0]):
        m, C = _discrete_moments(OU, m0, S0, 0.1, np.zeros(d), h, 40)
        ref = -np.mean(multivariate_normal(m, C).logpdf(x))
        assert abs(res.nll[i] - ref) < 5 * res.mc_se[i] + 1e-3
    assert len(res.rows()) == 2


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def test_bad_inputs():
    sc = AffineScore([0.0, 0.0], np.eye(2), OU)
    x = np.zeros((3, 2))
    key = jax.random.PRNGKey(0)
    for bad_h in (0.0, -1.0, float("nan")):
        with pytest.raises(HbarInputError):
            path_log_likelihood(sc, OU, x, bad_h, key, n_paths=4, steps=4)
        with pytest.raises(HbarInputError):
            path_kl_closed_form(sc, OU, bad_h, sc)
    with pytest.raises(HbarInputError):
        path_nll(sc, OU, x, [0.5, 0.0], key, n_paths=4, steps=4)
    with pytest.raises(HbarInputError):
        path_kl_bound(sc, OU, x, [0.0], key)
    with pytest.raises(HbarInputError, match="NaN"):
        path_log_likelihood(sc, OU, np.array([[0.0, np.nan]]), 0.5, key, n_paths=4, steps=4)
    with pytest.raises(HbarInputError, match="dimension"):
        path_log_likelihood(sc, OU, np.zeros((3, 3)), 0.5, key, n_paths=4, steps=4)
    with pytest.raises(HbarInputError):
        path_log_likelihood(sc, OU, x, 0.5, key, n_paths=4, steps=4, proposal="bridge")
    ps = sample_forward_paths(OU, x, key, 5)
    with pytest.raises(HbarInputError):
        backward_path_logp(sc, OU, 0.0, ps.path, ps.times)
    with pytest.raises(HbarInputError, match="shape"):
        backward_path_logp(sc, OU, 0.5, ps.path[:-1], ps.times)
    with pytest.raises(HbarInputError, match="dimension"):
        backward_path_logp(sc, OU, 0.5, np.zeros((6, 3, 3)), ps.times)
    with pytest.raises(HbarInputError, match="NaN"):
        backward_path_logp(sc, OU, 0.5, np.full((6, 3, 2), np.nan), ps.times)
    with pytest.raises(HbarInputError):
        forward_path_logp(OU, ps.path, np.r_[ps.times[:3], ps.times[2:5]])  # not strictly monotone
    with pytest.raises(HbarInputError):
        forward_path_logp(OU, ps.path, ps.times, convention="stratonovich")
    with pytest.raises(HbarInputError):
        forward_path_logp(OU, ps.path, ps.times, h=0.5)  # h != 1 needs a score
    with pytest.raises(HbarInputError):
        path_kl_monte_carlo(sc, OU, 0.5, AffineScore([0.0, 0.0], np.eye(2), OU, scale_eps=0.1), key)
