"""hbar.path.kl: the path KL in closed form and by Monte Carlo against an exact KL between
two linear-Gaussian chains and an independent quadrature (docs/theory.md section 3)."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from _path_cases import OU, SIMPLE, _affine_np, _gauss_case
from scipy.integrate import quad

from hbar.path import kl_prior, path_kl_bound, path_kl_closed_form, path_kl_monte_carlo, score_error_integral
from hbar.scores import AffineScore


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
