"""Summary statistics reported with every Monte Carlo or per-point number."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["mean_se", "pareto_khat", "khat_threshold"]


def mean_se(a: Any) -> tuple[float, float]:
    """(mean, standard error of the mean) of the entries of ``a``: se = sd / sqrt(n) with the
    n - 1 (unbiased) variance; se is NaN for fewer than two entries, both are NaN for none.
    Callers drop failed entries first (and report how many they dropped)."""
    arr = np.asarray(a, dtype=float).ravel()
    if arr.size == 0:
        return math.nan, math.nan
    se = float(arr.std(ddof=1) / math.sqrt(arr.size)) if arr.size > 1 else math.nan
    return float(arr.mean()), se


def khat_threshold(n_samples: int) -> float:
    """Largest Pareto k-hat at which an importance-sampling mean of ``n_samples`` weights and its
    sample-based standard error are trusted: min(1 - 1/log10(M), 0.7) (Vehtari et al. 2024,
    "Pareto smoothed importance sampling", section 3; docs/theory.md section 3.10)."""
    return min(1.0 - 1.0 / math.log10(max(int(n_samples), 11)), 0.7)


def _gpd_shape(e: np.ndarray) -> np.ndarray:
    """Shape xi of a generalised Pareto fitted to the exceedances e (rows, t), each row sorted
    ascending and positive: the profile-likelihood-weighted estimate of Zhang & Stephens (2009)
    over a grid of m = 30 + sqrt(t) values of theta = -xi / sigma, then shrunk towards 1/2 with
    the weight of 10 pseudo-observations (as in PSIS). Returns (rows,)."""
    t = e.shape[1]
    m = 30 + int(math.sqrt(t))
    j = np.arange(1, m + 1)
    q = e[:, max(int(t / 4 + 0.5) - 1, 0)]  # first quartile of the exceedances
    theta = 1.0 / e[:, -1:] + (1.0 - np.sqrt(m / (j - 0.5)))[None, :] / (3.0 * q[:, None])  # (rows, m)
    with np.errstate(invalid="ignore", divide="ignore"):  # all-equal exceedances: NaN, no fit
        k = np.mean(np.log1p(-theta[:, :, None] * e[:, None, :]), axis=2)  # (rows, m): xi for each theta
        loglik = t * (np.log(-theta / k) - k - 1.0)
        post = np.exp(loglik - loglik.max(axis=1, keepdims=True))
        theta_hat = np.sum(theta * post, axis=1) / np.sum(post, axis=1)
        xi = np.mean(np.log1p(-theta_hat[:, None] * e), axis=1)
    return (t * xi + 10 * 0.5) / (t + 10)


def pareto_khat(log_weights: Any) -> np.ndarray:
    """Pareto k-hat of each row of importance log-weights (n, M) -> (n,) (docs/theory.md section 3.10).

    The largest t = min(M/5, 3 sqrt(M)) weights (scaled by the row maximum) minus the next one are
    fitted by a generalised Pareto distribution (only the strictly positive exceedances); its shape
    k estimates the tail index of the weights: E[w^r] is finite for r < 1/k, so k > 1/2 means
    infinite variance, and the sample variance (hence the delta-method s.e.) understates the Monte
    Carlo error; above :func:`khat_threshold` the estimate itself is unreliable (Vehtari et al.
    2024). A weight of zero (log-weight -inf) is a valid weight. +inf where fewer than 5 tail
    weights stand above the cut-off although the row is not flat (a few weights dominate the rest
    beyond the float range, or by ties: the heaviest case, flagged); NaN where the row is flat
    (all tail weights equal, e.g. the exact score), holds NaN or +inf, or M < 25."""
    lw = np.atleast_2d(np.asarray(log_weights, dtype=float))
    n, M = lw.shape
    t = int(min(M / 5, 3 * math.sqrt(M)))
    out = np.full(n, np.nan)
    if t < 5:
        return out
    for i in range(n):
        row = lw[i]
        if np.any(np.isnan(row)) or np.any(row == np.inf) or not np.isfinite(row.max()):
            continue
        top = np.sort(row)[-(t + 1):]
        w = np.exp(top - top[-1])  # the largest weight is 1
        e = w[1:] - w[0]  # exceedances over the (t+1)-th largest weight, ascending
        e = e[e > 0]
        if e.size >= 5:
            out[i] = _gpd_shape(e[None, :])[0]
        elif w[-1] > w[0]:
            out[i] = np.inf
    return out
