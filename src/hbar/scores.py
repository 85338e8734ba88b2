"""Exact and perturbed analytic scores (docs/theory.md sections 1, 7).

Public contract: a *score* is any JAX-traceable callable ``score(x, t)`` with ``x`` of
shape (n, d) and ``t`` a scalar, returning an array of shape (n, d). Trained networks
(:mod:`hbar.networks`) and the analytic scores here all satisfy it.

For data p_0 = sum_k w_k N(mu_k, S_k) and a linear schedule, the forward marginal is

    p_t = sum_k w_k N(alpha(t) mu_k, alpha(t)^2 S_k + sigma(t)^2 I),

so its score is s(x, t) = sum_k r_k(x) [-(alpha^2 S_k + sigma^2 I)^{-1} (x - alpha mu_k)]
with responsibilities r_k. The "imperfect score" experiments of the paper use
s_eps = (1 + eps) s + shift(x, t), which :class:`PerturbedScore` provides.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import Array

from hbar.gaussian import as_covariance
from hbar.schedules import Schedule
from hbar.validation import HbarInputError

__all__ = [
    "ScoreFn",
    "declared_dim",
    "check_score_shape",
    "GaussianMixtureScore",
    "gaussian_score",
    "PerturbedScore",
    "AffineScore",
    "DiagonalGaussianScore",
]


class ScoreFn(Protocol):
    def __call__(self, x: Array, t: Array | float) -> Array: ...


def declared_dim(score: Callable) -> int | None:
    """The data dimension a score declares: ``score.dim`` (analytic and wrapped scores) or
    ``score.d`` (hbar networks); None when it declares neither."""
    dim = getattr(score, "dim", None)
    if dim is None:
        dim = getattr(score, "d", None)
    return None if dim is None else int(dim)


def check_score_shape(score: Callable, d: int, what: str = "x") -> None:
    """Clear error (:class:`HbarInputError`) unless ``score`` maps (n, d) points to (n, d).

    Checks the declared dimension (:func:`declared_dim`) against ``d`` (the width of ``what``)
    and traces the score once abstractly on a (2, d) input (:func:`jax.eval_shape`, nothing is
    computed): a score written for another dimension fails here with both shapes named
    instead of deep inside a jitted solve."""
    dim = declared_dim(score)
    if dim is not None and dim != d:
        raise HbarInputError(f"{what} has dimension {d} (shape (n, {d})), but the score is for d = {dim}"
                             + (" (a 1-D array is read as n points in 1-D: pass shape (n, d))" if d == 1 else ""))
    dtype = jnp.result_type(float)
    try:
        out = jax.eval_shape(score, jax.ShapeDtypeStruct((2, d), dtype), jax.ShapeDtypeStruct((), dtype))
    except Exception as err:  # the score cannot take (n, d) input: name the shapes
        raise HbarInputError(f"the score fails on input of shape (n, {d}) from {what}: "
                             f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
    shape = getattr(out, "shape", None)
    if shape != (2, d):
        raise HbarInputError(f"the score must map shape (n, d) = (2, {d}) to (2, {d}), got "
                             f"{shape if shape is not None else type(out).__name__}")


class GaussianMixtureScore(eqx.Module):
    """Exact score of the diffused Gaussian mixture sum_k w_k N(mu_k, S_k).

    Shapes: weights (K,), means (K, d), covs (K, d, d). ``schedule`` is static.
    ``log_density(x, t)`` gives log p_t(x), shape (n,), for exact-NLL checks.
    """

    weights: Array
    means: Array
    covs: Array
    schedule: Schedule = eqx.field(static=True)

    def __init__(self, weights, means, covs, schedule: Schedule):
        w = jnp.asarray(weights, dtype=jnp.result_type(float))
        mu = jnp.asarray(means, dtype=w.dtype)
        cv = jnp.asarray(covs, dtype=w.dtype)
        if mu.ndim != 2 or w.shape != (mu.shape[0],):
            raise HbarInputError(f"mixture: weights (K,) and means (K, d) expected, got {w.shape}, {mu.shape}")
        K, d = mu.shape
        if cv.ndim == 1:  # isotropic std per component
            cv = (cv**2)[:, None, None] * jnp.eye(d)[None]
        if cv.shape != (K, d, d):
            raise HbarInputError(f"mixture: covs must be (K, d, d) or stds (K,), got {cv.shape}")
        if not bool(jnp.all(w > 0)):
            raise HbarInputError("mixture weights must be positive")
        self.weights = w / jnp.sum(w)
        self.means = mu
        self.covs = cv
        self.schedule = schedule

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def _components(self, t):
        a = self.schedule.alpha(t)
        s2 = self.schedule.sigma2(t)
        d = self.means.shape[1]
        cov_t = a**2 * self.covs + s2 * jnp.eye(d, dtype=self.covs.dtype)[None]
        chol = jnp.linalg.cholesky(cov_t)  # (K, d, d)
        return a * self.means, chol

    def _log_comp_and_score(self, x, t):
        mean_t, chol = self._components(t)
        diff = x[:, None, :] - mean_t[None]  # (n, K, d)
        # solve L y = diff for each component
        y = jax.vmap(lambda L, dk: jax.scipy.linalg.solve_triangular(L, dk.T, lower=True).T,
                     in_axes=(0, 1), out_axes=1)(chol, diff)  # (n, K, d)
        logdet = 2 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)  # (K,)
        d = x.shape[-1]
        logc = (jnp.log(self.weights)[None] - 0.5 * jnp.sum(y**2, -1) - 0.5 * logdet[None]
                - 0.5 * d * jnp.log(2 * jnp.pi))  # (n, K)
        # component scores: -cov^{-1} diff = -L^{-T} y
        sc = jax.vmap(lambda L, yk: -jax.scipy.linalg.solve_triangular(L.T, yk.T, lower=False).T,
                      in_axes=(0, 1), out_axes=1)(chol, y)  # (n, K, d)
        return logc, sc

    def log_density(self, x: Array, t: Array | float) -> Array:
        """log p_t(x), shape (n,)."""
        logc, _ = self._log_comp_and_score(x, t)
        return jax.nn.logsumexp(logc, axis=-1)

    def __call__(self, x: Array, t: Array | float) -> Array:
        logc, sc = self._log_comp_and_score(x, t)
        r = jax.nn.softmax(logc, axis=-1)
        return jnp.einsum("nk,nkd->nd", r, sc)

    def sample_data(self, key: Array, n: int) -> Array:
        """n draws from the data mixture p_0, shape (n, d)."""
        k1, k2 = jax.random.split(key)
        comp = jax.random.choice(k1, self.weights.shape[0], (n,), p=self.weights)
        chol = jnp.linalg.cholesky(self.covs)
        z = jax.random.normal(k2, (n, self.dim), dtype=self.means.dtype)
        return self.means[comp] + jnp.einsum("nij,nj->ni", chol[comp], z)


class AffineScore(eqx.Module):
    """An affine score s(x, t) = A(t) x + b(t) with A(t) = -c(t) P(t) and b(t) given.

    Constructed for Gaussian data N(m0, S0): the exact score has
    A(t) = -(alpha^2 S0 + sigma^2 I)^{-1}, b(t) = -A(t) alpha m0. ``scale_eps`` multiplies
    the whole score by (1 + eps); ``shift`` adds a constant vector b_shift * shift_profile(t).
    Such scores keep every q^h Gaussian, which the closed-form oracle in
    :mod:`hbar.references` exploits (docs/theory.md section 7).
    """

    mean: Array
    cov: Array
    scale_eps: float
    shift: Array
    schedule: Schedule = eqx.field(static=True)

    def __init__(self, mean, cov, schedule: Schedule, scale_eps: float = 0.0, shift=None):
        m = jnp.atleast_1d(jnp.asarray(mean, dtype=jnp.result_type(float)))
        d = m.shape[0]
        self.mean = m
        self.cov = jnp.asarray(as_covariance(cov, d, "Gaussian cov"), dtype=m.dtype)
        self.scale_eps = float(scale_eps)
        self.shift = jnp.zeros(d, m.dtype) if shift is None else jnp.asarray(shift, m.dtype).reshape(d)
        self.schedule = schedule

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def affine(self, t: Array | float) -> tuple[Array, Array]:
        """(A(t), b(t)) with s(x, t) = x @ A(t).T + b(t). Shapes (d, d), (d,)."""
        a = self.schedule.alpha(t)
        s2 = self.schedule.sigma2(t)
        d = self.dim
        prec = jnp.linalg.inv(a**2 * self.cov + s2 * jnp.eye(d, dtype=self.cov.dtype))
        A = -(1.0 + self.scale_eps) * prec
        b = (1.0 + self.scale_eps) * prec @ (a * self.mean) + self.shift
        return A, b

    def __call__(self, x: Array, t: Array | float) -> Array:
        A, b = self.affine(t)
        return x @ A.T + b


def gaussian_score(mean, cov, schedule: Schedule, scale_eps: float = 0.0, shift=None) -> AffineScore:
    """Exact (eps = 0, shift = None) or perturbed score of Gaussian data N(mean, cov)."""
    return AffineScore(mean, cov, schedule, scale_eps=scale_eps, shift=shift)


class PerturbedScore(eqx.Module):
    """s_eps(x, t) = (1 + eps) base(x, t) + shift(x, t): the paper's imperfect-score device.

    ``eps`` is stored as an array leaf, so one compiled function serves every eps (a scan over
    eps does not recompile). ``shift`` is either None, a constant vector (d,), or a smooth
    callable shift(x, t) -> (n, d). ``dim`` is the base score's dimension when it has one.
    """

    base: Callable
    eps: Array
    shift: Callable | Array | None

    def __init__(self, base: Callable, eps: float | Array = 0.0, shift=None):
        self.base = base
        self.eps = jnp.asarray(eps, dtype=jnp.result_type(float))
        if self.eps.ndim != 0:
            raise HbarInputError(f"PerturbedScore: eps must be a scalar, got shape {self.eps.shape}")
        self.shift = shift if (shift is None or callable(shift)) else jnp.asarray(shift)

    @property
    def dim(self) -> int | None:
        return declared_dim(self.base)

    def __call__(self, x: Array, t: Array | float) -> Array:
        out = (1.0 + self.eps) * self.base(x, t)
        if self.shift is None:
            return out
        if callable(self.shift):
            return out + self.shift(x, t)
        return out + self.shift


class DiagonalGaussianScore(eqx.Module):
    """The affine score of factorised Gaussian data N(mean, diag(var)), perturbed like
    :class:`AffineScore` but with O(d) cost (for large d):

        s(x, t) = -(1 + eps) (x - alpha mean) / (alpha^2 var + sigma^2) + shift.

    Every coordinate evolves independently, so the closed-form oracle is a sum of 1-D oracles
    (:func:`hbar.references.factorised_oracle`). ``affine(t)`` gives the full (A, b) of
    :class:`AffineScore` (A diagonal) for checks with :func:`hbar.references.gaussian_oracle`
    in small d. Shapes: mean, var, shift (d,).
    """

    mean: Array
    var: Array
    scale_eps: float
    shift: Array
    schedule: Schedule = eqx.field(static=True)

    def __init__(self, mean, var, schedule: Schedule, scale_eps: float = 0.0, shift=None):
        m = jnp.atleast_1d(jnp.asarray(mean, dtype=jnp.result_type(float)))
        d = m.shape[0]
        v = jnp.broadcast_to(jnp.asarray(var, dtype=m.dtype), (d,))
        if m.ndim != 1 or not bool(jnp.all(v >= 0)):
            raise HbarInputError("DiagonalGaussianScore: mean must be (d,) and var (d,) non-negative")
        self.mean = m
        self.var = v
        self.scale_eps = float(scale_eps)
        self.shift = jnp.zeros(d, m.dtype) if shift is None else jnp.broadcast_to(jnp.asarray(shift, m.dtype), (d,))
        self.schedule = schedule

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def _prec(self, t):
        a = self.schedule.alpha(t)
        return a, 1.0 / (a**2 * self.var + self.schedule.sigma2(t))

    def affine(self, t: Array | float) -> tuple[Array, Array]:
        """(A(t), b(t)) with s = x @ A.T + b: A = -(1 + eps) diag(prec), shapes (d, d), (d,)."""
        a, prec = self._prec(t)
        return -(1.0 + self.scale_eps) * jnp.diag(prec), (1.0 + self.scale_eps) * prec * a * self.mean + self.shift

    def __call__(self, x: Array, t: Array | float) -> Array:
        a, prec = self._prec(t)
        return -(1.0 + self.scale_eps) * prec * (x - a * self.mean) + self.shift
