"""Independent references for the hbar.path tests (imported as ``from _path_cases import ...``).

Gaussian transition densities, the discrete Euler-chain moments by explicit recursion and the
continuous-time model moments by scipy's solve_ivp, all written in numpy/scipy without hbar's
own drift code (docs/theory.md section 3).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.integrate import solve_ivp

from hbar.schedules import OUSchedule, SimpleSchedule

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
