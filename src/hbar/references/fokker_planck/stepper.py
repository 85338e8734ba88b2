"""Fokker-Planck time stepping on one grid: variable-step BDF2 with one implicit linear solve
per step and h (docs/theory.md section 8).

With step dt_n = t_n - t_{n+1} (time decreasing) and w = dt_n / dt_{n-1} the BDF2 update is

    c0 q_{n+1} - dt L q_{n+1} = c1 q_n - c2 q_{n-1},
    c0 = (1 + 2w)/(1 + w),  c1 = 1 + w,  c2 = w^2/(1 + w)   (first step: backward Euler 1, 1, 0),

L the Scharfetter-Gummel operator of :mod:`.operator` at t_{n+1}. Solves: banded LU in 1-D;
in 2-D sparse LU (SuperLU), either fresh per step or reused as preconditioner of scipy's GMRES
(:class:`LinearSolver`). Shapes: q (size,) per h; hs (nh,); t_nodes (n_steps + 1,) decreasing.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np

from hbar.schedules import Schedule
from hbar.validation import HbarInputError

from .grid import Grid
from .operator import sg_coefficients, step_matrix_1d, step_matrix_2d

__all__ = ["LevelOut", "LinearSolver", "bdf2_coefficients", "solve_level"]


@dataclasses.dataclass
class LevelOut:
    q: list[np.ndarray]           # final density per h (size,)
    max_peclet: np.ndarray        # (nh,)
    mass_initial: float
    mass_final: np.ndarray        # (nh,)
    min_density: np.ndarray       # (nh,) min q / max q at t_min
    negative_mass: np.ndarray     # (nh,)
    boundary_mass: np.ndarray     # (nh,) max over time of the mass in the boundary cells
    seconds: float
    n_factor: int = 0             # sparse LU factorisations (2-D)
    n_iter: int = 0               # preconditioned GMRES iterations (2-D, "reuse")


def bdf2_coefficients(dt: float, dt_prev: float | None) -> tuple[float, float, float]:
    """(c0, c1, c2) of variable-step BDF2 (backward Euler (1, 1, 0) when dt_prev is None)."""
    if dt_prev is None:
        return 1.0, 1.0, 0.0
    w = dt / dt_prev
    return (1 + 2 * w) / (1 + w), 1 + w, w * w / (1 + w)


class LinearSolver:
    """Sparse solves M x = rhs for a slowly changing sequence of matrices (2-D).

    ``mode="splu"``: a fresh SuperLU factorisation per call. ``mode="reuse"``: the LU of an
    earlier matrix of the sequence preconditions scipy's GMRES (right preconditioning, so the
    stopping test is on the true residual |rhs - M x| <= rtol |rhs|, re-checked after the
    solve); the LU is renewed after a solve that needed more than ``refactor_after``
    iterations, and GMRES not converging within ``max_iter`` iterations falls back to a direct
    solve. A triangular solve costs far less than a factorisation.
    """

    def __init__(self, mode: str, rtol: float = 1e-12, max_iter: int = 15, refactor_after: int = 6):
        self.mode = mode
        self.rtol = rtol
        self.max_iter = max_iter
        self.refactor_after = refactor_after
        self.lu = None
        self.n_factor = 0
        self.n_iter = 0
        self.n_solve = 0

    def _factor(self, mat):
        import scipy.sparse.linalg as spl

        # M = c0 I - dt L is a column diagonally dominant M-matrix: no pivoting needed
        self.n_factor += 1
        return spl.splu(mat, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0,
                        options={"SymmetricMode": True})

    def _gmres(self, mat, rhs: np.ndarray, x0: np.ndarray) -> tuple[np.ndarray | None, int]:
        """x = x0 + P^{-1} y with (M P^{-1}) y = rhs - M x0 solved by scipy's GMRES (no restart)."""
        import scipy.sparse.linalg as spl

        bnorm = float(np.linalg.norm(rhs))
        if bnorm == 0.0:
            return np.zeros_like(rhs), 0
        r0 = rhs - mat @ x0
        if float(np.linalg.norm(r0)) <= self.rtol * bnorm:
            return x0.copy(), 0
        prec = self.lu.solve
        op = spl.LinearOperator(mat.shape, matvec=lambda v: mat @ prec(v), dtype=np.float64)
        its = [0]

        def count(_):
            its[0] += 1

        y, _ = spl.gmres(op, r0, rtol=0.0, atol=0.5 * self.rtol * bnorm, restart=self.max_iter, maxiter=1,
                         callback=count, callback_type="pr_norm")
        x = x0 + prec(y)
        if float(np.linalg.norm(rhs - mat @ x)) <= self.rtol * bnorm:
            return x, its[0]
        return None, its[0]

    def solve(self, mat, rhs: np.ndarray, x0: np.ndarray) -> np.ndarray:
        self.n_solve += 1
        if self.mode == "reuse" and self.lu is not None:
            xs, its = self._gmres(mat, rhs, x0)
            self.n_iter += its
            if xs is not None:
                if its > self.refactor_after:
                    self.lu = None  # convergence slowing down: refactorise next step
                return xs
        lu = self._factor(mat)
        self.lu = lu if self.mode == "reuse" else None
        return lu.solve(rhs)


