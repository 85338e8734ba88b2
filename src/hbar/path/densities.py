"""Path log-densities, Onsager–Machlup actions and path sampling (docs/theory.md section 3).

A discretised path is ``path`` (steps + 1, n, d) with its grid ``times`` (steps + 1,); forward
paths are stored along increasing times, backward ones along decreasing times, and every
function accepts either order. One step of a process dx = F dt + sqrt(h g^2) dw travelling along
its grid goes from (x_a, t_a) to (x_b, t_b), dt = t_b - t_a, D = |dt|; with the residual
r_k = x_b - x_a - F(x*, t*) dt and the variance V_k = h g(t*)^2 D (``HProcess.diffusion2`` times D)

    A[x]     = sum_k ||r_k||^2 / (2 V_k) + sum_k J_k                  (the action)
    log P[x] = log p_start(x_0) - A[x] - sum_k (d/2) log(2 pi V_k)     (the path log-density)

* Ito (alpha = 0): (x*, t*) = (x_a, t_a), J_k = 0; exactly the Euler–Maruyama transition
  N(x_b; x_a + F dt, V I) that :func:`hbar.sampling.sample` uses.
* midpoint (alpha = 1/2): (x*, t*) = ((x_a + x_b)/2, (t_a + t_b)/2), J_k = (dt/2) div F(x*, t*),
  the first-order expansion of the log-Jacobian -log det(I - dt/2 dF/dx) of the implicit
  midpoint transition (exact up to O(D^2) per step). Forward process: J = 1/2 int div f dt
  (= d f D / 2 per step); backward model (dt < 0): J_k = -(D/2) div u_h
  = -(D/2) [d f - (1+h)/2 g^2 div s], i.e. 1/2 int div(-u_h) dtau in its own time tau = -t.

p_start is the data density for forward paths (optional; without it the density is conditional
on the initial point) and the prior pi for backward paths. The drifts F come from
:class:`hbar.process.HProcess`: the forward h-process uses ``forward_drift`` (f x for the
noising process h = 1), the backward h-model ``drift`` (u_h).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from hbar.derivatives import divergence
from hbar.path._checks import check_convention, check_h_positive, check_score_dim, orient_path
from hbar.process import HProcess
from hbar.sampling import sample, simulate_path, time_grid
from hbar.schedules import Schedule
from hbar.validation import HbarInputError, check_points, check_positive_int

__all__ = [
    "forward_h_drift",
    "forward_path_action",
    "forward_path_logp",
    "backward_path_action",
    "backward_path_logp",
    "PathSample",
    "sample_forward_paths",
    "sample_backward_paths",
]

_NEEDS_SCORE = "the forward h-process with h != 1 needs a score (the true score for P^h)"


def forward_h_drift(score: Callable | None, schedule: Schedule, h: float | Array) -> Callable[[Array, Array], Array]:
    """v_h(x, t) = f(t) x - (1-h)/2 g(t)^2 s(x, t) (``HProcess.forward_drift``): the drift of the
    forward h-process, the time reversal of the h-backward model when s is the true score
    (docs/theory.md section 3). For h = 1 the score is not needed (``score`` may be None: the
    noising process, drift f x). Shapes (n, d) -> (n, d)."""
    if score is None and not (isinstance(h, (int, float)) and float(h) == 1.0):
        raise HbarInputError(_NEEDS_SCORE)
    proc = HProcess(schedule, score)
    return lambda x, t: proc.forward_drift(x, t, h)


def _chain_terms(drift: Callable, var_rate: Callable, path: Array, times: Array,
                 convention: str) -> tuple[Array, Array, Array]:
    """Per-path sums over the steps of a path ordered along ``times`` (either direction).

    ``drift(x, t)`` is F in forward-time notation, ``var_rate(t)`` the variance rate h g^2.
    Returns (quadratic, jacobian, normalisation), each (n,):
    sum ||r_k||^2 / (2 V_k), sum J_k and sum (d/2) log(2 pi V_k) (see the module docstring)."""
    d = path.shape[-1]

    def one(xa, xb, ta, tb):
        dt = tb - ta
        if convention == "ito":
            xs, ts = xa, ta
            F = drift(xs, ts)
            jac = jnp.zeros(xa.shape[0], xa.dtype)
        else:
            xs, ts = 0.5 * (xa + xb), 0.5 * (ta + tb)
            F, div = divergence(lambda z: drift(z, ts), xs)
            jac = 0.5 * dt * div
        var = var_rate(ts) * jnp.abs(dt)
        r = xb - xa - F * dt
        quad = 0.5 * jnp.sum(r**2, axis=-1) / var
        norm = 0.5 * d * jnp.log(2 * jnp.pi * var) * jnp.ones_like(quad)
        return quad, jac, norm

    q, j, nrm = jax.vmap(one)(path[:-1], path[1:], times[:-1], times[1:])
    return q.sum(0), j.sum(0), nrm.sum(0)


@eqx.filter_jit
def _forward_terms(score, schedule, h, path, times, convention):
    proc = HProcess(schedule, score)  # score None: the noising process (h = 1)
    return _chain_terms(lambda x, t: proc.forward_drift(x, t, h), lambda t: proc.diffusion2(t, h),
                        path, times, convention)


@eqx.filter_jit
def _backward_terms(score, schedule, h, path, times, convention):
    proc = HProcess(schedule, score)
    return _chain_terms(lambda x, t: proc.drift(x, t, h), lambda t: proc.diffusion2(t, h), path, times, convention)


def _forward_setup(schedule, path, times, h, score, convention):
    check_convention(convention)
    hv = float(check_h_positive(h)[0])
    if hv != 1.0 and score is None:
        raise HbarInputError(_NEEDS_SCORE)
    p, ts = orient_path(schedule, path, times, increasing=True)
    if score is not None:
        check_score_dim(score, p.shape[-1])
    return p, ts, hv


def _forward_chain(schedule, path, times, h, score, convention):
    p, ts, hv = _forward_setup(schedule, path, times, h, score, convention)
    # at h = 1 the forward h-process is the noising process whatever the score: drift f x exactly
    return p, _forward_terms(score if hv != 1.0 else None, schedule, jnp.asarray(hv, p.dtype), p, ts, convention)


def forward_path_action(schedule: Schedule, path: Any, times: Any, *, h: float = 1.0,
                        score: Callable | None = None, convention: str = "ito") -> Array:
    """Onsager–Machlup action A[x] of discretised paths under the forward h-process
    dx = [f x - (1-h)/2 g^2 s] dt + sqrt(h) g dw (h = 1, score None: the noising process
    dx = f x dt + g dw), docs/theory.md section 3:

        A = sum_k ||x_{k+1} - x_k - F(x*, t*) D_k||^2 / (2 h g(t*)^2 D_k) + J,

    Ito: (x*, t*) = start of the step, J = 0; midpoint: midpoint, J = sum_k (D_k/2) div F(x*, t*)
    (= 1/2 int div f dt for the noising process). path (steps + 1, n, d), times (steps + 1,)
    in either order. Returns (n,)."""
    _, (q, j, _) = _forward_chain(schedule, path, times, h, score, convention)
    return q + j


def forward_path_logp(schedule: Schedule, path: Any, times: Any, *, h: float = 1.0,
                      score: Callable | None = None, log_p0: Callable[[Array], Array] | None = None,
                      convention: str = "ito") -> Array:
    """Log-density of discretised forward paths (docs/theory.md section 3):

        log P[x] = log p0(x_{t_min}) - A[x] - sum_k (d/2) log(2 pi h g(t*)^2 D_k),

    with A from :func:`forward_path_action`. For the Ito convention this is exactly
    log p0 + sum_k log N(x_{k+1}; x_k + F(x_k, t_k) D_k, h g(t_k)^2 D_k I). ``log_p0``
    (callable (n, d) -> (n,)) is the data log-density; None gives the density conditional on
    the initial point. path (steps + 1, n, d), times (steps + 1,). Returns (n,)."""
    p, (q, j, nrm) = _forward_chain(schedule, path, times, h, score, convention)
    out = -(q + j) - nrm
    if log_p0 is not None:
        out = out + log_p0(p[0])
    return out


def _backward_chain(score, schedule, h, path, times, convention):
    check_convention(convention)
    hv = float(check_h_positive(h)[0])
    p, ts = orient_path(schedule, path, times, increasing=False)
    check_score_dim(score, p.shape[-1])
    return p, _backward_terms(score, schedule, jnp.asarray(hv, p.dtype), p, ts, convention)


def backward_path_action(score: Callable, schedule: Schedule, h: float, path: Any, times: Any, *,
                         convention: str = "ito") -> Array:
    """Action of discretised paths under the h-backward model (docs/theory.md section 3),
    L^h = ||xdot - u_h||^2 / (2 h g^2) with u_h = f x - (1+h)/2 g^2 s (``HProcess.drift``):

        A = sum_k ||x_{k+1} - x_k + u_h(x*, t*) D_k||^2 / (2 h g(t*)^2 D_k) + J,

    along the decreasing grid T -> t_min (D_k = t_k - t_{k+1} > 0). Ito: (x*, t*) = (x_k, t_k),
    J = 0. Midpoint: J = -sum_k (D_k/2) div u_h(x*, t*) = -sum_k (D_k/2)[d f - (1+h)/2 g^2 div s]
    (exact divergence, d jvps). h > 0. path (steps + 1, n, d), times (steps + 1,) in either
    order. Returns (n,)."""
    _, (q, j, _) = _backward_chain(score, schedule, h, path, times, convention)
    return q + j


def backward_path_logp(score: Callable, schedule: Schedule, h: float, path: Any, times: Any, *,
                       convention: str = "ito", include_prior: bool = True) -> Array:
    """Log-density of discretised paths under the h-backward model started from the prior
    (docs/theory.md section 3):

        log Q^h[x] = log pi(x_T) - A^h[x] - sum_k (d/2) log(2 pi h g(t*)^2 D_k).

    With the Ito convention this equals log pi(x_T) + sum_k log N(x_{k+1}; x_k - u_h(x_k, t_k) D_k,
    h g(t_k)^2 D_k I), the exact density of the Euler–Maruyama chain of
    :func:`hbar.sampling.sample`. ``include_prior=False`` drops log pi (density conditional on
    x_T). path (steps + 1, n, d), times (steps + 1,) in either order. Returns (n,)."""
    p, (q, j, nrm) = _backward_chain(score, schedule, h, path, times, convention)
    out = -(q + j) - nrm
    if include_prior:
        out = out + schedule.prior_logp(p[0])
    return out


# ----------------------------------------------------------------------------------------------
# sampling paths
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class PathSample:
    """Sampled discretised paths and their log-densities.

    path: (steps + 1, n, d) ordered along ``times`` (increasing for forward paths, decreasing
    for backward ones); times: (steps + 1,); logp: (n,) path log-density (Ito convention unless
    stated; forward paths: including log p0 if it was given, else conditional on x_{t_min});
    h: noise strength; direction: "forward" | "backward"."""

    path: np.ndarray
    times: np.ndarray
    logp: np.ndarray
    h: float
    direction: str
    convention: str = "ito"


def sample_forward_paths(schedule: Schedule, x0: Any, key: Array, steps: int, *, h: float = 1.0,
                         score: Callable | None = None, log_p0: Callable[[Array], Array] | None = None,
                         convention: str = "ito") -> PathSample:
    """Euler–Maruyama paths of the forward h-process from data points x0 (n, d) at t_min up to T
    on the uniform grid of ``steps`` steps (h = 1, score None: the noising process dx = f x dt
    + g dw; h != 1 needs the score, the true one for P^h), docs/theory.md section 3. Uses
    :func:`hbar.sampling.simulate_path` with the drift :func:`forward_h_drift`. Returns a
    :class:`PathSample` with path (steps + 1, n, d) along increasing times and logp (n,) from
    :func:`forward_path_logp`."""
    xs = check_points(x0, "x0")
    steps = check_positive_int(steps, "steps")
    hv = float(check_h_positive(h)[0])
    x = jnp.asarray(xs, dtype=jnp.result_type(float))
    if score is not None:
        check_score_dim(score, x.shape[1])
    ts = np.asarray(time_grid(schedule, steps, t_start=schedule.t_min, t_end=schedule.T))
    drift = forward_h_drift(score if hv != 1.0 else None, schedule, hv)
    path = jax.jit(lambda xx, kk: simulate_path(drift, schedule.g2, xx, ts, kk, h=hv))(x, key)
    logp = forward_path_logp(schedule, path, ts, h=hv, score=score, log_p0=log_p0, convention=convention)
    return PathSample(np.asarray(path), ts, np.asarray(logp), hv, "forward", convention)


def sample_backward_paths(score: Callable, schedule: Schedule, key: Array, n: int, h: float, steps: int, *,
                          d: int | None = None, convention: str = "ito") -> PathSample:
    """Euler–Maruyama paths of the h-backward model from the prior (via
    :func:`hbar.sampling.sample` with ``return_path=True``), with their log-densities from
    :func:`backward_path_logp` (including log pi), docs/theory.md section 3. h > 0. Returns a
    :class:`PathSample` with path (steps + 1, n, d) along decreasing times T -> t_min."""
    hv = float(check_h_positive(h)[0])
    res = sample(score, schedule, key, n, hv, steps=steps, method="euler", d=d, return_path=True)
    logp = backward_path_logp(score, schedule, hv, res.path, res.times, convention=convention)
    return PathSample(res.path, res.times, np.asarray(logp), hv, "backward", convention)
