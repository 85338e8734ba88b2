"""hbar.training.loss: the DSM loss against its closed-form minimum for Gaussian data
(docs/theory.md section 3)."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import quad

from hbar.schedules import CosineSchedule, OUSchedule, SimpleSchedule
from hbar.scores import gaussian_score
from hbar.training import dsm_loss, dsm_per_sample, heldout_loss
from hbar.validation import HbarInputError

_per_sample = eqx.filter_jit(dsm_per_sample)


def _gauss_hermite_2d(n=4):
    """Nodes and weights for E over (x0 ~ N(m, s0^2), z ~ N(0, 1)), exact for polynomials."""
    u, w = np.polynomial.hermite_e.hermegauss(n)
    w = w / w.sum()
    U, Z = np.meshgrid(u, u, indexing="ij")
    W = np.outer(w, w)
    return U.ravel(), Z.ravel(), W.ravel()


def _gaussian_minimum(sched, t, s0, weighting):
    """Expected DSM loss of the exact score of 1-D data N(m, s0^2) at time t:
    w(t) (1/sigma^2 - 1/C_t), C_t = alpha^2 s0^2 + sigma^2 (E||grad log p_t||^2 = 1/C_t)."""
    s2 = float(sched.sigma2(t))
    C = float(sched.alpha(t)) ** 2 * s0**2 + s2
    w = float(sched.g2(t)) if weighting == "g2" else s2
    return w * (1 / s2 - 1 / C)


@pytest.mark.parametrize("weighting", ["g2", "sigma2"])
def test_dsm_at_exact_gaussian_score_is_the_known_minimum(weighting):
    """For data N(m, s0^2) and the exact score the per-time expectation is the closed-form
    minimum; Gauss-Hermite is exact here."""
    sched = SimpleSchedule()
    m, s0 = 0.7, 0.4
    score = gaussian_score(jnp.array([m]), jnp.array([[s0**2]]), sched)
    U, Z, W = _gauss_hermite_2d()
    x0 = jnp.asarray(m + s0 * U)[:, None]
    z = jnp.asarray(Z)[:, None]
    for t in (0.01, 0.1, 0.5, 1.0):
        tt = jnp.full(U.shape, t)
        loss = float(jnp.sum(W * _per_sample(score, sched, x0, tt, z, weighting)))
        assert loss == pytest.approx(_gaussian_minimum(sched, t, s0, weighting), rel=1e-10)


def test_dsm_gradient_vanishes_at_exact_affine_score():
    """An affine model s = a x + b minimises the DSM loss at the exact score of N(m, s0^2)."""
    sched = OUSchedule(beta=2.0)
    m, s0, t = -0.3, 0.8, 0.4
    U, Z, W = _gauss_hermite_2d()
    x0 = jnp.asarray(m + s0 * U)[:, None]
    z = jnp.asarray(Z)[:, None]
    tt = jnp.full(U.shape, t)

    def loss(ab):
        model = lambda x, t: ab[0] * x + ab[1]  # noqa: E731
        return jnp.sum(W * dsm_per_sample(model, sched, x0, tt, z))

    al, s2 = float(sched.alpha(t)), float(sched.sigma2(t))
    C = al**2 * s0**2 + s2
    exact = jnp.array([-1 / C, al * m / C])
    g = jax.grad(loss)(exact)
    np.testing.assert_allclose(g, 0.0, atol=1e-10)
    assert float(loss(exact + jnp.array([0.05, 0.0]))) > float(loss(exact))
    assert float(loss(exact + jnp.array([0.0, -0.05]))) > float(loss(exact))


def test_dsm_loss_monte_carlo_matches_time_integral():
    """dsm_loss averages over t ~ U[t_min, T]: compare with the quadrature of the minimum."""
    sched = CosineSchedule()
    mean, cov = jnp.array([0.5, -1.0]), jnp.array([[0.3, 0.1], [0.1, 0.2]])
    score = gaussian_score(mean, cov, sched)
    x0 = jax.random.multivariate_normal(jax.random.PRNGKey(1), mean, cov, (40_000,))
    ts = np.linspace(sched.t_min, sched.T, 4001)
    a2, s2 = np.asarray(sched.alpha(ts)) ** 2, np.asarray(sched.sigma2(ts))
    Ct = a2[:, None, None] * np.asarray(cov)[None] + s2[:, None, None] * np.eye(2)[None]
    vals = np.asarray(sched.g2(ts)) * (2 / s2 - np.trace(np.linalg.inv(Ct), axis1=1, axis2=2))
    expect = np.trapezoid(vals, ts) / (sched.T - sched.t_min)
    loss = eqx.filter_jit(lambda k, xx, norm: dsm_loss(score, sched, xx, k, normalize_by_dim=norm))
    per = [float(loss(jax.random.PRNGKey(10 + k), x0, False)) for k in range(4)]
    mean_mc, se = np.mean(per), np.std(per, ddof=1) / 2
    assert abs(mean_mc - expect) < max(5 * se, 0.03 * expect)
    # the normalised loss is the plain one divided by d
    a = loss(jax.random.PRNGKey(0), x0, False)
    b = loss(jax.random.PRNGKey(0), x0, True)
    assert float(b) == pytest.approx(float(a) / 2, rel=1e-12)


@pytest.mark.parametrize("weighting", ["g2", "sigma2"])
def test_heldout_loss_of_exact_score_is_the_time_averaged_minimum(weighting):
    """Held-out DSM loss of the exact score on fresh draws of N(m, s0^2): its expectation is the
    closed-form minimum averaged over t ~ U[t_min, T]; the mean must be within 4 reported standard
    errors of it, the standard error must match the spread of the mean over seeds, and the result
    must be a deterministic function of the seed."""
    sched = SimpleSchedule()
    m, s0 = 0.7, 0.4
    score = gaussian_score(jnp.array([m]), jnp.array([[s0**2]]), sched)
    x = m + s0 * np.random.default_rng(0).normal(size=(2000, 1))
    expect = quad(lambda t: _gaussian_minimum(sched, t, s0, weighting), sched.t_min, sched.T, limit=200)[0]
    expect /= sched.T - sched.t_min
    runs = [heldout_loss(score, sched, x, seed=s, repeats=2, weighting=weighting, batch_size=1500) for s in range(6)]
    means, ses = np.array([r[0] for r in runs]), np.array([r[1] for r in runs])
    for mean, se in runs:
        assert abs(mean - expect) < 4 * se, (mean, expect, se)
    # the pooled mean is within 4 standard errors of the pooled estimate too (6x the data)
    assert abs(means.mean() - expect) < 4 * ses.mean() / math.sqrt(6)
    # se = sd / sqrt(n repeats): the scatter of the means over seeds agrees with it
    assert 0.4 < means.std(ddof=1) / ses.mean() < 2.0, (means.std(ddof=1), ses.mean())
    assert runs[0] == heldout_loss(score, sched, x, seed=0, repeats=2, weighting=weighting, batch_size=1500)
    assert runs[0] != runs[1]


def test_heldout_loss_bad_input():
    sched = SimpleSchedule()
    score = gaussian_score(jnp.zeros(2), jnp.eye(2) * 0.25, sched)
    with pytest.raises(HbarInputError, match="NaN"):
        heldout_loss(score, sched, np.array([[0.0, np.nan]]))
    with pytest.raises(HbarInputError, match="weighting"):
        heldout_loss(score, sched, np.zeros((3, 2)), weighting="lambda")
    with pytest.raises(HbarInputError, match="repeats"):
        heldout_loss(score, sched, np.zeros((3, 2)), repeats=0)
