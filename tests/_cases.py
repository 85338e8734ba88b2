"""Shared test cases (imported by several test modules)."""

import numpy as np

import hbar


def gaussian_case(d, eps, seed=0, schedule=None):
    """Gaussian data N(m0, S0) in d dimensions with a wrong affine score (scaled by 1 + eps and
    shifted), an OU schedule by default, and 4-5 data points. Returns (schedule, score, m0, S0, x)."""
    rng = np.random.default_rng(seed)
    B = rng.normal(size=(d, d)) / np.sqrt(d)
    S0 = B @ B.T + 0.3 * np.eye(d)
    m0 = 0.5 * rng.normal(size=d)
    s = schedule or hbar.OUSchedule(beta=1.0, t_min=1e-2, T=8.0)
    score = hbar.gaussian_score(m0, S0, s, scale_eps=eps, shift=0.1 * rng.normal(size=d))
    x = rng.multivariate_normal(m0, S0, size=5)
    return s, score, m0, S0, x
