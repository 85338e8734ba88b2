"""The probability-flow log-density solve (docs/theory.md section 4).

Along the probability-flow characteristic dx/dt = v0(x, t) of :class:`hbar.process.HProcess`,
started at a point x at time t0 and integrated towards noise (t0 -> T),

    log q^0_{t0}(x) = log pi(x_T) + int_{t0}^T div v0(x_t, t) dt.

The divergence is exact (d jvps) or the Hutchinson–Skilling estimate eps^T (dv0/dx) eps with a
probe eps fixed along the trajectory (unbiased, since the log-density is linear in the
integrand). Used by :func:`hbar.nll` and by the finite-difference WKB baseline's nested solves.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
from jax import Array

from hbar.derivatives import divergence, divergence_hutchinson
from hbar.ode import ODEOptions, solve_ode
from hbar.process import HProcess

__all__ = ["velocity_field", "pf_log_likelihood"]


def velocity_field(proc: HProcess, probe: Array | None = None) -> Callable:
    """The ODE right-hand side (t, (x, delta)) -> (v0(x, t), div v0(x, t)) of the solve above:
    exact divergence when ``probe`` is None, else the Hutchinson estimate with ``probe`` (n, d)."""

    def field(t, y):
        X, _ = y
        if probe is None:
            return divergence(lambda z: proc.velocity(z, t), X)
        return divergence_hutchinson(lambda z: proc.velocity(z, t), X, probe)

    return field


def pf_log_likelihood(proc: HProcess, x: Array, t0: Array | float, options: ODEOptions,
                      probe: Array | None = None, bound: Array | float | None = None) -> dict[str, Array]:
    """log q^0_{t0}(x) by the forward probability-flow solve from t0 to T (traceable).

    x: (n, d) points at time t0; probe: None for the exact divergence, else (n, d)
    Hutchinson probes; bound: the solve fails as soon as |x_t| exceeds it or turns non-finite
    (docs/theory.md section 14.1). Returns dict(ell0 (n,), x_T (n, d), ok (bool), evals (int)).
    """
    y0 = (x, jnp.zeros(x.shape[0], dtype=x.dtype))
    sol = solve_ode(velocity_field(proc, probe), y0, t0, proc.schedule.T, options, bound=bound,
                    bounded=lambda y: y[0])
    x_T, delta = sol["y1"]
    return dict(ell0=proc.prior_logp(x_T) + delta, x_T=x_T, ok=sol["ok"], evals=sol["evals"])
