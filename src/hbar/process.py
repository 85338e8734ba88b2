"""The h-family of diffusion processes as one object (docs/theory.md section 2).

For a schedule (f, g) and a score s the backward h-process, written in forward-time
notation and run from t = T down to t_min, is

    dx = u_h(x, t) dt + sqrt(h) g(t) dw_bar,     u_h(x, t) = f(t) x - (1+h)/2 g(t)^2 s(x, t),

h = 0 being the probability-flow ODE (velocity v0 = u_0) and h = 1 the reverse SDE. Its
time reversal when s is the true score is the forward h-process with the same diffusion
sqrt(h) g and drift u_h + h g^2 s = f x - (1-h)/2 g^2 s (Nelson's relation: forward minus
backward drift = squared diffusion times the score).

Everything that needs the h-family -- the sampler, the likelihood solves, the WKB
characteristics, the path densities, the closed-form oracle and the Fokker-Planck
reference -- takes it from :class:`HProcess`; the formula for u_h is written only in
:meth:`HProcess.drift_given_score`. Solvers stay separate (``hbar.ode``, ``hbar.sampling``).

``drift_given_score`` is an affine map of (x, s), so it also serves for matrices (the
linear drift of an affine score, s = A x + b gives u = K x - k with K = drift_given_score(I, A),
-k = drift_given_score(0, b)) and for divergences (div u = drift_given_score(d, div s)).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.numpy as jnp
from jax import Array

from hbar.schedules import Schedule
from hbar.validation import HbarInputError

__all__ = ["HProcess"]


class HProcess(eqx.Module):
    """The h-family for one schedule and one score (docs/theory.md section 2).

    ``score`` is any score callable s(x, t), (n, d) -> (n, d), or None for the processes
    that do not use one (the noising process h = 1 of :meth:`forward_drift`). Shapes: x and s
    are (n, d) (or any array the affine map broadcasts over); t is a scalar; h a scalar or
    traced array.
    """

    schedule: Schedule = eqx.field(static=True)
    score: Callable | None = None

    # --- the one formula -------------------------------------------------------------------
    def drift_given_score(self, x: Any, s: Any, t: Array | float, h: Array | float) -> Array:
        """u_h = f(t) x - (1+h)/2 g(t)^2 s, for a score value s already evaluated at (x, t)."""
        return self.schedule.f(t) * x - 0.5 * (1.0 + h) * self.schedule.g2(t) * s

    def drift_h_slope_given_score(self, s: Any, t: Array | float) -> Array:
        """du_h/dh = -(g^2/2) s (u_h is affine in h; its slope, from the one formula)."""
        zero = jnp.zeros_like(s)
        return self.drift_given_score(zero, s, t, 1.0) - self.drift_given_score(zero, s, t, 0.0)

    def diffusion2(self, t: Array | float, h: Array | float) -> Array:
        """Squared noise amplitude h g(t)^2 (the variance rate of the h-process)."""
        return h * self.schedule.g2(t)

    def forward_drift_given_score(self, x: Any, s: Any, t: Array | float, h: Array | float) -> Array:
        """Drift of the forward h-process, u_h + h g^2 s = f x - (1-h)/2 g^2 s."""
        return self.drift_given_score(x, s, t, h) + self.diffusion2(t, h) * s

    # --- with the process's own score ----------------------------------------------------------
    def _score(self, x: Array, t: Array | float) -> Array:
        if self.score is None:
            raise HbarInputError("this HProcess has no score; build it as HProcess(schedule, score)")
        return self.score(x, t)

    def drift(self, x: Array, t: Array | float, h: Array | float) -> Array:
        """u_h(x, t) = f x - (1+h)/2 g^2 s(x, t), shape (n, d)."""
        return self.drift_given_score(x, self._score(x, t), t, h)

    def velocity(self, x: Array, t: Array | float) -> Array:
        """Probability-flow velocity v0 = u_0 = f x - (g^2/2) s, shape (n, d)."""
        return self.drift(x, t, 0.0)

    def forward_drift(self, x: Array, t: Array | float, h: Array | float) -> Array:
        """Forward h-process drift f x - (1-h)/2 g^2 s. Without a score only h = 1 (the
        noising process dx = f x dt + g dw) is defined: a concrete h != 1 is an error, and a
        traced h must be checked by the caller before tracing."""
        if self.score is None:
            if isinstance(h, (int, float)) and float(h) != 1.0:
                raise HbarInputError("the forward h-process with h != 1 needs a score (the true score for P^h)")
            return self.schedule.f(t) * x
        return self.forward_drift_given_score(x, self._score(x, t), t, h)

    # --- prior -----------------------------------------------------------------------------------
    def prior_sample(self, key: Array, n: int, d: int, dtype: Any = None) -> Array:
        """n draws x_T ~ pi = N(0, prior_std^2 I), shape (n, d)."""
        return self.schedule.prior_sample(key, n, d, dtype=dtype)

    def prior_logp(self, x: Array) -> Array:
        """log pi(x), shape (n,)."""
        return self.schedule.prior_logp(x)

    def prior_score(self, x: Array) -> Array:
        """grad log pi(x) = -x / prior_std^2, shape (n, d)."""
        return self.schedule.prior_score(x)