def _check_finite_velocity(u_all: np.ndarray, face_pts: np.ndarray, t: float, hs: np.ndarray) -> None:
    """Clear error when the backward drift u_h (nh, F, d) on the cell faces is not finite (a
    score returning NaN/inf there), instead of a singular or NaN linear solve later."""
    bad = ~np.isfinite(np.asarray(u_all))
    if bad.any():
        ih, face, _ = (int(i[0]) for i in np.nonzero(bad))
        n_bad = int(np.any(bad, axis=(0, 2)).sum())
        raise HbarInputError(
            f"Fokker-Planck reference: the drift velocity u_h = f x - (1+h)/2 g^2 s is non-finite (NaN or inf) "
            f"at {n_bad} of {bad.shape[1]} cell faces at t = {t:.6g} (first: h = {float(hs[ih]):g}, x = "
            f"{np.asarray(face_pts)[face].tolist()}): the score returns NaN/inf there; fix the score or shrink the grid")


def solve_level(
    face_drift: Callable,
    schedule: Schedule,
    grid: Grid,
    hs: np.ndarray,
    t_nodes: np.ndarray,
    linear_solver: str = "reuse",
) -> LevelOut:
    """Backward Fokker-Planck for several h on one grid and time grid (BDF2, SG fluxes).

    ``face_drift`` is :func:`.operator.make_face_drift` of the score and schedule. BLAS is
    limited to one thread while stepping: the vectors are small and OpenBLAS threads competing
    with XLA's thread pool slowed the level-1 operations by 100x on a loaded machine.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return _solve_level_impl(face_drift, schedule, grid, hs, t_nodes, linear_solver)
    with threadpool_limits(limits=1, user_api="blas"):
        return _solve_level_impl(face_drift, schedule, grid, hs, t_nodes, linear_solver)


def _solve_level_impl(
    face_drift: Callable,
    schedule: Schedule,
    grid: Grid,
    hs: np.ndarray,
    t_nodes: np.ndarray,
    linear_solver: str,
) -> LevelOut:
    import jax.numpy as jnp
    from scipy.linalg import solve_banded

    t_start = time.perf_counter()
    d = grid.d
    nh = hs.shape[0]
    pts_j = jnp.asarray(grid.all_face_pts)
    splits = np.cumsum(grid.n_faces)[:-1]
    q0 = grid.prior_cell_density(schedule.prior_std)
    mass0 = float(q0.sum() * grid.vol)
    q = [q0.copy() for _ in range(nh)]
    q_prev: list[np.ndarray | None] = [None] * nh
    max_pe = np.zeros(nh)
    bmask = grid.boundary_mask()
    bmass = np.full(nh, float(q0[bmask].sum() * grid.vol))
    solvers = [LinearSolver(linear_solver) for _ in range(nh)]
    dt_prev = None
    for step in range(t_nodes.shape[0] - 1):
        t_new = float(t_nodes[step + 1])
        dt = float(t_nodes[step] - t_nodes[step + 1])
        # backward drift u_h at every interior face for all h: (nh, F, d); noise rate (nh,)
        u_all, diff2 = face_drift(pts_j, t_new, hs)
        _check_finite_velocity(u_all, grid.all_face_pts, t_new, hs)
        u_parts = np.split(u_all, splits, axis=1)
        c0, c1, c2 = bdf2_coefficients(dt, dt_prev)
        for ih in range(nh):
            D = 0.5 * diff2[ih]
            coef = []
            for k in range(d):
                v = -u_parts[k][ih, :, k]  # reverse-time velocity v = -u_h, normal component on axis-k faces
                if D > 0:
                    max_pe[ih] = max(max_pe[ih], float(np.max(np.abs(v))) * grid.dx[k] / D)
                else:
                    max_pe[ih] = np.inf
                a, b = sg_coefficients(v, D, float(grid.dx[k]))
                coef.append((a / grid.dx[k], b / grid.dx[k]))
            rhs = c1 * q[ih] if q_prev[ih] is None or c2 == 0.0 else c1 * q[ih] - c2 * q_prev[ih]
            if d == 1:
                q_new = solve_banded((1, 1), step_matrix_1d(c0, dt, *coef[0]), rhs, check_finite=False)
            else:
                q_new = solvers[ih].solve(step_matrix_2d(grid, c0, dt, coef), rhs, q[ih])
            q_prev[ih] = q[ih]
            q[ih] = q_new
            bmass[ih] = max(bmass[ih], float(np.abs(q_new[bmask]).sum() * grid.vol))
        dt_prev = dt
    mass_f = np.array([float(qq.sum() * grid.vol) for qq in q])
    qmin = np.array([float(qq.min() / qq.max()) for qq in q])
    negm = np.array([float(np.clip(qq, None, 0.0).sum() * grid.vol) for qq in q])
    return LevelOut(q=q, max_peclet=max_pe, mass_initial=mass0, mass_final=mass_f, min_density=qmin,
                    negative_mass=negm, boundary_mass=bmass, seconds=time.perf_counter() - t_start,
                    n_factor=sum(sv.n_factor for sv in solvers), n_iter=sum(sv.n_iter for sv in solvers))
