"""The one-loop (stochastic) estimator of the first WKB coefficient C1 in any dimension
(docs/theory.md section 5.7).

The exact characteristic method (:mod:`hbar.wkb`) transports G = grad ell0 and the full
d x d matrix H = Hess ell0, with third derivatives of the score: d^2-d^3 network passes per
step. Here psi1 = -C1 is written as an expectation over Gaussian fluctuations around the
probability-flow path and over Rademacher probes, with O(1) network passes (jvp / vjp) per
step and sample, and no stored trajectory (memory O(n d)):

    psi1 = int div w dt                                           (A, Hutchinson)
         + G_T . z_T + int eps . (D^2 v0[z, eps] + D^3 v0[xi, xi, eps]) dt
         + xi_T . grad log pi(xi_T)                               (= tr(H_T xi xi^T))
         + int D1 G1 . G2 dt,                                     (|G|^2, two probe sets)

along the characteristic dX/dt = v0(X) from the data point (t_min) to T, with the fluctuation
and the dual (duality) variable

    d xi = J xi dt + sqrt(D1) dW,       dz = (J z + D^2 v0[xi, xi] + w) dt,   xi = z = 0 at t_min,

(w = du_h/dh = -(g^2/2) s, D1 = g^2/2, J = dv0/dx, all from :class:`hbar.process.HProcess`),
and G1, G2 two independent unbiased solutions of the adjoint equation
dG/dt = -grad div v0 - J^T G, G_T = grad log pi(X_T), each with its own Hutchinson probes.
J xi and J z + D^2 v0[xi, xi] are the first two derivatives of v0 along the curve
X + tau xi + tau^2 z / 2 (two nested jvps in the scalar tau), and their derivative along the
probe eps gives the D^2 / D^3 terms (one more jvp). Each sample is unbiased for the
discretised psi1; its mean over K samples estimates -C1 with standard error sd / sqrt(K).

Time discretisation: additive-noise stochastic Heun (predictor-corrector with one Gaussian
increment per step and a trapezoidal variance), weak order 2, on a fixed grid uniform in the
log signal-to-noise ratio (resolves t_min, where the integrands grow like 1/sigma^2);
fresh probes every step (same probe for both stages of a step).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from hbar.precision import in_float64
from hbar.process import HProcess
from hbar.schedules import Schedule
from hbar.validation import HbarInputError, check_positive_int

__all__ = ["GRIDS", "fluctuation_grid", "one_loop_ell1", "one_loop_samples"]

GRIDS = ("logsnr", "uniform")


@in_float64
def fluctuation_grid(schedule: Schedule, steps: int, kind: str = "logsnr") -> np.ndarray:
    """Increasing time grid t_min = t_0 < ... < t_steps = T, shape (steps + 1,).

    ``kind="logsnr"`` (default): uniform in lambda(t) = log(alpha^2 / sigma^2), which is
    geometric in t near t_min for the VP / VE schedules (where the fluctuation's drift
    J ~ g^2 / (2 sigma^2) ~ 1 / (2 t) is stiff) and uniform where the SNR decays linearly.
    ``kind="uniform"``: uniform in t. lambda is inverted by interpolation on a dense table.
    """
    steps = check_positive_int(steps, "steps")
    if kind not in GRIDS:
        raise HbarInputError(f"unknown fluctuation grid {kind!r}; choose from {GRIDS}")
    t0, t1 = float(schedule.t_min), float(schedule.T)
    if kind == "uniform":
        return np.linspace(t0, t1, steps + 1)
    lo = max(t0, 1e-12)
    table = np.unique(np.concatenate([np.geomspace(lo, t1, 8193), np.linspace(t0, t1, 8193)]))
    table = table[table >= t0]
    lam = np.asarray(2.0 * schedule.log_alpha(jnp.asarray(table)) - jnp.log(schedule.sigma2(jnp.asarray(table))))
    if not np.all(np.isfinite(lam)) or not np.all(np.diff(lam) < 0):
        raise HbarInputError("the log-SNR of this schedule is not finite and decreasing on [t_min, T]; use grid='uniform'")
    target = np.linspace(lam[0], lam[-1], steps + 1)
    t = np.interp(-target, -lam, table)
    t[0], t[-1] = t0, t1
    return t


def _curve_score(score: Callable, t: Array, X: Array, xi: Array, z: Array) -> tuple[Array, Array, Array]:
    """s and its first two derivatives along the curve c(tau) = X + tau xi + tau^2 z / 2 at
    tau = 0: (s(X), Ds[xi], D^2 s[xi, xi] + Ds[z]), by two nested jvps in the scalar tau."""
    one = jnp.ones((), X.dtype)
    zero = jnp.zeros((), X.dtype)

    def along(tau):
        return score(X + tau * xi + (0.5 * tau**2) * z, t)

    def along1(tau):
        return jax.jvp(along, (tau,), (one,))

    (s0, s1), (_, s2) = jax.jvp(along1, (zero,), (one,))
    return s0, s1, s2


def _fluctuation_field(proc: HProcess, t: Array, X: Array, xi: Array, z: Array, eps: Array):
    """Drift of (X, xi, z, acc) of the forward pass (module doc): (v0, J xi,
    J z + D^2 v0[xi, xi] + w, eps . (Dw[eps] + D^3 v0[xi, xi, eps] + D^2 v0[z, eps]))."""

    def coeffs(x):
        s0, s1, s2 = _curve_score(proc.score, t, x, xi, z)
        # v0 is affine in (x, s): its derivatives along the curve are the same affine map of
        # the curve's derivatives (xi, z) and of the score's (s1, s2)
        return (proc.drift_given_score(x, s0, t, 0.0), proc.drift_given_score(xi, s1, t, 0.0),
                proc.drift_given_score(z, s2, t, 0.0), proc.drift_h_slope_given_score(s0, t))

    (v0, v1, v2, w), (_, _, dv2, dw) = jax.jvp(coeffs, (X,), (eps,))
    return v0, v1, v2 + w, jnp.sum(eps * (dw + dv2), axis=-1)


def _adjoint_field(proc: HProcess, t: Array, X: Array, G: Array, eps: Array):
    """(v0(X), dG/dt) with dG/dt = -grad(eps^T J eps) - J^T G = -grad_x[eps . Dv0[eps] + G . v0]
    at fixed (G, eps): one reverse pass of a jvp; unbiased for -grad div v0 - J^T G."""

    def phi(x):
        v, jv = jax.jvp(lambda y: proc.velocity(y, t), (x,), (eps,))
        return jnp.sum(eps * jv, axis=-1) + jnp.sum(G * v, axis=-1), v

    val, pull, v = jax.vjp(phi, X, has_aux=True)
    return v, -pull(jnp.ones_like(val))[0]


def _row_draws(row_keys: Array, k: int, d: int, dtype) -> tuple[Array, Array, Array]:
    """Per-row independent (normal, rademacher, rademacher) draws of shape (R, d) for step k."""

    def one(kk):
        a, b, c = jax.random.split(jax.random.fold_in(kk, k), 3)
        return (jax.random.normal(a, (d,), dtype), jax.random.rademacher(b, (d,), dtype),
                jax.random.rademacher(c, (d,), dtype))

    return jax.vmap(one)(row_keys)


def one_loop_samples(proc: HProcess, x: Array, x_T: Array, row_keys: Array, grid: Array) -> dict[str, Array]:
    """Unbiased samples of psi1 (= -C1) for the rows of x (traceable; one sample per row).

    x: (R, d) data points (repeat a point K times for K samples); x_T: (R, d) the end of its
    probability-flow characteristic (from the adaptive solve; starts the adjoint pass);
    row_keys: (R, 2) uint32 PRNG keys, one per row; grid: increasing times (N + 1,) from
    t_min to T. Returns dict(ell1 (R,), parts (R, 4): [int div w + Hessian terms, G_T . z_T,
    xi_T^T H_T xi_T, int D1 G1 . G2], x_T_heun (R, d), ok (bool)).
    """
    R, d = x.shape
    dtype = x.dtype
    grid = jnp.asarray(grid, dtype)
    nsteps = grid.shape[0] - 1
    D1 = lambda t: 0.5 * proc.diffusion2(t, 1.0)  # noqa: E731  (h-slope of the diffusion coefficient)

    # --- backward (adjoint) pass, T -> t_min: X, two independent G's, int D1 G1 . G2 dt -------
    def bfield(t, X, G, e):
        v, dG = _adjoint_field(proc, t, jnp.concatenate([X, X]), G, e)
        return v[:R], dG

    def bstep(carry, k):
        X, G, acc = carry
        ta, tb = grid[nsteps - k], grid[nsteps - k - 1]
        dt = tb - ta  # < 0
        _, e1, e2 = _row_draws(row_keys, nsteps + 1 + k, d, dtype)
        e = jnp.concatenate([e1, e2])
        va, Ga = bfield(ta, X, G, e)
        Xp, Gp = X + dt * va, G + dt * Ga
        vb, Gb = bfield(tb, Xp, Gp, e)
        qa = D1(ta) * jnp.sum(G[:R] * G[R:], axis=-1)
        qb = D1(tb) * jnp.sum(Gp[:R] * Gp[R:], axis=-1)
        return (X + 0.5 * dt * (va + vb), G + 0.5 * dt * (Ga + Gb), acc + 0.5 * dt * (qa + qb)), None

    G_T = proc.prior_score(x_T)
    (_, _, accG), _ = jax.lax.scan(bstep, (x_T, jnp.concatenate([G_T, G_T]), jnp.zeros(R, dtype)),
                                   jnp.arange(nsteps))
    g2_term = -accG  # the scan integrated from T down to t_min

    # --- forward pass, t_min -> T: X, fluctuation xi, dual variable z, accumulated sources -------
    def fstep(carry, k):
        X, xi, z, acc = carry
        ta, tb = grid[k], grid[k + 1]
        dt = tb - ta
        zeta, eps, _ = _row_draws(row_keys, k, d, dtype)
        noise = jnp.sqrt(0.5 * (D1(ta) + D1(tb)) * dt) * zeta  # trapezoidal variance of int D1 dt
        fa = _fluctuation_field(proc, ta, X, xi, z, eps)
        Xp, xip, zp = X + dt * fa[0], xi + dt * fa[1] + noise, z + dt * fa[2]
        fb = _fluctuation_field(proc, tb, Xp, xip, zp, eps)
        h = 0.5 * dt
        return (X + h * (fa[0] + fb[0]), xi + h * (fa[1] + fb[1]) + noise, z + h * (fa[2] + fb[2]),
                acc + h * (fa[3] + fb[3])), None

    zeros = jnp.zeros_like(x)
    (X_T, xi_T, z_T, acc), _ = jax.lax.scan(fstep, (x, zeros, zeros, jnp.zeros(R, dtype)), jnp.arange(nsteps))
    dual_end = jnp.sum(proc.prior_score(X_T) * z_T, axis=-1)  # G_T . z_T
    fluct_end = jnp.sum(xi_T * proc.prior_score(xi_T), axis=-1)  # xi^T Hess(log pi) xi, log pi quadratic
    parts = jnp.stack([acc, dual_end, fluct_end, g2_term], axis=1)
    ell1 = jnp.sum(parts, axis=1)
    ok = jnp.all(jnp.isfinite(ell1))
    return dict(ell1=ell1, parts=parts, x_T_heun=X_T, ok=ok)


def one_loop_ell1(proc: HProcess, x: Array, x_T: Array, point_keys: Array, grid: Array, probes: int) -> dict[str, Array]:
    """K = ``probes`` independent one-loop samples of psi1 per point (traceable).

    x, x_T: (n, d); point_keys: (n, 2) uint32 keys, one per point (split into K sample keys).
    Returns dict(ell1 (n,) the mean over samples, ell1_se (n,) sd / sqrt(K) over samples,
    samples (n, K), ok, evals (fixed-grid vector-field evaluations: 2 passes x 2 stages x steps)).
    """
    n, d = x.shape
    K = int(probes)
    keys = jax.vmap(lambda kk: jax.random.split(kk, K))(point_keys).reshape(n * K, -1)
    rep = lambda a: jnp.repeat(a, K, axis=0)  # noqa: E731
    out = one_loop_samples(proc, rep(x), rep(x_T), keys, grid)
    samples = out["ell1"].reshape(n, K)
    mean = jnp.mean(samples, axis=1)
    se = jnp.std(samples, axis=1, ddof=1) / np.sqrt(K) if K > 1 else jnp.full((n,), jnp.nan, x.dtype)
    nsteps = int(np.shape(grid)[0]) - 1
    return dict(ell1=mean, ell1_se=se, samples=samples, ok=out["ok"], evals=4 * nsteps)
