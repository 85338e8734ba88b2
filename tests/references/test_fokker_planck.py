"""Tests of the Fokker-Planck brute force (hbar.references.fokker_planck, docs/theory.md section 8)
end to end: against the Gaussian oracle for affine scores, against exact mixture densities,
and its input errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hbar.references import fokker_planck_density, fokker_planck_nll, gaussian_oracle
from hbar.schedules import CosineSchedule, OUSchedule, SimpleSchedule
from hbar.scores import AffineScore, GaussianMixtureScore
from hbar.validation import HbarInputError


@pytest.mark.parametrize(
    "eps, sch",
    [(0.0, OUSchedule(beta=1.0, t_min=1e-3, T=10.0)), (0.2, OUSchedule(beta=1.0, t_min=1e-3, T=10.0)),
     (0.2, CosineSchedule())],
)
def test_fp_1d_gaussian_matches_oracle(eps, sch):
    m0, S0 = [0.3], [[0.5]]
    rng = np.random.default_rng(0)
    x = 0.3 + np.sqrt(0.5) * rng.normal(size=(300, 1))
    score = AffineScore(m0, S0, sch, scale_eps=eps)
    hs = [0.5, 1.0, 2.0]
    tol = 1e-4
    oracle = gaussian_oracle(score, sch, m0, S0, hs, x=x)
    ref = oracle.nll_points.mean(axis=1)
    fp = fokker_planck_nll(score, sch, x, hs, tol=tol)
    assert fp.converged.all() and not fp.flags, fp.report()
    assert np.all(np.abs(fp.nll - ref) <= tol), fp.report()
    assert np.all(np.abs(fp.nll - ref) <= 3 * fp.error + 1e-6), fp.report()  # honest error estimate
    assert np.max(np.abs(fp.nll_points - oracle.nll_points)) < 1e-3
    assert len(fp.levels) >= 3 and np.all(np.isfinite(fp.observed_order))
    assert "cells=" in fp.report()
    if eps:
        assert ref[0] - ref[2] > 100 * tol  # NLL depends on h for the wrong score ...
        np.testing.assert_allclose(fp.nll[0] - fp.nll[2], ref[0] - ref[2], atol=2 * tol)  # ... FP sees it


def test_fp_2d_gaussian_nondiagonal_matches_oracle():
    sch = OUSchedule(beta=1.0, t_min=1e-3, T=8.0)
    m0 = np.array([0.3, -0.2])
    S0 = np.array([[0.6, 0.3], [0.3, 0.5]])
    rng = np.random.default_rng(0)
    x = rng.multivariate_normal(m0, S0, size=200)
    score = AffineScore(m0, S0, sch, scale_eps=0.2)
    hs = [0.5, 1.0, 2.0]
    tol = 1e-3
    ref = gaussian_oracle(score, sch, m0, S0, hs, x=x).nll_points.mean(axis=1)
    fp = fokker_planck_nll(score, sch, x, hs, tol=tol, grid=36, n_steps=18, max_levels=3, box=4.5,
                           boundary_tol=1e-5)
    assert fp.converged.all() and not fp.flags, fp.report()
    assert np.all(np.abs(fp.nll - ref) <= tol), fp.report()
    assert np.all(np.abs(fp.nll - ref) <= 3 * fp.error + 1e-6), fp.report()
    assert ref[0] - ref[2] > 50 * tol
    assert all(lv.mass_error[i] < 1e-10 for lv in fp.levels for i in range(3) if np.isfinite(lv.nll[i]))


def test_fp_failed_coarse_level_is_skipped_and_reported():
    # 16 cells / 4 BDF2 steps: the tails undershoot below zero next to data points
    sch = OUSchedule(beta=1.0, t_min=1e-3, T=8.0)
    m0, S0 = np.array([0.3, -0.2]), np.array([[0.6, 0.3], [0.3, 0.5]])
    x = np.random.default_rng(0).multivariate_normal(m0, S0, size=200)
    score = AffineScore(m0, S0, sch, scale_eps=0.2)
    with pytest.warns(RuntimeWarning, match="failed"):
        fp = fokker_planck_nll(score, sch, x, 0.5, grid=16, n_steps=4, levels=2, box=4.5)
    assert fp.levels[0].failed[0] and np.isnan(fp.levels[0].nll[0])
    assert np.isfinite(fp.levels[1].nll[0]) and np.isnan(fp.levels[1].richardson[0])
    assert not fp.converged[0] and "FAILED" in fp.report()


def test_fp_1d_mixture_exact_score_flat_in_h():
    sch = OUSchedule(beta=1.0, t_min=1e-3, T=20.0)  # prior mismatch ~ e^-20
    score = GaussianMixtureScore([0.4, 0.6], [[-1.0], [1.2]], [0.3, 0.5], sch)
    x = np.asarray(score.sample_data(jax.random.PRNGKey(0), 300))
    exact = -np.asarray(score.log_density(jnp.asarray(x), sch.t_min))
    tol = 1e-4
    fp = fokker_planck_nll(score, sch, x, [0.25, 0.5, 1.0, 2.0], tol=tol)
    assert fp.converged.all() and not fp.flags, fp.report()
    np.testing.assert_allclose(fp.nll, exact.mean(), atol=tol)
    assert np.ptp(fp.nll) < tol
    assert np.max(np.abs(fp.nll_points - exact[None])) < 2e-3
    assert fp.stderr[0] == pytest.approx(exact.std(ddof=1) / np.sqrt(300), rel=1e-2)


def test_fp_h0_upwind_is_opt_in_and_flagged():
    sch = OUSchedule(beta=1.0, t_min=1e-3, T=20.0)
    score = GaussianMixtureScore([0.4, 0.6], [[-1.0], [1.2]], [0.3, 0.5], sch)
    x = np.asarray(score.sample_data(jax.random.PRNGKey(1), 100))
    with pytest.raises(HbarInputError, match="h = 0"):
        fokker_planck_nll(score, sch, x, [0.0, 1.0])
    exact = -np.asarray(score.log_density(jnp.asarray(x), sch.t_min)).mean()
    with pytest.warns(RuntimeWarning, match="upwind"):
        fp = fokker_planck_nll(score, sch, x, 0.0, tol=2e-3, allow_upwind_h0=True, grid=80)
    assert fp.nll[0] == pytest.approx(exact, abs=2e-3)
    assert np.isinf(fp.levels[0].max_peclet[0])


def test_fp_density_matches_oracle_gaussian():
    sch = OUSchedule(beta=1.0, t_min=1e-3, T=10.0)
    score = AffineScore([0.3], [[0.5]], sch, scale_eps=0.2)
    hs = [0.5, 2.0]
    dens = fokker_planck_density(score, sch, hs, d=1, grid=300, n_steps=300)
    orc = gaussian_oracle(score, sch, [0.3], [[0.5]], hs)
    xc = dens.centres[0]
    assert dens.density.shape == (2, 300)
    for i in range(2):
        m, v = orc.mean[i, 0], orc.cov[i, 0, 0]
        exact = np.exp(-0.5 * (xc - m) ** 2 / v) / np.sqrt(2 * np.pi * v)
        assert np.max(np.abs(dens.density[i] - exact)) < 2e-3 * exact.max()
        assert dens.mass[i] == pytest.approx(1.0, abs=1e-8)
    d2 = fokker_planck_density(AffineScore([0.0, 0.0], np.eye(2) * 0.5, sch), sch, 1.0, d=2, grid=24, n_steps=12)
    assert d2.density.shape == (1, 24, 24)


def test_fp_input_errors():
    sch = OUSchedule(beta=1.0, t_min=1e-3, T=5.0)
    s1 = AffineScore([0.0], [[0.5]], sch)
    x1 = np.array([[0.1], [-0.3]])
    with pytest.raises(HbarInputError, match=">= 0"):
        fokker_planck_nll(s1, sch, x1, [-0.5])
    with pytest.raises(HbarInputError, match="outside the box"):
        fokker_planck_nll(s1, sch, np.array([[0.0], [7.0]]), 1.0, box=6.0)
    with pytest.raises(HbarInputError, match="d = 1 and d = 2"):
        fokker_planck_nll(AffineScore(np.zeros(3), np.eye(3), sch), sch, np.zeros((2, 3)), 1.0)
    with pytest.raises(HbarInputError, match="d = 1 and d = 2"):
        fokker_planck_density(s1, sch, 1.0, d=3)
    with pytest.raises(HbarInputError, match="shape"):
        fokker_planck_nll(s1, sch, np.zeros((2, 2)), 1.0)  # 1-D score, 2-D points
    with pytest.raises(HbarInputError):
        fokker_planck_nll(s1, sch, np.array([[np.nan]]), 1.0)
    with pytest.raises(HbarInputError):
        fokker_planck_nll(s1, sch, x1, 1.0, tol=0.0)
    with pytest.raises(HbarInputError):
        fokker_planck_nll(s1, sch, x1, 1.0, box=[[1.0, -1.0]])


@pytest.mark.slow
def test_fp_2d_mixture_exact_score_auto_grid():
    # default (automatic) grid choice in 2-D; about a minute
    sch = SimpleSchedule()
    score = GaussianMixtureScore([0.5, 0.5], [[-1.0, 0.5], [1.0, -0.5]], [0.35, 0.5], sch)
    x = np.asarray(score.sample_data(jax.random.PRNGKey(0), 300))
    exact = -np.asarray(score.log_density(jnp.asarray(x), sch.t_min)).mean()
    fp = fokker_planck_nll(score, sch, x, [0.5, 1.0], tol=1e-3, warn=False)
    assert fp.converged.all(), fp.report()
    # SIMPLE has a prior mismatch alpha(1) = e^-5: allow 1e-4 on top of tol
    np.testing.assert_allclose(fp.nll, exact, atol=1e-3 + 1e-4)


@pytest.mark.slow
def test_fp_1d_small_h_against_exact_density():
    sch = OUSchedule(beta=1.0, t_min=1e-3, T=20.0)
    score = GaussianMixtureScore([0.4, 0.6], [[-1.0], [1.2]], [0.3, 0.5], sch)
    x = np.asarray(score.sample_data(jax.random.PRNGKey(0), 300))
    exact = -np.asarray(score.log_density(jnp.asarray(x), sch.t_min)).mean()
    fp = fokker_planck_nll(score, sch, x, [0.01, 0.05], tol=1e-4, max_levels=6)
    assert fp.converged.all(), fp.report()
    np.testing.assert_allclose(fp.nll, exact, atol=1e-4)


def test_fp_nan_score_is_a_clear_error():
    """A score that is NaN somewhere in the box: a clear error naming the non-finite drift
    velocity, not scipy's 'Factor is exactly singular' from the linear solve."""
    sch = OUSchedule(beta=1.0, t_min=1e-3, T=5.0)
    s1 = AffineScore([0.0], [[0.5]], sch)
    bad = lambda x, t: jnp.where((x > 2.0) & (t < 1.0), jnp.nan, s1(x, t))
    with pytest.raises(HbarInputError, match="non-finite.*velocity|velocity.*non-finite"):
        fokker_planck_nll(bad, sch, np.array([[0.1], [-0.3]]), 1.0)
