"""Tests of the Fokker-Planck building blocks (docs/theory.md section 8): Scharfetter-Gummel
fluxes, point evaluation of log q on the grid, the step matrices, the face drift of the
HProcess and the sparse linear solver (LU reused as GMRES preconditioner).
"""

import jax.numpy as jnp
import numpy as np
import pytest

from hbar.gaussian import isotropic_logpdf
from hbar.process import HProcess
from hbar.references.fokker_planck.grid import Grid
from hbar.references.fokker_planck.operator import (
    bernoulli,
    make_face_drift,
    sg_coefficients,
    step_matrix_1d,
    step_matrix_2d,
)
from hbar.references.fokker_planck.stepper import LinearSolver, bdf2_coefficients
from hbar.schedules import OUSchedule
from hbar.scores import GaussianMixtureScore


def test_scharfetter_gummel_flux_properties():
    v = np.array([-50.0, -3.0, -1e-9, 0.0, 1e-9, 0.7, 3.0, 800.0])
    a, b = sg_coefficients(v, D=0.25, dx=0.1)
    assert np.all(a >= 0) and np.all(b >= 0)
    np.testing.assert_allclose(a - b, v, rtol=1e-12, atol=1e-12)  # consistency with advection
    # small Peclet: central flux D/dx + -v/2
    np.testing.assert_allclose(a[3], 0.25 / 0.1)
    # large Peclet: upwind
    assert a[-1] == pytest.approx(800.0) and b[-1] < 1e-100
    au, bu = sg_coefficients(v, D=0.0, dx=0.1)
    np.testing.assert_allclose(au, np.maximum(v, 0))
    np.testing.assert_allclose(bu, np.maximum(-v, 0))
    z = np.array([-800.0, -1.0, 0.0, 1e-8, 1.0, 800.0])
    np.testing.assert_allclose(bernoulli(z)[[1, 4]], [-1.0 / np.expm1(-1.0), 1.0 / np.expm1(1.0)], rtol=1e-14)
    assert np.all(np.isfinite(bernoulli(z)))


@pytest.mark.parametrize("d", [1, 2])
def test_point_evaluation_of_log_density(d):
    # exact Gaussian cell averages: quadratic evaluation with the cell-average correction is
    # far more accurate than linear interpolation, and converges faster than O(dx^2)
    from scipy.special import ndtr

    s = 0.4
    rng = np.random.default_rng(0)
    x = rng.normal(scale=s, size=(50, d))
    errs = {"quadratic": [], "linear": []}
    for n in (40, 80):
        g = Grid(np.full(d, -3.0), np.full(d, 3.0), (n,) * d)
        m1 = (ndtr(g.edges[0][1:] / s) - ndtr(g.edges[0][:-1] / s)) / g.dx[0]
        q = m1 if d == 1 else np.outer(m1, m1).ravel()
        exact = np.asarray(isotropic_logpdf(x, s**2))
        for method in errs:
            val, ok = g.eval_logq(q, x, method)
            assert ok.all()
            errs[method].append(np.max(np.abs(val - exact)))
    assert errs["quadratic"][1] < 0.1 * errs["linear"][1]
    assert errs["quadratic"][0] / errs["quadratic"][1] > 6.0
    assert errs["linear"][0] / errs["linear"][1] == pytest.approx(4.0, rel=0.3)



def _dense_operator_2d(grid, coef):
    """L (size, size) of the 2-D finite-volume operator built face by face (test only)."""
    n0, n1 = grid.n
    (ax, bx), (ay, by) = coef
    ax, bx = ax.reshape(n0 - 1, n1), bx.reshape(n0 - 1, n1)
    ay, by = ay.reshape(n0, n1 - 1), by.reshape(n0, n1 - 1)
    idx = np.arange(grid.size).reshape(n0, n1)
    L = np.zeros((grid.size, grid.size))
    for (a, b, lower, upper) in ((ax, bx, idx[:-1, :], idx[1:, :]), (ay, by, idx[:, :-1], idx[:, 1:])):
        for aa, bb, i, j in zip(a.ravel(), b.ravel(), lower.ravel(), upper.ravel()):
            flux = np.zeros(grid.size)  # J = a q_i - b q_j from cell i into cell j
            flux[i], flux[j] = aa, -bb
            L[i] -= flux
            L[j] += flux
    return L


