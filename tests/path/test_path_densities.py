"""hbar.path.densities: path log-densities and Onsager–Machlup actions against Gaussian
transition densities written out with scipy (docs/theory.md section 3)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _path_cases import OU, SIMPLE, _affine_np, _gauss_case
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import multivariate_normal, norm

from hbar.path import (
    backward_path_action,
    backward_path_logp,
    forward_path_action,
    forward_path_logp,
    sample_backward_paths,
    sample_forward_paths,
)
from hbar.schedules import OUSchedule
from hbar.scores import AffineScore


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


_PROP_SCORE = {}


def _prop_score():
    if not _PROP_SCORE:
        m0, S0, _ = _gauss_case(2, 9)
        _PROP_SCORE.update(m0=m0, S0=S0, sc=AffineScore(m0, S0, OU, scale_eps=-0.15, shift=[0.2, -0.1]))
    return _PROP_SCORE


@settings(max_examples=12, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), h=st.floats(0.05, 3.0), scale=st.floats(0.1, 5.0))
def test_ito_logp_is_sum_of_transition_densities_for_any_path(seed, h, scale):
    """Property: for arbitrary path values (not sampled from the model) on an arbitrary
    non-uniform grid, the Ito log-densities are the sums of the Gaussian Euler transition
    log-densities (written here with scipy), for the backward h-model and the forward h-process,
    and the actions are those sums without the normalisations."""
    c = _prop_score()
    m0, S0, sc = c["m0"], c["S0"], c["sc"]
    rng = np.random.default_rng(seed)
    steps, n, d = 6, 3, 2
    inner = np.sort(rng.uniform(OU.t_min, OU.T, size=steps - 1))
    ts = np.r_[OU.t_min, inner, OU.T]  # increasing, non-uniform
    if np.any(np.diff(ts) <= 1e-9):
        return
    path = scale * rng.normal(size=(steps + 1, n, d))  # path[k] at ts[k]
    f, g2 = -1.0, 2.0  # OU(beta=2): f = -beta/2, g^2 = beta

    def transitions(order, drift):
        """sum_k log N(x_b; x_a + F(x_a, t_a) dt, h g^2 |dt| I) along the storage ``order``."""
        out, norm_c = np.zeros(n), 0.0
        for a, b in zip(order[:-1], order[1:]):
            dt = ts[b] - ts[a]
            var = h * g2 * abs(dt)
            out += norm(path[a] + drift(path[a], ts[a]) * dt, math.sqrt(var)).logpdf(path[b]).sum(-1)
            norm_c += d / 2 * math.log(2 * math.pi * var)
        return out, norm_c

    def s_model(x, t):
        A, b = _affine_np(OU, m0, S0, -0.15, np.array([0.2, -0.1]), t)
        return x @ A.T + b

    def s_true(x, t):
        A, b = _affine_np(OU, m0, S0, 0.0, np.zeros(d), t)
        return x @ A.T + b

    # backward model, travelling T -> t_min: F = u_h = f x - (1+h)/2 g^2 s
    back = np.arange(steps, -1, -1)
    ref_b, nc_b = transitions(back, lambda x, t: f * x - 0.5 * (1 + h) * g2 * s_model(x, t))
    prior = multivariate_normal(np.zeros(d), np.eye(d)).logpdf(path[-1])
    got_b = np.asarray(backward_path_logp(sc, OU, h, path, ts))
    np.testing.assert_allclose(got_b, prior + ref_b, rtol=1e-9, atol=1e-8)
    np.testing.assert_allclose(np.asarray(backward_path_action(sc, OU, h, path[::-1], ts[::-1])), -ref_b - nc_b,
                               rtol=1e-9, atol=1e-8)
    # forward h-process with the true score, travelling t_min -> T: F = f x - (1-h)/2 g^2 s
    truth = AffineScore(m0, S0, OU)
    ref_f, nc_f = transitions(np.arange(steps + 1), lambda x, t: f * x - 0.5 * (1 - h) * g2 * s_true(x, t))
    got_f = np.asarray(forward_path_logp(OU, path, ts, h=h, score=truth))
    np.testing.assert_allclose(got_f, ref_f, rtol=1e-9, atol=1e-8)
    np.testing.assert_allclose(np.asarray(forward_path_action(OU, path, ts, h=h, score=truth)), -ref_f - nc_f,
                               rtol=1e-9, atol=1e-8)
