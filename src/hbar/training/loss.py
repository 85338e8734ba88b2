"""The denoising score-matching loss (docs/theory.md section 3).

Per sample, averaged over a batch:

    l(x0, t, z) = w(t) || s(alpha(t) x0 + sigma(t) z, t) + z / sigma(t) ||^2   [/ d if normalize_by_dim]

with t ~ U[t_min, T], z ~ N(0, I_d), x0 from the training set, and w(t) = g(t)^2 (default,
``weighting="g2"``: the likelihood / path-KL weighting for which the h = 1 path KL equals
KL(p_T || pi) + (1/2) int g^2 E||grad log p_t - s||^2 dt up to a constant) or
w(t) = sigma(t)^2 (``weighting="sigma2"``, the "simple" weighting). For the exact score the
expected loss at time t is its minimum w(t) (d / sigma^2 - E_{p_t} ||grad log p_t||^2)
(times 1/d if normalised); for Gaussian data N(m, S0) E||grad log p_t||^2 = tr C_t^{-1},
C_t = alpha^2 S0 + sigma^2 I.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from hbar.schedules import Schedule
from hbar.stats import mean_se
from hbar.validation import HbarInputError, check_points, check_positive_int

__all__ = ["WEIGHTINGS", "dsm_weight", "dsm_per_sample", "dsm_loss", "heldout_loss"]

WEIGHTINGS = ("g2", "sigma2")


def dsm_weight(schedule: Schedule, t: Array, weighting: str = "g2") -> Array:
    """w(t) = g(t)^2 (``"g2"``) or sigma(t)^2 (``"sigma2"``); shape of t."""
    if weighting == "g2":
        return schedule.g2(t)
    if weighting == "sigma2":
        return schedule.sigma2(t)
    raise HbarInputError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")


def _score_rows(score: Callable, x: Array, t: Array) -> Array:
    """Evaluate score at one time per row: x (n, d), t (n,) -> (n, d).

    hbar networks take a time vector directly; other scores (scalar-t contract) are
    vmapped over rows."""
    if getattr(score, "accepts_time_vector", False):
        return score(x, t)
    return jax.vmap(lambda xi, ti: score(xi[None, :], ti)[0])(x, t)


def dsm_per_sample(
    score: Callable,
    schedule: Schedule,
    x0: Array,
    t: Array,
    z: Array,
    weighting: str = "g2",
    normalize_by_dim: bool = False,
) -> Array:
    """Per-sample DSM loss w(t_i) || s(alpha_i x0_i + sigma_i z_i, t_i) + z_i / sigma_i ||^2.

    x0 (n, d), t (n,), z (n, d) -> (n,). Divided by d if ``normalize_by_dim``."""
    x0 = jnp.asarray(x0)
    t = jnp.asarray(t, dtype=x0.dtype)
    z = jnp.asarray(z, dtype=x0.dtype)
    a = schedule.alpha(t)[:, None]
    sig = schedule.sigma(t)[:, None]
    xt = a * x0 + sig * z
    r = _score_rows(score, xt, t) + z / sig
    out = dsm_weight(schedule, t, weighting) * jnp.sum(r**2, axis=1)
    return out / x0.shape[1] if normalize_by_dim else out


def _sample_tz(schedule: Schedule, key: Array, n: int, d: int, dtype: Any) -> tuple[Array, Array]:
    kt, kz = jax.random.split(key)
    t = jax.random.uniform(kt, (n,), dtype=dtype, minval=schedule.t_min, maxval=schedule.T)
    z = jax.random.normal(kz, (n, d), dtype=dtype)
    return t, z


def dsm_loss(
    score: Callable,
    schedule: Schedule,
    x0: Array,
    key: Array,
    weighting: str = "g2",
    normalize_by_dim: bool = False,
) -> Array:
    """Batch DSM loss: mean over rows of :func:`dsm_per_sample` with t_i ~ U[t_min, T] and
    z_i ~ N(0, I) drawn from ``key``. x0 (n, d) -> scalar."""
    x0 = jnp.asarray(x0)
    t, z = _sample_tz(schedule, key, x0.shape[0], x0.shape[1], x0.dtype)
    return jnp.mean(dsm_per_sample(score, schedule, x0, t, z, weighting, normalize_by_dim))


@eqx.filter_jit
def _heldout_chunk(score, schedule, x, key, weighting, normalize_by_dim):
    t, z = _sample_tz(schedule, key, x.shape[0], x.shape[1], x.dtype)
    return dsm_per_sample(score, schedule, x, t, z, weighting, normalize_by_dim)


def heldout_loss(
    score: Callable,
    schedule: Schedule,
    x: Any,
    *,
    seed: int = 0,
    repeats: int = 1,
    weighting: str = "g2",
    normalize_by_dim: bool = False,
    batch_size: int = 4096,
) -> tuple[float, float]:
    """DSM loss of ``score`` on held-out points x (n, d): (mean, standard error).

    Every point is used ``repeats`` times with independent (t, z) (keys from ``seed``); the
    standard error is std / sqrt(n * repeats) of the per-sample losses. Deterministic for a
    fixed seed."""
    x = jnp.asarray(check_points(x, "held-out data"))
    if weighting not in WEIGHTINGS:
        raise HbarInputError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    repeats = check_positive_int(repeats, "repeats")
    batch_size = check_positive_int(batch_size, "batch_size")
    key = jax.random.PRNGKey(seed)
    vals = []
    for r in range(repeats):
        kr = jax.random.fold_in(key, r)
        for j, i0 in enumerate(range(0, x.shape[0], batch_size)):
            vals.append(np.asarray(_heldout_chunk(score, schedule, x[i0:i0 + batch_size],
                                                  jax.random.fold_in(kr, j), weighting, normalize_by_dim),
                                   dtype=np.float64))
    return mean_se(np.concatenate(vals))
