"""Fokker-Planck space operator: Scharfetter-Gummel fluxes on the faces and the implicit step
matrix (docs/theory.md section 8).

In reverse time tau = T - t the density of the backward h-process obeys
d_tau q = -div(v q - D grad q) with velocity v = -u_h (u_h from
:meth:`hbar.process.HProcess.drift_given_score` on the face values of the score) and
D = diffusion2(t, h) / 2 = h g^2 / 2. Finite volumes with zero-flux walls: the flux across an
interior face normal to axis k is J = a q_L - b q_R; the cell update divides by dx_k.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from hbar.process import HProcess
from hbar.schedules import Schedule

from .grid import Grid

__all__ = ["bernoulli", "sg_coefficients", "make_face_drift", "step_matrix_1d", "step_matrix_2d"]


def bernoulli(z: np.ndarray) -> np.ndarray:
    """B(z) = z / (exp(z) - 1), B(0) = 1, evaluated without overflow or cancellation."""
    z = np.asarray(z, dtype=np.float64)
    out = np.empty_like(z)
    small = np.abs(z) < 1e-6
    zs = z[small]
    out[small] = 1.0 - 0.5 * zs + zs * zs / 12.0
    zl = z[~small]
    with np.errstate(over="ignore", invalid="ignore"):
        pos = zl > 0
        res = np.empty_like(zl)
        # z > 0: z e^{-z} / (1 - e^{-z}); z < 0: z / expm1(z)
        ez = np.exp(-zl[pos])
        res[pos] = zl[pos] * ez / (-np.expm1(-zl[pos]))
        res[~pos] = zl[~pos] / np.expm1(zl[~pos])
    out[~small] = res
    return out


def sg_coefficients(v: np.ndarray, D: float, dx: float) -> tuple[np.ndarray, np.ndarray]:
    """Scharfetter-Gummel flux J = a q_L - b q_R across a face with velocity v (L -> R positive).

    a = (D/dx) B(-P), b = (D/dx) B(P), P = v dx / D (cell Peclet number), B(z) = z/(e^z - 1).
    Exact for constant v and D between the two centres; a, b >= 0 (monotone, M-matrix);
    a - b = v always; for |P| -> 0 it is the central flux, for |P| -> inf the upwind flux.
    For D = 0 (h = 0) it is exactly first-order upwind: a = max(v, 0), b = max(-v, 0).
    """
    if D <= 0.0:
        return np.maximum(v, 0.0), np.maximum(-v, 0.0)
    P = v * (dx / D)
    c = D / dx
    return c * bernoulli(-P), c * bernoulli(P)



def make_face_drift(score: Callable, schedule: Schedule) -> Callable:
    """Jitted (pts (F, d), t, hs (nh,)) -> (u (nh, F, d), diffusion2 (nh,)).

    u = HProcess(schedule, score).drift_given_score(pts, s(pts, t), t, h) for every h, i.e. the
    backward drift f x - (1+h)/2 g^2 s at the face points (one score evaluation shared by all
    h), and the noise variance rate h g^2. Float64 when jax_enable_x64 is on."""
    import jax
    import jax.numpy as jnp

    proc = HProcess(schedule, score)

    @jax.jit
    def face_drift(pts, t, hs):
        s = score(pts, t)
        u = proc.drift_given_score(pts[None], s[None], t, hs[:, None, None])
        return u, proc.diffusion2(t, hs)

    def ev(pts_j, t: float, hs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        u, diff2 = face_drift(pts_j, jnp.asarray(t, dtype=pts_j.dtype), jnp.asarray(hs, dtype=pts_j.dtype))
        return np.asarray(u, dtype=np.float64), np.asarray(diff2, dtype=np.float64)

    return ev


def step_matrix_1d(c0: float, dt: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Banded (3, n) form (scipy ``solve_banded((1, 1), ...)``) of M = c0 I - dt L in 1-D.

    a, b (n - 1,) are the flux coefficients of the interior faces already divided by dx:
    row i gets +dt a_i (outflow right), +dt b_{i-1} (outflow left) on the diagonal,
    -dt b_i at (i, i+1) and -dt a_i at (i+1, i)."""
    n0 = a.shape[0] + 1
    ab = np.zeros((3, n0))
    diag = np.full(n0, c0)
    diag[:-1] += dt * a
    diag[1:] += dt * b
    ab[1] = diag
    ab[0, 1:] = -dt * b     # (i, i+1)
    ab[2, :-1] = -dt * a    # (i+1, i)
    return ab


def step_matrix_2d(grid: Grid, c0: float, dt: float, coef: list[tuple[np.ndarray, np.ndarray]]):
    """CSC matrix M = c0 I - dt L (size, size) of the 5-point operator in 2-D.

    ``coef`` = [(ax, bx), (ay, by)], flux coefficients divided by dx_k, flattened over the
    x-faces ((n0 - 1) * n1) and y-faces (n0 * (n1 - 1)). M is a column diagonally dominant
    M-matrix (columns sum to c0)."""
    import scipy.sparse as sp

    n0, n1 = grid.n
    (ax, bx), (ay, by) = coef
    ax = ax.reshape(n0 - 1, n1)
    bx = bx.reshape(n0 - 1, n1)
    ay = ay.reshape(n0, n1 - 1)
    by = by.reshape(n0, n1 - 1)
    diag = np.full((n0, n1), c0)
    diag[:-1, :] += dt * ax
    diag[1:, :] += dt * bx
    diag[:, :-1] += dt * ay
    diag[:, 1:] += dt * by
    data = np.concatenate([diag.ravel(), -dt * bx.ravel(), -dt * ax.ravel(),
                           -dt * by.ravel(), -dt * ay.ravel()])
    return sp.csc_matrix((data[grid.csc_perm], grid.csc_indices, grid.csc_indptr), shape=(grid.size, grid.size))