def test_step_matrices_conserve_mass_and_match_dense_assembly():
    rng = np.random.default_rng(0)
    c0, dt = 1.5, 0.1
    a1, b1 = rng.uniform(0.1, 2.0, size=(2, 7))
    ab = step_matrix_1d(c0, dt, a1, b1)
    M1 = np.diag(ab[1]) + np.diag(ab[0, 1:], 1) + np.diag(ab[2, :-1], -1)
    np.testing.assert_allclose(M1.sum(axis=0), c0, rtol=1e-14)  # zero-flux walls: columns sum to c0
    assert np.all(M1 - np.diag(np.diag(M1)) <= 0)  # M-matrix sign pattern
    g = Grid(np.array([-1.0, -2.0]), np.array([1.0, 2.0]), (5, 4))
    coef = [tuple(rng.uniform(0.1, 2.0, size=(2, n))) for n in g.n_faces]
    M2 = step_matrix_2d(g, c0, dt, coef).toarray()
    np.testing.assert_allclose(M2, c0 * np.eye(g.size) - dt * _dense_operator_2d(g, coef), rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(M2.sum(axis=0), c0, rtol=1e-14)


def test_bdf2_coefficients_exact_for_quadratics():
    # c0 q(t_{n+1}) - c1 q(t_n) + c2 q(t_{n-1}) = dt dq/dtau(t_{n+1}) for q quadratic (variable steps)
    q = lambda s: 0.3 - 1.2 * s + 0.7 * s**2  # noqa: E731
    dq = lambda s: -1.2 + 1.4 * s  # noqa: E731
    for dt_prev, dt in [(0.3, 0.3), (0.2, 0.35), (0.5, 0.1)]:
        c0, c1, c2 = bdf2_coefficients(dt, dt_prev)
        s0, s1, s2 = 0.0, dt_prev, dt_prev + dt
        assert c0 * q(s2) - c1 * q(s1) + c2 * q(s0) == pytest.approx(dt * dq(s2), rel=1e-12)
    assert bdf2_coefficients(0.1, None) == (1.0, 1.0, 0.0)


def test_face_drift_is_the_hprocess_drift():
    sch = OUSchedule(beta=1.3, t_min=1e-3, T=5.0)
    score = GaussianMixtureScore([0.4, 0.6], [[-1.0, 0.5], [1.2, 0.0]], [0.3, 0.5], sch)
    g = Grid(np.array([-3.0, -3.0]), np.array([3.0, 3.0]), (6, 5))
    pts = jnp.asarray(g.all_face_pts)
    hs = np.array([0.0, 0.5, 2.0])
    u, diff2 = make_face_drift(score, sch)(pts, 0.7, hs)
    assert u.shape == (3, g.all_face_pts.shape[0], 2) and diff2.shape == (3,)
    proc = HProcess(sch, score)
    for i, h in enumerate(hs):
        np.testing.assert_allclose(u[i], np.asarray(proc.drift(pts, 0.7, h)), rtol=1e-13, atol=1e-13)
        assert diff2[i] == pytest.approx(h * float(sch.g2(0.7)), rel=1e-14)


def _matrix_sequence(n=20, steps=12, seed=0, scale=100.0):
    """A slowly changing sequence of 2-D step matrices c0 I - dt L, as in a BDF2 run (flux
    coefficients of size ``scale``, so that dt L dominates c0 I)."""
    rng = np.random.default_rng(seed)
    g = Grid(np.array([-1.0, -1.0]), np.array([1.0, 1.0]), (n, n))
    base = [scale * rng.uniform(0.5, 1.5, size=(2, m)) for m in g.n_faces]
    return g, [step_matrix_2d(g, 1.5, 0.05, [tuple(c * (1.0 + 0.02 * k)) for c in base]) for k in range(steps)]


def test_linear_solver_reuse_matches_direct_and_saves_factorisations():
    g, mats = _matrix_sequence()
    direct, reuse = LinearSolver("splu"), LinearSolver("reuse")
    x_d = x_r = np.random.default_rng(1).uniform(0.5, 1.0, size=g.size)
    for M in mats:
        rhs_d, rhs_r = 1.1 * x_d, 1.1 * x_r
        x_d = direct.solve(M, rhs_d, x_d)
        x_r = reuse.solve(M, rhs_r, x_r)
        assert np.linalg.norm(M @ x_r - rhs_r) <= 1e-12 * np.linalg.norm(rhs_r)  # true residual
        np.testing.assert_allclose(x_r, x_d, rtol=1e-9)
    assert direct.n_factor == len(mats) and direct.n_iter == 0
    assert reuse.n_factor < len(mats) // 2 and reuse.n_iter > 0  # GMRES did the work


def test_linear_solver_falls_back_to_direct_when_gmres_stalls():
    g, mats = _matrix_sequence(steps=1)
    _, far = _matrix_sequence(steps=1, seed=5, scale=1e4)  # the old LU is a poor preconditioner here
    sv = LinearSolver("reuse", max_iter=2)
    rhs = np.ones(g.size)
    sv.solve(mats[0], rhs, rhs)
    x = sv.solve(far[0], rhs, rhs)
    assert sv.n_factor == 2 and sv.n_iter == 2  # GMRES gave up after max_iter, a fresh LU solved it
    assert np.linalg.norm(far[0] @ x - rhs) <= 1e-12 * np.linalg.norm(rhs)
    assert np.all(sv.solve(mats[0], np.zeros(g.size), rhs) == 0.0) and sv.n_factor == 2
