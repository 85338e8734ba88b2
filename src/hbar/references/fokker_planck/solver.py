"""Fokker-Planck brute force in d = 1, 2: :func:`fokker_planck_nll` with automatic grid
refinement and Richardson extrapolation, and :func:`fokker_planck_density` on one grid
(docs/theory.md section 8).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from hbar.schedules import Schedule
from hbar.stats import mean_se
from hbar.validation import HbarInputError, check_h, check_number, check_points, check_positive_int

from .convergence import FokkerPlanckDensity, FokkerPlanckLevel, FokkerPlanckResult
from .grid import Grid, feature_scale, resolve_box, time_nodes
from .operator import make_face_drift
from .richardson import error_estimate, extrapolation_order, is_asymptotic, observed_order, richardson_extrapolate
from .stepper import solve_level

__all__ = ["fokker_planck_nll", "fokker_planck_density"]


def _make_score_eval(score: Callable, d: int) -> Callable:
    import jax
    import jax.numpy as jnp

    fn = jax.jit(lambda p, t: score(p, t))

    def ev(pts_j, t: float) -> np.ndarray:
        out = np.asarray(fn(pts_j, jnp.asarray(t, dtype=pts_j.dtype)), dtype=np.float64)
        return out

    return ev


def _check_common(score: Any, schedule: Schedule, d: int, h: Any, allow_upwind_h0: bool) -> np.ndarray:
    if not callable(score):
        raise HbarInputError("score must be a callable score(x, t) -> (n, d)")
    if not isinstance(schedule, Schedule):
        raise HbarInputError("schedule must be an hbar Schedule")
    if d not in (1, 2):
        raise HbarInputError(f"the Fokker-Planck brute force supports d = 1 and d = 2 only, got d = {d}")
    hs = check_h(h)
    if np.any(hs == 0) and not allow_upwind_h0:
        raise HbarInputError(
            "h = 0 makes the Fokker-Planck equation pure advection: the grid scheme would be first-order "
            "upwind with numerical diffusion that acts like an extra h. Use hbar's exact probability-flow "
            "likelihood for h = 0 (docs/theory.md section 4), or pass allow_upwind_h0=True to accept the "
            "first-order upwind value."
        )
    return hs


def _check_score_output(score_eval: Callable, grid: Grid, schedule: Schedule) -> None:
    import jax.numpy as jnp

    pts = jnp.asarray(grid.all_face_pts[:3])
    try:
        out = score_eval(pts, float(schedule.T))
    except Exception as err:
        raise HbarInputError(f"score(x, t) failed on a (3, {grid.d}) batch: {err}") from err
    if out.shape != (pts.shape[0], grid.d):
        raise HbarInputError(f"score(x, t) must return shape (n, {grid.d}), got {out.shape}")
    if not np.all(np.isfinite(out)):
        raise HbarInputError("score(x, t) returned NaN or inf")


def fokker_planck_nll(
    score: Callable,
    schedule: Schedule,
    x: Any,
    h: float | Sequence[float] | np.ndarray,
    tol: float = 1e-3,
    grid: int | None = None,
    n_steps: int | None = None,
    *,
    box: Any = None,
    levels: int | None = None,
    min_levels: int = 3,
    max_levels: int = 5,
    max_cells: int | None = None,
    refine: int = 2,
    cells_per_scale: float = 2.0,
    time_floor: float | None = None,
    allow_upwind_h0: bool = False,
    point_eval: str = "quadratic",
    linear_solver: str = "reuse",
    mass_tol: float = 1e-8,
    negative_tol: float = 1e-6,
    boundary_tol: float = 1e-6,
    warn: bool = True,
) -> FokkerPlanckResult:
    """Brute-force NLL(h) = mean_i -log q^h_{t_min}(x_i) for any score in d = 1, 2 (section 8).

    Solves the backward Fokker-Planck equation of the h-process (docs/theory.md section 2)

        d_t q = -div(u q) - (h g^2 / 2) Lap q,   u = f(t) x - (1+h)/2 g(t)^2 s(x, t),

