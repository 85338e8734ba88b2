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
fresh probes every step (same probe for both stages of a step). The random numbers are drawn
ahead for blocks of steps (one generator call per block, at most ``_DRAW_BUDGET`` floats held;
each step's numbers do not depend on the blocking).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from hbar.precision import in_float64
from hbar.process import HProcess
from hbar.references.fokker_planck.richardson import error_estimate, is_asymptotic, observed_order, richardson_extrapolate
from hbar.schedules import Schedule
from hbar.validation import HbarInputError, check_positive_int

__all__ = ["GRIDS", "SCHEME_ORDER", "adjoint_pass", "fluctuation_grid", "ladder_grids", "ladder_result", "one_loop_ell1",
           "one_loop_samples"]

GRIDS = ("logsnr", "uniform")
SCHEME_ORDER = 2  # weak order of the stochastic Heun scheme (module doc, docs/theory.md section 5.7)


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


def _rademacher(key: Array, d: int, dtype) -> Array:
    """d Rademacher signs from ceil(d / 32) random 32-bit words (one bit each): the same law as
    ``jax.random.rademacher``, 32 times fewer generator calls (which cost as much as the
    network passes for d in the thousands)."""
    words = jax.random.bits(key, (-(-d // 32),), jnp.uint32)
    bits = (words[:, None] >> jnp.arange(32, dtype=jnp.uint32)) & jnp.uint32(1)
    return (1 - 2 * bits.reshape(-1)[:d].astype(jnp.int32)).astype(dtype)


def _row_draws(row_keys: Array, k: Array | int, d: int, dtype, normal: bool) -> tuple[Array, Array]:
    """Per-row independent draws for fine-grid step indices k (any shape S): a pair of arrays of
    shape S + (R, d), (normal, rademacher) if ``normal`` (forward pass) else (rademacher,
    rademacher) (backward pass, two probe sets). Step k's draws are the same whether k is drawn
    alone or with others (one generator call for a block of steps)."""

    def one(kk, kidx):
        a, b = jax.random.split(jax.random.fold_in(kk, kidx))
        return (jax.random.normal(a, (d,), dtype) if normal else _rademacher(a, d, dtype)), _rademacher(b, d, dtype)

    f = jax.vmap(one, in_axes=(0, None))
    for _ in range(jnp.ndim(k)):
        f = jax.vmap(f, in_axes=(None, 0))
    return f(row_keys, jnp.asarray(k))


# random numbers drawn ahead of the steps, per block of steps (float elements held at once): one
# generator call per block instead of one per step (the per-call cost dominates at small R d)
_DRAW_BUDGET = 1 << 21


def _blocked_scan(step: Callable, init, nsteps: int, draw: Callable, elems_per_step: int):
    """``lax.scan`` of step(carry, (k, draw_k)) over k = 0 .. nsteps - 1, where draw(ks) returns
    the random numbers of the steps ks (leading axis) for a block of B steps at once (B the
    largest divisor of nsteps within ``_DRAW_BUDGET``): memory O(B R d), not O(steps R d)."""
    cap = max(1, _DRAW_BUDGET // max(1, elems_per_step))
    B = max(b for b in range(1, min(cap, nsteps) + 1) if nsteps % b == 0)

    def block(carry, kb):
        return jax.lax.scan(step, carry, (kb, draw(kb)))

    carry, _ = jax.lax.scan(block, init, jnp.arange(nsteps).reshape(nsteps // B, B))
    return carry


def _refinement(grid: Array, noise_grid: Array | None) -> int:
    """m such that ``grid`` is every m-th point of ``noise_grid`` (static, from the shapes)."""
    if noise_grid is None:
        return 1
    n, nf = grid.shape[0] - 1, noise_grid.shape[0] - 1
    if nf % n:
        raise HbarInputError(f"a ladder level of {n} steps does not nest in the finest grid of {nf}")
    return nf // n


def adjoint_pass(proc: HProcess, x_T: Array, row_keys: Array, grid: Array,
                 noise_grid: Array | None = None) -> dict[str, Array]:
    """The backward (adjoint) pass of :func:`one_loop_samples` alone (traceable): from X_T at T
    to t_min, X and two solutions G1, G2 of the adjoint equation with independent probe sets,
    started at G_T = grad log pi(X_T). Returns dict(g2_term (R,) = int D1 G1 . G2 dt (unbiased
    for int D1 |G|^2 dt on the grid), G1, G2 (R, d) at t_min, X (R, d) at t_min)."""
    R, d = x_T.shape
    dtype = x_T.dtype
    grid = jnp.asarray(grid, dtype)
    nsteps = grid.shape[0] - 1
    m = _refinement(grid, noise_grid)
    nfine = nsteps * m
    D1 = lambda t: 0.5 * proc.diffusion2(t, 1.0)  # noqa: E731

    def bfield(t, X, G, e):
        v, dG = _adjoint_field(proc, t, jnp.concatenate([X, X]), G, e)
        return v[:R], dG

    def bdraw(ks):  # two independent probe sets, (B, 2R, d)
        e1, e2 = _row_draws(row_keys, nfine + 1 + ks * m, d, dtype, False)
        return jnp.concatenate([e1, e2], axis=1)

    def bstep(carry, k_e):
        (X, G, acc), (k, e) = carry, k_e
        ta, tb = grid[nsteps - k], grid[nsteps - k - 1]
        dt = tb - ta  # < 0
        va, Ga = bfield(ta, X, G, e)
        Xp, Gp = X + dt * va, G + dt * Ga
        vb, Gb = bfield(tb, Xp, Gp, e)
        qa = D1(ta) * jnp.sum(G[:R] * G[R:], axis=-1)
        qb = D1(tb) * jnp.sum(Gp[:R] * Gp[R:], axis=-1)
        return (X + 0.5 * dt * (va + vb), G + 0.5 * dt * (Ga + Gb), acc + 0.5 * dt * (qa + qb)), None

    G_T = proc.prior_score(x_T)
    init = (x_T, jnp.concatenate([G_T, G_T]), jnp.zeros(R, dtype))
    X0, G0, accG = _blocked_scan(bstep, init, nsteps, bdraw, 2 * R * d)
    return dict(g2_term=-accG, G1=G0[:R], G2=G0[R:], X=X0)  # the scan integrated from T down to t_min


def one_loop_samples(proc: HProcess, x: Array, x_T: Array, row_keys: Array, grid: Array,
                     noise_grid: Array | None = None) -> dict[str, Array]:
    """Unbiased samples of psi1 (= -C1) for the rows of x (traceable; one sample per row).

    x: (R, d) data points (repeat a point K times for K samples); x_T: (R, d) the end of its
    probability-flow characteristic (from the adaptive solve; starts the adjoint pass);
    row_keys: (R, 2) uint32 PRNG keys, one per row; grid: increasing times (N + 1,) from
    t_min to T. ``noise_grid`` (step ladders, common random numbers): a finer grid of which
    ``grid`` is every m-th point; the random numbers are then those of the finer grid -- each
    step's Gaussian increment is the (exactly N(0, 1)-normalised) sum of its m sub-steps'
    increments, its probes those of its first sub-step -- so the levels of a ladder run with
    the same row keys share their Brownian paths and most probes. Returns dict(ell1 (R,),
    parts (R, 4): [int div w + Hessian terms, G_T . z_T, xi_T^T H_T xi_T, int D1 G1 . G2],
    x_T_heun (R, d), ok (bool)).
    """
    R, d = x.shape
    dtype = x.dtype
    grid = jnp.asarray(grid, dtype)
    nsteps = grid.shape[0] - 1
    m = _refinement(grid, noise_grid)
    D1 = lambda t: 0.5 * proc.diffusion2(t, 1.0)  # noqa: E731  (h-slope of the diffusion coefficient)
    var = lambda ta, tb: 0.5 * (D1(ta) + D1(tb)) * (tb - ta)  # noqa: E731  (trapezoidal int D1 dt)
    if m > 1:
        fine = jnp.asarray(noise_grid, dtype)
        sub_var = var(fine[:-1], fine[1:]).reshape(nsteps, m)
        sub_w = jnp.sqrt(sub_var / jnp.sum(sub_var, axis=1, keepdims=True))  # unit-norm rows

    def fdraws(ks):
        """(zeta ~ N(0, I), eps) of forward steps ks, (B, R, d) each (from the fine sub-steps
        when m > 1)."""
        if m == 1:
            return _row_draws(row_keys, ks, d, dtype, True)
        zs, eps = _row_draws(row_keys, ks[:, None] * m + jnp.arange(m), d, dtype, True)  # (B, m, R, d)
        return jnp.einsum("bm,bmrd->brd", sub_w[ks], zs), eps[:, 0]


    # --- forward pass, t_min -> T: X, fluctuation xi, dual variable z, accumulated sources -------
    def fstep(carry, k_draws):
        (X, xi, z, acc), (k, (zeta, eps)) = carry, k_draws
        ta, tb = grid[k], grid[k + 1]
        dt = tb - ta
        noise = jnp.sqrt(var(ta, tb)) * zeta  # trapezoidal variance of int D1 dt
        fa = _fluctuation_field(proc, ta, X, xi, z, eps)
        Xp, xip, zp = X + dt * fa[0], xi + dt * fa[1] + noise, z + dt * fa[2]
        fb = _fluctuation_field(proc, tb, Xp, xip, zp, eps)
        h = 0.5 * dt
        return (X + h * (fa[0] + fb[0]), xi + h * (fa[1] + fb[1]) + noise, z + h * (fa[2] + fb[2]),
                acc + h * (fa[3] + fb[3])), None

    zeros = jnp.zeros_like(x)
    finit = (x, zeros, zeros, jnp.zeros(R, dtype))
    X_T, xi_T, z_T, acc = _blocked_scan(fstep, finit, nsteps, fdraws, 2 * m * R * d)
    g2_term = adjoint_pass(proc, x_T, row_keys, grid, noise_grid)["g2_term"]
    dual_end = jnp.sum(proc.prior_score(X_T) * z_T, axis=-1)  # G_T . z_T
    fluct_end = jnp.sum(xi_T * proc.prior_score(xi_T), axis=-1)  # xi^T Hess(log pi) xi, log pi quadratic
    parts = jnp.stack([acc, dual_end, fluct_end, g2_term], axis=1)
    ell1 = jnp.sum(parts, axis=1)
    ok = jnp.all(jnp.isfinite(ell1))
    return dict(ell1=ell1, parts=parts, x_T_heun=X_T, ok=ok)


def one_loop_ell1(proc: HProcess, x: Array, x_T: Array, point_keys: Array, grid: Array | tuple[Array, ...],
                  probes: int) -> dict[str, Array]:
    """K = ``probes`` independent one-loop samples of psi1 per point (traceable).

    x, x_T: (n, d); point_keys: (n, 2) uint32 keys, one per point (split into K sample keys).
    Returns dict(ell1 (n,) the mean over samples, ell1_se (n,) sd / sqrt(K) over samples,
    samples (n, K), ok, evals (fixed-grid vector-field evaluations: 2 passes x 2 stages x steps)).

    ``grid`` may be a tuple of nested grids, coarsest first (a step ladder, :func:`ladder_grids`):
    every level then runs with the same sample keys on the finest level's random numbers
    (common random numbers), ``ell1`` / ``ell1_se`` / ``samples`` are the finest level's, and
    per point ``ell1_levels`` (n, L) / ``ell1_se_levels`` (n, L), ``ell1_diff_se`` (n, L - 1)
    the s.e. of consecutive level differences (sample by sample), ``ell1_rich`` / ``ell1_rich_se``
    (n,) the order-2 Richardson combination of the last two levels and its s.e.
    """
    n, d = x.shape
    K = int(probes)
    keys = jax.vmap(lambda kk: jax.random.split(kk, K))(point_keys).reshape(n * K, -1)
    rep = lambda a: jnp.repeat(a, K, axis=0)  # noqa: E731
    se = (lambda s: jnp.std(s, axis=1, ddof=1) / np.sqrt(K)) if K > 1 else (lambda s: jnp.full((n,), jnp.nan, x.dtype))
    grids = tuple(grid) if isinstance(grid, (tuple, list)) else (grid,)
    noise = grids[-1] if len(grids) > 1 else None
    levels = [one_loop_samples(proc, rep(x), rep(x_T), keys, g, noise) for g in grids]
    samples = [lv["ell1"].reshape(n, K) for lv in levels]
    nsteps = [int(np.shape(g)[0]) - 1 for g in grids]
    out = dict(ell1=jnp.mean(samples[-1], axis=1), ell1_se=se(samples[-1]), samples=samples[-1],
               ok=jnp.all(jnp.stack([lv["ok"] for lv in levels])), evals=4 * sum(nsteps))
    if len(grids) > 1:
        S = jnp.stack(samples, axis=2)  # (n, K, L)
        rich = samples[-1] + (samples[-1] - samples[-2]) / ((nsteps[-1] / nsteps[-2]) ** SCHEME_ORDER - 1)
        out.update(ell1_levels=jnp.mean(S, axis=1), ell1_se_levels=jnp.stack([se(s) for s in samples], axis=1),
                   ell1_diff_se=jnp.stack([se(b - a) for a, b in zip(samples[:-1], samples[1:])], axis=1),
                   ell1_rich=jnp.mean(rich, axis=1), ell1_rich_se=se(rich))
    return out


def ladder_grids(schedule: Schedule, steps: Sequence[int], kind: str = "logsnr") -> tuple[np.ndarray, ...]:
    """The nested grids of a step ladder ``steps`` (increasing, a constant integer ratio >= 2,
    at least two levels): every level is every m-th point of the finest grid."""
    st = [check_positive_int(s, "steps") for s in steps]
    if len(st) < 2:
        raise HbarInputError(f"a step ladder needs at least two levels, got steps={list(steps)}")
    r = st[1] // st[0]
    if r < 2 or any(b != r * a for a, b in zip(st[:-1], st[1:])):
        raise HbarInputError(f"a step ladder needs increasing steps with a constant integer ratio >= 2 "
                             f"(e.g. [32, 64, 128]), got {st}")
    fine = fluctuation_grid(schedule, st[-1], kind)
    return tuple(fine[:: st[-1] // s] for s in st)


def ladder_result(res: dict[str, np.ndarray], valid: np.ndarray, steps: Sequence[int]) -> tuple[np.ndarray, np.ndarray, dict]:
    """C1 from a step ladder (``one_loop_ell1`` with nested grids): observed order, Richardson
    extrapolation and the discretisation-error estimate of the mean C1 over ``valid`` points.

    The order is observed on the means over valid points of the last three levels
    (:func:`hbar.references.fokker_planck.richardson.observed_order`; with common random numbers
    their differences carry little Monte Carlo noise, ``ladder["diff_se"]``). If it is within
    [1.5, 3] of the scheme's order 2 (``is_asymptotic``), the per-point values are the order-2
    Richardson combinations of the last two levels (sample by sample, so ``c1_se`` is their own
    s.e.) and the discretisation error of the mean is |R_L - R_{L-1}|; otherwise (or with two
    levels) the finest level is kept, ``extrapolated`` is False and the error is
    max(|R_L - R_{L-1}|, |Q_L - Q_{L-1}|) (``error_estimate``). Returns (c1, c1_se, extras)
    with extras["ladder"] a dict: steps, ratio, c1_levels (n, L), mean (L,) the level means,
    diff_se (L - 1,) the Monte Carlo s.e. of their differences, observed_order, extrapolated,
    c1_mean, disc_error (discretisation, of the mean C1), mc_se (estimator s.e. of the mean),
    total_error = sqrt(disc_error^2 + mc_se^2).
    """
    st = [int(s) for s in steps]
    r = st[-1] / st[-2]
    c1_levels = -np.asarray(res["ell1_levels"])
    ok = valid & np.all(np.isfinite(c1_levels), axis=1)
    nv = max(int(ok.sum()), 1)
    Q = c1_levels[ok].mean(axis=0)
    diff_se = np.sqrt(np.sum(np.asarray(res["ell1_diff_se"])[ok] ** 2, axis=0)) / nv
    R = richardson_extrapolate(Q[-2], Q[-1], r, SCHEME_ORDER)
    if len(st) >= 3:
        p_obs = float(observed_order(Q[-3], Q[-2], Q[-1], r))
        asym = bool(is_asymptotic(p_obs, SCHEME_ORDER))
        R_prev = richardson_extrapolate(Q[-3], Q[-2], r, SCHEME_ORDER)
    else:
        p_obs, asym, R_prev = math.nan, False, Q[-2]
    disc = float(error_estimate(R_prev, R, abs(Q[-1] - Q[-2]), asym))
    if asym:
        c1, c1_se = -np.asarray(res["ell1_rich"]), np.asarray(res["ell1_rich_se"])
    else:
        c1, c1_se = -np.asarray(res["ell1"]), np.asarray(res["ell1_se"])
    mc_se = float(np.sqrt(np.sum(c1_se[ok] ** 2)) / nv)
    ladder = dict(steps=st, ratio=r, c1_levels=c1_levels, mean=Q.tolist(), diff_se=diff_se.tolist(),
                  observed_order=p_obs, extrapolated=asym, c1_mean=float(c1[ok].mean()), disc_error=disc,
                  mc_se=mc_se, total_error=math.hypot(disc, mc_se))
    return c1, c1_se, {"ladder": ladder}
