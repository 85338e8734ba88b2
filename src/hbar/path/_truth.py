"""The data distribution behind an exact analytic score (ground truth for the path KL checks)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from hbar.schedules import Schedule
from hbar.scores import AffineScore, GaussianMixtureScore
from hbar.validation import HbarInputError


class Truth:
    """AffineScore (Gaussian data N(m0, S0), must be unperturbed) or GaussianMixtureScore.

    Provides the score, data sampling, log p_t and, for Gaussian data, the moments
    m_t = alpha m0, C_t = alpha^2 S0 + sigma^2 I (docs/theory.md section 3)."""

    def __init__(self, truth: Any, schedule: Schedule):
        if isinstance(truth, AffineScore):
            if truth.scale_eps != 0.0 or bool(jnp.any(truth.shift != 0)):
                raise HbarInputError("truth must be the exact score (AffineScore with scale_eps = 0 and no shift)")
            self.gaussian = True
            self.mean, self.cov = truth.mean, truth.cov
        elif isinstance(truth, GaussianMixtureScore):
            self.gaussian = False
        else:
            raise HbarInputError("truth must be an exact AffineScore (Gaussian data) or a GaussianMixtureScore")
        if truth.schedule != schedule:
            raise HbarInputError("truth was built for a different schedule than the one given")
        self.score = truth
        self.schedule = schedule
        self.dim = truth.dim

    def moments(self, t):
        """(m_t (d,), C_t (d, d)) of the Gaussian marginal p_t."""
        a, s2 = self.schedule.alpha(t), self.schedule.sigma2(t)
        return a * self.mean, a**2 * self.cov + s2 * jnp.eye(self.dim, dtype=self.cov.dtype)

    def log_density(self, x: Array, t) -> Array:
        """log p_t(x), x (n, d) -> (n,)."""
        if not self.gaussian:
            return self.score.log_density(x, t)
        m, C = self.moments(t)
        L = jnp.linalg.cholesky(C)
        y = jax.scipy.linalg.solve_triangular(L, (x - m).T, lower=True)
        return (-0.5 * jnp.sum(y**2, axis=0) - jnp.sum(jnp.log(jnp.diag(L)))
                - 0.5 * self.dim * jnp.log(2 * jnp.pi))

    def sample_data(self, key: Array, n: int) -> Array:
        """n draws from p_data, (n, d)."""
        if not self.gaussian:
            return self.score.sample_data(key, n)
        z = jax.random.normal(key, (n, self.dim), dtype=self.mean.dtype)
        return self.mean + z @ jnp.linalg.cholesky(self.cov).T


def gauss_kl_to_prior(m: Array, C: Array, prior_var: float) -> float:
    """KL(N(m, C) || N(0, prior_var I)) = [tr C / v + |m|^2 / v - d + d log v - log det C] / 2."""
    d = m.shape[0]
    sign, logdet = np.linalg.slogdet(np.asarray(C))
    return float(0.5 * (np.trace(np.asarray(C)) / prior_var + float(m @ m) / prior_var - d
                        + d * math.log(prior_var) - logdet))