(u and h g^2 from :class:`hbar.process.HProcess`, evaluated on the cell faces),
    from q_T = prior density (exact cell averages) at t = T down to t_min, for every h in
    ``h`` at once. No expansion in h: this is the reference the WKB series must match.

    Discretisation (reverse time tau = T - t, d_tau q = -div(v q - D grad q), v = -u,
    D = h g^2/2):

    * space: finite volumes on the box (uniform cell-centred grid, zero-flux walls, so mass is
      conserved to round-off); the score is evaluated once per time step on all interior cell
      faces (one jitted batch shared by all h). Fluxes are Scharfetter-Gummel (exponentially
      fitted): exact for locally constant v, positive (M-matrix), central at small cell Peclet
      number Pe = |v| dx / D and upwind at large Pe; the max Pe is reported per h. Second order
      in dx once Pe is O(1); at large Pe (small h) the error is first order until the grid
      resolves the drift.
    * time: variable-step BDF2 (first step backward Euler), implicit, one linear solve per
      step and h: banded LU in 1-D; in 2-D sparse LU (``splu``) used either fresh per step
      (``linear_solver="splu"``) or, default ``"reuse"``, as preconditioner of GMRES for the
      next steps until it needs more than 6 iterations (relative residual 1e-12; a few times
      faster). Nodes are uniform in a warped time (:func:`.grid.time_nodes`): dense where g^2 is
      fast relative to sigma^2 + floor alpha^2 (near t_min for VP schedules), with
      ``floor = time_floor``, default (box width / 200)^2. BDF2 is not positivity preserving:
      on too coarse grids the tails can undershoot below zero (reported as negative mass); a
      level where that happens next to a data point is marked failed and skipped.
    * output: log q at the points by quadratic interpolation with the cell-average correction
      (``point_eval="quadratic"``, see :meth:`Grid.eval_logq`) or bilinear ("linear").

    Accuracy control: level k uses ``grid * refine**k`` cells per axis and
    ``n_steps * refine**k`` time steps (nested time grids). By default ``grid`` is chosen so
    that the coarsest cell is 1/``cells_per_scale`` of the feature scale of the model density
    at the data (1/sqrt of the 90 % quantile of the largest eigenvalue of -ds/dx at t_min) and
    ``n_steps = grid``. From the second level on the value is Richardson-extrapolated assuming
    order p = 2 (1 for h = 0), R_k = Q_k + (Q_k - Q_{k-1}) / (refine^p - 1), applied to the mean
    and to every point (:mod:`.richardson`). Error estimate: with three consecutive levels |R_k - R_{k-1}|, or, if
    the observed order log_r(|Q_{k-1} - Q_{k-2}| / |Q_k - Q_{k-1}|) lies outside [p - 0.5, p + 1]
    (not yet asymptotic), the larger of that and |Q_k - Q_{k-1}|; with two levels
    |Q_k - Q_{k-1}|. An h is converged when the estimate is <= ``tol`` after ``min_levels``
    consecutive usable levels; converged h are not solved again. Refinement stops after
    ``max_levels`` or before a grid of more than ``max_cells`` cells (then ``converged`` is
    False and a flag is set). ``levels=k`` runs exactly k levels instead.

    Args:
        score: any JAX callable score(x (n, d), t scalar) -> (n, d).
        schedule: linear schedule; prior N(0, prior_std^2 I) sets q_T.
        x: (n, d) data points, d = 1 or 2, all inside the box.
        h: scalar or list of h > 0 (h = 0 only with ``allow_upwind_h0``: first-order upwind,
            Richardson with order 1; better use the exact h = 0 likelihood, section 4).
        tol: requested absolute accuracy of the mean NLL (nats).
        grid: cells per axis on the coarsest level (default: from the feature scale).
        n_steps: time steps on the coarsest level (default = grid).
        box: half-width L (box [-L, L]^d), (lo, hi), or (d, 2); default L = max(6 prior_std,
            1.2 max|x|).
        max_cells: total cell limit (default 2e5 in 1-D, 256^2 in 2-D).

    Returns:
        :class:`FokkerPlanckResult`; ``result.report()`` prints the full convergence table.

    Raises:
        HbarInputError: bad inputs (h < 0, h = 0 without opt-in, d not in {1, 2}, points
            outside the box, score of the wrong shape).
        RuntimeError: no usable level for some h (density <= 0 next to a point on every grid).
    """
    xa = check_points(x, "x").astype(np.float64)
    d = xa.shape[1]
    hs = _check_common(score, schedule, d, h, allow_upwind_h0)
    tol = check_number(tol, "tol", positive=True)
    if point_eval not in ("quadratic", "linear"):
        raise HbarInputError(f"point_eval must be 'quadratic' or 'linear', got {point_eval!r}")
    if linear_solver not in ("reuse", "splu"):
        raise HbarInputError(f"linear_solver must be 'reuse' or 'splu', got {linear_solver!r}")
    bx = resolve_box(box, d, schedule, xa)
    outside = np.any((xa < bx[:, 0]) | (xa > bx[:, 1]), axis=1)
    if outside.any():
        i = int(np.nonzero(outside)[0][0])
        raise HbarInputError(
            f"{int(outside.sum())} point(s) lie outside the box {bx.tolist()}, first x[{i}] = {xa[i].tolist()}; "
            "pass a larger box"
        )
    refine = check_positive_int(refine, "refine")
    if refine < 2:
        raise HbarInputError("refine must be >= 2")
    if levels is not None:
        levels = check_positive_int(levels, "levels")
    min_levels = check_positive_int(min_levels, "min_levels")
    max_levels = check_positive_int(max_levels, "max_levels")
    max_cells = int(max_cells) if max_cells is not None else (200_000 if d == 1 else 256 * 256)
    width = float(np.max(bx[:, 1] - bx[:, 0]))
    floor = time_floor if time_floor is not None else (width / 200.0) ** 2

    _check_score_output(_make_score_eval(score, d), Grid(bx[:, 0], bx[:, 1], (8,) * d), schedule)
    face_drift = make_face_drift(score, schedule)
    flags: list[str] = []
    scale = feature_scale(score, schedule, xa)
    if grid is None:
        n0 = int(math.ceil(cells_per_scale * width / min(scale, width)))
        n0 = max(n0, 64 if d == 1 else 24)
        # leave room for min_levels levels below max_cells
        n_cap = int((max_cells ** (1.0 / d)) // refine ** (min_levels - 1))
        if n0 > n_cap:
            if n0 > 1.5 * n_cap:
                flags.append(f"coarsest grid capped at {n_cap} cells/axis by max_cells (feature scale "
                             f"{scale:.3g} wanted {n0}); the result may be under-resolved")
            n0 = max(n_cap, 8)
    else:
        n0 = check_positive_int(grid, "grid")
    if n0 < 5:
        raise HbarInputError("grid must have at least 5 cells per axis")
    s0 = check_positive_int(n_steps, "n_steps") if n_steps is not None else n0

    nh, npts = hs.shape[0], xa.shape[0]
    order = np.where(hs == 0, 1.0, 2.0)
    active = np.ones(nh, bool)
    # per-h history of consecutive usable levels: list of (Q, P, R)
    hist: list[list[tuple[float, np.ndarray, float]]] = [[] for _ in range(nh)]
    level_reports: list[FokkerPlanckLevel] = []
    final_val = np.full(nh, np.nan)
    final_pts = np.full((nh, npts), np.nan)
    err = np.full(nh, np.nan)
    obs = np.full(nh, np.nan)
    converged = np.zeros(nh, bool)
    no_extrap: set[float] = set()
    n_run = levels if levels is not None else max_levels
    for k in range(n_run):
        cells = n0 * refine**k
        steps = s0 * refine**k
        if cells**d > max_cells:
            flags.append(f"stopped refining: {cells}^{d} cells would exceed max_cells={max_cells}")
            break
        g = Grid(bx[:, 0], bx[:, 1], (cells,) * d)
        tn = time_nodes(schedule, steps, floor)
        idx = np.nonzero(active)[0]
        out = solve_level(face_drift, schedule, g, hs[idx], tn, linear_solver)
        Q = np.full(nh, np.nan)
        R = np.full(nh, np.nan)
        lev = {key: np.full(nh, np.nan) for key in ("pe", "me", "nm", "bm")}
        failed = np.zeros(nh, bool)
        for j, ih in enumerate(idx):
            lev["pe"][ih] = out.max_peclet[j]
            lev["me"][ih] = abs(out.mass_final[j] - out.mass_initial)
            lev["nm"][ih] = out.negative_mass[j]
            lev["bm"][ih] = out.boundary_mass[j]
            lq_pts, ok = g.eval_logq(out.q[j], xa, point_eval)
            if not ok.all():
                failed[ih] = True
                hist[ih] = []  # Richardson needs consecutive usable levels
                continue
            P = -lq_pts
            Q[ih] = mean_se(P)[0]
            H = hist[ih]
            if H:
                dq = abs(Q[ih] - H[-1][0])
                p_use = order[ih]
                if len(H) >= 2 and np.isfinite(H[-1][2]):
                    obs[ih] = float(observed_order(H[-2][0], H[-1][0], Q[ih], refine))
                    p_use = float(extrapolation_order(obs[ih], order[ih]))
                if not np.isfinite(p_use):
                    # erratic observed order: no extrapolation, the raw finest value with error |dQ|
                    R[ih], RP = Q[ih], P
                    err[ih] = dq
                    no_extrap.add(float(hs[ih]))
                elif len(H) >= 2 and np.isfinite(H[-1][2]):
                    no_extrap.discard(float(hs[ih]))
                    R[ih] = float(richardson_extrapolate(H[-1][0], Q[ih], refine, p_use))
                    # per point with its own observed order (the mean's order can be distorted by
                    # cancellation between points); erratic points keep their raw finest value
                    p_pts = extrapolation_order(observed_order(H[-2][1], H[-1][1], P, refine), order[ih])
                    RP = np.where(np.isfinite(p_pts),
                                  richardson_extrapolate(H[-1][1], P, refine, np.where(np.isfinite(p_pts), p_pts, 1.0)),
                                  P)
                    err[ih] = float(error_estimate(H[-1][2], R[ih], dq, is_asymptotic(obs[ih], order[ih])))
                else:
                    R[ih] = float(richardson_extrapolate(H[-1][0], Q[ih], refine, order[ih]))
                    RP = richardson_extrapolate(H[-1][1], P, refine, order[ih])
                    obs[ih] = np.nan
                    err[ih] = dq
                final_val[ih], final_pts[ih] = R[ih], RP
            else:
                final_val[ih], final_pts[ih] = Q[ih], P
                err[ih] = np.nan
            H.append((Q[ih], P, R[ih]))
            if len(H) >= min_levels and err[ih] <= tol:
                converged[ih] = True
                if levels is None:
                    active[ih] = False
            else:
                converged[ih] = False
        level_reports.append(FokkerPlanckLevel(
            cells=cells, n_steps=steps, dx=tuple(float(v) for v in g.dx), nll=Q, richardson=R,
            max_peclet=lev["pe"], mass_error=lev["me"], negative_mass=lev["nm"], boundary_mass=lev["bm"],
            failed=failed, seconds=out.seconds, n_factor=out.n_factor, n_iter=out.n_iter,
        ))
        if not active.any():
            break

    res_levels = tuple(level_reports)
    for h in sorted(no_extrap):
        flags.append(f"h={h:g}: erratic observed order: not extrapolated (raw finest value, error = last level change)")
    for ih, h in enumerate(hs):
        solved = [L for L in res_levels if np.isfinite(L.nll[ih])]
        fails = [L.cells for L in res_levels if L.failed[ih]]
        if fails:
            flags.append(f"h={h:g}: levels with cells={fails} failed (density <= 0 next to a point)")
        if not solved:
            tmp = FokkerPlanckResult(h=hs, nll=final_val, nll_points=final_pts, error=err, stderr=np.full(nh, np.nan),
                                     converged=converged, observed_order=obs, levels=res_levels, box=bx,
                                     tol=float(tol), feature_scale=scale, flags=tuple(flags))
            raise RuntimeError(f"fokker_planck_nll: no usable grid for h={h:g}\n" + tmp.report())
        if not converged[ih]:
            flags.append(f"h={h:g}: not converged to tol={tol:g} (estimated error {err[ih]:.2e})")
        lv = solved[-1]
        if lv.mass_error[ih] > mass_tol:
            flags.append(f"h={h:g}: mass changed by {lv.mass_error[ih]:.2e} > {mass_tol:g}")
        if -lv.negative_mass[ih] > negative_tol:
            flags.append(f"h={h:g}: negative density, mass {lv.negative_mass[ih]:.2e}")
        if lv.boundary_mass[ih] > boundary_tol:
            flags.append(f"h={h:g}: mass {lv.boundary_mass[ih]:.2e} in the boundary cells: box may be too small")
        if h == 0:
            flags.append("h=0: first-order upwind scheme (numerical diffusion acts like an extra h)")
    stderr = np.array([mean_se(row)[1] for row in final_pts])  # MC error of the mean over the points
    res = FokkerPlanckResult(
        h=hs, nll=final_val, nll_points=final_pts, error=err, stderr=stderr, converged=converged,
        observed_order=obs, levels=res_levels, box=bx, tol=float(tol), feature_scale=scale, flags=tuple(flags),
    )
    if warn and flags:
        warnings.warn("fokker_planck_nll: " + "; ".join(flags), RuntimeWarning, stacklevel=2)
    return res


def fokker_planck_density(
    score: Callable,
    schedule: Schedule,
    h: float | Sequence[float] | np.ndarray,
    d: int,
    grid: int = 200,
    n_steps: int = 200,
    *,
    box: Any = None,
    time_floor: float | None = None,
    allow_upwind_h0: bool = False,
) -> FokkerPlanckDensity:
    """Grid density q^h_{t_min} of the backward h-process (docs/theory.md section 8), for plotting.

    Same scheme as :func:`fokker_planck_nll` on one fixed grid (``grid`` cells per axis,
    ``n_steps`` BDF2 steps), no refinement. Box default [-6 prior_std, 6 prior_std]^d.
    Returns :class:`FokkerPlanckDensity` with density (nh, grid) or (nh, grid, grid).
    """
    d = check_positive_int(d, "d")
    hs = _check_common(score, schedule, d, h, allow_upwind_h0)
    grid = check_positive_int(grid, "grid")
    n_steps = check_positive_int(n_steps, "n_steps")
    bx = resolve_box(box, d, schedule, None)
    floor = time_floor if time_floor is not None else (float(np.max(bx[:, 1] - bx[:, 0])) / 200.0) ** 2
    g = Grid(bx[:, 0], bx[:, 1], (grid,) * d)
    _check_score_output(_make_score_eval(score, d), g, schedule)
    out = solve_level(make_face_drift(score, schedule), schedule, g, hs, time_nodes(schedule, n_steps, floor))
    dens = np.array([qq.reshape(g.n) for qq in out.q])
    return FokkerPlanckDensity(h=hs, centres=g.centres, density=dens, mass=out.mass_final,
                               min_density=out.min_density, max_peclet=out.max_peclet, n_steps=n_steps)
