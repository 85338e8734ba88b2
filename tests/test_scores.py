"""Analytic scores: gradients of the exact log-densities, perturbations, the score contract."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hbar


def test_mixture_score_is_gradient_of_log_density():
    s = hbar.SimpleSchedule()
    sc = hbar.GaussianMixtureScore([1.0, 2.0, 1.0], [[0, 0], [1, -1], [-2, 1]], [0.2, 0.5, 0.3], s)
    x = jax.random.normal(jax.random.PRNGKey(0), (7, 2))
    for t in (0.01, 0.3, 1.0):
        auto = jax.grad(lambda z: jnp.sum(sc.log_density(z, t)))(x)
        np.testing.assert_allclose(np.asarray(sc(x, t)), np.asarray(auto), rtol=1e-10, atol=1e-10)
        assert sc(x, t).shape == x.shape


def test_mixture_marginal_is_the_diffused_data():
    """log p_t from the class equals a direct Gaussian-mixture density with
    means alpha mu_k and covariances alpha^2 S_k + sigma^2 I."""
    from scipy.stats import multivariate_normal

    s = hbar.CosineSchedule()
    w, mu, sd = np.array([0.3, 0.7]), np.array([[1.0, 0.0], [-1.0, 0.5]]), np.array([0.2, 0.4])
    sc = hbar.GaussianMixtureScore(w, mu, sd, s)
    x = np.array([[0.3, 0.1], [-1.0, 2.0]])
    t = 0.4
    a, s2 = float(s.alpha(t)), float(s.sigma2(t))
    dens = sum(wk * multivariate_normal(a * m, (a**2 * sk**2 + s2) * np.eye(2)).pdf(x) for wk, m, sk in zip(w, mu, sd))
    np.testing.assert_allclose(np.exp(np.asarray(sc.log_density(x, t))), dens, rtol=1e-10)


def test_gaussian_score_matches_one_component_mixture_and_perturbations():
    s = hbar.OUSchedule()
    cov = np.array([[1.0, 0.3], [0.3, 0.5]])
    g = hbar.gaussian_score([0.5, -0.2], cov, s)
    m = hbar.GaussianMixtureScore([1.0], [[0.5, -0.2]], cov[None], s)
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 2))
    np.testing.assert_allclose(np.asarray(g(x, 0.7)), np.asarray(m(x, 0.7)), rtol=1e-10)
    gp = hbar.gaussian_score([0.5, -0.2], cov, s, scale_eps=0.1, shift=[0.2, 0.0])
    pert = hbar.PerturbedScore(m, eps=0.1, shift=jnp.array([0.2, 0.0]))
    np.testing.assert_allclose(np.asarray(gp(x, 0.7)), np.asarray(pert(x, 0.7)), rtol=1e-10)
    A, b = gp.affine(0.7)
    np.testing.assert_allclose(np.asarray(x @ A.T + b), np.asarray(gp(x, 0.7)))


def test_bad_mixture_inputs():
    s = hbar.SimpleSchedule()
    with pytest.raises(hbar.HbarInputError):
        hbar.GaussianMixtureScore([1.0, 1.0], [[0.0, 0.0]], [0.1], s)
    with pytest.raises(hbar.HbarInputError):
        hbar.GaussianMixtureScore([1.0, -1.0], [[0.0], [1.0]], [0.1, 0.1], s)
