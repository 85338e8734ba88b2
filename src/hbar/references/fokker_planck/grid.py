"""Fokker-Planck grid: the uniform cell-centred box grid in d = 1, 2, the box, the time
nodes and the length scale that sets the coarsest grid (docs/theory.md section 8).

Shapes: cell values are flattened (size,) with size = prod(n); points x are (n_pts, d); the
interior faces normal to axis k are ``face_pts[k]`` ((n_faces_k, d), x-faces first).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from hbar.schedules import Schedule
from hbar.validation import HbarInputError

__all__ = ["Grid", "cell_average_gauss_1d", "resolve_box", "time_nodes", "feature_scale"]


def cell_average_gauss_1d(edges: np.ndarray, std: float) -> np.ndarray:
    """Mass of N(0, std^2) in each cell [edges[i], edges[i+1]] (tail-accurate)."""
    from scipy.special import ndtr

    a = edges[:-1] / std
    b = edges[1:] / std
    return np.where(a >= 0.0, ndtr(-a) - ndtr(-b), ndtr(b) - ndtr(a))



class Grid:
    """Uniform cell-centred grid on the box [lo, hi] (lo, hi (d,)), d = 1 or 2, ``n`` cells per
    axis: ``edges``/``centres`` (d lists of (n_k + 1,) / (n_k,)), ``dx`` (d,), ``vol`` = prod(dx),
    interior ``face_pts`` per axis and ``all_face_pts`` (sum n_faces, d); in 2-D also the fixed CSC
    pattern of the 5-point operator (``csc_perm``, ``csc_indices``, ``csc_indptr``)."""

    def __init__(self, lo: np.ndarray, hi: np.ndarray, n: tuple[int, ...]):
        self.d = len(n)
        self.lo = np.asarray(lo, float)
        self.hi = np.asarray(hi, float)
        self.n = tuple(int(k) for k in n)
        self.dx = (self.hi - self.lo) / np.asarray(self.n)
        self.edges = [np.linspace(self.lo[k], self.hi[k], self.n[k] + 1) for k in range(self.d)]
        self.centres = [0.5 * (e[1:] + e[:-1]) for e in self.edges]
        self.size = int(np.prod(self.n))
        self.vol = float(np.prod(self.dx))
        # interior face points: faces normal to axis k (n_k - 1 interior per line)
        if self.d == 1:
            self.face_pts = [self.edges[0][1:-1, None]]
        else:
            fx = np.stack(np.meshgrid(self.edges[0][1:-1], self.centres[1], indexing="ij"), -1).reshape(-1, 2)
            fy = np.stack(np.meshgrid(self.centres[0], self.edges[1][1:-1], indexing="ij"), -1).reshape(-1, 2)
            self.face_pts = [fx, fy]
        self.all_face_pts = np.concatenate(self.face_pts, axis=0)
        self.n_faces = [p.shape[0] for p in self.face_pts]
        if self.d == 2:
            self._build_pattern_2d()

    def _build_pattern_2d(self) -> None:
        """Fixed COO pattern of the 5-point operator and its permutation into CSC order."""
        import scipy.sparse as sp

        n0, n1 = self.n
        idx = np.arange(self.size).reshape(n0, n1)
        rows = [idx.ravel(),
                idx[:-1, :].ravel(), idx[1:, :].ravel(),   # x-upper: (i,j)->(i+1,j); x-lower
                idx[:, :-1].ravel(), idx[:, 1:].ravel()]   # y-upper; y-lower
        cols = [idx.ravel(),
                idx[1:, :].ravel(), idx[:-1, :].ravel(),
                idx[:, 1:].ravel(), idx[:, :-1].ravel()]
        r = np.concatenate(rows)
        c = np.concatenate(cols)
        nnz = r.size
        probe = sp.csc_matrix((np.arange(1, nnz + 1, dtype=np.float64), (r, c)), shape=(self.size, self.size))
        probe.sort_indices()
        self.csc_perm = probe.data.astype(np.int64) - 1  # csc slot -> coo position
        self.csc_indices = probe.indices.copy()
        self.csc_indptr = probe.indptr.copy()

    def prior_cell_density(self, std: float) -> np.ndarray:
        """Cell averages of the prior N(0, std^2 I) density, flattened (size,)."""
        m = [cell_average_gauss_1d(e, std) / dx for e, dx in zip(self.edges, self.dx)]
        if self.d == 1:
            return m[0]
        return np.outer(m[0], m[1]).ravel()

    def boundary_mask(self) -> np.ndarray:
        if self.d == 1:
            mask = np.zeros(self.n[0], bool)
            mask[[0, -1]] = True
            return mask
        mask = np.zeros(self.n, bool)
        mask[[0, -1], :] = True
        mask[:, [0, -1]] = True
        return mask.ravel()

    def eval_logq(self, q: np.ndarray, x: np.ndarray, method: str = "quadratic") -> tuple[np.ndarray, np.ndarray]:
        """log q at points x (n, d) from the cell values q (size,). Returns (values (n,), ok (n,)).

        "quadratic" (default): P = tensor-product quadratic Lagrange interpolant of log qbar
        (qbar = cell averages) on the 3 (1-D) or 3 x 3 (2-D) centres nearest to x, then the
        cell-average-to-point correction log q(x) = P(x) - sum_k dx_k^2/24 (d_kk P + (d_k P)^2)
        (from qbar = q + dx^2/24 q'' + O(dx^4) per axis) with the derivatives of P itself.
        Interpolation error O(dx^3); exact for a Gaussian up to the O(dx^4) correction terms.
        "linear": (bi)linear interpolation of log qbar between centres, O(dx^2) (error
        dx^2/8 |d^2 log q| at mid-cell), no correction. ``ok`` is False where a grid value of
        the stencil is <= 0 (then the value is meaningless).
        """
        n = self.n
        qq = q.reshape(n)
        lq = np.log(np.maximum(qq, 1e-300))
        idx, w0, w1, w2 = [], [], [], []
        for k in range(self.d):
            s = (x[:, k] - self.lo[k]) / self.dx[k] - 0.5
            if method == "linear":
                i0 = np.clip(np.floor(s).astype(int), 0, n[k] - 2)
                r = s - i0  # in [0, 1] except in the outer half cells (linear extrapolation)
                idx.append(i0)
                w0.append(np.stack([1 - r, r], axis=1))
            elif method == "quadratic":
                i0 = np.clip(np.rint(s).astype(int), 1, n[k] - 2)
                r = s - i0
                idx.append(i0 - 1)
                one = np.ones_like(r)
                w0.append(np.stack([0.5 * r * (r - 1), 1 - r * r, 0.5 * r * (r + 1)], axis=1))
                w1.append(np.stack([r - 0.5, -2 * r, r + 0.5], axis=1))  # d/dr (cell units)
                w2.append(np.stack([one, -2 * one, one], axis=1))        # d^2/dr^2
            else:
                raise HbarInputError(f"point_eval must be 'quadratic' or 'linear', got {method!r}")
        span = 2 if method == "linear" else 3
        ar = np.arange(span)
        if self.d == 1:
            nodes = idx[0][:, None] + ar[None, :]
            ok = np.all(qq[nodes] > 0, axis=1)
            vals = lq[nodes]
            P = np.sum(w0[0] * vals, axis=1)
            if method == "quadratic":
                P1 = np.sum(w1[0] * vals, axis=1)
                P2 = np.sum(w2[0] * vals, axis=1)
                P = P - (P2 + P1**2) / 24.0
            return P, ok
        ii = idx[0][:, None, None] + ar[None, :, None]
        jj = idx[1][:, None, None] + ar[None, None, :]
        ok = np.all(qq[ii, jj] > 0, axis=(1, 2))
        block = lq[ii, jj]
        P = np.einsum("na,nb,nab->n", w0[0], w0[1], block)
        if method == "quadratic":
            Px = np.einsum("na,nb,nab->n", w1[0], w0[1], block)
            Pxx = np.einsum("na,nb,nab->n", w2[0], w0[1], block)
            Py = np.einsum("na,nb,nab->n", w0[0], w1[1], block)
            Pyy = np.einsum("na,nb,nab->n", w0[0], w2[1], block)
            P = P - (Pxx + Px**2 + Pyy + Py**2) / 24.0
        return P, ok


def feature_scale(score: Callable, schedule: Schedule, x: np.ndarray, quantile: float = 0.9) -> float:
    """Length scale of the model density near the data: 1 / sqrt(lambda), lambda = the
    ``quantile`` over the points of the largest eigenvalue of -(J + J^T)/2, J = d s / d x at
    t_min (for a Gaussian this is the smallest standard deviation)."""
    import jax
    import jax.numpy as jnp

    from hbar.derivatives import jacobian_rows

    t = jnp.asarray(schedule.t_min, dtype=jnp.result_type(float))
    jac = jax.jit(lambda z: jacobian_rows(lambda y: score(y, t), z)[1])  # batched jvps (hbar.derivatives)
    J = np.asarray(jac(jnp.asarray(x, dtype=t.dtype)))
    lam = np.linalg.eigvalsh(-0.5 * (J + np.swapaxes(J, 1, 2)))[:, -1]
    lam_q = float(np.quantile(lam, quantile))
    if not np.isfinite(lam_q) or lam_q <= 0:
        return float("inf")
    return 1.0 / math.sqrt(lam_q)


def time_nodes(schedule: Schedule, n_steps: int, floor: float) -> np.ndarray:
    """Time nodes t_0 = T > t_1 > ... > t_n = t_min, uniform in a warped time psi(t).

    psi = 0.8 rho_hat + 0.2 t_hat, where rho(t) = log(sigma^2/alpha^2 + floor) (a log
    noise-to-signal ratio floored at ``floor``), rho_hat and t_hat are rho and t rescaled to
    [0, 1]. Since d rho/dt = g^2 / (sigma^2 + floor alpha^2), the steps are short where the
    diffusion g^2 is fast relative to the current spread of the marginals (near t_min for VP
    schedules, where the score sharpens; near T for COSINE where g^2 blows up) and about
    uniform in t elsewhere. The mapping is fixed for a given schedule, so refining n_steps
    nests the grids (needed for Richardson extrapolation).
    """
    tf = np.linspace(schedule.t_min, schedule.T, 20001)
    a2 = np.exp(2.0 * np.asarray(schedule.log_alpha(tf), dtype=np.float64))
    s2 = np.asarray(schedule.sigma2(tf), dtype=np.float64)
    rho = np.log(s2 / a2 + floor)
    # enforce monotonicity (sigma^2/alpha^2 is nondecreasing for g^2 >= 0)
    rho = np.maximum.accumulate(rho)
    rh = (rho - rho[0]) / max(rho[-1] - rho[0], 1e-300)
    th = (tf - tf[0]) / (tf[-1] - tf[0])
    psi = 0.8 * rh + 0.2 * th
    target = np.linspace(1.0, 0.0, n_steps + 1)
    t = np.interp(target, psi, tf)
    t[0], t[-1] = schedule.T, schedule.t_min
    if np.any(np.diff(t) >= 0):
        raise RuntimeError("internal error: time nodes not strictly decreasing")
    return t



def resolve_box(box: object, d: int, schedule: Schedule, x: np.ndarray | None) -> np.ndarray:
    """The box as a (d, 2) array of (lo, hi) rows from a half-width L ([-L, L]^d), a (lo, hi)
    pair or a (d, 2) array; None gives L = max(6 prior_std, 1.2 max|x|)."""
    if box is None:
        L = 6.0 * schedule.prior_std
        if x is not None:
            L = max(L, 1.2 * float(np.abs(x).max()))
        return np.array([[-L, L]] * d, dtype=float)
    arr = np.asarray(box, dtype=float)
    if arr.ndim == 0:
        if not arr > 0:
            raise HbarInputError(f"box half-width must be > 0, got {box}")
        return np.array([[-float(arr), float(arr)]] * d)
    if arr.shape == (2,):
        arr = np.tile(arr, (d, 1))
    if arr.shape != (d, 2) or not np.all(np.isfinite(arr)) or np.any(arr[:, 1] <= arr[:, 0]):
        raise HbarInputError(f"box must be a half-width, (lo, hi) or (d, 2) with lo < hi; got {box}")
    return arr


